"""Precision: choose the compute dtype from what the hardware does natively, never one it would emulate.

On a CPU, bf16 arithmetic is native only with AVX512-BF16 or AMX; on an AVX2-only CPU it is emulated, and one QLoRA
step of SmolLM2-135M took over 100 s in bf16 against 9.6 s in fp32 (README). CUDA devices report bf16 support
themselves; one without it (e.g. a T4 or V100) gets fp16 mixed precision. `train.compute_dtype` overrides the choice.

oneDNN runs torch's CPU matmuls, and ONEDNN_MAX_CPU_ISA (or DNNL_MAX_CPU_ISA) can keep it below the CPU's bf16
instructions, in a container or to reproduce an older CPU (`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`, as
bench/README.md's AVX2 rows do); bf16 is then emulated, so `auto` takes fp32 where torch reports that limit.

SFTFLOW_COMPUTE_DTYPE=bf16|fp32 forces the dtype for the whole process (and the processes it starts: `sftflow task
train`, accelerate's ranks) wherever `train.compute_dtype` is `auto`; an explicit `train.compute_dtype` still wins.
It exists for tests: `make test` runs the model tests a second time with the dtype this CPU does not pick, so a test
that passes in one dtype only is caught on any machine. Unset or empty means auto. Stage caches key on the config, not
on this variable: use a fresh SFTFLOW_HOME (the tests do) when comparing dtypes through the flow.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

from tasks.core.errors import ConfigError

NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # x86 /proc/cpuinfo flags; aarch64 calls its bf16 extension "bf16"
COMPUTE_DTYPE_ENV = "SFTFLOW_COMPUTE_DTYPE"
ONEDNN_ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA")  # oneDNN's cap on the instructions it uses
FORCEABLE = ("bf16", "fp32")  # fp16 is CUDA-only mixed precision: a CUDA user sets train.compute_dtype=fp16 instead


@dataclass(frozen=True)
class Precision:
    """The compute dtype chosen for a run, and why."""

    name: str  # "bf16", "fp16" or "fp32"
    reason: str

    @property
    def torch_dtype(self):
        """Return the torch dtype of this precision."""
        import torch

        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[self.name]


def cpu_flags() -> set[str]:
    """Return this CPU's feature flags (Linux /proc/cpuinfo; elsewhere what torch's cpuinfo probe reports)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                return set(value.split())
    import torch

    probes = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported, "amx_bf16": torch.cpu._is_amx_tile_supported,
              "avx2": torch.cpu._is_avx2_supported}
    return {flag for flag, probe in probes.items() if probe()}


def cpu_name() -> str:
    """Return the CPU model name (as lscpu prints it), for logs and benchmark records."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model"):
                return value.strip()
    return platform.processor() or platform.machine()


def native_cpu_bf16(flags: set[str]) -> str | None:
    """Return the flag that makes bf16 native on this CPU, or None when bf16 would be emulated."""
    found = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if not found and platform.machine() in ("aarch64", "arm64") and "bf16" in flags:
        found = ["bf16"]
    return found[0] if found else None


def onednn_bf16_limit() -> str | None:
    """Return the setting (`ONEDNN_MAX_CPU_ISA=AVX2`) that keeps oneDNN from this CPU's bf16 instructions, as torch's
    own probe reports it; None where no such setting is made, or oneDNN may still use them."""
    setting = next(iter(isa_limits(ONEDNN_ISA_ENV)), None)
    if setting is None:
        return None
    return None if onednn_runs_bf16() in (True, None) else setting


def onednn_runs_bf16() -> bool | None:
    """Return whether torch's oneDNN runs bf16 natively in this process (its own probe, which honours
    ONEDNN_MAX_CPU_ISA), or None for a torch without that probe."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return None


def isa_limits(names: tuple[str, ...] = (*ONEDNN_ISA_ENV, "ATEN_CPU_CAPABILITY")) -> list[str]:
    """Return the instruction-set limits (`NAME=value`) set among `names` for this process's torch: by default
    oneDNN's and ATen's."""
    return [f"{k}={os.environ[k]}" for k in names if os.environ.get(k, "").strip()]


def cpu_summary() -> str:
    """Return the CPU model and the flags that decide its speed here, for benchmark records
    ("…; native bf16: no; avx2"), with any instruction-set limit set for torch."""
    flags = cpu_flags()
    vector = "avx512f" if "avx512f" in flags else "avx2" if "avx2" in flags else "no avx2"
    limits = isa_limits()
    return (f"{cpu_name()}; native bf16: {native_cpu_bf16(flags) or 'no'}; {vector}; {os.cpu_count()} cores"
            + (f"; torch limited to {' '.join(limits)}" if limits else ""))


def auto_precision(cuda: bool) -> Precision:
    """Return the precision the hardware runs natively: bf16 where supported, else fp16 on CUDA, else fp32."""
    if cuda:
        import torch

        name = torch.cuda.get_device_name(0)
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"CUDA device {name} supports bf16")
        return Precision("fp16", f"CUDA device {name} has no bf16: fp16 mixed precision")
    flag = native_cpu_bf16(cpu_flags())
    if flag and (limit := onednn_bf16_limit()):
        return Precision("fp32", f"CPU {cpu_name()} has native bf16 ({flag}), but {limit} keeps torch's oneDNN from "
                                 "it: bf16 would be emulated, over 10x slower")
    if flag:
        return Precision("bf16", f"CPU {cpu_name()} has native bf16 ({flag})")
    return Precision("fp32", f"CPU {cpu_name()} has no native bf16 (no AMX or AVX512-BF16): bf16 would be emulated, "
                             "over 10x slower")


def forced_dtype() -> str | None:
    """Return the dtype SFTFLOW_COMPUTE_DTYPE forces (bf16 or fp32), or None when it is unset or empty."""
    value = os.environ.get(COMPUTE_DTYPE_ENV, "").strip().lower()
    if not value:
        return None
    if value not in FORCEABLE:
        raise ConfigError(f"{COMPUTE_DTYPE_ENV}={value!r} is not a dtype this variable can force: set it to "
                          f"{' or '.join(FORCEABLE)}, or unset it to let the hardware decide")
    return value


def other_compute_dtype(cuda: bool) -> str:
    """Return the dtype an `auto` run in this process does not compute in (bf16 after fp32, else fp32): the one
    `make test` forces for its second run of the model tests, so that the two runs cover both."""
    return "bf16" if choose_precision("auto", cuda).name == "fp32" else "fp32"


def choose_precision(requested: str, cuda: bool) -> Precision:
    """Return the configured precision (`train.compute_dtype`): the one the config sets, else the one
    SFTFLOW_COMPUTE_DTYPE forces, else what the hardware does natively."""
    source = f"set by train.compute_dtype={requested}"
    if requested == "auto":
        requested = forced_dtype()
        if requested is None:
            return auto_precision(cuda)
        source = f"forced by {COMPUTE_DTYPE_ENV}={requested} (train.compute_dtype is auto)"
    if requested == "bf16" and not cuda and (not native_cpu_bf16(cpu_flags()) or onednn_bf16_limit()):
        return Precision("bf16", f"{source}, although CPU {cpu_name()} emulates bf16 (over 10x slower than fp32)")
    return Precision(requested, source)
