"""Run the TRL anchor (../shared/bench/trl_anchor.py) unchanged and observe it, for bench/train.py.

Usage: python bench/anchor_probe.py ADAPTER_OUT [--lr LR] -- ANCHOR_ARGS...

The anchor script is executed as it is (runpy, as `python trl_anchor.py ANCHOR_ARGS` would run it); this wrapper only
adds instruments around TRL, never touching the anchor's own lines:
- a TrainerCallback that records, at the end of every optimizer step, the wall clock and the supervised (labels !=
  -100), real (attention mask) and processed (padding included) tokens its batches held (counted in compute_loss);
- `--lr`: the anchor's SFTConfig gets this learning rate instead of its own 2e-4 (to compare held-out loss at
  sftflow's learning rate too); nothing else of its config changes;
- after training, the adapter is saved to ADAPTER_OUT (PEFT safetensors) for bench/train.py to score on the held-out
  rows with the same function as sftflow's adapter, and the model's parameter counts for the MFU.
The last line printed is one JSON object: the anchor's own figures plus `steps_log`, `params`, `trainable_params`.
`StepClock` and `window_rates` are shared with bench/train.py's sftflow side, so both are timed the same way.
"""

from __future__ import annotations

import json
import resource
import runpy
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ANCHOR = ROOT.parent / "shared" / "bench" / "trl_anchor.py"


class Counter:
    """Tokens seen by compute_loss since the start: supervised, real (not padding) and processed."""

    def __init__(self):
        self.sup = self.real = self.processed = 0

    def add(self, inputs: dict) -> None:
        """Count one batch (called with every compute_loss input)."""
        self.sup += int((inputs["labels"] != -100).sum())
        mask = inputs.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
        self.processed += int(inputs["input_ids"].numel())


def step_clock(counter: Counter):
    """Return a TrainerCallback that logs (seconds since train begin, tokens so far) at each optimizer step's end."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.log: list[dict] = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.log.append({"step": state.global_step, "t": round(time.perf_counter() - self.start, 3),
                             "sup": counter.sup, "real": counter.real, "processed": counter.processed})

    return StepClock()


def window_rates(log: list[dict], windows: int = 3) -> list[dict]:
    """Split the steps after the first (warm-up) into `windows` runs of consecutive steps, as equal as possible;
    return each window's steps, seconds and supervised/real tokens per second."""
    if len(log) < windows + 1:
        raise ValueError(f"{len(log)} steps cannot make a warm-up step and {windows} timed windows")
    rest = len(log) - 1
    bounds = [1 + round(k * rest / windows) for k in range(windows + 1)]
    out = []
    for a, b in zip(bounds, bounds[1:]):
        start, end = log[a - 1], log[b - 1]
        seconds = end["t"] - start["t"]
        out.append({"steps": f"{start['step'] + 1}-{end['step']}", "seconds": round(seconds, 2),
                    "sup_tok_per_s": round((end["sup"] - start["sup"]) / seconds, 1),
                    "real_tok_per_s": round((end["real"] - start["real"]) / seconds, 1)})
    return out


def main() -> None:
    args = sys.argv[1:]
    split = args.index("--")
    own, anchor_args = args[:split], args[split + 1:]
    adapter_out, lr = Path(own[0]), None
    if "--lr" in own:
        lr = float(own[own.index("--lr") + 1])

    import trl

    counter = Counter()
    clock = step_clock(counter)
    trainer_class, config_class = trl.SFTTrainer, trl.SFTConfig
    original_init, original_loss = trainer_class.__init__, trainer_class.compute_loss

    def init(self, *a, **k):
        original_init(self, *a, **k)
        self.add_callback(clock)

    def compute_loss(self, model, inputs, *a, **k):
        if model.training:
            counter.add(inputs)
        return original_loss(self, model, inputs, *a, **k)

    trainer_class.__init__, trainer_class.compute_loss = init, compute_loss
    if lr is not None:
        trl.SFTConfig = lambda *a, **k: config_class(*a, **{**k, "learning_rate": lr})
    sys.argv = [str(ANCHOR), *anchor_args]
    scope = runpy.run_path(str(ANCHOR), run_name="__main__")  # prints the anchor's own JSON line first
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    from tasks.train.utilisation import model_parameters

    trainer = scope["trainer"]
    params, trainable = model_parameters(trainer.model)
    trainer.model.save_pretrained(str(adapter_out))
    losses = scope["losses"]
    print(json.dumps({"mode": scope["mode"], "method": scope["method"],
                      "gradient_checkpointing": scope["checkpointing"],
                      "compute_dtype": {"bfloat16": "bf16", "float32": "fp32"}[str(scope["compute"]).split(".")[-1]],
                      "learning_rate": trainer.args.learning_rate,
                      "steps": scope["steps"], "wall_s": round(scope["wall"], 2),
                      "supervised_tokens": scope["seen"]["sup"], "input_tokens": scope["seen"]["tot"],
                      "real_tokens": counter.real, "sup_tok_per_s": round(scope["seen"]["sup"] / scope["wall"], 1),
                      "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
                      "peak_rss_mb": peak_rss_mb, "params": params, "trainable_params": trainable,
                      "steps_log": clock.log, "adapter": str(adapter_out)}))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
