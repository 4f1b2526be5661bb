"""The MLflow model registry as sftflow uses it: which version is @champion, and its trained weights on disk.

Register logs each run's trained directory (a LoRA adapter or full weights, as `trained_model_dir` gives it) under
the run's artifact path `trained/`, and tags the version with where it came from (`base_model`, `train_method`).
Evaluate scores the champion found here on the same held-out prompts as the new model.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from tasks.core.errors import SftflowError

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


def champion_to_compare(tracking_uri: str, model_name: str, cache_dir: Path, trained_dir: Path) -> Champion | None:
    """Return the @champion evaluate should also score, downloaded: None when there is none, or when it holds the
    very weights in `trained_dir` (a cached rerun: scoring them against themselves decides nothing)."""
    from mlflow import MlflowClient

    held = current_champion(MlflowClient(tracking_uri, registry_uri=tracking_uri), model_name)
    if held is None or held[1].get("trained_sha256") == directory_digest(trained_dir):
        return None
    return find_champion(tracking_uri, model_name, cache_dir)


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


class RegistryError(SftflowError):
    """A registry command names a model, version or store that does not exist, or has nothing to act on."""


# ---- the promotion gate: a pure decision over report.json (evaluate's scores on one held-out set) ----

LOWER_IS_BETTER = ("eval_loss", "perplexity")
HISTORY_TAG = "champion_history"  # registered-model tag: the versions that held @champion, oldest first (a stack)


@dataclass(frozen=True)
class GateDecision:
    """What the promotion gate decided for a new version, and why (recorded as its `gate.*` tags)."""

    metric: str
    tuned: float
    against: str  # "champion vN" or "base"
    against_score: float | None  # None: no score of the champion on this held-out set
    margin: float
    promoted: bool
    reason: str

    def tags(self) -> dict[str, str]:
        """Return the decision as model-version tags."""
        return {"gate.metric": self.metric, "gate.tuned": repr(self.tuned), "gate.against": self.against,
                "gate.against_score": "" if self.against_score is None else repr(self.against_score),
                "gate.margin": repr(self.margin), "gate.promoted": str(self.promoted).lower(),
                "gate.reason": self.reason}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> GateDecision | None:
        """Return the decision recorded in a version's tags, or None when it has none (e.g. an older version)."""
        if "gate.metric" not in tags:
            return None
        score = tags.get("gate.against_score", "")
        return cls(tags["gate.metric"], float(tags["gate.tuned"]), tags.get("gate.against", ""),
                   float(score) if score else None, float(tags.get("gate.margin", "0")),
                   tags.get("gate.promoted") == "true", tags.get("gate.reason", ""))


def improvement(metric: str, new: float, old: float) -> float:
    """Return how much `new` beats `old` on `metric` (positive is better; eval_loss and perplexity fall)."""
    return old - new if metric in LOWER_IS_BETTER else new - old


def champion_score(report: dict, metric: str, version: str, tags: dict[str, str]) -> float | None:
    """Return the champion's `metric` on this report's held-out set: scored in this evaluate, or recorded at its
    registration on the same held-out set (same heldout_fingerprint); None when neither holds."""
    scored = report.get("models", {}).get("champion")
    if scored and str(scored.get("version")) == str(version) and metric in scored:
        return float(scored[metric])
    same_set = tags.get("heldout_fingerprint") and tags["heldout_fingerprint"] == report.get("heldout_fingerprint")
    if same_set and f"score.{metric}" in tags:
        return float(tags[f"score.{metric}"])
    return None


def decide_promotion(report: dict, metric: str, margin: float, champion: tuple[str, dict] | None) -> GateDecision:
    """Return the gate's decision: promote when the tuned model beats the champion (version, tags), or the base
    model when there is no champion, on `metric` by more than `margin`."""
    tuned = float(report["models"]["tuned"][metric])
    if champion is None:
        against, old = "base", float(report["models"]["base"][metric])
    else:
        against, old = f"champion v{champion[0]}", champion_score(report, metric, *champion)
    if old is None:
        return GateDecision(metric, tuned, against, None, margin, False, (
            f"{against} has no {metric} on this held-out set (evaluate did not score it: evaluate.compare_champion "
            "is false, or the champion changed after evaluate ran); rerun evaluate to compare"))
    gain = improvement(metric, tuned, old)
    direction = " (lower is better)" if metric in LOWER_IS_BETTER else ""
    if gain > margin:
        why = f"{metric} {tuned:.4g} beats {against}'s {old:.4g} by {gain:.4g} > margin {margin:g}{direction}"
    else:
        why = (f"{metric} {tuned:.4g} does not beat {against}'s {old:.4g} by more than margin {margin:g} "
               f"(difference {gain:+.4g}){direction}")
    return GateDecision(metric, tuned, against, old, margin, gain > margin, why)


# ---- the registry as the commands see it: versions, aliases, the champion's history ----

def registry_client(tracking_uri: str):
    """Return an MlflowClient on the store, which must exist (a sqlite path that is not there is an error, not a
    new empty store)."""
    from mlflow import MlflowClient

    from tasks.core.config import absent_sqlite_store

    if absent := absent_sqlite_store(tracking_uri):
        raise RegistryError(f"no MLflow store at {absent}: pass --runs-dir or "
                            "--tracking-uri (or set MLFLOW_TRACKING_URI) to the store `sftflow run` wrote")
    return MlflowClient(tracking_uri, registry_uri=tracking_uri)


def get_model(client, name: str):
    """Return the registered model `name`, or raise RegistryError naming the models there are."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_registered_model(name)
    except MlflowException:
        known = ", ".join(sorted(m.name for m in client.search_registered_models())) or "none"
        raise RegistryError(f"no registered model {name!r} in this store (models: {known})") from None


def get_version(client, name: str, version: str):
    """Return version `version` of model `name`, or raise RegistryError naming the versions there are."""
    from mlflow.exceptions import MlflowException

    model = get_model(client, name)
    try:
        return client.get_model_version(model.name, str(version))
    except MlflowException:
        raise RegistryError(f"{name} has no version {version!r} (versions: "
                            f"{', '.join(str(v.version) for v in all_versions(client, name)) or 'none'})") from None


def all_versions(client, name: str) -> list:
    """Return every version of model `name`, oldest first."""
    found = client.search_model_versions(f"name = '{name}'")
    return sorted(found, key=lambda v: int(v.version))


def find_by_digest(client, name: str, digest: str):
    """Return the version of `name` whose trained weights have this directory_digest, or None."""
    return next((v for v in all_versions(client, name) if v.tags.get("trained_sha256") == digest), None)


def aliases(client, name: str) -> dict[str, str]:
    """Return model `name`'s aliases and the version each names (as a string; MLflow hands back ints)."""
    return {alias: str(version) for alias, version in get_model(client, name).aliases.items()}


def alias_holder(client, name: str, alias: str) -> str | None:
    """Return the version holding `alias` of model `name`, or None."""
    return aliases(client, name).get(alias)


def champion_history(client, name: str) -> list[str]:
    """Return the versions that held @champion, oldest first, ending with the current champion."""
    history = json.loads(get_model(client, name).tags.get(HISTORY_TAG, "[]"))
    current = alias_holder(client, name, CHAMPION)
    if current is not None and (not history or history[-1] != current):  # moved outside sftflow: keep it true
        history.append(current)
    return history


def stamp(prefix: str, who: str, reason: str) -> dict[str, str]:
    """Return `<prefix>_by`, `<prefix>_at` (UTC, ISO) and `<prefix>_reason` tags."""
    return {f"{prefix}_by": who, f"{prefix}_at": datetime.now(UTC).isoformat(timespec="seconds"),
            f"{prefix}_reason": reason}


def set_champion(client, name: str, version: str, how: str, who: str, reason: str) -> None:
    """Give `version` @champion, recording how (gate, manual, rollback), who and why, and push it on the history."""
    history = champion_history(client, name)
    if history and history[-1] == str(version):
        return
    client.set_registered_model_alias(name, CHAMPION, str(version))
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps([*history, str(version)][-1000:]))
    for key, value in {"promotion": how, **stamp("promoted", who, reason)}.items():
        client.set_model_version_tag(name, str(version), key, value)


def current_champion(client, name: str) -> tuple[str, dict] | None:
    """Return (version, tags) of `name`'s @champion, or None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    return str(version.version), dict(version.tags)


def apply_decision(client, name: str, version: str, decision: GateDecision, who: str) -> None:
    """Give a new version @challenger, and @champion when the gate promoted it; mark the decision applied (a retry
    that finds the version already registered completes an unapplied one)."""
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    if decision.promoted:
        set_champion(client, name, str(version), "gate", who, decision.reason)
    client.set_model_version_tag(name, str(version), "gate.applied", "true")


def current_user() -> str:
    """Return who runs this command (the login name)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return os.environ.get("USER", "unknown")


def promote_version(tracking_uri: str, name: str, version: str, reason: str, who: str | None = None) -> str:
    """Give `version` @champion by hand (who and why recorded; the previous champion stays in the history, so
    rollback returns to it); return a line saying what happened."""
    client = registry_client(tracking_uri)
    number = str(get_version(client, name, version).version)
    previous = alias_holder(client, name, CHAMPION)
    if previous == number:
        return f"{name} v{number} is already @champion; nothing changed"
    set_champion(client, name, number, "manual", who or current_user(), reason)
    return f"{name} v{number} is now @champion (was {f'v{previous}' if previous else 'none'}): {reason}"


def rollback_champion(tracking_uri: str, name: str, reason: str = "", who: str | None = None) -> str:
    """Move @champion back to the version that held it before the current one (recorded on both); return a line."""
    client = registry_client(tracking_uri)
    history = champion_history(client, name)
    if not history:
        raise RegistryError(f"{name} has no @champion to roll back")
    if len(history) < 2:
        raise RegistryError(f"{name} v{history[-1]} is its first champion: there is no previous one to roll back to")
    current, previous = history[-1], history[-2]
    get_version(client, name, previous)  # still there (not deleted)
    who, why = who or current_user(), reason or "rollback"
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    for key, value in stamp("demoted", who, f"rolled back to v{previous}: {why}").items():
        client.set_model_version_tag(name, current, key, value)
    for key, value in {"promotion": "rollback",
                       **stamp("promoted", who, f"rolled back from v{current}: {why}")}.items():
        client.set_model_version_tag(name, previous, key, value)
    return f"{name} @champion rolled back from v{current} to v{previous}"


def version_line(version, aliases: list[str]) -> str:
    """Return one line about a version: aliases, its gate decision (metric, both scores) and any manual change."""
    tags = version.tags
    named = f"v{version.version} " + (" ".join(f"@{a}" for a in sorted(aliases)) or "-")
    decision = GateDecision.from_tags(tags)
    parts = [named]
    if decision is not None:
        verdict = "promoted" if decision.promoted else "not promoted"
        parts.append(f"gate {verdict}: {decision.reason}")
    if "promoted_by" in tags and tags.get("promotion") != "gate":
        parts.append(f"{tags.get('promotion', 'manual')} by {tags['promoted_by']} at {tags.get('promoted_at', '?')}: "
                     f"{tags.get('promoted_reason', '')}")
    if "demoted_by" in tags:
        parts.append(f"demoted by {tags['demoted_by']}: {tags.get('demoted_reason', '')}")
    return "; ".join(parts)


def list_versions(tracking_uri: str, name: str) -> str:
    """Return the versions of `name`, newest first, with their aliases, scores and decisions (`sftflow models`)."""
    client = registry_client(tracking_uri)
    held = aliases(client, name)
    by_version: dict[str, list[str]] = {}
    for alias, version in held.items():
        by_version.setdefault(version, []).append(alias)
    versions = all_versions(client, name)
    lines = [f"{name}: {len(versions)} version{'s' if len(versions) != 1 else ''}, @champion "
             + (f"v{held[CHAMPION]}" if CHAMPION in held else "none")]
    lines += [version_line(v, by_version.get(str(v.version), [])) for v in reversed(versions)]
    return "\n".join(lines)


# ---- links to the MLflow UI ----
