"""fp32 linear layers with their weights packed once for oneDNN, for batched decoding on a CPU.

Why: a decode step multiplies a few rows (one per request in the batch) by every weight matrix. PyTorch's default
fp32 CPU path (MKL's sgemm on the weight as stored) handles one row well, but its cost grows steeply with a few more:
on a 2-core AVX2-only AMD EPYC, SmolLM2-135M's decode step took 100 ms for one row and 212 ms for eight. With each
weight reordered once into oneDNN's blocked layout for that batch size, eight rows took 124-131 ms and one row stayed
at ~100 ms, with logits within fp32 rounding of the plain layers (6e-5 on values up to 29). That is the batching
`sftflow serve` lives on (bench/serve.py).

How: the same two operators PyTorch's own compiler emits for a frozen CPU model (inductor's weight prepacking):
`torch.ops.mkldnn._reorder_linear_weight` once per layer, `torch.ops.mkldnn._linear_pointwise` per call. Not
`torch.compile(freezing=True)` itself: it compiles again for each new batch and cache length a server meets, minutes
on this CPU; nor `torch.utils.mkldnn.to_mkldnn`, which converts every input to oneDNN's tensor type and back. These
operators are private to PyTorch, so `pack_linears` checks they exist and work on a small layer first and leaves the
model as it is (returning 0) where they do not. fp32 only: with native bf16 the plain layers already batch nearly
for free (docs/serving.md), and a quantized base keeps its own kernels.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

log = logging.getLogger("sftflow.serve")

BATCH_HINT = 8  # the rows oneDNN lays the weights out for: `sftflow serve`'s default --max-batch (any count works)


@functools.cache
def packed_linear_class():
    """Return the PackedLinear module class, defined once, on first use (so that importing this module needs no
    torch)."""
    import torch

    class PackedLinear(torch.nn.Module):
        """A frozen nn.Linear whose weight is stored in oneDNN's layout; inference only."""

        def __init__(self, linear: torch.nn.Linear, batch_hint: int):
            super().__init__()
            self.in_features, self.out_features = linear.in_features, linear.out_features
            weight = linear.weight.detach()
            self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(weight, batch_hint),
                                 persistent=False)
            bias = None if linear.bias is None else linear.bias.detach()
            self.register_buffer("bias", bias, persistent=False)

        def forward(self, x):
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")

        def extra_repr(self) -> str:
            return f"in_features={self.in_features}, out_features={self.out_features}, packed for oneDNN"

    return PackedLinear


def packing_works(batch_hint: int) -> bool:
    """Return whether this torch build packs linear weights for oneDNN and computes a small layer as nn.Linear does."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        linear = torch.nn.Linear(16, 8).eval()
        x = torch.randn(3, 16)
        with torch.inference_mode():
            return torch.allclose(packed_linear_class()(linear, batch_hint)(x), linear(x), rtol=1e-4, atol=1e-5)
    except (AttributeError, RuntimeError, NotImplementedError):  # no such operator in this build, or no kernel
        return False


def pack_linears(model: Any, batch_hint: int = BATCH_HINT) -> int:
    """Replace every fp32 nn.Linear of `model` (on the CPU) by a PackedLinear in place; return how many were replaced,
    0 where this torch build cannot pack them (the model is then left as it was)."""
    import torch

    linears = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
               if type(child) is torch.nn.Linear and child.weight.dtype == torch.float32
               and child.weight.device.type == "cpu"]
    if not linears or not packing_works(batch_hint):
        return 0
    packed = packed_linear_class()
    for parent, name, child in linears:
        setattr(parent, name, packed(child, batch_hint))
    log.info("serving: %d fp32 linear layers packed for oneDNN (batch hint %d)", len(linears), batch_hint)
    return len(linears)
