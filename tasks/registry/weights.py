"""Registered versions' trained weights on this machine: found by `NAME@alias` or `NAME/VERSION`, downloaded into a
cache that is checked against each version's `trained_sha256` and written atomically (what evaluate scores as the
champion and serve loads)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from tasks.registry.ledger import CHAMPION, RegistryError

TRAINED_ARTIFACT = "trained"  # artifact path, in the version's MLflow run, of its adapter or full weights


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered version with its trained directory downloaded, and how to load it."""

    name: str
    version: str
    trained_dir: Path  # an adapter (adapter_config.json) or full weights (config.json)
    base_model: str  # the base's spec (train.base_model: Hub id, pkg://…, GGUF path or directory) the adapter goes over
    method: str  # train.method it was trained with: decides how its base loads (4-bit, 8-bit, full)
    base_path: str = ""  # where the base resolved to when it was registered: a hint (modeling.resolve_version_base)
    compute_dtype: str = "auto"  # train.compute_dtype it was trained and evaluated with (modeling.evaluation_precision)
    repetition_penalty: float = 1.0  # evaluate.repetition_penalty its scores were measured with: serving's default


Champion = RegisteredVersion  # what evaluate compares against: the version holding @champion


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """Split `NAME@alias` or `NAME/VERSION` (or `models:/…` of either) into (name, alias, version)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    if "/" in ref:
        name, version = ref.rsplit("/", 1)
        return name, None, version
    return ref, CHAMPION, None


def find_version(tracking_uri: str, ref: str, cache_dir: Path) -> RegisteredVersion | None:
    """Return the version `ref` names (NAME@alias or NAME/VERSION) with its trained directory downloaded under
    `cache_dir` and checked against its `trained_sha256` tag, or None when the model, alias or version does not
    exist (or it has no trained weights logged)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, alias, number = parse_model_ref(ref)
    client = MlflowClient(tracking_uri, registry_uri=tracking_uri)
    try:
        version = (client.get_model_version_by_alias(name, alias) if alias
                   else client.get_model_version(name, number))
    except MlflowException:
        return None
    if not version.run_id:
        return None
    try:
        trained = cached_weights(client, name, version, Path(cache_dir))
    except (MlflowException, OSError):
        return None
    # an older sftflow tagged base_model with the local directory and base_model_spec with the spec
    spec = version.tags.get("base_model_spec") or version.tags.get("base_model", "")
    old_dir = version.tags.get("base_model", "")
    hint = version.tags.get("base_model_path") or (old_dir if old_dir != spec else "")
    return RegisteredVersion(name, str(version.version), trained, spec, version.tags.get("train_method", "qlora"), hint,
                             version.tags.get("train_compute_dtype", "auto"),
                             float(version.tags.get("generation_repetition_penalty") or 1.0))


def cached_weights(client, name: str, version, cache_dir: Path) -> Path:
    """Return the version's trained directory in the cache, downloaded when the cache has no copy whose digest is
    the version's `trained_sha256`.

    The cache entry is named by version *and* digest (`NAME-vN-<sha>`), so a store reset under the same runs_dir
    (another v1) never finds the old store's weights; a copy is verified on every use, and a download goes to a
    temporary directory, is verified, then renamed into place, so a partial or foreign copy is never used. A version
    without the tag (registered by an older sftflow) cannot be verified: it is downloaded afresh each time.
    """
    digest = version.tags.get("trained_sha256", "")
    target = cache_dir / f"{name}-v{version.version}-{digest[:16] or 'unverified'}"
    if digest and (target / TRAINED_ARTIFACT).is_dir() and directory_digest(target / TRAINED_ARTIFACT) == digest:
        return target / TRAINED_ARTIFACT
    cache_dir.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        client.download_artifacts(version.run_id, TRAINED_ARTIFACT, str(fresh))
        got = directory_digest(fresh / TRAINED_ARTIFACT)
        if digest and got != digest:
            raise RegistryError(f"{name} v{version.version}: the trained weights in the store (sha256 {got[:16]}…) "
                                f"are not the ones registered (trained_sha256 {digest[:16]}…): the store's artifacts "
                                "were changed or damaged; re-register the run, or promote another version")
        replace_dir(fresh, target)
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return target / TRAINED_ARTIFACT


def replace_dir(fresh: Path, target: Path) -> None:
    """Put directory `fresh` at `target` by renames (atomic on one file system), moving an older copy aside first."""
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(target, old)
    try:
        os.rename(fresh, target)
    except OSError:  # another process put its own verified copy there meanwhile: keep it
        if not target.is_dir():
            raise
    shutil.rmtree(old, ignore_errors=True)


def directory_digest(path: Path) -> str:
    """Return the sha256 over a directory's files (relative names and bytes, in sorted order): equal digests mean
    byte-identical weights."""
    digest = hashlib.sha256()
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()
