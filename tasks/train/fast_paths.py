"""Which kernels training uses: the libraries' GPU fast paths on CUDA where they are installed, sftflow's own CPU
paths on a CPU. Each choice is a pure function of what the device and the environment offer, returned with its
reason (logged by the train task), so it is tested with the probes patched, as the dtype choice is.

- Attention over packed, padding-free rows: FlashAttention-2's varlen kernel (`flash_attention_2`) on a CUDA device
  of compute capability 8.0 or newer with `flash_attn` installed: each conversation attends to itself from the
  position ids, in one call. Else, on CUDA, `sdpa` (PyTorch's fused kernels) over the rows TRL pads. On a CPU,
  sftflow's packed attention (tasks/train/packing.py): one SDPA call per conversation, never across them.
- The loss: Liger's fused linear cross-entropy (`use_liger_kernel`, TRL's own switch) on CUDA with `liger_kernel`
  installed: logits are never materialised, a chunk at a time. Else sftflow's lean loss (tasks/train/trainer.py),
  which builds logits only where a label is: the CPU path.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Kernels:
    """The attention implementation (None: sftflow's packed CPU attention, or the model's default) and whether
    Liger's fused loss replaces the lean loss, with why."""

    attention: str | None
    liger: bool
    reason: str


def installed(module: str) -> bool:
    """Return True when `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def choose_kernels(cuda: bool, capability: tuple[int, int] | None, packing: bool, lean_loss: bool,
                   has=installed) -> Kernels:
    """Return the kernels for a run on this device (`capability`: the CUDA device's, None on a CPU); `has(module)`
    says what is installed."""
    if not cuda:
        return Kernels(None, False, "CPU: sftflow's packed attention and lean loss")
    reasons = []
    if packing and capability is not None and capability >= (8, 0) and has("flash_attn"):
        attention = "flash_attention_2"
        reasons.append(f"FlashAttention-2 varlen over packed rows (compute capability {capability[0]}.{capability[1]})")
    else:
        attention = "sdpa"
        why = ("flash_attn is not installed" if not has("flash_attn") else
               f"compute capability {capability} < 8.0" if capability is not None and capability < (8, 0)
               else "no packing")
        reasons.append(f"SDPA attention ({why})")
    liger = lean_loss and has("liger_kernel")
    reasons.append("Liger fused linear cross-entropy" if liger else
                   "lean loss" + ("" if not lean_loss else " (liger_kernel is not installed)"))
    return Kernels(attention, liger, "CUDA: " + "; ".join(reasons))


def device_kernels(packing: bool, lean_loss: bool) -> Kernels:
    """Return the kernels for this process's device."""
    from tasks.model.modeling import has_cuda

    cuda = has_cuda()
    capability = None
    if cuda:
        import torch

        capability = tuple(torch.cuda.get_device_capability(0))
    return choose_kernels(cuda, capability, packing, lean_loss)
