"""`make prefect-up` / `make prefect-down` for real (deployments/stack.py, which the make targets call): a `prefect
server` on a free loopback port with a throwaway PREFECT_HOME, the process work pool, deployments/prefect.yaml, a
worker; the manual deployment run on configs/tiny.yaml until a model is registered in a temporary MLflow store, the
weekly schedule, a second run on unchanged data that the data gate ends early, and a teardown that leaves no process.

Not the harness of tests/flows: every flow run here is a subprocess of a real worker, as in production.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC
from pathlib import Path

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from tests.conftest import ROOT, registry_client, seed_prefect_database

pytestmark = pytest.mark.slow  # a real Prefect server and worker running deployments

STACK = ROOT / "deployments" / "stack.py"
MANUAL, WEEKLY = "sft-pipeline/sft-pipeline-manual", "sft-pipeline/sft-pipeline-weekly"
RUN_TIMEOUT_S = 300


@dataclass
class Stack:
    """The running stack: its API URL, sftflow home (PID files, logs, Prefect's database), runs dir, environment."""

    url: str
    home: Path
    runs: Path
    env: dict[str, str]
    overrides: list[str]

    def record(self, name: str) -> dict:
        """Return the PID record stack.py wrote for "server" or "worker"."""
        return json.loads((self.home / "stack" / f"{name}.pid").read_text())

    def log_tail(self) -> str:
        """Return the end of the worker's log (the flow runs' output), for a failure message."""
        return (self.home / "stack" / "worker.log").read_text(errors="replace")[-4000:]


def free_port() -> int:
    """Return a loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stack_command(stack_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run deployments/stack.py (what make prefect-up / prefect-down run) and return the finished process."""
    return subprocess.run([sys.executable, str(STACK), *args], cwd=ROOT, env=stack_env, capture_output=True,
                          text=True, timeout=RUN_TIMEOUT_S, check=False)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_model_dir):
    """Steps 1-4: `stack.py up` on a free port with a throwaway sftflow home; `down` at the end whatever happened."""
    home, runs = tmp_path_factory.mktemp("sftflow-home"), tmp_path_factory.mktemp("runs")
    # none of this session's Prefect or MLflow settings: stack.py derives PREFECT_HOME from SFTFLOW_HOME
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
    env.update(SFTFLOW_HOME=str(home), PREFECT_WORKER_QUERY_SECONDS="1")  # the worker polls every second
    port = free_port()
    # the tiny run as tests/flows/test_sft_pipeline.py makes it (gate on eval_loss, no stop check), shorter still
    overrides = [f"runs_dir={runs}", f"train.base_model={tiny_model_dir}", "register.min_stop_rate=0",
                 "register.gate_metric=eval_loss", "train.max_steps=2", "evaluate.max_samples=4"]
    the_stack = Stack(f"http://127.0.0.1:{port}/api", home, runs, env, overrides)
    seed_prefect_database(home / "prefect", tmp_path_factory)  # a migrated database: the stack is the subject here
    try:
        started = stack_command(env, "up", "--port", str(port))
        assert started.returncode == 0, started.stdout + started.stderr
        with temporary_settings({PREFECT_API_URL: the_stack.url}):
            yield the_stack
    finally:
        stack_command(env, "down")


def run_manual_deployment(stack: Stack) -> object:
    """Trigger the manual deployment on configs/tiny.yaml and return its flow run once it reached a final state."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(MANUAL)
        flow_run = client.create_flow_run_from_deployment(
            deployment.id, parameters={"config_path": "configs/tiny.yaml", "overrides": stack.overrides})
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not flow_run.state.is_final():
            assert time.monotonic() < deadline, f"flow run still {flow_run.state.name}; worker log:\n{stack.log_tail()}"
            time.sleep(1)
            flow_run = client.read_flow_run(flow_run.id)
    return flow_run


def model_versions(stack: Stack) -> list[int]:
    """Return the registered versions of sftflow-tiny in the run's own MLflow store (runs_dir/mlflow.db)."""

    client = registry_client(f"sqlite:///{stack.runs / 'mlflow.db'}")
    return sorted(int(v.version) for v in client.search_model_versions("name = 'sftflow-tiny'"))


@pytest.fixture(scope="module")
def first_run(stack):
    """Steps 5-6: the manual deployment's first run, with the train directories it left; while it runs, `up` again
    (idempotent: it keeps the server and the worker, and deploys again), whose result comes third."""
    again = subprocess.Popen([sys.executable, str(STACK), "up", "--port", "1"], cwd=ROOT, env=stack.env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        flow_run = run_manual_deployment(stack)
        output, _ = again.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        again.kill()
    return flow_run, sorted(stack.runs.glob("*/train")), (again.returncode, output)


def stack_processes(stack: Stack, *words: str) -> list[psutil.Process]:
    """Return the running processes with sftflow home `stack.home` whose command line holds all of `words`."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if all(w in (proc.info["cmdline"] or []) for w in words) and \
                    proc.environ().get("SFTFLOW_HOME") == str(stack.home):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_up_serves_the_api_with_the_process_pool_both_deployments_and_an_online_worker(stack):
    with get_client(sync_client=True) as client:
        pool = client.read_work_pool("cpu")
        workers = client.read_workers_for_work_pool("cpu")
        manual = client.read_deployment_by_name(MANUAL)
    assert pool.type == "process"
    assert [(w.name, w.status.value) for w in workers] == [("sftflow-worker", "ONLINE")]
    assert manual.work_pool_name == "cpu" and manual.entrypoint == "flows/sft_pipeline.py:sft_pipeline"
    assert manual.parameters == {"config_path": "configs/default.yaml", "overrides": [], "force": False}
    assert {"config_path", "overrides", "force"} <= set(manual.parameter_openapi_schema["properties"])
    # each flow run works in this checkout, whatever directory the worker was started from
    assert manual.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
    server = psutil.Process(stack.record("server")["pid"])
    port = int(stack.url.split(":")[-1].split("/")[0])
    assert {c.laddr.ip for c in server.net_connections("inet") if c.status == psutil.CONN_LISTEN
            and c.laddr.port == port} == {"127.0.0.1"}  # listening on the loopback interface only
    assert Path(stack.record("server")["log"]).parent == stack.home / "stack"  # logs and PID files in sftflow's home
    assert (stack.home / "prefect" / "prefect.db").exists()  # the server's database in the throwaway PREFECT_HOME


def test_the_manual_deployment_trains_and_registers_a_version_through_the_worker(stack, first_run):
    flow_run, trained, _ = first_run
    assert flow_run.state.type == StateType.COMPLETED, f"{flow_run.state}\n{stack.log_tail()}"
    assert flow_run.state.name == "Completed"
    assert model_versions(stack) == [1]
    assert len(trained) == 1 and (trained[0] / "adapter" / "adapter_model.safetensors").exists()
    summary = json.loads((trained[0].parent / "summary.json").read_text())
    assert summary["prefect_flow_run_id"] == str(flow_run.id)  # the run directory is this worker-run's own


def test_up_again_keeps_the_one_server_and_the_one_worker_and_deploys_again(stack, first_run):
    returncode, output = first_run[2]
    assert returncode == 0, output
    server, worker = stack.record("server"), stack.record("worker")
    assert f"Prefect server already running: {stack.url} (pid {server['pid']})" in output  # --port 1 was not used
    assert f"worker already running on pool 'cpu' (pid {worker['pid']})" in output
    assert "deployed deployments/prefect.yaml" in output
    assert [p.pid for p in stack_processes(stack, "server", "start")] == [server["pid"]]
    assert [p.pid for p in stack_processes(stack, "worker", "start")] == [worker["pid"]]


def test_the_weekly_deployment_runs_mondays_at_three_utc_on_the_process_pool(stack):
    with get_client(sync_client=True) as client:
        weekly = client.read_deployment_by_name(WEEKLY)
        deadline = time.monotonic() + 60
        while not (upcoming := client.get_scheduled_flow_runs_for_deployments([weekly.id])):
            assert time.monotonic() < deadline, "the server's scheduler created no run of the weekly deployment"
            time.sleep(1)
    assert weekly.work_pool_name == "cpu" and weekly.parameters == {"config_path": "configs/default.yaml"}
    [schedule] = weekly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 3 * * 1", "UTC", True)
    starts = [run.expected_start_time.astimezone(UTC) for run in upcoming]
    assert all((t.isoweekday(), t.hour, t.minute) == (1, 3, 0) for t in starts), starts


def test_a_second_run_on_unchanged_data_is_completed_as_no_new_data_without_training(stack, first_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, trained_before, _ = first_run
    flow_run = run_manual_deployment(stack)
    assert (flow_run.state.type, flow_run.state.name) == (StateType.COMPLETED, "no new data"), (
        f"{flow_run.state}\n{stack.log_tail()}")
    assert "unchanged" in flow_run.state.message
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    gate = [a for a in artifacts if a.key == "data-gate"]
    assert gate and "unchanged" in gate[0].data
    assert model_versions(stack) == [1]  # nothing new registered
    assert sorted(stack.runs.glob("*/train")) == trained_before  # and nothing trained


def test_down_stops_the_worker_and_the_server_with_their_process_trees(stack):
    trees = []
    for name in ("worker", "server"):
        root = psutil.Process(stack.record(name)["pid"])
        trees += [root, *root.children(recursive=True)]
    stopped = stack_command(stack.env, "down")
    assert stopped.returncode == 0, stopped.stderr
    assert "worker stopped" in stopped.stdout and "server stopped" in stopped.stdout
    left = [p for p in trees if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]
    port = int(stack.url.split(":")[-1].split("/")[0])
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", port)) != 0  # nothing answers on the server's port any more
    again = stack_command(stack.env, "down")  # with nothing running, down is fine
    assert again.returncode == 0 and again.stdout.split("\n")[:2] == ["no worker running", "no server running"]


def test_up_on_a_port_another_process_holds_is_one_error_line_and_starts_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env["SFTFLOW_HOME"] = str(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = stack_command(env, "up", "--port", str(port))
    assert done.returncode == 2
    assert done.stderr.strip() == (f"prefect-up: error: port {port} on 127.0.0.1 is in use by a process this script "
                                   "did not start: stop it, or pass --port "
                                   f"(make prefect-up ARGS=\"--port {port + 1}\")")
    assert not (tmp_path / "stack" / "server.pid").exists()
