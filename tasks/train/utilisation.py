"""The cost and utilisation ledger of a training run: model FLOPs utilisation (MFU), device-hours and cost.

MFU is the FLOP/s the model's own arithmetic needs at the measured token rate, over the device's peak FLOP/s in the
compute dtype in use. The arithmetic per token processed (PaLM's "model FLOPs", matmuls only):
- the forward pass: 2 x every parameter;
- the backward pass: 2 x every parameter for the gradients flowing back to the inputs (frozen layers included:
  LoRA's gradients pass through them), plus 2 x each trainable parameter for its weight gradient;
so LoRA over a frozen base is about 4N and full fine-tuning 6N. Attention's score products (a few per cent at 512
tokens for a 135M model) are left out, so MFU slightly understates the work done: the convention most papers use.

The peak comes from the hardware's own description:
- a CPU: cores this process may use x clock x FLOPs per cycle per core for the dtype, from its flags: AMX tiles
  (bf16: 1,024), AVX512-BF16 dot products (128; 64 on AMD's 256-bit datapaths before Zen 5), AVX-512 FMA (fp32: 64;
  AMD 32), AVX2 FMA (fp32: 32). bf16 without native support is emulated: its peak is the fp32 one. The clock is
  `cpu MHz` as /proc/cpuinfo reports it (under load, near the boost clock);
- a CUDA device: a table of dense tensor-core peaks by device name (datasheets), else none.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tasks.model.precision import cpu_flags

# datasheet dense peaks in TFLOP/s: (bf16 or fp16 tensor cores, fp32)
CUDA_PEAKS = {"H200": (989.0, 67.0), "H100": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6),
              "L4": (121.0, 30.3), "A10": (125.0, 31.2), "T4": (65.0, 8.1), "V100": (125.0, 15.7),
              "4090": (165.0, 82.6)}


@dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s in one dtype, and how it was found."""

    flops_per_s: float | None
    how: str


def cpu_mhz() -> float | None:
    """Return the mean current clock of this machine's cores (MHz), from /proc/cpuinfo, or None."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return None
    clocks = [float(line.partition(":")[2]) for line in cpuinfo.read_text(errors="replace").splitlines()
              if line.startswith("cpu MHz")]
    return sum(clocks) / len(clocks) if clocks else None


def cpu_flops_per_cycle(flags: set[str], dtype: str, amd: bool) -> tuple[int, str]:
    """Return the peak FLOPs per cycle per core for `dtype` (bf16 or fp32) on a CPU with `flags`, and the unit."""
    if dtype == "bf16" and "amx_bf16" in flags:
        return 1024, "AMX bf16 tiles"
    if dtype == "bf16" and "avx512_bf16" in flags:
        return (64 if amd else 128), "AVX512-BF16 dot products" + (" (256-bit datapaths)" if amd else "")
    if "avx512f" in flags:
        return (32 if amd else 64), "AVX-512 FMA" + (" (256-bit datapaths)" if amd else "")
    if "fma" in flags and "avx2" in flags:
        return 32, "AVX2 FMA"
    return 8, "SSE"


def device_peak(dtype: str, cuda: bool, cores: int | None = None) -> Peak:
    """Return the peak FLOP/s of this process's device in `dtype` (bf16, fp16 or fp32)."""
    if cuda:
        import torch

        name = torch.cuda.get_device_name(0)
        peaks = next((v for k, v in CUDA_PEAKS.items() if k in name), None)
        if peaks is None:
            return Peak(None, f"no datasheet peak known for {name}")
        tflops = peaks[1] if dtype == "fp32" else peaks[0]
        return Peak(tflops * 1e12, f"{name} datasheet, dense {'fp32' if dtype == 'fp32' else 'tensor-core'}")
    flags, mhz = cpu_flags(), cpu_mhz()
    native = dtype == "bf16" and ("amx_bf16" in flags or "avx512_bf16" in flags)
    per_cycle, unit = cpu_flops_per_cycle(flags, dtype if native else "fp32", amd=is_amd())
    cores = cores or len(os.sched_getaffinity(0))
    if mhz is None:
        return Peak(None, "no CPU clock in /proc/cpuinfo")
    emulated = " (bf16 emulated: the fp32 peak)" if dtype == "bf16" and not native else ""
    return Peak(cores * mhz * 1e6 * per_cycle, f"{cores} cores x {mhz / 1000:.2f} GHz x {per_cycle} FLOP/cycle "
                                               f"({unit}){emulated}")


def is_amd() -> bool:
    """Return True on an AMD CPU (its AVX-512 runs on 256-bit datapaths before Zen 5)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "AuthenticAMD" in cpuinfo.read_text(errors="replace")[:4000]


def flops_per_token(params: int, trainable: int) -> float:
    """Return the model FLOPs of training on one token (module docstring): 4N + 2T, which is 6N when all train."""
    return 4.0 * params + 2.0 * trainable


@dataclass(frozen=True)
class Ledger:
    """What a run's training cost: tokens/s, achieved FLOP/s and MFU, device-hours and (with a price) money."""

    tokens_per_s: float
    achieved_flops_per_s: float
    mfu: float | None
    device_hours: float
    cost: float | None
    peak: Peak

    def metrics(self) -> dict[str, float]:
        """Return the ledger as MLflow metrics (the ones that are known)."""
        out = {"train/achieved_tflops": self.achieved_flops_per_s / 1e12, "train/device_hours": self.device_hours}
        if self.mfu is not None:
            out["train/mfu"] = self.mfu
        if self.cost is not None:
            out["train/cost"] = self.cost
        return out

    def line(self) -> str:
        """Return one line for logs and the model card."""
        mfu = f"MFU {self.mfu:.1%}" if self.mfu is not None else "MFU unknown"
        cost = f", cost {self.cost:.2f}" if self.cost is not None else ""
        return (f"{self.tokens_per_s:.1f} tokens/s, {self.achieved_flops_per_s / 1e9:.1f} GFLOP/s achieved, {mfu} of "
                f"the {self.peak.how} peak; {self.device_hours:.3f} device-hours{cost}")


def ledger(tokens: int, seconds: float, params: int, trainable: int, peak: Peak, devices: int = 1,
           price_per_hour: float | None = None) -> Ledger:
    """Return the ledger of `tokens` processed in `seconds` by a model of `params` (`trainable` of them trained)."""
    rate = tokens / max(seconds, 1e-9)
    achieved = rate * flops_per_token(params, trainable)
    mfu = achieved / peak.flops_per_s if peak.flops_per_s else None
    hours = devices * seconds / 3600
    return Ledger(rate, achieved, mfu, hours, hours * price_per_hour if price_per_hour is not None else None, peak)


def model_parameters(model) -> tuple[int, int]:
    """Return (all, trainable) parameter counts, 4-bit packed weights counted by their logical size."""
    if hasattr(model, "get_nb_trainable_parameters"):  # PEFT counts packed 4-bit weights by their logical size
        trainable, total = model.get_nb_trainable_parameters()
        return int(total), int(trainable)
    total = sum(p.numel() for p in model.parameters())
    return total, sum(p.numel() for p in model.parameters() if p.requires_grad)


def ledger_callback(out_dir: Path, precision: str, price_per_hour: float | None = None):
    """Return a TrainerCallback that adds MFU and achieved GFLOP/s to each training log that has tokens/s (so the
    live MLflow metrics carry them), and writes the whole run's ledger to out_dir/ledger.json at the end."""
    import json
    import time

    from transformers import TrainerCallback

    from tasks.model.modeling import has_cuda

    class LedgerCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.params, self.trainable = model_parameters(model) if model is not None else (0, 0)
            self.peak = device_peak(precision, has_cuda())
            self.devices, self.start = max(args.world_size, 1), time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "tokens_per_second" in logs and self.params:
                book = ledger(logs["tokens_per_second"], 1.0, self.params, self.trainable, self.peak)
                extra = {"achieved_gflops": round(book.achieved_flops_per_s / 1e9, 2)}
                if book.mfu is not None:
                    extra["mfu"] = round(book.mfu, 4)
                logs.update(extra)  # the live MLflow metrics after this callback log it
                if state.log_history and state.log_history[-1].get("step") == state.global_step:
                    state.log_history[-1].update(extra)

        def on_train_end(self, args, state, control, **kwargs):
            if not state.is_world_process_zero or not self.params:
                return
            tokens = next((h["num_tokens"] for h in reversed(state.log_history) if "num_tokens" in h), 0)
            book = ledger(int(tokens), time.perf_counter() - self.start, self.params, self.trainable, self.peak,
                          self.devices, price_per_hour)
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "ledger.json").write_text(json.dumps({
                "tokens": int(tokens), "tokens_per_s": book.tokens_per_s, "params": self.params,
                "trainable_params": self.trainable, "achieved_flops_per_s": book.achieved_flops_per_s,
                "peak_flops_per_s": self.peak.flops_per_s, "peak": self.peak.how, "mfu": book.mfu,
                "device_hours": book.device_hours, "cost": book.cost, "price_per_hour": price_per_hour,
                "line": book.line()}, indent=1), encoding="utf-8")

    return LedgerCallback()
