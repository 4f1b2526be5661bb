"""Evaluation benchmark: batched against one-by-one greedy generation, on the same prompts, in one run, in two cases.

Usage: .venv/bin/python bench/eval.py [--cases default,base] [--repeats 3] [--run runs/<id>]

Both sides call evaluate's own `tasks.evaluate.evaluate.generate` with the same settings (greedy, the template's
end-of-turn as stop): once with batch size 1, once batched (left padding, KV cache, prompts of similar length
together). A one-prompt warm-up runs first, untimed; each side is then timed --repeats times, alternating.
- `default`: the case evaluate runs in the default pipeline. The 4-bit tuned model (the default run's QLoRA adapter
  over the 4-bit NF4 base, loaded by tasks.model.modeling.load_trained_model as evaluate loads it) on the default
  run's held-out prompts (64, with the token ids format cut for them, as evaluate prompts), at configs/default.yaml's
  evaluate settings: max_new_tokens 48, batch 64. The adapter is --run's (a finished `make run`: runs/<id>), else the
  newest under runs/, else one trained here first with the default config (untimed; a few minutes).
- `base`: the earlier benchmark's case: the converted default base in fp32 (as the full/hft/lora methods load it) on
  32 synthetic order prompts rendered with the chat template, 24 new tokens, batch 32.
The CPU and its load (1-minute load average before each timed run) are printed: the figures are wall-clock on a
shared machine. The last line printed is one JSON object: {"speedup" (the default case's), "cases": {case:
{"speedup", "prompts_per_s", "one_by_one_prompts_per_s", "batched_s", "one_by_one_s", spreads, "answers_equal",
"stop_rate", "prompts", "batch_size", "max_new_tokens", "load"}}, "cpu"}. `answers_equal` is the share of prompts
whose greedy answer is the same both ways (left padding changes float rounding, which can flip a near-tie).
Goal: >= 4x.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = 4.0


def order_prompts(n: int, seed: int = 123) -> list[list[dict]]:
    """Return `n` single-turn order-extraction prompts as the format step builds them from Alpaca rows."""
    from tasks.data.synth import make_order

    rng = random.Random(seed)
    return [[{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}]
            for row in (make_order(rng) for _ in range(n))]


def default_run(run: Path | None) -> Path:
    """Return a finished default run's directory: `run`, else the newest under runs/ with an adapter, else one
    trained now (ingest to train, the default config, untimed)."""
    if run is not None:
        return run
    done = sorted((p.parents[2] for p in (ROOT / "runs").glob("*/train/adapter/adapter_config.json")),
                  key=lambda p: p.stat().st_mtime)
    if done:
        return done[-1]
    from flows.steps import STEPS, RunContext
    from tasks.core.config import RunPaths, load_config

    cfg = load_config(ROOT / "configs" / "default.yaml",
                      [f"runs_dir={tempfile.mkdtemp(prefix='sftflow-bench-eval-')}", "train.eval_steps=null"])
    context = RunContext(cfg, RunPaths(cfg.runs_dir, "bench"))
    print("no finished default run: training one with configs/default.yaml (untimed)", flush=True)
    for name in ("prepare-base-model", "ingest", "clean", "format", "train"):
        context.hand_over(name, STEPS[name].task.fn(*STEPS[name].args(context)))
    return context.run.root


def default_case(run: Path | None):
    """Return (model, tokenizer, prompts, prompt ids, EvaluateConfig, label) of the default pipeline's evaluate."""
    import pyarrow.parquet as pq

    from tasks.core.config import load_config
    from tasks.evaluate.heldout import select_rows
    from tasks.model.modeling import load_trained_model
    from tasks.model.tokenizer import load_tokenizer

    root = default_run(run)
    cfg = load_config(ROOT / "configs" / "default.yaml")
    model_dir = base_model_dir()
    rows = select_rows(pq.read_table(root / "formatted" / "heldout.parquet").to_pylist(), cfg.evaluate.max_samples)
    model = load_trained_model(model_dir, root / "train" / "adapter", cfg.train).eval()
    tokenizer = load_tokenizer(model_dir, root / "formatted")  # the base's, with the template format used
    prompts = [json.loads(r["prompt"]) for r in rows]
    ids = [r["input_ids"][:r["prompt_tokens"]] for r in rows]
    return model, tokenizer, prompts, ids, cfg.evaluate, f"4-bit tuned ({root.name}), held-out prompts"


def base_case():
    """Return the earlier benchmark's case: the fp32 base, 32 order prompts, 24 new tokens, batch 32."""
    from tasks.core.config import EvaluateConfig
    from tasks.model.modeling import load_base_model
    from tasks.model.tokenizer import load_tokenizer

    model_dir = base_model_dir()
    cfg = EvaluateConfig(max_samples=32, max_new_tokens=24, batch_size=32)
    return (load_base_model(model_dir, False).eval(), load_tokenizer(model_dir), order_prompts(32), None, cfg,
            "fp32 base, order prompts")


def base_model_dir() -> str:
    """Return the converted default base model's directory."""
    from tasks.core.config import DEFAULT_BASE_MODEL
    from tasks.model.base_model import resolve_base_model

    return resolve_base_model(DEFAULT_BASE_MODEL)


def timed_generate(model, tokenizer, prompts, ids, cfg, batch_size: int):
    """Return (generations, seconds) for greedy generation at `batch_size`."""
    from tasks.evaluate.evaluate import generate

    start = time.perf_counter()
    gens = generate(model, tokenizer, prompts, cfg.model_copy(update={"batch_size": batch_size}), prompt_ids=ids)
    return gens, time.perf_counter() - start


def measure(case: str, run: Path | None, repeats: int) -> dict:
    """Time one-by-one and batched generation of one case, alternating, `repeats` each; return the figures."""
    model, tokenizer, prompts, ids, cfg, label = default_case(run) if case == "default" else base_case()
    timed_generate(model, tokenizer, prompts[:1], ids[:1] if ids else None,
                   cfg.model_copy(update={"max_new_tokens": 4}), 1)  # warm-up: first-call allocations, kernels
    single_s, batched_s, loads = [], [], []
    for k in range(repeats):
        loads.append(round(os.getloadavg()[0], 2))
        single, seconds = timed_generate(model, tokenizer, prompts, ids, cfg, 1)
        single_s.append(seconds)
        batched, seconds = timed_generate(model, tokenizer, prompts, ids, cfg, cfg.batch_size)
        batched_s.append(seconds)
        print(f"[{case} {k + 1}/{repeats}] one by one {single_s[-1]:.1f} s, batched {batched_s[-1]:.1f} s "
              f"(load before {loads[-1]})", flush=True)
    n, one, many = len(prompts), statistics.median(single_s), statistics.median(batched_s)
    return {"what": label, "speedup": round(one / many, 2), "prompts_per_s": round(n / many, 3),
            "one_by_one_prompts_per_s": round(n / one, 3), "batched_s": round(many, 2), "one_by_one_s": round(one, 2),
            "batched_spread_s": [round(min(batched_s), 2), round(max(batched_s), 2)],
            "one_by_one_spread_s": [round(min(single_s), 2), round(max(single_s), 2)],
            "answers_equal": sum(a.text == b.text for a, b in zip(single, batched)) / n,
            "stop_rate": sum(g.stopped for g in batched) / n, "prompts": n, "batch_size": cfg.batch_size,
            "max_new_tokens": cfg.max_new_tokens, "load_before": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="default,base", help="comma-separated: default (4-bit tuned, default "
                        "settings), base (fp32 base, 24 tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", type=Path, help="a finished default run (runs/<id>) whose adapter and held-out "
                                                  "prompts the default case uses")
    args = parser.parse_args()
    from tasks.core.settings import apply_defaults

    apply_defaults()  # sftflow's environment: OpenMP threads sleep while they wait (a shared machine)

    import torch
    from transformers.utils import logging as hf_logging

    from tasks.model.modeling import model_precision
    from tasks.model.precision import cpu_summary

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    print(f"CPU: {cpu_summary()}; torch threads {torch.get_num_threads()}; compute dtype (4-bit) "
          f"{model_precision('auto').name}; 1-min load average {os.getloadavg()[0]:.2f}", flush=True)
    cases = {case: measure(case, args.run, args.repeats) for case in args.cases.split(",")}
    for case, r in cases.items():
        met = "met" if r["speedup"] >= GOAL else "NOT met"
        print(f"{case} ({r['what']}, {r['prompts']} prompts, {r['max_new_tokens']} new tokens, batch "
              f"{r['batch_size']}): speedup {r['speedup']}x (goal >= {GOAL:g}: {met})"
              f", {r['prompts_per_s']} prompts/s batched (spread {r['batched_spread_s']} s) against "
              f"{r['one_by_one_prompts_per_s']} one by one (spread {r['one_by_one_spread_s']} s); answers equal "
              f"{r['answers_equal']:.0%}; stop rate {r['stop_rate']:.0%}")
    headline = cases.get("default") or next(iter(cases.values()))
    print(json.dumps({"speedup": headline["speedup"], "cases": cases, "cpu": cpu_summary(),
                      "compute_dtype": model_precision("auto").name}))


if __name__ == "__main__":
    main()
