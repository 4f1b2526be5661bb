"""Compute-dtype benchmark: one QLoRA optimizer step of the default base model in fp32 and in bf16 compute.

Usage: .venv/bin/python bench/precision.py [--batch 4] [--tokens 256] [--steps 3]

Both sides load the base exactly as the train task does (tasks.model.modeling.load_base_model: 4-bit NF4, double
quantisation) with LoRA r=16 on all linear layers, adapters in the compute dtype, autocast as the trainer would
set it, and time forward + backward + AdamW step on the same random token batch, in one process: one untimed warm-up
step, then --steps timed steps. It prints the median seconds per step and the spread (min-max) for each, the ratio of
the medians, what `train.compute_dtype=auto` picks here, and the CPU; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

from tasks.core.config import DEFAULT_BASE_MODEL
from tasks.model.base_model import resolve_base_model
from tasks.model.modeling import load_base_model, model_precision
from tasks.model.precision import cpu_summary


def seconds_per_step(model_dir: str, dtype: str, batch: int, tokens: int, steps: int) -> list[float]:
    """Return the wall seconds of each of `steps` QLoRA steps (after one untimed warm-up step) in `dtype`."""
    torch.manual_seed(0)
    model = prepare_model_for_kbit_training(load_base_model(model_dir, True, dtype), use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    compute = torch.bfloat16 if dtype == "bf16" else torch.float32
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(compute)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens))
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
        print(f"  {dtype}: step {len(times)}/{steps + 1} {times[-1]:.1f} s", flush=True)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from tasks.core.settings import apply_defaults

    apply_defaults()  # sftflow's environment: OpenMP threads sleep while they wait (a shared machine)
    model_dir = resolve_base_model(DEFAULT_BASE_MODEL)
    result = {"cpu": cpu_summary(),
              "batch": args.batch, "tokens": args.tokens, "auto_picks": model_precision("auto").name}
    for dtype in ("fp32", "bf16"):
        times = seconds_per_step(model_dir, dtype, args.batch, args.tokens, args.steps)
        result[f"{dtype}_s_per_step"] = round(statistics.median(times), 2)
        result[f"{dtype}_spread_s"] = [round(min(times), 2), round(max(times), 2)]
    result["bf16_over_fp32"] = round(result["bf16_s_per_step"] / result["fp32_s_per_step"], 2)
    print(f"medians of {args.steps}: fp32 {result['fp32_s_per_step']} s/step {result['fp32_spread_s']}, bf16 "
          f"{result['bf16_s_per_step']} s/step {result['bf16_spread_s']}: bf16 takes "
          f"{result['bf16_over_fp32']}x as long; auto picks {result['auto_picks']} on {result['cpu']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
