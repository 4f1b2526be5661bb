"""The MLflow model registry as sftflow uses it: which version is @champion, and its trained weights on disk.

Register logs each run's trained directory (a LoRA adapter or full weights, as `trained_model_dir` gives it) under
the run's artifact path `trained/`, and tags the version with where it came from (`base_model`, `train_method`).
Evaluate scores the champion found here on the same held-out prompts as the new model.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

TRAINED_ARTIFACT = "trained"  # artifact path, in the version's MLflow run, of its adapter or full weights
CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class RegisteredVersion:
    """A registered version with its trained directory downloaded, and how to load it."""

    name: str
    version: str
    trained_dir: Path  # an adapter (adapter_config.json) or full weights (config.json)
    base_model: str  # the local base directory (or Hub id) the adapter goes over
    method: str  # train.method it was trained with: decides how its base loads (4-bit, 8-bit, full)


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
    `cache_dir`, or None when the model, alias or version does not exist (or it has no trained weights logged)."""
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
    target = Path(cache_dir) / f"{name}-v{version.version}"
    trained = target / TRAINED_ARTIFACT
    if not trained.is_dir():
        try:
            client.download_artifacts(version.run_id, TRAINED_ARTIFACT, str(target))
        except (MlflowException, OSError):
            return None
    return RegisteredVersion(name, str(version.version), trained, version.tags.get("base_model", ""),
                             version.tags.get("train_method", "qlora"))


def find_champion(tracking_uri: str, model_name: str, cache_dir: Path) -> Champion | None:
    """Return `model_name`'s @champion with its trained directory downloaded, or None when there is none yet."""
    return find_version(tracking_uri, f"{model_name}@{CHAMPION}", cache_dir)


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
