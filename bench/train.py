"""Training benchmark: sftflow's train task against the plain TRL recipe (../shared/bench/trl_anchor.py), same run.

Usage: .venv/bin/python bench/train.py [--rows 200] [--anchor-steps 8] [--format-rows 100000]

Both sides train QLoRA (4-bit NF4 base, LoRA r=16 on all linear layers) on the converted SmolLM2-135M-Instruct, on
the first --rows GSM8K conversations of ../shared/data/gsm8k_train.jsonl, on the same CPU, one after the other, each
in its own process (so each peak RSS is its own):

1. the anchor: `trl_anchor.py MODEL DATA ROWS STEPS padded qlora` (TRL's SFTTrainer with its defaults, batch 8);
2. sftflow: the same rows through the pipeline's own ingest, clean and format steps (run as plain functions), then
   the trainer the train task builds (tasks.train.trainer.build_trainer) with configs/default.yaml's train section and
   `train.max_steps` set so it sees as many supervised tokens as the anchor did.

Each side counts the supervised tokens (labels != -100) its trainer was given and times `trainer.train()` alone.
Then the format step's speed is measured on --format-rows GSM8K-sized conversations (bench/format.py): the whole
format task (clean DuckDB in, both splits' Parquet out), `format_rows_per_s`, and its encode step alone.
The last line printed is one JSON object:
{"throughput_ratio", "rss_ratio", "sftflow_final_loss", "anchor_final_loss", "format_rows_per_s", "cpu", …}
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = ROOT.parent / "shared"
ANCHOR = SHARED / "bench" / "trl_anchor.py"
GSM8K = SHARED / "data" / "gsm8k_train.jsonl"


def base_model_dir() -> str:
    """Return the converted default base model's directory (converting the packaged GGUF once if needed)."""
    from tasks.core.config import DEFAULT_BASE_MODEL
    from tasks.model.base_model import resolve_base_model

    return resolve_base_model(DEFAULT_BASE_MODEL)


def last_json_line(text: str) -> dict:
    """Return the last line of `text` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError(f"no JSON line in output:\n{text[-2000:]}")


def run_side(cmd: list[str], label: str) -> dict:
    """Run one side in its own process, echo its stderr tail on failure, and return its JSON result."""
    print(f"[{label}] {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = last_json_line(proc.stdout)
    print(f"[{label}] done in {time.perf_counter() - start:.0f} s: {json.dumps(result)}", flush=True)
    return result


def write_config(work: Path, rows: int) -> Path:
    """Write the first `rows` GSM8K records and a pipeline config that reads them as prompt-completion pairs."""
    import yaml

    data = work / "gsm8k.jsonl"
    with GSM8K.open(encoding="utf-8") as src:
        data.write_text("".join(line for _, line in zip(range(rows), src)), encoding="utf-8")
    config = {"runs_dir": str(work / "runs"),
              "data": {"sources": [{"path": str(data), "format": "prompt_completion",
                                    "columns": {"prompt": "question", "completion": "answer"}}]},
              "clean": {"heldout_fraction": 0.05}, "validate": {"min_rows": 1}, "chat": {"max_length": 512},
              # the default train section, less the periodic held-out loss the anchor does not compute
              "train": {**yaml.safe_load((ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"))["train"],
                        "eval_steps": None}}
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def sftflow_side(rows: int, target_supervised: int) -> dict:
    """Format the rows with the pipeline's steps, train with the train task's trainer; return the measurements."""
    from flows.single_task import step_call
    from tasks.core.config import RunPaths, load_config
    from tasks.train.trainer import build_trainer

    work = Path(tempfile.mkdtemp(prefix="sftflow-bench-train-"))
    cfg = load_config(write_config(work, rows))
    run = RunPaths(cfg.runs_dir, "bench")
    run.root.mkdir(parents=True)
    model_dir = base_model_dir()
    for step in ("ingest", "clean", "format"):
        task, args = step_call(step, cfg, run)
        task.fn(*args)
    trainer = build_trainer(run.formatted, model_dir, run.train, cfg.train)
    # steps for the anchor's supervised-token budget, from what one optimizer step of this trainer holds
    sup_per_row = supervised_tokens(trainer.train_dataset) / len(trainer.train_dataset)
    per_step = sup_per_row * cfg.train.batch_size * cfg.train.gradient_accumulation_steps
    trainer.args.max_steps = max(1, math.ceil(target_supervised / per_step))
    seen = count_supervised(trainer)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"steps": trainer.args.max_steps, "wall_s": round(wall, 2), "supervised_tokens": seen["sup"],
            "input_tokens": seen["tot"], "sup_tok_per_s": round(seen["sup"] / wall, 1),
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "packing": cfg.train.packing, "lean_loss": cfg.train.lean_loss,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def supervised_tokens(rows) -> int:
    """Return the supervised tokens of the trainer's (possibly packed) training rows: a 0/1 mask column, or labels."""
    names = rows.column_names
    if "labels" in names:
        return sum(sum(1 for t in labels if t != -100) for labels in rows["labels"])
    column = next(c for c in ("assistant_masks", "completion_mask") if c in names)
    return sum(sum(mask) for mask in rows[column])


def count_supervised(trainer) -> dict:
    """Wrap compute_loss to count the supervised (labels != -100) and input tokens of every batch, as the anchor."""
    seen = {"sup": 0, "tot": 0}
    original = trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        seen["sup"] += int((inputs["labels"] != -100).sum())
        seen["tot"] += int(inputs["input_ids"].numel())
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    return seen


def load_bench_module(name: str):
    """Return bench/<name>.py as a module (bench/ is scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="GSM8K rows both sides train on")
    parser.add_argument("--anchor-steps", type=int, default=8, help="the anchor's optimizer steps (batch 8)")
    parser.add_argument("--format-rows", type=int, default=100_000, help="conversations for the format speed")
    parser.add_argument("--anchor-json", type=Path, help="reuse the anchor's JSON line from an earlier run on this "
                        "machine instead of running it (~15 min); say so wherever the figures are quoted")
    parser.add_argument("--side", choices=("sftflow",), help=argparse.SUPPRESS)
    parser.add_argument("--target-supervised", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "sftflow":
        print(json.dumps(sftflow_side(args.rows, args.target_supervised)))
        return

    from tasks.model.precision import cpu_summary

    model_dir = base_model_dir()
    if args.anchor_json:
        anchor = last_json_line(args.anchor_json.read_text(encoding="utf-8"))
        print(f"[anchor] reused from {args.anchor_json}: {json.dumps(anchor)}")
    else:
        anchor = run_side([sys.executable, str(ANCHOR), model_dir, str(GSM8K), str(args.rows),
                           str(args.anchor_steps), "padded", "qlora"], "anchor")
    ours = run_side([sys.executable, __file__, "--side", "sftflow", "--rows", str(args.rows),
                     "--target-supervised", str(anchor["supervised_tokens"])], "sftflow")
    format_bench = load_bench_module("format")
    fmt = format_bench.format_rows_per_s(args.format_rows, paths=("fast",))
    fmt["task"] = format_bench.format_task_rows_per_s(args.format_rows)
    result = {"throughput_ratio": round(ours["sup_tok_per_s"] / anchor["sup_tok_per_s"], 2),
              "rss_ratio": round(ours["peak_rss_mb"] / anchor["peak_rss_mb"], 2),
              "sftflow_final_loss": ours["last_loss"], "anchor_final_loss": anchor["last_loss"],
              "format_rows_per_s": fmt["task"]["rows_per_s"], "format_encode_rows_per_s": fmt["fast"]["rows_per_s"],
              "cpu": cpu_summary(),
              "sftflow": ours, "anchor": anchor, "format": fmt}
    print(f"{'':10}{'sup tok/s':>12}{'peak RSS MB':>14}{'final loss':>12}{'sup tokens':>12}{'wall s':>9}")
    for name, side in (("sftflow", ours), ("anchor", anchor)):
        print(f"{name:10}{side['sup_tok_per_s']:>12}{side['peak_rss_mb']:>14}{side['last_loss'] or 0:>12.4f}"
              f"{side['supervised_tokens']:>12}{side['wall_s']:>9}")
    for line in format_bench.summary_lines(fmt):
        print(line)
    print(f"throughput {result['throughput_ratio']}x the anchor (goal >= 2), peak RSS {result['rss_ratio']}x "
          f"(goal <= 0.5), format task {result['format_rows_per_s']} rows/s (goal >= 10,000); CPU: {result['cpu']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
