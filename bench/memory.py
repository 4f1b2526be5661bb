"""Memory benchmark: peak RSS of training steps of the default base with and without `train.lean_loss`.

Usage: .venv/bin/python bench/memory.py [--formatted runs/<id>/formatted] [--steps 2] [--repeats 3]
                                        [section.field=value ...]

Each side runs in its own process, --repeats times, alternating: the train task's trainer
(tasks.train.trainer.build_trainer) with the train section of configs/default.yaml (SmolLM2-135M, its method, packing
and batch, compute dtype `auto`), `train.lean_loss` false or true, on the formatted rows of a finished run (default:
the newest under runs/; with none, the default config's data is formatted first, untimed). A thread samples the
process RSS every 5 ms during `trainer.train()`; the peak minus the RSS just before training is what the steps
themselves need. It prints each side's medians and spreads (min-max): peak RSS, seconds per step, supervised tokens
per second, and the ratios, with the CPU and the dtype; the last line is one JSON object.

Measured 2026-12-01, AMD EPYC AVX2, 2 busy cores, QLoRA SmolLM2-135M on the default synthetic orders (31% supervised):
- 4 x 1024 packed rows (~3.9k tokens per micro-batch), 2 micro-batches: peak RSS 15.7 GB without lean loss, 11.9 GB
  with it (0.76); ~2.7 MB of activations per token without gradient checkpointing.
- 1 x 512 packed rows (~440 tokens per micro-batch): 2.97 GB without, 2.52 GB with (0.85; training's own share 1.57
  vs 1.23 GB, 0.78); 8.1 vs 6.6 s/step, 17.2 vs 21.2 supervised tokens/s. Small micro-batches are also faster per
  token on this CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class PeakRss:
    """Sample this process's RSS in a background thread; `peak_mb` is the largest seen."""

    def __init__(self, every_s: float = 0.005):
        import psutil

        self.process, self.every_s, self.peak, self.stop = psutil.Process(), every_s, 0, threading.Event()

    def __enter__(self):
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.every_s)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def one_side(formatted: Path, lean: bool, steps: int, overrides: list[str]) -> dict:
    """Train `steps` steps with lean_loss=`lean` in this process; return its memory and speed figures."""
    import psutil

    from tasks.core.config import load_config
    from tasks.model.base_model import resolve_base_model
    from tasks.train.trainer import build_trainer

    cfg = load_config(ROOT / "configs" / "default.yaml",
                      [*overrides, f"train.lean_loss={str(lean).lower()}", f"train.max_steps={steps}",
                       "train.save_steps=1000", "train.logging_steps=1"]).train
    model_dir = resolve_base_model(cfg.base_model)
    seen = {"supervised": 0, "tokens": 0}

    trainer = build_trainer(formatted, model_dir, Path(tempfile.mkdtemp(prefix="bench-memory-")), cfg)
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *args, **kwargs):
        seen["supervised"] += int((inputs["labels"][:, 1:] != -100).sum())
        seen["tokens"] += int(inputs["input_ids"].numel())
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = counting
    before = psutil.Process().memory_info().rss / 2**20
    start = time.perf_counter()
    with PeakRss() as peak:
        trainer.train()
    wall = time.perf_counter() - start
    return {"lean_loss": lean, "method": cfg.method, "pack_length": cfg.pack_length if cfg.packing else None,
            "batch_size": cfg.batch_size, "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "steps": steps, "micro_batch_tokens": seen["tokens"] // max(steps * cfg.gradient_accumulation_steps, 1),
            "rss_before_train_mb": round(before), "peak_rss_mb": round(peak.peak_mb),
            "train_peak_over_before_mb": round(peak.peak_mb - before), "s_per_step": round(wall / steps, 1),
            "sup_tok_per_s": round(seen["supervised"] / wall, 1)}


def newest_formatted() -> Path:
    """Return the formatted rows of the newest run under runs/, else the default config's data formatted now."""
    found = sorted(ROOT.glob("runs/*/formatted/train.parquet"), key=lambda p: p.stat().st_mtime)
    if found:
        return found[-1].parent
    sys.path.insert(0, str(ROOT))
    from flows.steps import STEPS, RunContext
    from tasks.core.config import RunPaths, load_config

    cfg = load_config(ROOT / "configs" / "default.yaml", [f"runs_dir={tempfile.mkdtemp(prefix='bench-memory-')}"])
    context = RunContext(cfg, RunPaths(cfg.runs_dir, "bench"))
    print("no runs/*/formatted: formatting the default config's data (untimed)", flush=True)
    for name in ("prepare-base-model", "ingest", "clean", "format"):
        context.hand_over(name, STEPS[name].task.fn(*STEPS[name].args(context)))
    return context.run.formatted


def median_spread(values: list[float]) -> tuple[float, list[float]]:
    """Return the median and [min, max] of `values`."""
    import statistics

    return round(statistics.median(values), 2), [round(min(values), 2), round(max(values), 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formatted", type=Path)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--side", choices=["lean", "full"], help=argparse.SUPPRESS)  # one child process
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.batch_size=1")
    args = parser.parse_args()
    from tasks.core.settings import apply_defaults

    apply_defaults()  # sftflow's environment: OpenMP threads sleep while they wait (a shared machine)
    formatted = args.formatted or newest_formatted()
    if args.side:
        print(json.dumps(one_side(formatted, args.side == "lean", args.steps, args.overrides)), flush=True)
        return
    sys.path.insert(0, str(ROOT))
    from tasks.model.modeling import model_precision
    from tasks.model.precision import cpu_summary

    runs: dict[str, list[dict]] = {"full": [], "lean": []}
    for k in range(args.repeats):
        for side in ("full", "lean"):
            out = subprocess.run([sys.executable, __file__, "--formatted", str(formatted), "--steps", str(args.steps),
                                  "--side", side, *args.overrides], check=False, capture_output=True, text=True,
                                 cwd=ROOT)
            if out.returncode:
                sys.exit(f"lean_loss={side == 'lean'} failed:\n{out.stderr[-3000:]}")
            runs[side].append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = runs[side][-1]
            print(f"[{k + 1}/{args.repeats}] lean_loss={side == 'lean'}: peak RSS {r['peak_rss_mb']} MB "
                  f"({r['train_peak_over_before_mb']} MB over the loaded model), {r['s_per_step']} s/step, "
                  f"{r['sup_tok_per_s']} supervised tokens/s", flush=True)
    result = {"formatted": str(formatted), "repeats": args.repeats, "cpu": cpu_summary(),
              "compute_dtype": model_precision("auto").name}
    for side, rs in runs.items():
        result[side] = {**{k: v for k, v in rs[0].items() if k not in ("peak_rss_mb", "train_peak_over_before_mb",
                                                                         "s_per_step", "sup_tok_per_s")}}
        for key in ("peak_rss_mb", "train_peak_over_before_mb", "s_per_step", "sup_tok_per_s"):
            result[side][key], result[side][f"{key}_spread"] = median_spread([r[key] for r in rs])
    result["peak_ratio_lean_over_full"] = round(result["lean"]["peak_rss_mb"] / result["full"]["peak_rss_mb"], 3)
    result["train_memory_ratio_lean_over_full"] = round(
        result["lean"]["train_peak_over_before_mb"] / max(result["full"]["train_peak_over_before_mb"], 1), 3)
    result["speed_ratio_lean_over_full"] = round(result["lean"]["sup_tok_per_s"] / result["full"]["sup_tok_per_s"], 3)
    print(f"medians of {args.repeats}: peak RSS lean/full {result['peak_ratio_lean_over_full']}, training's own memory "
          f"{result['train_memory_ratio_lean_over_full']}, supervised tokens/s {result['speed_ratio_lean_over_full']}; "
          f"{result['compute_dtype']} on {result['cpu']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
