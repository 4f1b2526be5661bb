"""The MLflow model registry as sftflow uses it: which version is @champion, and its trained weights on disk.

Register logs each run's trained directory (a LoRA adapter or full weights, as `trained_model_dir` gives it) under
the run's artifact path `trained/`, and tags the version with where it came from (`base_model`, `train_method`).
Evaluate scores the champion found here on the same held-out prompts as the new model. The gate's decision is
tasks/registry/gate.py (pure); @champion moves by compare-and-set on the champion record (tasks/registry/ledger.py);
this module is the I/O around both and the registry commands (`sftflow models`, `promote`, `rollback`).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from tasks.core.mlflow_store import seed_sqlite_store
from tasks.registry.gate import LOWER_IS_BETTER, GateDecision, decide_promotion, improvement  # noqa: F401 (API)
from tasks.registry.ledger import (
    CHALLENGER,
    CHAMPION,
    HISTORY_TAG,  # noqa: F401 (API)
    MAX_ATTEMPTS,
    ChampionState,
    Move,
    RegistryError,
    is_claim,
    move_champion,
    read_state,
    upsert,
)
from tasks.registry.weights import (  # noqa: F401 (API: evaluate, serve and the tests import them from here)
    TRAINED_ARTIFACT,
    Champion,
    RegisteredVersion,
    directory_digest,
    find_version,
    parse_model_ref,
)


def find_champion(tracking_uri: str, model_name: str, cache_dir: Path) -> Champion | None:
    """Return `model_name`'s champion (the record's: tasks/registry/ledger.py) with its trained directory
    downloaded, or None when there is none yet."""
    from mlflow import MlflowClient

    seed_sqlite_store(tracking_uri)
    held = current_champion(MlflowClient(tracking_uri, registry_uri=tracking_uri), model_name)
    return None if held is None else find_version(tracking_uri, f"{model_name}/{held[0]}", cache_dir)


def champion_to_compare(tracking_uri: str, model_name: str, cache_dir: Path, trained_dir: Path) -> Champion | None:
    """Return the champion evaluate should also score, downloaded: None when there is none, or when it holds the
    very weights in `trained_dir` (a cached rerun: scoring them against themselves decides nothing)."""
    from mlflow import MlflowClient

    seed_sqlite_store(tracking_uri)
    held = current_champion(MlflowClient(tracking_uri, registry_uri=tracking_uri), model_name)
    if held is None or held[1].get("trained_sha256") == directory_digest(trained_dir):
        return None
    return find_version(tracking_uri, f"{model_name}/{held[0]}", cache_dir)


# ---- the registry as the commands see it: versions, aliases, the champion's record ----

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
        known = ", ".join(sorted(m.name for m in client.search_registered_models() if not is_claim(m.name)))
        raise RegistryError(f"no registered model {name!r} in this store (models: {known or 'none'})") from None


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
    """Return the versions that held @champion, oldest first, ending with the current champion (the record's)."""
    get_model(client, name)
    return list(read_state(client, name).history)


def current_champion(client, name: str) -> tuple[str, dict] | None:
    """Return (version, tags) of `name`'s champion as the record has it, or None when the model or a champion does
    not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        state = read_state(client, name)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")):
            return None
        raise
    if state.champion is None:
        return None
    return state.champion, dict(client.get_model_version(name, state.champion).tags)


def stamp(prefix: str, who: str, reason: str) -> dict[str, str]:
    """Return `<prefix>_by`, `<prefix>_at` (UTC, ISO) and `<prefix>_reason` tags."""
    return {f"{prefix}_by": who, f"{prefix}_at": datetime.now(UTC).isoformat(timespec="seconds"),
            f"{prefix}_reason": reason}


def tag_version(client, name: str, version: str, tags: dict[str, str]) -> None:
    """Set tags on a model version."""
    for key, value in tags.items():
        upsert(client.set_model_version_tag, name, str(version), key, value)


def new_move(state: ChampionState, version: str, how: str, who: str, reason: str) -> Move:
    """Return the move of `version` to @champion from `state` (the first move keeps the store's older history)."""
    return Move(str(version), state.champion, how, who, reason, before=state.history if state.seq == 0 else ())


def settle_challenger(client, name: str) -> str:
    """Give @challenger to the newest version, rewriting it while a newer one appeared meanwhile (two registrations
    at once: the alias ends on the newest whichever writes last); return that version."""
    newest = str(all_versions(client, name)[-1].version)
    for _ in range(MAX_ATTEMPTS):
        upsert(client.set_registered_model_alias, name, CHALLENGER, newest)
        latest = str(all_versions(client, name)[-1].version)
        if latest == newest:
            break
        newest = latest
    return newest


def apply_gate(client, name: str, version: str, decide: Callable[[tuple[str, dict] | None], GateDecision],
               who: str) -> GateDecision:
    """Decide with `decide` against the champion current at the moment @champion would move, and move it by
    compare-and-set (tasks/registry/ledger.py): a champion that changed since evaluate is decided against anew, never
    against the one evaluate saw. Record the decision in the version's `gate.*` tags, mark it applied, give the
    newest version @challenger; return the decision."""
    made: list[GateDecision] = []

    def propose(state: ChampionState) -> Move | None:
        if state.champion == str(version):  # a retry after its move: it holds @champion already
            recorded = GateDecision.from_tags(dict(client.get_model_version(name, str(version)).tags))
            made.append(recorded if recorded is not None and recorded.promoted else GateDecision(
                "", None, f"v{version}", None, 0.0, True, f"v{version} already holds @champion (move {state.seq})"))
            return None
        champion = None if state.champion is None else (
            state.champion, dict(client.get_model_version(name, state.champion).tags))
        made.append(decide(champion))
        return new_move(state, version, "gate", who, made[-1].reason) if made[-1].promoted else None

    _, move = move_champion(client, name, propose)
    decision = made[-1]
    if move is not None:
        tag_version(client, name, version, {"promotion": "gate", **stamp("promoted", who, decision.reason)})
    if decision.metric:
        tag_version(client, name, version, decision.tags())
    tag_version(client, name, version, {"gate.applied": "true"})
    settle_challenger(client, name)
    return decision


def apply_decision(client, name: str, version: str, decision: GateDecision, who: str) -> GateDecision:
    """Apply a decision made by the caller as it is (tests and tools that build a history); register decides
    against the champion current at the move instead (`apply_gate`)."""
    return apply_gate(client, name, version, lambda champion: decision, who)


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
    number, who = str(get_version(client, name, version).version), who or current_user()
    state, move = move_champion(client, name, lambda s: None if s.champion == number else
                                new_move(s, number, "manual", who, reason))
    if move is None:
        return f"{name} v{number} is already @champion; nothing changed"
    tag_version(client, name, number, {"promotion": "manual", **stamp("promoted", who, reason)})
    return f"{name} v{number} is now @champion (was {f'v{move.previous}' if move.previous else 'none'}): {reason}"


def rollback_move(name: str, who: str, why: str) -> Callable[[ChampionState], Move]:
    """Return the proposal that moves @champion back to the version before the current one."""
    def propose(state: ChampionState) -> Move:
        if not state.history:
            raise RegistryError(f"{name} has no @champion to roll back")
        if len(state.history) < 2:
            raise RegistryError(f"{name} v{state.history[-1]} is its first champion: there is no previous one to "
                                "roll back to")
        return new_move(state, state.history[-2], "rollback", who, why)

    return propose


def rollback_champion(tracking_uri: str, name: str, reason: str = "", who: str | None = None) -> str:
    """Move @champion back to the version that held it before the current one (recorded on both); return a line."""
    client = registry_client(tracking_uri)
    get_model(client, name)
    who, why = who or current_user(), reason or "rollback"
    history = read_state(client, name).history
    if len(history) >= 2:
        get_version(client, name, history[-2])  # still there (not deleted)
    _, move = move_champion(client, name, rollback_move(name, who, why))
    current, previous = move.previous, move.version
    tag_version(client, name, current, stamp("demoted", who, f"rolled back to v{previous}: {why}"))
    tag_version(client, name, previous, {"promotion": "rollback",
                                         **stamp("promoted", who, f"rolled back from v{current}: {why}")})
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
    state = read_state(client, name)
    if state.seq and state.champion != held.get(CHAMPION):
        lines.append(f"note: the champion record says v{state.champion} (move {state.seq}); @champion was moved "
                     "outside sftflow: the gate compares against the record's (sftflow promote records a move)")
    lines += [version_line(v, by_version.get(str(v.version), [])) for v in reversed(versions)]
    return "\n".join(lines)
