"""@champion moves by compare-and-set on the MLflow registry itself, so that registrations, promotions and
rollbacks, from any number of processes or machines, neither race one another nor lose a move.

**The record.** Each move of @champion is one registered-model tag on the model, `champion.move.000001`,
`champion.move.000002`, ... (JSON: the version that took @champion, the one it took it from, how, who, when, why),
numbered without gaps. The champion is the last move's version; the champion history (what rollback returns along)
is the moves replayed. The `@champion` alias and the `champion_history` tag are views of the record, written after
it.

**Why no move is lost or made against a stale champion.** To make move k+1 a writer reads the record up to move k,
decides against move k's champion, then *claims* k+1 by creating the registered model `NAME.champion-claim.<k+1>`,
with the move as its tags in the same request. A registered model's name is the primary key of the store's table
(the sqlite file, or the database behind an `mlflow server` however many workers and machines call it), so the
store creates it once, in one transaction, and refuses every later creation with RESOURCE_ALREADY_EXISTS: of all
writers that decided against move k, exactly one claims k+1. The others read the record again and decide again,
against the new champion. The claimer copies its claim into the tag `champion.move.<k+1>` and deletes the claim; a
claim left behind by a crash is completed the same way by the next reader, so the record never stalls. A claim made
from a stale read, after the tag of its number exists (its earlier claim already deleted), is void: its writer finds
that tag holding another writer's nonce. A completer reads a claim first and the tag second, and the tag is written
before a claim is deleted, so a claim whose tag is still absent at that check is the first for its number. A file
lock would not do: it holds on one machine, and the store is shared. (MLflow's deprecated file store is not a
database and gives no such guarantee.)

**The alias.** After its move a writer sets @champion to the last move's version, then reads the record again; when
a newer move landed meanwhile it writes the alias again from that one, until the record it read last is the one it
wrote from. Every writer's last alias write is followed by such a check, so the alias ends on the last move's
version. A move of the alias outside sftflow (the MLflow UI) is not in the record: the gate compares against the
record's champion, and `sftflow models` shows the difference; `sftflow promote` and `rollback` write the record.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime

from tasks.core.errors import SftflowError

CHAMPION, CHALLENGER = "champion", "challenger"
MOVE_TAG = "champion.move."  # registered-model tag per move, numbered from 1 (zero-padded: sorted in the UI)
CLAIM_TAG = "sftflow.champion_move"  # the move a claim carries
HISTORY_TAG = "champion_history"  # a view: the versions that held @champion, oldest first (pre-ledger stores' record)
MAX_ATTEMPTS = 100  # reads and claims before giving up: each lost claim means another writer's move succeeded


class RegistryError(SftflowError):
    """A registry command names a model, version or store that does not exist, or has nothing to act on."""


@dataclass(frozen=True)
class Move:
    """One move of @champion: `version` takes it from `previous` (None: there was none)."""

    version: str
    previous: str | None
    how: str  # gate, manual or rollback
    who: str
    reason: str
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    nonce: str = field(default_factory=lambda: uuid.uuid4().hex)
    before: tuple[str, ...] = ()  # move 1 only: the history a store kept before the record began (its tag)

    def to_json(self) -> str:
        """Return the move as the JSON its tag holds."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> Move:
        """Return the move a tag holds."""
        data = json.loads(text)
        return cls(**{**data, "before": tuple(data.get("before", ()))})


@dataclass(frozen=True)
class ChampionState:
    """The champion as the record has it after `seq` moves, its history, and what the alias shows."""

    seq: int
    champion: str | None
    history: tuple[str, ...]
    alias: str | None  # differs from `champion` only while a move's alias write is under way, or after a UI move


def move_tag(seq: int) -> str:
    """Return the tag key of move `seq`."""
    return f"{MOVE_TAG}{seq:06d}"


def claim_name(name: str, seq: int) -> str:
    """Return the registered model whose creation claims move `seq` of model `name`."""
    return f"{name}.champion-claim.{seq}"


def is_claim(model_name: str) -> bool:
    """Return True for a claim's registered model (left out of model lists)."""
    return ".champion-claim." in model_name


def recorded_moves(tags: dict[str, str]) -> list[Move]:
    """Return the moves in a model's tags, in order, up to the first number missing."""
    moves: list[Move] = []
    while (text := tags.get(move_tag(len(moves) + 1))) is not None:
        moves.append(Move.from_json(text))
    return moves


def replay(moves: list[Move]) -> list[str]:
    """Return the champion history the moves leave: a promotion pushes its version, a rollback pops back to it."""
    history = list(moves[0].before) if moves else []
    for move in moves:
        if move.how == "rollback" and history and history[-1] == move.previous:
            history.pop()
        if not history or history[-1] != move.version:
            history.append(move.version)
    return history


def legacy_history(tags: dict[str, str], alias: str | None) -> list[str]:
    """Return the history of a store from before the record (its champion_history tag), ending with the alias."""
    history = [str(v) for v in json.loads(tags.get(HISTORY_TAG, "[]"))]
    if alias is not None and (not history or history[-1] != alias):  # moved outside sftflow: keep it true
        history.append(alias)
    return history


def error_code(error: Exception) -> str:
    """Return an MlflowException's error code (as the REST client and the stores spell it)."""
    return str(getattr(error, "error_code", ""))


def upsert(call: Callable[..., object], *args) -> None:
    """Run one of MLflow's set-tag or set-alias calls, again when it lost a race to insert the same key: the SQL
    store sets a key by look-up then insert, so two writers of one key at once see a unique-constraint error (an
    `mlflow server` answers 500, and its client retries by itself)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(3):
        try:
            call(*args)
            return
        except MlflowException as e:
            if attempt == 2 or not any(s in str(e) for s in ("UNIQUE constraint", "IntegrityError", "Duplicate")):
                raise


def read_model(client, name: str) -> tuple[dict[str, str], str | None]:
    """Return model `name`'s tags and its @champion alias holder."""
    model = client.get_registered_model(name)
    alias = model.aliases.get(CHAMPION)
    return dict(model.tags), None if alias is None else str(alias)


VANISHED = ""  # read_claim: a claim deleted while it was read (its writer recorded its move first)


def read_claim(client, name: str, seq: int) -> str | None:
    """Return the move claim `seq` of model `name` carries (its CLAIM_TAG), None when there is no claim, or VANISHED
    when the claim was deleted while it was read.

    The SQL store reads a registered model and its tags in two queries, so a claim its writer deletes between them
    reads as a model without tags; read again, it is gone, and its move is in the record (a writer records its move
    before it deletes its claim). A claim still without the tag is not sftflow's (the claim and its tag are created in
    one request)."""
    from mlflow.exceptions import MlflowException

    seen = False
    for _ in range(3):
        try:
            claim = client.get_registered_model(claim_name(name, seq))
        except MlflowException as e:
            if "RESOURCE_DOES_NOT_EXIST" in error_code(e):
                return VANISHED if seen else None
            raise
        if CLAIM_TAG in claim.tags:
            return claim.tags[CLAIM_TAG]
        seen = True
    raise RegistryError(f"{claim_name(name, seq)} is not an sftflow claim (no {CLAIM_TAG} tag); delete it by hand")


def complete_claim(client, name: str, seq: int) -> bool:
    """Copy a claim of move `seq` left behind into the record (or drop it when the record has that move already);
    return False when there is no claim (True after one that vanished while read: the record has changed)."""
    move = read_claim(client, name, seq)
    if move is None or move == VANISHED:
        return move == VANISHED
    tags, _ = read_model(client, name)  # after the claim: an absent tag here proves the claim is the first
    if move_tag(seq) not in tags:
        upsert(client.set_registered_model_tag, name, move_tag(seq), move)
    drop_claim(client, name, seq)
    return True


def drop_claim(client, name: str, seq: int) -> None:
    """Delete claim `seq` (already gone: another writer or completer deleted it)."""
    from mlflow.exceptions import MlflowException

    try:
        client.delete_registered_model(claim_name(name, seq))
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" not in error_code(e):
            raise


def read_state(client, name: str) -> ChampionState:
    """Return the champion as the record has it (completing any claim a crashed writer left)."""
    tags, alias = read_model(client, name)
    moves = recorded_moves(tags)
    while complete_claim(client, name, len(moves) + 1):
        tags, alias = read_model(client, name)
        moves = recorded_moves(tags)
    if not moves:
        history = legacy_history(tags, alias)
        return ChampionState(0, history[-1] if history else None, tuple(history), alias)
    return ChampionState(len(moves), moves[-1].version, tuple(replay(moves)), alias)


def claim_move(client, name: str, seq: int, move: Move) -> bool:
    """Try to make `move` move number `seq`; return True when it is, False when another writer's move has it."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(claim_name(name, seq), tags={CLAIM_TAG: move.to_json()},
                                       description=f"sftflow: claim of move {seq} of {name}'s @champion (transient)")
    except MlflowException as e:
        # taken; or taken and deleted between the store's insert and its look-up of the existing model
        if any(code in error_code(e) for code in ("RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST")):
            return False
        raise
    tags, _ = read_model(client, name)
    recorded = tags.get(move_tag(seq))
    if recorded is not None and Move.from_json(recorded).nonce != move.nonce:
        drop_claim(client, name, seq)  # void: the record already had move `seq` (a stale read)
        return False
    upsert(client.set_registered_model_tag, name, move_tag(seq), move.to_json())  # a completer may write it too
    drop_claim(client, name, seq)
    return True


def settle_alias(client, name: str) -> ChampionState:
    """Write @champion and the history view from the last move, until the record read after the write is the one
    written from; return that state."""
    state = read_state(client, name)
    for _ in range(MAX_ATTEMPTS):
        if state.champion is not None:
            upsert(client.set_registered_model_alias, name, CHAMPION, state.champion)
            upsert(client.set_registered_model_tag, name, HISTORY_TAG, json.dumps(list(state.history[-200:])))
        after = read_state(client, name)
        if after.seq == state.seq:
            return after
        state = after
    return state


def move_champion(client, name: str, propose: Callable[[ChampionState], Move | None]) -> tuple[ChampionState,
                                                                                             Move | None]:
    """Move @champion by compare-and-set: read the record, let `propose` decide against the champion it shows (a
    Move, or None to leave it), claim the next move; on a lost claim read and decide again. Return the state after
    and the move made (None when `propose` declined)."""
    for _ in range(MAX_ATTEMPTS):
        state = read_state(client, name)
        move = propose(state)
        if move is None:
            return state, None
        if claim_move(client, name, state.seq + 1, move):
            return settle_alias(client, name), move
    raise RegistryError(f"{name}: could not move @champion after {MAX_ATTEMPTS} attempts: other writers kept moving "
                        "it; retry")
