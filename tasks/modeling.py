"""Model loading shared by train, evaluate and register: the base in 4-bit NF4 (QLoRA) or full precision."""

from __future__ import annotations

from typing import Any


from tasks.base_model import resolve_base_model
from tasks.common import stage_logger, stage_task


def has_cuda() -> bool:
    """Return True when a CUDA device is usable."""
    import torch

    return torch.cuda.is_available()


def quantization_config():
    """Return the QLoRA 4-bit NF4 config (double quantization; bf16 compute)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch.bfloat16)


def load_base_model(model_dir: str, load_in_4bit: bool) -> Any:
    """Return the causal LM at `model_dir`: 4-bit NF4 via bitsandbytes if asked (CPU or CUDA), else fp32/bf16."""
    import torch
    from transformers import AutoModelForCausalLM

    cuda = has_cuda()
    kwargs: dict[str, Any] = {"device_map": {"": 0} if cuda else "cpu",
                              "dtype": torch.bfloat16 if cuda else torch.float32}
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config()
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


@stage_task("prepare-base-model", retries=3, retry_delay_seconds=[10, 60, 300])
def prepare_base_model(spec: str) -> str:
    """Return a loadable base model (a GGUF is converted once into the cache); Hub ids are passed through."""
    resolved = resolve_base_model(spec)
    stage_logger().info("base model %s -> %s", spec, resolved)
    return resolved
