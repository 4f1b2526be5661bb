"""Two pipeline runs at once on one machine: `sftflow run` twice, started together, against the test harness's
Prefect API, each with its own run directory, sharing one runs_dir (MLflow sqlite store, registry, champions cache)
and one base model. With one training slot they take turns at training, and the shared stores stay whole.

And two registrations at once, against a sqlite store and a real `mlflow server`: @champion moves by compare-and-set
on the champion record (tasks/registry/ledger.py), so the better version holds it whichever writes last, and no move
of many writers in several processes is lost."""

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from tasks.train.concurrency import train_limit_name
from tests.conftest import ROOT, new_store, registry_client

pytestmark = pytest.mark.slow  # two pipeline runs and registrations at once

TINY = ROOT / "configs" / "tiny.yaml"


def sftflow_run(run_id: str, seed: int, runs, model_dir, log):
    """Start `sftflow run configs/tiny.yaml` as its own process on synthetic data of `seed`; return the process."""
    overrides = [f"runs_dir={runs}", f"train.base_model={model_dir}", "register.min_stop_rate=0",
                 "train.max_steps=4", "train.save_steps=2", "evaluate.max_samples=4", "orchestrate.train_slots=1",
                 f"data.sources=[{{synthetic: {{rows: 120, seed: {seed}}}}}]"]  # other data: the data gate lets it in
    cmd = [sys.executable, "-m", "flows.cli", "run", str(TINY), "--run-id", run_id]
    for o in overrides:
        cmd += ["--set", o]
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_until_both_wait(logs, procs, timeout_s: float = 300) -> None:
    """Return once both runs' output says they wait for a training slot (or one has ended, or time is up)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline and all(p.poll() is None for p in procs.values()):
        if all("waiting for a training slot" in path.read_text(errors="replace") for path in logs.values()):
            return
        time.sleep(1)


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    """Run a and b at the same time; return the runs_dir, each run's summary, slot record and output, and when the
    test let go of the slot it held until both runs waited for it (so both really compete for one slot)."""
    from prefect.concurrency.sync import concurrency

    from tasks.train.concurrency import ensure_limit

    runs = tmp_path_factory.mktemp("shared-runs")
    started = time.time()
    logs = {r: runs.parent / f"{runs.name}-{r}.log" for r in "ab"}
    files = {r: path.open("w") for r, path in logs.items()}
    ensure_limit(train_limit_name(), 1)
    with concurrency(train_limit_name(), occupy=1, strict=True):  # a third training, as far as the runs can tell
        procs = {r: sftflow_run(r, seed, runs, tiny_model_dir, files[r]) for r, seed in (("a", 1), ("b", 2))}
        wait_until_both_wait(logs, procs)
        released = time.time()
    codes = {r: p.wait(timeout=600) for r, p in procs.items()}
    for f in files.values():
        f.close()
    output = {r: path.read_text(errors="replace") for r, path in logs.items()}
    assert codes == {"a": 0, "b": 0}, "\n\n".join(f"--- run {r} ---\n{output[r][-4000:]}" for r in "ab")
    summaries = {r: json.loads((runs / r / "summary.json").read_text()) for r in "ab"}
    slots = {r: json.loads((runs / r / "train" / "train_slot.json").read_text()) for r in "ab"}
    return {"runs": runs, "summaries": summaries, "slots": slots, "output": output, "released": released,
            "wall": time.time() - started}


def test_both_runs_register_their_own_version(two_runs):
    summaries = two_runs["summaries"]
    assert sorted(s["model_version"] for s in summaries.values()) == [1, 2]
    assert {s["registered_model"] for s in summaries.values()} == {"sftflow-tiny"}
    assert summaries["a"]["mlflow_run_id"] != summaries["b"]["mlflow_run_id"]


def test_the_aliases_agree_with_the_champion_record_each_move_decided_against_the_one_before(two_runs):

    runs, summaries = two_runs["runs"], two_runs["summaries"]
    client = registry_client(f"sqlite:///{runs / 'mlflow.db'}")
    model = client.get_registered_model("sftflow-tiny")
    aliases = {alias: str(version) for alias, version in model.aliases.items()}
    assert set(aliases) == {"champion", "challenger"}
    assert aliases["challenger"] == "2"  # every new version is the challenger: the newest holds it
    moves = [json.loads(model.tags[k]) for k in sorted(model.tags) if k.startswith("champion.move.")]
    assert moves and aliases["champion"] == moves[-1]["version"]  # the alias shows the record's last move
    # not last-writer-wins: each move was decided against the champion the move before it left
    assert [m["previous"] for m in moves] == [None, *(m["version"] for m in moves[:-1])]
    for move in moves:
        tags = client.get_model_version("sftflow-tiny", move["version"]).tags
        against = "base" if move["previous"] is None else f"champion v{move['previous']}"
        assert (tags["gate.promoted"], tags["gate.against"], tags["gate.reason"]) == ("true", against, move["reason"])
    said = {str(s["model_version"]) for s in summaries.values() if s["alias"] == "champion"}
    assert said == {m["version"] for m in moves}
    for version in ("1", "2"):
        tags = client.get_model_version("sftflow-tiny", version).tags
        assert tags["gate.applied"] == "true" and tags["sftflow_run_id"] in ("a", "b")


def test_the_shared_mlflow_store_is_intact(two_runs):
    runs, summaries = two_runs["runs"], two_runs["summaries"]
    with sqlite3.connect(runs / "mlflow.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        names = sorted(r[0] for r in db.execute("SELECT DISTINCT value FROM tags WHERE key = 'sftflow_run_id'"))
        finished = db.execute("SELECT count(*) FROM runs WHERE status = 'FINISHED'").fetchone()[0]
    assert names == ["a", "b"] and finished >= 2
    for s in summaries.values():  # each version's files are where its run logged them
        assert (runs / "mlartifacts").is_dir()
        assert s["mlflow_run_id"]


def test_one_training_slot_makes_the_two_trainings_take_turns(two_runs):
    slots, output = two_runs["slots"], two_runs["output"]
    first, second = sorted(slots.values(), key=lambda s: s["started_at"])
    assert first["limit"] == second["limit"] == train_limit_name() and first["slots"] == 1
    assert first["threads"] == first["cores"]  # one slot: the training that holds it gets every core
    assert first["started_at"] >= two_runs["released"]  # neither trained while the test held the only slot
    assert second["started_at"] >= first["ended_at"], (first, second)  # and they did not overlap
    assert first["waited_s"] > 0 and second["waited_s"] > first["waited_s"]
    for r in "ab":  # each said it waits, on what, and who else trains; then that it got the slot
        assert f"waiting for a training slot: global concurrency limit '{train_limit_name()}' has 1 of 1 slots " \
               "taken; other train tasks running: " in output[r]
        assert "got a training slot" in output[r]
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(train_limit_name())
    assert (limit.limit, limit.active_slots) == (1, 0)  # both slots went back


def test_slots_and_threads_follow_the_machine_one_slot_per_two_cores_unless_configured():
    from tasks.train.concurrency import slot_threads, train_slots

    assert [train_slots(0, cores) for cores in (1, 2, 3, 16)] == [1, 1, 1, 8]
    assert train_slots(3, cores=16) == 3 and train_slots(5, cores=2) == 5  # configured: as many as asked
    assert [slot_threads(s, cores=16) for s in (1, 3, 8, 32)] == [16, 5, 2, 1]


def test_without_a_prefect_run_training_has_no_slot_limit_but_its_threads(tmp_path):
    import torch

    from tasks.train.concurrency import machine_cores, training_slot

    before = torch.get_num_threads()
    with training_slot(machine_cores() + 1, tmp_path) as threads:  # more slots than cores: one thread each
        assert threads == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before  # evaluate and the rest get the process's threads back
    record = json.loads((tmp_path / "train_slot.json").read_text())
    assert record["limit"] is None and record["threads"] == 1 and record["ended_at"] >= record["started_at"]


def dead_pid() -> int:
    """Return the pid of a process that has just ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def plant_holder(limit: str, limit_id, lease_id, pid: int) -> Path:
    from tasks.train.concurrency import holders_dir

    record = holders_dir() / f"{lease_id}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(
        json.dumps({"limit": limit, "limit_id": str(limit_id), "lease_id": str(lease_id), "pid": pid, "started": ""})
    )
    return record


@pytest.fixture
def reclaim_limit(tmp_path, monkeypatch, request):
    """A fresh one-slot global concurrency limit on the harness's server, and an empty holders directory."""
    from tasks.train.concurrency import ensure_limit

    monkeypatch.setenv("SFTFLOW_CACHE", str(tmp_path))
    name = f"sftflow-test-{request.node.name[-40:]}"
    ensure_limit(name, 1)
    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    yield name, limit.id
    with get_client(sync_client=True) as client:
        client.delete_global_concurrency_limit_by_name(name)


def active_slots(name: str) -> int:
    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(name).active_slots


def test_a_dead_holder_recorded_for_another_prefect_database_never_frees_a_live_holders_slot(reclaim_limit):
    # what CI hit: a SIGKILLed training of an earlier test session (another database) left its record, and the
    # next session's run freed the slot a live holder had, so two trainings overlapped
    import uuid

    from prefect.concurrency.sync import concurrency

    from tasks.train.concurrency import reclaim_dead_slots

    name, _ = reclaim_limit
    with concurrency(name, occupy=1, strict=True):
        record = plant_holder(name, uuid.uuid4(), uuid.uuid4(), dead_pid())
        assert reclaim_dead_slots(name) == []
        assert active_slots(name) == 1 and record.exists()  # kept for its own database's runs
        os.utime(record, (time.time() - 8 * 86400,) * 2)
        assert reclaim_dead_slots(name) == [] and active_slots(name) == 1
        assert not record.exists()  # a week old and its holder dead: dropped


def test_a_dead_holders_slot_goes_back_by_its_lease_or_by_count_when_the_server_forgot_it(reclaim_limit):
    import uuid

    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

    from tasks.train.concurrency import reclaim_dead_slots

    name, limit_id = reclaim_limit
    lease = acquire_concurrency_slots_with_lease([name], 1, lease_duration=300, strict=True)
    pid = dead_pid()
    plant_holder(name, limit_id, lease.lease_id, pid)
    assert active_slots(name) == 1
    assert reclaim_dead_slots(name) == [pid] and active_slots(name) == 0  # released through its lease
    # a temporary server that started after the holder's died never knew its lease: the slot goes by count
    with get_client(sync_client=True) as client:
        client.increment_concurrency_slots(names=[name], slots=1, mode="concurrency")
    record = plant_holder(name, limit_id, uuid.uuid4(), pid)
    assert reclaim_dead_slots(name) == [pid] and active_slots(name) == 0 and not record.exists()


def test_a_forgotten_lease_frees_no_slot_that_a_live_recorded_holder_has(reclaim_limit):
    # a server's repossessor expired the dead holder's lease and a live training took the slot since
    import uuid

    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

    from tasks.train.concurrency import process_started, reclaim_dead_slots

    name, limit_id = reclaim_limit
    live = acquire_concurrency_slots_with_lease([name], 1, lease_duration=300, strict=True)
    record = plant_holder(name, limit_id, live.lease_id, os.getpid())
    record.write_text(json.dumps({**json.loads(record.read_text()), "started": process_started(os.getpid())}))
    pid = dead_pid()
    plant_holder(name, limit_id, uuid.uuid4(), pid)
    assert reclaim_dead_slots(name) == [pid] and active_slots(name) == 1  # its record goes, the live slot stays


# ---- two registrations at once: the gate decides against the champion current at the move ----

ITEMS = 40  # held-out items of the prepared reports


def items(score: float) -> list[float]:
    """Per-item exact match with `score` of the items right, nested (a better model gets the same items right)."""
    right = round(score * ITEMS)
    return [1.0] * right + [0.0] * (ITEMS - right)


def prepared_report(tuned: float) -> dict:
    """An eval report of a run that scored `tuned` against champion v1's 0.5, on held-out set `set-1`."""
    return {"heldout_fingerprint": "set-1",
            "models": {"base": {"exact_match": 0.1}, "tuned": {"exact_match": tuned},
                       "champion": {"exact_match": 0.5, "version": "1"}},
            "items": {"base": {"exact_match": items(0.1)}, "tuned": {"exact_match": items(tuned)},
                      "champion": {"exact_match": items(0.5)}}}


def registered(client, scores: list[float], name: str = "race") -> None:
    """Model `name` with one version per score, tagged as register tags them (score, items, held-out set); v1
    champion."""
    from tasks.registry.gate import item_tags
    from tasks.registry.registry import GateDecision, apply_decision

    client.create_registered_model(name)
    for score in scores:
        report = prepared_report(score)
        client.create_model_version(name, "s3://sftflow-test/nowhere", tags={
            "heldout_fingerprint": "set-1", "score.exact_match": repr(score), **item_tags(report)})
    apply_decision(client, name, "1", GateDecision("exact_match", 0.5, "base", 0.1, 0.0, True, "v1 over base"), "t")


@pytest.fixture(params=["sqlite", "mlflow-server"])
def store(request, tmp_path):
    """A registry store: a sqlite file, or a real `mlflow server` on a loopback port (many processes, one database;
    the module's one, so each test registers a model of its own name)."""
    if request.param == "sqlite":
        return new_store(tmp_path / "mlflow.db")
    return request.getfixturevalue("module_mlflow_server")[0]


@pytest.mark.parametrize("held", ["0.9", "0.8"])
def test_two_registrations_at_once_the_better_holds_champion_whichever_writes_last(store, held, monkeypatch):
    import threading

    from mlflow import MlflowClient

    from tasks.registry import ledger
    from tasks.registry.registry import apply_gate, decide_promotion

    name = f"race-held-{held}"  # the server is the module's
    registered(MlflowClient(store, registry_uri=store), [0.5, 0.9, 0.8], name)
    versions = {"0.9": "2", "0.8": "3"}
    other_done, held_waits, decided = threading.Event(), threading.Event(), {"0.9": [], "0.8": []}
    claim = ledger.claim_move

    def held_claim(client, name, seq, move):  # hold one writer between its decision and its write
        if move.version == versions[held] and not other_done.is_set():
            held_waits.set()
            assert other_done.wait(120), "the other registration did not finish"
        elif move.version != versions[held]:  # the other claims only once the held one has decided: a real race
            assert held_waits.wait(120), "the held registration never reached its claim"
        return claim(client, name, seq, move)

    monkeypatch.setattr(ledger, "claim_move", held_claim)
    results, errors = {}, []

    def register(label: str) -> None:
        def decide(champion):
            decision = decide_promotion(prepared_report(float(label)), "exact_match", 0.0, champion, 0.95)
            decided[label].append(decision.against)
            return decision

        try:
            results[label] = apply_gate(MlflowClient(store, registry_uri=store), name, versions[label], decide, label)
        except Exception as e:  # noqa: BLE001 -- reported by the assertion below
            errors.append(e)
        finally:
            if label != held:
                other_done.set()

    threads = [threading.Thread(target=register, args=(label,)) for label in ("0.9", "0.8")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert errors == []
    client = MlflowClient(store, registry_uri=store)
    model = client.get_registered_model(name)
    assert str(model.aliases["champion"]) == "2"  # 0.9 holds @champion
    assert decided[held][0] == "champion v1"  # the held one decided against v1, then waited: a real race
    moves = [json.loads(model.tags[k]) for k in sorted(model.tags) if k.startswith("champion.move.")]
    if held == "0.9":  # 0.8 moved first; 0.9's claim was lost, and it decided again against 0.8 (v3)
        assert decided["0.9"] == ["champion v1", "champion v3"]
        assert [(m["version"], m["previous"]) for m in moves] == [("1", None), ("3", "1"), ("2", "3")]
        assert results["0.9"].promoted and results["0.9"].against_score == 0.8
    else:  # 0.9 moved first; 0.8 lost its claim and, against 0.9, does not promote
        assert decided["0.8"] == ["champion v1", "champion v2"]
        assert [(m["version"], m["previous"]) for m in moves] == [("1", None), ("2", "1")]
        assert not results["0.8"].promoted and "does not beat champion v2's 0.9" in results["0.8"].reason
    v3 = client.get_model_version(name, "3").tags
    assert v3["gate.applied"] == "true" and v3["gate.against"] == ("champion v1" if held == "0.9" else "champion v2")
    assert json.loads(model.tags["champion_history"]) == [m["version"] for m in moves]
    assert str(model.aliases["challenger"]) == "3"  # the newest version


MOVER = """
import sys
from tasks.registry.registry import promote_version
uri, versions = sys.argv[1], sys.argv[2:]
for v in versions:
    print(promote_version(uri, "race", v, "stress", who="p"), flush=True)
"""


def test_many_moves_from_two_processes_at_once_lose_none(tmp_path):
    from mlflow import MlflowClient

    from tasks.registry.ledger import read_state

    uri = new_store(tmp_path / "mlflow.db")
    registered(MlflowClient(uri, registry_uri=uri), [0.5, 0.6, 0.7, 0.8])
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, "-c", MOVER, uri, *versions], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for versions in (["2", "3", "4"] * 4, ["3", "4", "2"] * 4)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    moved = sum(line.endswith(": stress") for out, _ in outputs for line in out.splitlines())
    client = MlflowClient(uri, registry_uri=uri)
    model = client.get_registered_model("race")
    state = read_state(client, "race")
    assert state.seq == moved + 1 and len(state.history) == state.seq  # every move recorded, none lost
    assert str(model.aliases["champion"]) == state.champion  # the alias shows the last move
    assert [m.name for m in client.search_registered_models()] == ["race"]  # no claim left behind


def test_a_claim_deleted_while_it_is_read_is_no_foreign_claim(tmp_path, monkeypatch):
    """The SQL store reads a model, then its tags: a claim its writer deletes in between reads as one without tags.
    The reader reads it again, finds it gone and the move recorded, and goes on (a 2-process run of the test above
    failed on this once, with 'not an sftflow claim')."""
    from mlflow import MlflowClient

    from tasks.registry import ledger

    uri = new_store(tmp_path / "mlflow.db")
    client, writer = MlflowClient(uri, registry_uri=uri), MlflowClient(uri, registry_uri=uri)
    registered(client, [0.5, 0.6])
    move = ledger.Move("2", "1", "manual", "a writer", "test")
    client.create_registered_model(ledger.claim_name("race", 2), tags={ledger.CLAIM_TAG: move.to_json()})
    read = client.get_registered_model

    def read_while_its_writer_finishes(name):
        model = read(name)
        if ledger.is_claim(name) and ledger.CLAIM_TAG in model.tags:  # its writer records the move, deletes the claim
            writer.set_registered_model_tag("race", ledger.move_tag(2), model.tags[ledger.CLAIM_TAG])
            writer.delete_registered_model(name)
            model._tags = {}  # what the store's second query (the tags) then finds
        return model

    monkeypatch.setattr(client, "get_registered_model", read_while_its_writer_finishes)
    state = ledger.read_state(client, "race")
    assert (state.seq, state.champion, state.history) == (2, "2", ("1", "2"))
    assert [m.name for m in writer.search_registered_models()] == ["race"]  # and no claim left


def test_a_claim_without_the_sftflow_tag_is_refused_with_the_fix(tmp_path):
    from mlflow import MlflowClient

    from tasks.registry import ledger

    uri = new_store(tmp_path / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    registered(client, [0.5])
    client.create_registered_model(ledger.claim_name("race", 2))
    with pytest.raises(ledger.RegistryError, match=r"^race.champion-claim.2 is not an sftflow claim \(no "
                                                    r"sftflow.champion_move tag\); delete it by hand$"):
        ledger.read_state(client, "race")
