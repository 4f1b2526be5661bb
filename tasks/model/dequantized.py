"""A 4-bit base's frozen weights dequantized once, on a CPU.

bitsandbytes keeps a QLoRA base's linear weights in NF4 and dequantizes each one on every call: in training twice a
micro-batch (in the forward, and again in the backward for the input's gradient). On CUDA that dequantization is a
fused kernel. On a CPU it is a pass that writes the whole full-precision weight, for every layer, on every call.
QLoRA never changes those weights, so on a CPU sftflow dequantizes each one once, to the compute dtype, and keeps it
beside the NF4 weight. The values are the ones bitsandbytes' backward computes (`dequantize_4bit`, then the cast), so
the losses and gradients are bit-identical to bitsandbytes' own path (tests/model/test_dequantized.py, in both
dtypes). The cost is memory: 2 (bf16) or 4 (fp32) bytes a weight on top of the NF4 half byte. So this is done only
while those copies fit in a quarter of the memory available when the model loads; a larger base keeps bitsandbytes'
path, and the train task logs which one it took and why. Evaluate does the same where bitsandbytes has no fused CPU
inference kernel (a CPU without AVX512-BF16), where generation would otherwise dequantize every layer at every token.

The copies are plain attributes, not parameters or buffers: nothing is saved with a checkpoint or an adapter, and the
optimizer never sees them.
"""

from __future__ import annotations

import os
import types
from dataclasses import dataclass
from typing import Any

SHARE_OF_AVAILABLE = 0.25  # the most of the memory available at load time the full-precision copies may take
ATTRIBUTE = "_sftflow_dequantized"


@dataclass(frozen=True)
class Choice:
    """Whether the frozen 4-bit weights are dequantized once, with why."""

    once: bool
    reason: str


def linear_4bit_modules(model: Any) -> list:
    """Return the model's bitsandbytes 4-bit linear layers."""
    import bitsandbytes as bnb

    return [module for module in model.modules() if isinstance(module, bnb.nn.Linear4bit)]


def inference_kernel() -> bool:
    """Return True where bitsandbytes has a fused CPU kernel for 4-bit inference (a CPU with AVX512-BF16): without
    gradients it is faster than a kept bf16 copy (SmolLM2-135M, greedy, 16 prompts: 1.77 s against 1.95 s)."""
    import bitsandbytes.functional as bnb_functional

    return bool(bnb_functional.has_avx512bf16())


def train_without_repacking(model: Any) -> int:
    """Keep bitsandbytes' CPU inference kernel out of a model being trained; return the 4-bit layers guarded.

    At its first forward in eval mode without gradients (an in-training held-out evaluation, `train.eval_steps`) a
    Linear4bit on a CPU with AVX512-BF16 repacks its weight for that kernel, and from then on computes with
    `gemv_4bit` in training too. That op has no autograd kernel: the gradient through the frozen layer to its input
    is silently dropped (torch only warns), so every step after the first evaluation trains the LoRA weights on wrong
    gradients (bitsandbytes 0.50; tests/model/test_dequantized.py shows it). Guarded, such an evaluation dequantizes
    as training does (or uses the kept copies)."""
    layers = linear_4bit_modules(model)
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def choose(cuda: bool, weights: int, bytes_per_weight: int, available: int) -> Choice:
    """Return whether `weights` 4-bit weights are dequantized once, at `bytes_per_weight` each, with `available` bytes
    of memory free (a pure function of what the device and the model offer, tested as the dtype choice is)."""
    if cuda:
        return Choice(False, "CUDA: bitsandbytes' fused 4-bit kernels")
    if weights == 0:
        return Choice(False, "no 4-bit weights")
    need, budget = weights * bytes_per_weight, int(available * SHARE_OF_AVAILABLE)
    size = f"{need / 2**30:.2f} GiB for {weights / 1e6:.0f}M weights"
    if need > budget:
        return Choice(False, f"CPU: the base's 4-bit weights dequantized on every call (bitsandbytes' path): "
                             f"dequantized once they would take {size}, more than a quarter of the "
                             f"{available / 2**30:.1f} GiB available")
    return Choice(True, f"CPU: the base's frozen 4-bit weights dequantized once ({size}, of "
                        f"{available / 2**30:.1f} GiB available), not on every call")


def dequantize_once(model: Any, dtype: Any, cuda: bool, available: int | None = None) -> Choice:
    """Dequantize every 4-bit linear layer of `model` once, to `dtype` (the dtype its matmuls run in: autocast's
    where autocast is on), where `choose` allows it, and make the layers use those copies; return the choice.
    `available`: bytes of free memory (default: psutil's reading now, shared among this machine's processes under
    accelerate launch). Call it before the model's first forward."""
    import psutil
    import torch

    layers = linear_4bit_modules(model)
    weights = sum(layer.out_features * layer.in_features for layer in layers)
    if available is None:  # each of this machine's training processes keeps its own copies
        available = psutil.virtual_memory().available // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    choice = choose(cuda, weights, torch.finfo(dtype).bits // 8, available)
    if choice.once:
        for layer in layers:
            keep_dequantized(layer, dtype)
    return choice


def keep_dequantized(layer: Any, dtype: Any) -> None:
    """Give one bitsandbytes Linear4bit its weight dequantized to `dtype` and a forward that uses it."""
    import bitsandbytes.functional as bnb_functional

    quant_state = layer.weight.quant_state
    if getattr(quant_state, "packing_format_for_cpu", False):  # repacked for bitsandbytes' CPU inference kernel
        raise RuntimeError(f"{type(layer).__name__}: the 4-bit weight was repacked for inference before it could be "
                           "dequantized once; dequantize_once must run before the model's first forward")
    # bitsandbytes' backward dequantizes in the weight's own dtype, then casts; autocast rounds the same way
    weight = bnb_functional.dequantize_4bit(layer.weight.data, quant_state).to(dtype)
    setattr(layer, ATTRIBUTE, weight)
    layer.forward = types.MethodType(dequantized_forward, layer)


def dequantized_forward(self, x):
    """bitsandbytes' Linear4bit.forward, computing with the kept weight wherever its matmul runs in that weight's
    dtype. Anywhere else (bitsandbytes' fused CPU inference kernel, another dtype) it is bitsandbytes' own forward."""
    import bitsandbytes as bnb
    import torch
    import torch.nn.functional as F

    weight = getattr(self, ATTRIBUTE)
    fused = (x.device.type == "cpu" and getattr(self, "support_avx512bf16_for_cpu", False)
             and not self.training and not x.requires_grad)  # where bitsandbytes runs its CPU inference kernel
    if not self.compute_type_is_set:  # bitsandbytes' own first-call choice, kept as it keeps it
        self.set_compute_type(x)
        self.compute_type_is_set = True
    matmul = self.compute_dtype
    if torch.is_autocast_enabled(x.device.type) and matmul in (torch.float32, torch.bfloat16, torch.float16):
        matmul = torch.get_autocast_dtype(x.device.type)
    if fused or matmul != weight.dtype:
        return bnb.nn.Linear4bit.forward(self, x)
    bias = None if self.bias is None else self.bias.to(self.compute_dtype)
    return F.linear(x.to(self.compute_dtype), weight, bias).to(x.dtype)
