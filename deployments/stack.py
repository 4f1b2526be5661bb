"""sftflow's local Prefect stack, up and down in one command each (`make prefect-up`, `make prefect-down`).

    python deployments/stack.py up [--port 4200] [--pool cpu] [--gpu-pool] [--zombie-after 90]
    python deployments/stack.py status
    python deployments/stack.py down        # the workers, then the server: no process left behind

`up` starts `prefect server start` on 127.0.0.1 in the background and waits until its API answers, creates the
process work pools `cpu` and `gpu` unless they exist, deploys deployments/prefect.yaml (every `up` deploys again, so
an edited file takes effect) and starts a worker on the `cpu` pool; with `--gpu-pool` a second worker on the `gpu` pool
as well (a GPU on this machine: the steps `orchestrate.placement` sends to `gpu` run there). On two machines, run `up`
on the first and `prefect worker start --pool gpu` on the GPU machine instead (docs/scale-out.md).

A lost worker: the workers' flow runs send a heartbeat every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds (30 unless
set), and `up` creates Prefect's zombie-run automation (as Prefect's docs give it): a flow run that misses its
heartbeats for `--zombie-after` seconds is marked Crashed, so the pipeline that placed it retries it.

Each background process gets a PID file (JSON: pid, start time, command) and a log in $SFTFLOW_HOME/stack/ (default
.sftflow/stack/), in a process group of its own. `up` is idempotent: a server or worker that is still running is kept,
not started twice. `down` stops the workers and the server with their whole process trees (the workers' flow-run
subprocesses included: a run in progress is interrupted, and a rerun of its run id skips the steps it finished); with
nothing running it says so.

The processes get sftflow's environment (tasks/core/settings.py: PREFECT_HOME in $SFTFLOW_HOME, telemetry off, ...;
variables you set win) plus PREFECT_API_URL of this server, and the worker hands it to every flow run. The home is
this checkout's .sftflow wherever the script is started from, and the deployments' pull step works in this checkout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from zombies import ZOMBIE_AFTER_S, ensure_zombie_automation  # deployments/zombies.py, beside this script

from flows.temporary_server import healthy
from tasks.core.settings import PREFECT_STARTUP_TIMEOUT_S, apply_defaults, sftflow_home

ROOT = Path(__file__).resolve().parents[1]
PREFECT_FILE = ROOT / "deployments" / "prefect.yaml"
HOST = "127.0.0.1"
DEFAULT_PORT = 4200
DEFAULT_POOL = "cpu"  # the work pool deployments/prefect.yaml names
GPU_POOL = "gpu"  # where the deployment sft-step/gpu runs the steps orchestrate.placement sends there
WORKER_NAME = "sftflow-worker"
WORKERS = {"worker": WORKER_NAME, "gpu-worker": "sftflow-gpu-worker"}  # PID record name -> Prefect worker name
HEARTBEAT_S = "30"  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY for the workers' flow runs (Prefect's minimum)
STOP_GRACE_S = 20


class StackError(RuntimeError):
    """A condition `up` or `down` cannot fix itself; the message says what to do."""


def state_dir() -> Path:
    """Return (and create) the folder holding the PID files and logs: $SFTFLOW_HOME/stack (default .sftflow/stack)."""
    path = sftflow_home(cwd=ROOT) / "stack"  # this checkout's .sftflow, wherever the script is started from
    path.mkdir(parents=True, exist_ok=True)
    return path


def read_record(name: str) -> dict | None:
    """Return the PID record of background process `name` ("server" or "worker"), or None when there is none."""
    path = state_dir() / f"{name}.pid"
    return json.loads(path.read_text()) if path.exists() else None


def running(record: dict | None) -> psutil.Process | None:
    """Return the process a PID record names while it still runs; None once it ended (or its pid was reused)."""
    if record is None:
        return None
    try:
        proc = psutil.Process(record["pid"])
        if abs(proc.create_time() - record["create_time"]) > 1 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.NoSuchProcess:
        return None


def spawn(name: str, command: list[str], env: dict[str, str], **extra) -> dict:
    """Start `command` in the background in a session of its own, its output appended to <name>.log; return and
    write its PID record <name>.pid."""
    log = state_dir() / f"{name}.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    record = {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "command": command,
              "log": str(log), **extra}
    (state_dir() / f"{name}.pid").write_text(json.dumps(record, indent=1))
    return record


def log_tail(record: dict, lines: int = 15) -> str:
    """Return the last lines of a background process's log, indented, for an error message."""
    text = Path(record["log"]).read_text(errors="replace").splitlines()[-lines:]
    return "\n".join("    " + line for line in text)


def port_free(port: int) -> bool:
    """Return whether nothing listens on HOST:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def start_server(port: int, env: dict[str, str]) -> dict:
    """Return the running server's PID record, starting `prefect server start` and waiting until it answers."""
    record = read_record("server")
    if running(record):
        print(f"Prefect server already running: {record['url']} (pid {record['pid']})")
        return record
    if not port_free(port):
        raise StackError(f"port {port} on {HOST} is in use by a process this script did not start: stop it, or pass "
                         f"--port (make prefect-up ARGS=\"--port {port + 1}\")")
    started, url = time.monotonic(), env["PREFECT_API_URL"]
    record = spawn("server", [prefect_cli(), "server", "start", "--host", HOST, "--port", str(port)], env,
                   port=port, url=url)
    import prefect.client.orchestration  # noqa: F401  (seconds of imports, done while the server starts)

    deadline = started + PREFECT_STARTUP_TIMEOUT_S  # a first start creates and migrates the database: ~40 s busy
    while not healthy(url):
        if not running(record):
            raise StackError(f"the Prefect server exited while starting; {record['log']} ends:\n{log_tail(record)}")
        if time.monotonic() > deadline:
            stop("server")
            raise StackError(f"the Prefect server did not answer at {url} within {PREFECT_STARTUP_TIMEOUT_S} s; "
                             f"see {record['log']}")
        time.sleep(0.5)
    print(f"Prefect server up: {url[:-4]} (pid {record['pid']}, log {record['log']}; {elapsed(started)})")
    return record


def ensure_pool(pool: str) -> None:
    """Create the process work pool `pool` with Prefect's default job template unless it exists (kept as it is)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            existing = client.read_work_pool(pool)
            print(f"work pool {pool!r} exists (type {existing.type})")
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=pool, type=ProcessWorker.type,
                                                   base_job_template=ProcessWorker.get_default_base_job_template()))
            print(f"work pool {pool!r} created (type {ProcessWorker.type})")


def deploy(env: dict[str, str]) -> None:
    """Deploy every deployment of deployments/prefect.yaml from the repository root (the pull step's `{{ $PWD }}`)."""
    started, log = time.monotonic(), state_dir() / "deploy.log"
    command = [prefect_cli(), "--no-prompt", "deploy", "--all", "--prefect-file", str(PREFECT_FILE)]
    with log.open("w") as out:
        done = subprocess.run(command, cwd=ROOT, env={**env, "PWD": str(ROOT)}, stdin=subprocess.DEVNULL,
                              stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise StackError(f"prefect deploy failed (exit {done.returncode}); {log} ends:\n"
                         f"{log_tail({'log': str(log)})}")
    print(f"deployed {PREFECT_FILE.relative_to(ROOT)} (log {log}; {elapsed(started)})")


def start_worker(pool: str, env: dict[str, str], name: str = "worker") -> dict:
    """Return the PID record of worker `name` ("worker" or "gpu-worker") polling `pool`, starting a process worker
    unless one runs."""
    record = read_record(name)
    if running(record):
        print(f"{name} already running on pool {record['pool']!r} (pid {record['pid']})")
        return record
    command = [prefect_cli(), "worker", "start", "--pool", pool, "--type", "process", "--name", WORKERS[name]]
    return spawn(name, command, env, pool=pool, worker=WORKERS[name])


def wait_worker_online(record: dict, timeout_s: float = 120) -> None:
    """Return once the worker of `record` has sent the server a heartbeat since it started."""
    from prefect.client.orchestration import get_client

    deadline, name = time.monotonic() + timeout_s, record.get("worker", WORKER_NAME)
    with get_client(sync_client=True) as client:
        while not any(w.name == name and w.status == "ONLINE" and w.last_heartbeat_time.timestamp() >=
                      record["create_time"] for w in client.read_workers_for_work_pool(record["pool"])):
            if not running(record):
                raise StackError(f"the worker exited while starting; {record['log']} ends:\n{log_tail(record)}")
            if time.monotonic() > deadline:
                raise StackError(f"the worker sent no heartbeat within {timeout_s:.0f} s; see {record['log']}")
            time.sleep(0.5)
    print(f"worker online on pool {record['pool']!r} (pid {record['pid']}, log {record['log']})")


def elapsed(started: float) -> str:
    """Return the seconds since `started` (time.monotonic()) as text."""
    return f"{time.monotonic() - started:.0f} s"


def prefect_cli() -> str:
    """Return the `prefect` executable next to this Python (the project's venv)."""
    return str(Path(sys.executable).parent / "prefect")


def up(port: int = DEFAULT_PORT, pool: str = DEFAULT_POOL, gpu_pool: bool = False,
       zombie_after_s: float = ZOMBIE_AFTER_S) -> dict:
    """Start (or keep) the server, create the pools and the zombie-run automation, start (or keep) the worker (and
    with `gpu_pool` the gpu pool's) and deploy; return the server record."""
    started = time.monotonic()
    apply_defaults(cwd=ROOT)
    server = read_record("server")
    # set before prefect is imported here, and handed to the server, the workers and each flow run
    os.environ["PREFECT_API_URL"] = server["url"] if running(server) else f"http://{HOST}:{port}/api"
    os.environ.setdefault("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", HEARTBEAT_S)  # the zombie automation's signal
    env = dict(os.environ)
    server = start_server(port, env)
    for name in dict.fromkeys((pool, GPU_POOL)):  # the gpu pool exists even without a worker: sft-step/gpu needs it
        ensure_pool(name)
    ensure_zombie_automation(zombie_after_s)
    workers = [start_worker(pool, env)]  # the workers start up while deploy runs
    if gpu_pool:
        workers.append(start_worker(GPU_POOL, env, "gpu-worker"))
    deploy(env)
    for worker in workers:
        wait_worker_online(worker)
    print(f"ready in {elapsed(started)}. UI {server['url'][:-4]}; run the manual deployment with\n"
          f"  PREFECT_API_URL={server['url']} {prefect_cli()} deployment run sft-pipeline/sft-pipeline-manual "
          f"-p config_path=configs/tiny.yaml --watch")
    return server


def stop(name: str) -> list[int]:
    """Stop background process `name` with its whole process tree (SIGTERM, SIGKILL after STOP_GRACE_S); return
    the pids it stopped and remove its PID file."""
    record = read_record(name)
    proc = running(record)
    stopped: list[int] = []
    if proc is not None:
        tree = [proc, *proc.children(recursive=True)]  # before any of them dies: orphans lose their parent link
        for member in tree:
            with _gone_ok():
                member.terminate()
        _, alive = psutil.wait_procs(tree, timeout=STOP_GRACE_S)
        for member in alive:
            with _gone_ok():
                member.kill()
        psutil.wait_procs(alive, timeout=5)
        with _gone_ok():
            os.killpg(record["pid"], signal.SIGKILL)  # anything left in its session that left the tree
        stopped = [member.pid for member in tree]
    (state_dir() / f"{name}.pid").unlink(missing_ok=True)
    return stopped


class _gone_ok:
    """Context manager ignoring a process that already ended."""

    def __enter__(self):
        """Enter: nothing to set up."""
        return self

    def __exit__(self, kind, value, traceback):
        """Swallow NoSuchProcess / ProcessLookupError only."""
        return kind is not None and issubclass(kind, (psutil.NoSuchProcess, ProcessLookupError))


def down() -> None:
    """Stop the workers, then the server; fine when nothing runs."""
    for name in ("gpu-worker", "worker", "server"):
        stopped = stop(name)
        if stopped or name != "gpu-worker":  # a gpu worker only runs when asked for: no line for its absence
            print(f"{name} stopped (pids {', '.join(map(str, stopped))})" if stopped else f"no {name} running")


def status() -> int:
    """Print whether the server and the worker(s) run; return 0 when the server and the cpu worker do, else 1."""
    alive = 0
    for name in ("server", "worker", "gpu-worker"):
        record = read_record(name)
        if running(record):
            alive += name != "gpu-worker"
            where = record.get("url") or f"pool {record.get('pool')!r}"
            print(f"{name}: running, pid {record['pid']}, {where}, log {record['log']}")
        elif name != "gpu-worker":
            print(f"{name}: not running")
    return 0 if alive == 2 else 1


def main(argv: list[str] | None = None) -> int:
    """Command line: up / down / status."""
    parser = argparse.ArgumentParser(prog="deployments/stack.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("up", help="server on 127.0.0.1, process work pools, deploy, worker(s) (idempotent)")
    start.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"server port (default {DEFAULT_PORT})")
    start.add_argument("--pool", default=DEFAULT_POOL, help=f"work pool the worker polls (default {DEFAULT_POOL})")
    start.add_argument("--gpu-pool", action="store_true", help=f"also a worker on pool {GPU_POOL!r} on this machine")
    start.add_argument("--zombie-after", type=float, default=ZOMBIE_AFTER_S,
                       help=f"seconds without a heartbeat before a flow run is marked Crashed (default "
                            f"{ZOMBIE_AFTER_S}; more than PREFECT_FLOWS_HEARTBEAT_FREQUENCY, {HEARTBEAT_S} here)")
    sub.add_parser("down", help="stop the worker and the server, with their process trees")
    sub.add_parser("status", help="say whether the server and the worker run")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            up(args.port, args.pool, args.gpu_pool, args.zombie_after)
        elif args.command == "down":
            down()
        else:
            return status()
    except StackError as exc:
        print(f"prefect-{args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
