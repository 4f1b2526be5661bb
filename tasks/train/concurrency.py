"""Training runs take turns on one machine: a Prefect global concurrency limit on the training part of the train task.

Two trainings started together on 2 cores each ran 2.4x slower than one after the other (608 s against 125 s for 6
steps): both fight for the same cores and caches. So training holds a slot of the global concurrency limit
`sftflow-train-<host>` (one per machine, since workers of one Prefect server may run on several machines), created or
resized from `orchestrate.train_slots` (0 = one per 2 cores, at least 1) before each acquisition, and torch gets the
cores of one slot (cores // slots) as its threads. A run that finds every slot taken logs that it waits, on what, and
which other train tasks are running, then waits in Prefect (`prefect.concurrency.sync.concurrency`), saying every
minute that it still waits. The slot is a lease renewed while training runs: a crashed run's slot goes back when the
lease expires on a `prefect server` (its repossessor service). Prefect's temporary (ephemeral) server runs no such
service, so each held lease is also recorded with its process id on this machine (the limit is per machine), and a
run that finds every slot taken first releases the leases of holders that are gone (a SIGKILLed training).

Without a Prefect run (`task.fn(...)`, a notebook) there is no limit: only the threads are set.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tasks.core.common import in_prefect_run, stage_logger

LEASE_S = 300  # renewed in the background while training runs; a dead holder's slot returns after this on a server
WAIT_REPORT_S = 60  # a waiting run says it still waits this often
# and asks again at least this often: Prefect's own retry interval grows to 30 s while slots stay taken, so a slot
# freed just after a refusal would otherwise stand idle for up to that long
POLL_S = 10


def machine_cores() -> int:
    """Return the cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0))


def train_slots(configured: int, cores: int | None = None) -> int:
    """Return the training runs allowed at once: `orchestrate.train_slots`, or 0 = one per 2 cores, at least 1."""
    cores = cores if cores is not None else machine_cores()
    return configured if configured > 0 else max(1, cores // 2)


def slot_threads(slots: int, cores: int | None = None) -> int:
    """Return the torch threads of one training run: the machine's cores shared out among the slots, at least 1."""
    cores = cores if cores is not None else machine_cores()
    return max(1, cores // max(1, slots))


def train_limit_name() -> str:
    """Return the global concurrency limit of this machine's trainings (one per host: one server, many machines)."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname()) or "local"
    return f"sftflow-train-{host}"


def ensure_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit `name` with `slots` slots, or resize it (the latest run's config wins)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)


def limit_id(name: str) -> str:
    """Return the id of global concurrency limit `name`: it tells one Prefect database's limit from another's."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_global_concurrency_limit_by_name(name).id)


def limit_usage(name: str) -> str:
    """Return how many slots of limit `name` are taken, e.g. '1 of 1 slots taken'."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name(name)
    return f"{limit.active_slots} of {limit.limit} slots taken"


def other_trainings() -> list[str]:
    """Return 'flow run name (task run name)' for every other running train task: who holds or awaits the slots."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        TaskRunFilter,
        TaskRunFilterName,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.runtime import task_run

    running = TaskRunFilter(name=TaskRunFilterName(like_="train"),
                            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=[StateType.RUNNING])))
    with get_client(sync_client=True) as client:
        runs = [t for t in client.read_task_runs(task_run_filter=running, limit=20) if str(t.id) != task_run.id]
        names = []
        for t in runs:
            flow = client.read_flow_run(t.flow_run_id).name if t.flow_run_id else "no flow run"
            names.append(f"flow run {flow} ({t.name})")
    return names


def lease_holder():
    """Return this task run (else flow run) as the lease holder Prefect records with the slot, or None."""
    from prefect.client.schemas.objects import ConcurrencyLeaseHolder
    from prefect.runtime import flow_run, task_run

    if task_run.id:
        return ConcurrencyLeaseHolder(type="task_run", id=task_run.id)
    return ConcurrencyLeaseHolder(type="flow_run", id=flow_run.id) if flow_run.id else None


def is_locked(err: BaseException) -> bool:
    """Return True when an acquisition failed only because every slot is taken (HTTP 423 from the server)."""
    cause = err.__cause__
    response = getattr(cause, "response", None)
    return getattr(response, "status_code", None) == 423


def holders_dir() -> Path:
    """Return where this machine's training-slot holders are recorded: one file per held lease (pid, lease id)."""
    from tasks.core.settings import cache_root

    return cache_root() / "train-slots"


def process_started(pid: int) -> str | None:
    """Return the start time of process `pid` (Linux: /proc/<pid>/stat field 22), '' where unknown, None if dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return ""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def holder_alive(held: dict) -> bool:
    """Return True while the process a holder record names still runs (the same process, not a new one with its
    pid; where its start time cannot be read, a live pid counts as alive)."""
    started = process_started(int(held["pid"]))
    return started is not None and (not started or not held.get("started") or started == held["started"])


STALE_RECORD_S = 7 * 86400  # a dead holder's record of another Prefect database is dropped after this


def reclaim_dead_slots(name: str) -> list[int]:
    """Release the leases of limit `name` whose recorded holder process on this machine is gone (SIGKILLed, OOM):
    Prefect's temporary server never expires a lease, so without this a killed training's slot would stay taken
    and every later training would wait for it forever. Return the dead holders' pids.

    A record counts only for the limit it was taken from (its id): one of another Prefect database (another
    PREFECT_HOME, server or test session) names a lease this server never had, and freeing a slot for it would free
    a live holder's."""
    this_limit = limit_id(name)
    ours = []
    for record in sorted(holders_dir().glob("*.json")):
        try:
            held = json.loads(record.read_text(encoding="utf-8"))
            alive = holder_alive(held)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if held.get("limit") == name and held.get("limit_id") == this_limit:
            ours.append((record, held, alive))
        elif not alive and time.time() - record.stat().st_mtime > STALE_RECORD_S:
            record.unlink(missing_ok=True)
    live = sum(alive for *_, alive in ours)
    freed = []
    for record, held, alive in ours:
        if alive:
            continue
        try:
            release_dead_lease(name, held["lease_id"], live)
        except Exception as err:  # noqa: BLE001 -- reclaiming is a courtesy: never fail a training over it
            stage_logger().warning("train: could not free the slot of dead pid %s: %s", held["pid"], err)
            continue
        record.unlink(missing_ok=True)
        freed.append(int(held["pid"]))
    return freed


def release_dead_lease(name: str, lease_id: str, live_holders: int) -> None:
    """Give back the slot a dead holder's lease `lease_id` took. A temporary server keeps leases in its memory: one
    started after the holder's server died knows no such lease (and says nothing) while the slot is still counted
    in the database, so the slot is then released by count, but only while more slots are taken than the
    `live_holders` recorded on this machine (a server's repossessor may have expired the lease and given its slot
    to a live run already)."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency._sync import release_concurrency_slots_with_lease

    with get_client(sync_client=True) as client:
        before = client.read_global_concurrency_limit_by_name(name).active_slots
        try:
            release_concurrency_slots_with_lease(lease_id)
        except Exception as err:  # noqa: BLE001 -- a lease the server already expired or never knew
            stage_logger().info("train: lease %s of a dead training: %s", lease_id, err)
        after = client.read_global_concurrency_limit_by_name(name).active_slots
        if after >= before and after > live_holders:
            client.release_concurrency_slots(names=[name], slots=1, occupancy_seconds=1.0)  # must be > 0


def hold_lease(stack: ExitStack, name: str, lease_id) -> None:
    """Keep lease `lease_id` of limit `name` renewed until `stack` closes, then release it; record its holder (this
    process) in holders_dir() meanwhile, so a later run can free it if this process dies."""
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import release_concurrency_slots_with_lease

    record = holders_dir() / f"{lease_id}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"limit": name, "limit_id": limit_id(name), "lease_id": str(lease_id),
                                  "pid": os.getpid(), "started": process_started(os.getpid()) or ""}),
                      encoding="utf-8")
    stack.callback(record.unlink, missing_ok=True)
    stack.callback(release_concurrency_slots_with_lease, lease_id)
    # a transient renewal failure must not kill a long training (the lease only matters when the process dies)
    stack.enter_context(maintain_concurrency_lease(lease_id, LEASE_S, raise_on_lease_renewal_failure=False))


def acquire_slot(stack: ExitStack, name: str, what: str) -> float:
    """Hold one slot of limit `name` until `stack` closes, waiting (and saying so) while all are taken; return the
    seconds waited. Slots whose holder process on this machine died are freed first.

    Prefect's `concurrency()` context manager does the same acquire / renew / release but keeps the lease id to
    itself; sftflow needs it to record the holder, so it calls the same three functions directly."""
    from prefect.concurrency._asyncio import AcquireConcurrencySlotTimeoutError, ConcurrencySlotAcquisitionError
    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease

    holder, logger, started = lease_holder(), stage_logger(), time.monotonic()

    def take(**wait):
        # strict: a limit deleted under us is an error, not an unlimited run
        lease = acquire_concurrency_slots_with_lease([name], 1, lease_duration=LEASE_S, strict=True, holder=holder,
                                                     **wait)
        hold_lease(stack, name, lease.lease_id)

    for attempt in range(2):
        try:
            take(max_retries=0)  # take a free slot at once, or learn that there is none
            return 0.0
        except ConcurrencySlotAcquisitionError as err:
            if not is_locked(err):
                raise
        if attempt == 0 and (dead := reclaim_dead_slots(name)):
            logger.info("%s: freed the training slot(s) of %r that killed run(s) held (pid %s)", what, name,
                        ", ".join(map(str, dead)))
        else:
            break
    others = other_trainings()
    logger.info("%s: waiting for a training slot: global concurrency limit %r has %s; other train tasks running: %s",
                what, name, limit_usage(name), "; ".join(others) or "none seen (a run on another machine may hold "
                f"it; `prefect gcl update {name} --active-slots 0` frees every slot)")
    reported = started
    while True:
        try:
            take(timeout_seconds=POLL_S)
            break
        except AcquireConcurrencySlotTimeoutError:
            reclaim_dead_slots(name)
            if time.monotonic() - reported >= WAIT_REPORT_S:
                reported = time.monotonic()
                logger.info("%s: still waiting for a training slot of %r (%s) after %.0f s", what, name,
                            limit_usage(name), reported - started)
    waited = time.monotonic() - started
    logger.info("%s: got a training slot of %r after waiting %.0f s", what, name, waited)
    return waited


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with `threads` torch (intra-op) threads, then restore the previous count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def training_slot(configured_slots: int, out_dir: Path, what: str = "train") -> Iterator[int]:
    """Hold a training slot of this machine for the block (inside a Prefect run) with torch threads set to one
    slot's cores; yield the thread count. Writes out_dir/train_slot.json: limit, slots, threads, waited and the
    wall-clock times the slot was held (so two runs can be shown to have taken turns)."""
    cores = machine_cores()
    slots = train_slots(configured_slots, cores)
    threads = slot_threads(slots, cores)
    record = {"limit": None, "slots": slots, "cores": cores, "threads": threads, "waited_s": 0.0}
    with ExitStack() as stack:
        if in_prefect_run():
            record["limit"] = name = train_limit_name()
            ensure_limit(name, slots)
            record["waited_s"] = round(acquire_slot(stack, name, what), 3)
            where = f"a slot of global concurrency limit {name!r} ({slots} on {cores} cores)"
        else:
            where = f"no Prefect run, so no slot limit ({cores} cores, train slots {slots})"
        stage_logger().info("%s: %s; torch threads %d", what, where, threads)
        record["started_at"] = time.time()
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            with torch_threads(threads):
                yield threads
        finally:
            record["ended_at"] = time.time()
            (out_dir / "train_slot.json").write_text(json.dumps(record, indent=1), encoding="utf-8")
