"""Model loading shared by train, evaluate and register: the base in 4-bit NF4 (QLoRA), 8-bit or full precision,
and where a training run leaves what it trained (a LoRA adapter or full weights)."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from tasks.core.common import stage_logger
from tasks.core.errors import ConfigError
from tasks.model.base_model import PICKLE_SUFFIXES
from tasks.model.precision import Precision, choose_precision


def has_cuda() -> bool:
    """Return True when a CUDA device is usable."""
    import torch

    return torch.cuda.is_available()


def model_precision(compute_dtype: str = "auto") -> Precision:
    """Return the precision the model computes in: `train.compute_dtype`, or what this device does natively."""
    return choose_precision(compute_dtype, has_cuda())


def evaluation_precision(method: str, compute_dtype: str = "auto") -> Precision:
    """Return the precision evaluate's model of train.method `method` (train.compute_dtype `compute_dtype`) computes
    in on this device, as `load_base_model` loads it: the compute dtype on CUDA and over a 4-bit base (bitsandbytes'
    compute dtype), fp32 for a full-precision or 8-bit base on a CPU, which evaluate runs without autocast. What
    `sftflow serve --dtype auto` serves a version in, so that it answers as it was evaluated."""
    if has_cuda() or method == "qlora":
        return model_precision(compute_dtype)
    return Precision("fp32", f"train.method={method} is evaluated in fp32 on a CPU")


def quantization_config(precision: Precision):
    """Return the QLoRA 4-bit NF4 config (double quantization) computing in `precision`."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=precision.torch_dtype)


def load_base_model(model_dir: str, load_in_4bit: bool, compute_dtype: str = "auto", load_in_8bit: bool = False,
                    trust_remote_code: bool = False, attn_implementation: str | None = None) -> Any:
    """Return the causal LM at `model_dir`: 4-bit NF4 or 8-bit via bitsandbytes if asked (CPU or CUDA), else full
    precision; safetensors weights only, and a model's own Python code only when `trust_remote_code`
    (train.trust_remote_code).

    The weights that stay unquantized load in the compute dtype on CUDA and in fp32 on a CPU (autocast, where bf16
    is native, does the rest).
    """
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda, precision = has_cuda(), model_precision(compute_dtype)
    # under accelerate launch each process loads onto its own GPU (LOCAL_RANK), never all onto GPU 0
    device = {"": int(os.environ.get("LOCAL_RANK", "0"))} if cuda else "cpu"
    kwargs: dict[str, Any] = {"device_map": device, "dtype": precision.torch_dtype if cuda else torch.float32,
                              "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if attn_implementation is not None:  # a GPU kernel tasks/train/fast_paths.py chose
        kwargs["attn_implementation"] = attn_implementation
    if load_in_4bit:
        kwargs["quantization_config"] = quantization_config(precision)
    elif load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        # bitsandbytes' int8 matmul casts fp32 inputs to fp16 and says so on every call: thousands of lines a run
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)


def is_adapter_dir(path: Path) -> bool:
    """Return True when `path` holds a PEFT adapter (to load over the base) rather than a full model."""
    return (Path(path) / "adapter_config.json").is_file()


def trained_model_dir(train_dir: Path) -> Path:
    """Return what a training run in `train_dir` produced: `model/` (full, hft) or `adapter/` (LoRA methods)."""
    full = Path(train_dir) / "model"
    return full if (full / "config.json").is_file() else Path(train_dir) / "adapter"


def load_trained_model(model_dir: str, trained_dir: Path, cfg, generating: bool = False) -> Any:
    """Return the trained model: the adapter in `trained_dir` over the base loaded as in training (`cfg`, a
    TrainConfig), or the full weights in `trained_dir`. Safetensors only: an adapter saved as a pickle is refused.

    `generating`: the model will answer prompts as it is (evaluate). A 4-bit base on a CPU where bitsandbytes has no
    fused inference kernel then has its frozen weights dequantized once, not at every generated token
    (tasks/model/dequantized.py): the same answers."""
    if not is_adapter_dir(trained_dir):
        return load_base_model(str(trained_dir), False, cfg.compute_dtype, trust_remote_code=cfg.trust_remote_code)
    from peft import PeftModel

    check_adapter_weights(Path(trained_dir))
    base = load_base_model(model_dir, cfg.load_in_4bit, cfg.compute_dtype, cfg.load_in_8bit, cfg.trust_remote_code)
    if generating and cfg.load_in_4bit and not has_cuda():
        from tasks.model.dequantized import dequantize_once, inference_kernel

        if not inference_kernel():
            choice = dequantize_once(base, model_precision(cfg.compute_dtype).torch_dtype, cuda=False)
            stage_logger().info("4-bit weights: %s", choice.reason)
    return PeftModel.from_pretrained(base, str(trained_dir))


def check_adapter_weights(adapter_dir: Path) -> None:
    """Raise ConfigError unless `adapter_dir` holds its adapter as safetensors (PEFT would torch.load a .bin)."""
    if (adapter_dir / "adapter_model.safetensors").is_file():
        return
    pickles = sorted(p.name for p in adapter_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    found = f"only {', '.join(pickles)}" if pickles else "no adapter weights"
    raise ConfigError(f"{adapter_dir}: no adapter_model.safetensors ({found}); sftflow loads safetensors only, never "
                      "pickle weights: re-save the adapter with PEFT's save_pretrained, which writes safetensors")


def resolve_version_base(spec: str, hint: str = "", trust_remote_code: bool = False) -> str:
    """Return the local directory a registered version's base loads from on this machine: `hint` (the directory it
    resolved to where the version was registered) when it is still a complete model directory here, else `spec`
    (its train.base_model: a Hub id, pkg://… or a GGUF path, or a directory) resolved again as prepare-base-model
    resolves it (a GGUF converted into this machine's cache, a Hub id fetched or found in the Hugging Face cache)."""
    from tasks.model.base_model import missing_parts, refuse_remote_code

    local = Path(hint).expanduser() if hint else None
    if local is not None and local.is_dir() and not missing_parts(local):
        refuse_remote_code(spec or hint, local, trust_remote_code)
        return str(local.resolve())
    if not spec:
        raise ConfigError(f"the registered version names no base model spec (tag base_model), and its base directory "
                          f"hint {hint!r} is not on this machine; re-register it with a current sftflow")
    if local is not None:
        stage_logger().info("base model %s: %s is not on this machine; resolving the spec again", spec, hint)
    from tasks.model.prepare import prepare_base_model

    return prepare_base_model.fn(spec, trust_remote_code)
