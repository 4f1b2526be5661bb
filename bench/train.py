"""Training benchmark: sftflow's train task against the plain TRL recipe (../shared/bench/trl_anchor.py) in each of
its settings, in one run, on equal work; speed, memory, utilisation and held-out loss.

Usage: .venv/bin/python bench/train.py [--rows 200] [--heldout 64] [--padded-steps 10] [--packed-steps 4]
                                       [--settings padded-gc,padded-nogc,packed-gc,packed-nogc] [--no-quality]

Work, the same on every side: QLoRA (4-bit NF4 base, double quantisation, LoRA r=16 alpha 32 on all linear layers)
of the converted SmolLM2-135M-Instruct, compute dtype `auto` (bf16 where the CPU has it natively, else fp32, the same
on both sides: the anchor is given the dtype sftflow's `auto` resolves to), max length 512, on the first --rows GSM8K
train rows (../shared/data/gsm8k_train.jsonl) as user question -> assistant answer. Every side runs in its own
process, one after the other (each peak RSS is its own):

1. the anchor in each setting of --settings (`padded|packed` x `gc|nogc`: gradient checkpointing, TRL's default, on
   or off), batch 8, lr 2e-4, run unchanged through bench/anchor_probe.py (which only times its steps, counts its
   tokens and saves its adapter). Padded settings run --padded-steps steps; packed ones (8 packed rows of 512 tokens
   per step, ~2.3x the tokens of a padded step) --packed-steps, so every setting sees about the same supervised
   tokens (printed);
2. sftflow: the same rows through the pipeline's own ingest, clean (near-duplicate dropping off, so no row is lost)
   and format steps (`chat.too_long: truncate`, as the anchor truncates), then the train task's trainer
   (tasks.train.trainer.build_trainer with the train task's callbacks) from configs/default.yaml's train section
   (packed 1 x 512, padding-free, lean loss, no gradient checkpointing on a CPU, lr 1e-3), with as many steps as
   it takes to see the padded anchor's supervised tokens.

Every side runs in sftflow's environment (tasks/core/settings.py apply_defaults: OpenMP threads sleep while they
wait, which matters on a shared machine), inherited alike. Speed: each side's steps after the first (warm-up) are
split into 3 windows of consecutive steps, each window's supervised tokens/s is one repeat; the median and the
spread (min-max) are printed, and the ratio to the fastest anchor setting (by median) is the headline. MFU
(tasks/train/utilisation.py): the model FLOPs of the real (not padding) tokens per second over this CPU's peak for
the dtype in use, for both sides. Peak RSS: the process's maximum.

Quality (unless --no-quality): the held-out loss (tasks.evaluate.evaluate.supervised_loss, mean cross-entropy over
the answer tokens of the first --heldout GSM8K *test* rows, formatted by sftflow) of every trained adapter, each
loaded the same way (tasks.model.modeling.load_trained_model), after the same supervised tokens, at the same learning
rate: at the anchor's 2e-4 (sftflow run again at 2e-4) and at sftflow's 1e-3 (the fastest padded anchor setting run
again with only its learning rate changed), and the base model's for reference.
The last line printed is one JSON object: {"throughput_ratio", "rss_ratio", "fastest_anchor", "ratios", "mfu",
"heldout_loss", "cpu", "load_avg", "sftflow", "anchors", ...}. About 30 minutes on 2 idle cores with native bf16.

An AVX2-only CPU, reproduced on a newer one: `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 make bench-train`
keeps torch's kernels (oneDNN's and ATen's) to AVX2, so `auto` takes fp32 on both sides and the MFU is taken against
the fp32 peak; the "cpu" field names the limit. bitsandbytes' own CPU kernels, the clock and the caches stay the
newer CPU's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
SHARED = ROOT.parent / "shared"
GSM8K_TRAIN = SHARED / "data" / "gsm8k_train.jsonl"
GSM8K_TEST = SHARED / "data" / "gsm8k_test.jsonl"
ANCHOR_LR, GOAL_SPEED, GOAL_RSS = 2e-4, 3.0, 0.5


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
    """Run one side in its own process and return its JSON result (its stderr tail on failure)."""
    print(f"[{label}] load {os.getloadavg()[0]:.2f}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
        sys.exit(f"{label} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = last_json_line(proc.stdout)
    print(f"[{label}] done in {time.perf_counter() - start:.0f} s", flush=True)
    return result


def write_config(work: Path, rows: int, heldout: int) -> Path:
    """Write the first `rows` GSM8K train and `heldout` test records, and a pipeline config pinning them to the
    train and held-out sides (the default train section, less its periodic held-out loss)."""
    import yaml

    sources = []
    for name, path, n, split in (("train", GSM8K_TRAIN, rows, "train"), ("test", GSM8K_TEST, heldout, "heldout")):
        data = work / f"gsm8k_{name}.jsonl"
        with path.open(encoding="utf-8") as src:
            data.write_text("".join(line for _, line in zip(range(n), src)), encoding="utf-8")
        sources.append({"path": str(data), "format": "alpaca", "split": split,
                        "columns": {"instruction": "question", "output": "answer"}})
    config = {"runs_dir": str(work / "runs"), "data": {"sources": sources},
              "clean": {"drop_near_duplicates": False}, "validate": {"min_rows": 1},
              "chat": {"max_length": 512, "too_long": "truncate"},
              "train": {**yaml.safe_load((ROOT / "configs" / "default.yaml").read_text(encoding="utf-8"))["train"],
                        "eval_steps": None}}
    path = work / "bench.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def prepare(work: Path, rows: int, heldout: int) -> Path:
    """Ingest, clean and format the rows with the pipeline's own steps (plain functions); return the config."""
    from flows.steps import STEPS, RunContext
    from tasks.core.config import RunPaths, load_config

    config = write_config(work, rows, heldout)
    cfg = load_config(config)
    context = RunContext(cfg, RunPaths(cfg.runs_dir, "bench"))
    for name in ("prepare-base-model", "ingest", "clean", "format"):
        context.hand_over(name, STEPS[name].task.fn(*STEPS[name].args(context)))
    return config


def sftflow_side(config: Path, target_supervised: int, lr: float, out: Path) -> dict:
    """Train with the train task's trainer on the formatted rows for about `target_supervised` supervised tokens;
    return the measurements (the adapter saved to out/adapter)."""
    from anchor_probe import Counter, step_clock

    from tasks.core.config import RunPaths, load_config
    from tasks.model.modeling import model_precision
    from tasks.train.trainer import build_trainer, training_callbacks
    from tasks.train.utilisation import model_parameters

    cfg = load_config(config, [f"train.learning_rate={lr}"])
    formatted = RunPaths(cfg.runs_dir, "bench").formatted
    counter = Counter()
    clock = step_clock(counter)
    trainer = build_trainer(formatted, base_model_dir(), out, cfg.train, [*training_callbacks(out, cfg.train), clock])
    per_step = supervised_tokens(trainer.train_dataset) / len(trainer.train_dataset) * cfg.train.batch_size \
        * cfg.train.gradient_accumulation_steps
    trainer.args.max_steps = max(4, math.ceil(target_supervised / per_step))
    original = trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        if model.training:
            counter.add(inputs)
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    params, trainable = model_parameters(trainer.model)
    trainer.model.save_pretrained(str(out / "adapter"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"mode": "packed 1x512 padding-free, lean loss", "gradient_checkpointing": False,
            "compute_dtype": model_precision(cfg.train.compute_dtype).name, "learning_rate": lr,
            "steps": trainer.args.max_steps, "wall_s": round(wall, 2), "supervised_tokens": counter.sup,
            "input_tokens": counter.processed, "real_tokens": counter.real,
            "sup_tok_per_s": round(counter.sup / wall, 1), "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "peak_rss_mb": peak_rss_mb, "params": params,
            "trainable_params": trainable, "steps_log": clock.log, "adapter": str(out / "adapter")}


def supervised_tokens(rows) -> int:
    """Return the supervised tokens of the trainer's (possibly packed) training rows: a 0/1 mask column, or labels."""
    names = rows.column_names
    if "labels" in names:
        return sum(sum(1 for t in labels if t != -100) for labels in rows["labels"])
    column = next(c for c in ("assistant_masks", "completion_mask") if c in names)
    return sum(sum(mask) for mask in rows[column])


def score_side(config: Path, adapters: list[str]) -> dict:
    """Return the held-out loss of the base model and of each adapter, every model loaded and scored the same way."""
    import pyarrow.parquet as pq

    from tasks.core.config import RunPaths, load_config
    from tasks.evaluate.evaluate import supervised_loss
    from tasks.model.modeling import load_base_model, load_trained_model

    cfg = load_config(config)
    rows = pq.read_table(RunPaths(cfg.runs_dir, "bench").formatted / "heldout.parquet").to_pylist()
    model_dir = base_model_dir()
    out = {"rows": len(rows), "base": supervised_loss(load_base_model(model_dir, True).eval(), rows)}
    for adapter in adapters:
        out[adapter] = supervised_loss(load_trained_model(model_dir, Path(adapter), cfg.train).eval(), rows)
    return out


def speed(side: dict) -> dict:
    """Return a side's per-window rates, their median and spread, and its MFU (tasks/train/utilisation.py)."""
    from anchor_probe import window_rates

    from tasks.train.utilisation import device_peak, ledger

    windows = window_rates(side["steps_log"])
    sup = [w["sup_tok_per_s"] for w in windows]
    real = statistics.median(w["real_tok_per_s"] for w in windows)
    book = ledger(real, 1.0, side["params"], side["trainable_params"], device_peak(side["compute_dtype"], False))
    return {"windows": windows, "sup_tok_per_s_median": round(statistics.median(sup), 1),
            "sup_tok_per_s_spread": [min(sup), max(sup)], "real_tok_per_s_median": round(real, 1),
            "mfu": round(book.mfu, 4) if book.mfu is not None else None,
            "achieved_gflops": round(book.achieved_flops_per_s / 1e9, 1), "peak": book.peak.how}


def anchor_dtype() -> str:
    """Return the compute dtype the anchor is told to use: the one sftflow's `auto` resolves to in this environment
    (so an instruction-set limit such as ONEDNN_MAX_CPU_ISA=AVX2 reaches both sides alike), else the anchor's auto."""
    from tasks.model.precision import choose_precision

    name = choose_precision("auto", cuda=False).name
    return name if name in ("bf16", "fp32") else "auto"


def anchor_command(work: Path, model_dir: str, rows: int, setting: str, steps: int, lr: float | None) -> list[str]:
    """Return the command that runs the anchor in `setting` (e.g. padded-gc) through bench/anchor_probe.py."""
    mode, gc = setting.split("-")
    out = work / f"anchor-{setting}-{'default' if lr is None else lr}"
    return [sys.executable, str(ROOT / "bench" / "anchor_probe.py"), str(out), *(["--lr", str(lr)] if lr else []),
            "--", model_dir, str(GSM8K_TRAIN), str(rows), str(steps), mode, "qlora", anchor_dtype(), gc]


def print_table(sides: dict[str, dict]) -> None:
    """Print one line per side: supervised tok/s (median, spread), MFU, peak RSS, tokens, lr, held-out loss."""
    print(f"\n{'side':26}{'sup tok/s':>10}{'spread':>16}{'MFU':>7}{'RSS MB':>8}{'sup tok':>9}{'pad %':>7}"
          f"{'lr':>8}{'held-out':>10}")
    for name, s in sides.items():
        pad = 100 * (1 - s["real_tokens"] / s["input_tokens"]) if s["input_tokens"] else 0
        loss = f"{s['heldout_loss']:.4f}" if s.get("heldout_loss") is not None else "-"
        mfu = f"{s['speed']['mfu']:.1%}" if s["speed"]["mfu"] is not None else "-"
        print(f"{name:26}{s['speed']['sup_tok_per_s_median']:>10}{str(s['speed']['sup_tok_per_s_spread']):>16}"
              f"{mfu:>7}{s['peak_rss_mb']:>8}{s['supervised_tokens']:>9}{pad:>7.1f}{s['learning_rate']:>8g}{loss:>10}")


def fastest(sides: dict[str, dict], mode: str = "") -> str:
    """Return the name of the side (of `mode`, if given) with the highest median supervised tokens/s."""
    return max((k for k in sides if mode in k), key=lambda k: sides[k]["speed"]["sup_tok_per_s_median"])


def run_anchors(args, work: Path, model_dir: str) -> dict[str, dict]:
    """Run the anchor in every setting at its own learning rate; return each side's result with its speed."""
    anchors = {}
    for setting in args.settings.split(","):
        steps = args.padded_steps if setting.startswith("padded") else args.packed_steps
        name = f"anchor {setting}"
        anchors[name] = run_side(anchor_command(work, model_dir, args.rows, setting, steps, None), name)
        anchors[name]["speed"] = speed(anchors[name])
    return anchors


def run_quality_sides(args, work: Path, model_dir: str, me: list[str], anchors: dict) -> dict[str, dict]:
    """Run sftflow at the anchor's learning rate and the fastest padded anchor setting at sftflow's."""
    sides = {f"sftflow lr {ANCHOR_LR:g}": run_side([*me, "--lr", str(ANCHOR_LR), "--out", str(work / "sftflow-2e-4")],
                                                   f"sftflow lr {ANCHOR_LR:g}")}
    best = fastest(anchors, "padded") if any("padded" in k for k in anchors) else fastest(anchors)
    setting = best.removeprefix("anchor ")
    steps = args.padded_steps if setting.startswith("padded") else args.packed_steps
    sides[f"{best} lr 1e-3"] = run_side(anchor_command(work, model_dir, args.rows, setting, steps, 1e-3),
                                        f"{best} lr 1e-3")
    for side in sides.values():
        side["speed"] = speed(side)
    return sides


def compare(args, work: Path) -> dict:
    """Run every side, score the adapters, and return the result."""
    from tasks.model.precision import cpu_summary

    load_before, model_dir = os.getloadavg()[0], base_model_dir()
    config = prepare(work, args.rows, args.heldout)
    anchors = run_anchors(args, work, model_dir)
    padded = [a for a in anchors.values() if a["mode"] == "padded"] or list(anchors.values())
    target = round(statistics.median(a["supervised_tokens"] for a in padded))  # what the padded anchor saw
    me = [sys.executable, __file__, "--side", "sftflow", "--config", str(config), "--target-supervised", str(target)]
    ours = run_side([*me, "--lr", "1e-3", "--out", str(work / "sftflow-1e-3")], "sftflow lr 1e-3")
    ours["speed"] = speed(ours)
    extra = {} if args.no_quality else run_quality_sides(args, work, model_dir, me, anchors)
    everything = {"sftflow lr 1e-3 (default)": ours, **{k: v for k, v in extra.items() if "sftflow" in k}, **anchors,
                  **{k: v for k, v in extra.items() if "anchor" in k}}
    heldout = {} if args.no_quality else run_side(
        [sys.executable, __file__, "--side", "score", "--config", str(config), "--adapters",
         ",".join(s["adapter"] for s in everything.values())], "held-out loss")
    for side in everything.values():
        side["heldout_loss"] = round(heldout[side["adapter"]], 4) if heldout else None
        side["steps_log"] = len(side["steps_log"])  # its windows keep what the summary needs
    peer = fastest(anchors)
    ratios = {name: round(ours["speed"]["sup_tok_per_s_median"] / a["speed"]["sup_tok_per_s_median"], 2)
              for name, a in anchors.items()}
    return {"throughput_ratio": ratios[peer], "rss_ratio": round(ours["peak_rss_mb"] / anchors[peer]["peak_rss_mb"], 2),
            "fastest_anchor": peer, "ratios": ratios,
            "rss_ratios": {n: round(ours["peak_rss_mb"] / a["peak_rss_mb"], 2) for n, a in anchors.items()},
            "mfu": {n: s["speed"]["mfu"] for n, s in everything.items()},
            "heldout_loss": {"base": round(heldout["base"], 4), **{n: s["heldout_loss"] for n, s in
                                                                    everything.items()}} if heldout else None,
            "heldout_rows": heldout.get("rows"), "rows": args.rows, "target_supervised_tokens": target,
            "cpu": cpu_summary(), "load_avg": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "sides": everything}


def verdict(value: float, goal: float, at_least: bool) -> str:
    """Return 'met' or 'NOT met' for `value` against `goal`."""
    return "met" if (value >= goal if at_least else value <= goal) else "NOT met"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200, help="GSM8K train rows every side trains on")
    parser.add_argument("--heldout", type=int, default=64, help="GSM8K test rows the held-out loss is taken on")
    parser.add_argument("--padded-steps", type=int, default=10, help="the padded anchor's optimizer steps (batch 8)")
    parser.add_argument("--packed-steps", type=int, default=4, help="the packed anchor's steps (8 packed rows each)")
    parser.add_argument("--settings", default="padded-gc,padded-nogc,packed-gc,packed-nogc",
                        help="anchor settings to run, comma-separated")
    parser.add_argument("--no-quality", action="store_true", help="speed and memory only: no second learning rate, "
                                                                  "no held-out loss")
    parser.add_argument("--side", choices=("sftflow", "score"), help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--target-supervised", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "sftflow":
        print(json.dumps(sftflow_side(args.config, args.target_supervised, args.lr, args.out)))
        return
    if args.side == "score":
        print(json.dumps(score_side(args.config, args.adapters.split(","))))
        return
    from tasks.core.settings import apply_defaults

    apply_defaults()  # sftflow's environment (OpenMP threads sleep while waiting), inherited by every side alike
    work = Path(tempfile.mkdtemp(prefix="sftflow-bench-train-"))
    result = compare(args, work)
    print_table(result["sides"])
    if result["heldout_loss"]:
        print(f"{'base model (untrained)':26}{'':>65}{result['heldout_loss']['base']:>10.4f}")
    ours = result["sides"]["sftflow lr 1e-3 (default)"]
    speed_ok = verdict(result["throughput_ratio"], GOAL_SPEED, True)
    rss_ok = verdict(result["rss_ratio"], GOAL_RSS, False)
    print(f"\nsftflow: {result['throughput_ratio']}x the supervised tokens/s of the fastest anchor setting, "
          f"{result['fastest_anchor']} (goal >= {GOAL_SPEED:g}: {speed_ok}), {result['rss_ratio']}x its peak RSS "
          f"(goal <= {GOAL_RSS:g}: {rss_ok}); every setting: {result['ratios']}; MFU {ours['speed']['mfu']:.1%} "
          f"({ours['speed']['peak']}); CPU {result['cpu']}; load {result['load_avg']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
