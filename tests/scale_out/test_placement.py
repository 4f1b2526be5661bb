"""Two machines on one: a CPU box and a GPU box sharing one runs_dir and one `mlflow server`, with train and evaluate
placed on the GPU box's work pool (`orchestrate.placement`), then the GPU box lost in the middle of training.

The CPU box is `deployments/stack.py up` (what `make prefect-up` runs): a real `prefect server` on a free loopback port,
the `cpu` process pool and its worker, deployments/prefect.yaml deployed, Prefect's zombie-run automation. The GPU box
is `prefect worker start --pool gpu` in a working directory and HOME of its own, as a second machine would run it.
Every flow run is a subprocess of a real worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId, LogFilter, LogFilterFlowRunId
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings

from tasks.core.mlflow_store import seed_sqlite_store
from tests.conftest import ROOT, free_port, seed_prefect_database, wait_for_http

pytestmark = [pytest.mark.scale_out, pytest.mark.slow]  # slow: a real server, two workers, one SIGKILLed

STACK = ROOT / "deployments" / "stack.py"
MANUAL = "sft-pipeline/sft-pipeline-manual"
TIMEOUT_S = 420
ZOMBIE_AFTER_S = 45  # the automation's silence before Crashed: heartbeats come every 30 s (Prefect's minimum)
GPU_WORKER = "gpu-box"


@dataclass
class Boxes:
    """The two machines: the Prefect API, the shared runs_dir and MLflow server, each box's home and environment."""

    url: str
    runs: Path
    mlflow: str
    cpu_home: Path
    gpu_dir: Path
    stack_env: dict[str, str]
    gpu_env: dict[str, str]
    overrides: list[str]
    gpu_worker: subprocess.Popen | None = None

    def gpu_log(self) -> str:
        return (self.gpu_dir / "worker.log").read_text(errors="replace")

    def logs(self) -> str:
        """Return the ends of both workers' logs (every flow run's output), for a failure message."""
        cpu = (self.cpu_home / "stack" / "worker.log").read_text(errors="replace")
        return f"--- cpu worker ---\n{cpu[-3000:]}\n--- gpu worker ---\n{self.gpu_log()[-3000:]}"


def isolated_env(**extra: str) -> dict[str, str]:
    """Return this environment without any Prefect or MLflow store of the test session's, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "MLFLOW_TRACKING_URI"}
    return {**env, "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30", **extra}


def start_gpu_box(boxes: Boxes) -> subprocess.Popen:
    """Start the GPU box's worker (its own working directory and HOME) and return once it is online."""
    started = time.time()
    log = (boxes.gpu_dir / "worker.log").open("ab")
    boxes.gpu_worker = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", "gpu", "--type", "process",
         "--name", GPU_WORKER], cwd=boxes.gpu_dir, env=boxes.gpu_env, stdin=subprocess.DEVNULL, stdout=log,
        stderr=subprocess.STDOUT, start_new_session=True)
    with get_client(sync_client=True) as client:
        deadline = time.monotonic() + 120
        while not any(w.name == GPU_WORKER and w.status == "ONLINE" and w.last_heartbeat_time.timestamp() >= started
                      for w in client.read_workers_for_work_pool("gpu")):
            assert boxes.gpu_worker.poll() is None and time.monotonic() < deadline, boxes.gpu_log()[-3000:]
            time.sleep(0.5)
    return boxes.gpu_worker


def lose_gpu_box(boxes: Boxes) -> list[int]:
    """SIGKILL the GPU box's worker with every process under it (the flow run, its training), as a lost machine;
    return their pids."""
    root = psutil.Process(boxes.gpu_worker.pid)
    tree = [root, *root.children(recursive=True)]
    for proc in tree:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(tree, timeout=30)
    boxes.gpu_worker.wait(timeout=30)
    return [p.pid for p in tree]


@pytest.fixture(scope="module")
def boxes(tmp_path_factory, tiny_model_dir):
    """The CPU box (stack.py up), the GPU box (a worker of its own), one runs_dir and one mlflow server for both."""
    root = tmp_path_factory.mktemp("two-boxes")
    runs, cpu_home, gpu_dir = root / "shared-runs", root / "cpu-box", root / "gpu-box"
    for path in (runs, cpu_home / "home", gpu_dir / "home"):
        path.mkdir(parents=True)
    port, mlflow_port = free_port(), free_port()
    mlflow_url = f"http://127.0.0.1:{mlflow_port}"
    seed_sqlite_store(f"sqlite:///{root / 'mlflow.db'}")  # as sftflow's own stores start: migrated, empty
    mlflow = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{root / 'mlflow.db'}", "--default-artifact-root", str(root / "mlflow-artifacts"),
         "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    common = {"PREFECT_API_URL": url, "MLFLOW_TRACKING_URI": mlflow_url}
    the_boxes = Boxes(
        url, runs, mlflow_url, cpu_home, gpu_dir,
        isolated_env(SFTFLOW_HOME=str(cpu_home), HOME=str(cpu_home / "home"), **common),
        isolated_env(SFTFLOW_HOME=str(gpu_dir / ".sftflow"), HOME=str(gpu_dir / "home"), **common),
        # configs/tiny.yaml on the tiny llama, fp32 (this CPU would pick bf16) so a resumed run is the same bytes;
        # 8 steps with a checkpoint every 2, so the GPU box can be lost between two of them
        [f"runs_dir={runs}", f"train.base_model={tiny_model_dir}", "train.compute_dtype=fp32", "train.max_steps=8",
         "train.save_steps=2", "evaluate.max_samples=4", "orchestrate.placement={train: gpu, evaluate: gpu}",
         "orchestrate.retries.train.delay_s=1"])
    seed_prefect_database(cpu_home / "prefect", tmp_path_factory)  # a migrated database: the boxes are the subject
    try:
        up = subprocess.run([sys.executable, str(STACK), "up", "--port", str(port), "--zombie-after",
                             str(ZOMBIE_AFTER_S)], cwd=ROOT, env=the_boxes.stack_env, capture_output=True, text=True,
                            timeout=TIMEOUT_S, check=False)  # the mlflow server starts meanwhile
        assert up.returncode == 0, up.stdout + up.stderr
        wait_for_http(f"{mlflow_url}/health", mlflow)
        with temporary_settings({PREFECT_API_URL: url}):
            start_gpu_box(the_boxes)
            yield the_boxes
    finally:
        if the_boxes.gpu_worker is not None and the_boxes.gpu_worker.poll() is None:
            lose_gpu_box(the_boxes)
        subprocess.run([sys.executable, str(STACK), "down"], cwd=ROOT, env=the_boxes.stack_env, capture_output=True,
                       timeout=120, check=False)
        os.killpg(mlflow.pid, signal.SIGTERM)
        mlflow.wait(timeout=30)


def start_pipeline(boxes: Boxes, run_id: str, force: bool = False):
    """Start the manual deployment (on the CPU box) on configs/tiny.yaml as run `run_id`; return its flow run."""
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(MANUAL)
        return client.create_flow_run_from_deployment(deployment.id, parameters={
            "config_path": "configs/tiny.yaml", "overrides": boxes.overrides, "run_id": run_id, "force": force})


def wait_final(boxes: Boxes, flow_run_id, timeout_s: float = TIMEOUT_S):
    """Return the flow run once it reached a final state."""
    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
            assert time.monotonic() < deadline, f"still {flow_run.state.name}\n{boxes.logs()}"
            time.sleep(1)
    return flow_run


def children(parent_id) -> list:
    """Return the child flow runs of a flow run (the placed steps), oldest first."""
    with get_client(sync_client=True) as client:
        found = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))
    return sorted(found, key=lambda r: r.created)


def task_runs_of(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))


def logs_of(flow_run_id) -> str:
    with get_client(sync_client=True) as client:
        return "\n".join(log.message for log in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200))


def versions(boxes: Boxes) -> dict[int, str]:
    """Return the shared server's versions of sftflow-tiny: number -> the sftflow run that registered it."""
    from mlflow import MlflowClient

    client = MlflowClient(boxes.mlflow, registry_uri=boxes.mlflow)
    return {int(v.version): v.tags.get("sftflow_run_id") for v in client.search_model_versions("name='sftflow-tiny'")}


def wait_for_training(boxes: Boxes, parent_id, run_id: str):
    """Return the running train child flow run once its checkpoint-2 is whole on the shared runs_dir."""
    checkpoint = boxes.runs / run_id / "train" / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    deadline = time.monotonic() + TIMEOUT_S
    while True:
        assert time.monotonic() < deadline, f"training never reached checkpoint-2\n{boxes.logs()}"
        try:  # the file first: asking the API ten times a second for the whole run would keep its server busy
            whole = checkpoint.is_file() and json.loads(checkpoint.read_text()) is not None
        except ValueError:  # being written
            whole = False
        if whole and (kids := [k for k in children(parent_id) if k.name.endswith(": train") and k.state.is_running()]):
            return kids[0]
        time.sleep(0.1)


@dataclass
class LostRun:
    """The pipeline run whose GPU box was lost mid-training: its flow run, the train child it lost, the pids killed."""

    parent: object
    lost_child: object
    gpu_box_pids: set[int]
    killed: list[int]
    adapter_when_lost: bool
    seconds: float


@pytest.fixture(scope="module")
def lost_run(boxes) -> LostRun:
    """The tiny pipeline started on the CPU box, train and evaluate placed on the GPU box; the GPU box lost (SIGKILL,
    worker and all) once training has saved checkpoint-2 of 8, then started again; the run left to finish alone."""
    started = time.monotonic()
    parent = start_pipeline(boxes, "two-boxes")
    child = wait_for_training(boxes, parent.id, "two-boxes")
    gpu_box = {boxes.gpu_worker.pid, *(p.pid for p in psutil.Process(boxes.gpu_worker.pid).children(recursive=True))}
    killed = lose_gpu_box(boxes)
    adapter_when_lost = (boxes.runs / "two-boxes" / "train" / "adapter").exists()
    start_gpu_box(boxes)  # the machine comes back
    parent = wait_final(boxes, parent.id)
    return LostRun(parent, child, gpu_box, killed, adapter_when_lost, time.monotonic() - started)


def test_train_and_evaluate_run_on_the_gpu_box_as_child_runs_and_the_version_registers_in_the_shared_server(
        boxes, lost_run):
    parent = lost_run.parent
    assert parent.state.type == StateType.COMPLETED, f"{parent.state}\n{boxes.logs()}"
    kids = children(parent.id)
    assert [(k.name, k.work_pool_name) for k in kids] == [
        ("two-boxes: train", "gpu"), ("two-boxes: train", "gpu"), ("two-boxes: evaluate", "gpu")]
    assert parent.work_pool_name == "cpu"
    pids = {parent.infrastructure_pid, *(k.infrastructure_pid for k in kids)}
    assert len(pids) == 4 and None not in pids  # a flow-run process each, started by its pool's worker
    assert int(lost_run.lost_child.infrastructure_pid) in lost_run.gpu_box_pids  # under the gpu box's worker
    gpu_log = boxes.gpu_log()
    assert all(str(k.id) in gpu_log for k in kids) and str(parent.id) not in gpu_log

    # each step's task ran where its placement says: the data steps and register in the parent flow run on the cpu
    # box, train and evaluate in their child runs on the gpu box (the parent holds a placeholder for each)
    done = {t.name.split("[")[0]: t.flow_run_id for kid in kids for t in task_runs_of(kid.id) if t.state.is_completed()}
    assert done == {"train": kids[1].id, "evaluate": kids[2].id}
    here = {t.name.split("[")[0] for t in task_runs_of(parent.id) if t.state.is_completed()}
    assert {"ingest", "validate-raw", "clean", "validate", "format", "validate-tokens", "register"} <= here
    links = {t.id: t for t in task_runs_of(parent.id)}
    assert all(links[k.parent_task_run_id].flow_run_id == parent.id for k in kids)  # the children link back

    summary = json.loads((boxes.runs / "two-boxes" / "summary.json").read_text())
    assert summary["model_version"] == 1 and summary["prefect_flow_run_id"] == str(parent.id)
    assert versions(boxes) == {1: "two-boxes"}  # in the shared server, once
    print(f"\ntwo-box run with a lost gpu box: {lost_run.seconds:.0f} s")


def test_a_gpu_box_lost_mid_training_is_marked_crashed_retried_and_resumed_to_the_uninterrupted_adapter(
        boxes, lost_run, tiny_model_dir, tmp_path):
    from tasks.core.config import load_config
    from tasks.train.concurrency import slot_threads, torch_threads, train_slots
    from tasks.train.train import train_model

    assert int(lost_run.lost_child.infrastructure_pid) in lost_run.killed and not lost_run.adapter_when_lost
    trains = [k for k in children(lost_run.parent.id) if k.name.endswith(": train")]
    assert [k.state.type for k in trains] == [StateType.CRASHED, StateType.COMPLETED], boxes.logs()
    assert "no heartbeat" in trains[0].state.message  # Prefect's zombie automation marked it
    [placeholder] = [t for t in task_runs_of(lost_run.parent.id) if t.name.startswith("train[")]
    assert placeholder.run_count == 2  # the parent's retry sent the step again
    resumed = logs_of(trains[1].id)
    assert f"train: resuming from {boxes.runs / 'two-boxes' / 'train' / 'checkpoints'}/checkpoint-" in resumed, resumed

    # the same adapter, byte for byte, as the same job trained without a break (fp32, the same threads)
    cfg = load_config(boxes.runs / "two-boxes" / "config.yaml")
    with torch_threads(slot_threads(train_slots(cfg.orchestrate.train_slots))):
        reference = train_model(boxes.runs / "two-boxes" / "formatted", str(tiny_model_dir), tmp_path, cfg.train)
    placed = boxes.runs / "two-boxes" / "train" / "adapter" / "adapter_model.safetensors"
    assert placed.read_bytes() == (reference / "adapter_model.safetensors").read_bytes()
    assert versions(boxes) == {1: "two-boxes"}  # exactly one version for the run


def test_prefect_up_with_gpu_pool_adds_a_worker_on_the_gpu_pool_to_the_running_stack(boxes):
    up = subprocess.run([sys.executable, str(STACK), "up", "--gpu-pool", "--zombie-after", str(ZOMBIE_AFTER_S)],
                        cwd=ROOT, env=boxes.stack_env, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "worker already running on pool 'cpu'" in up.stdout and "worker online on pool 'gpu'" in up.stdout
    with get_client(sync_client=True) as client:
        online = {w.name for w in client.read_workers_for_work_pool("gpu") if w.status == "ONLINE"}
        step = client.read_deployment_by_name("sft-step/gpu")
    assert {"sftflow-gpu-worker", GPU_WORKER} <= online and step.work_pool_name == "gpu"
    assert step.entrypoint == "flows/placement.py:sft_step"
