"""Placement: a step of the pipeline runs on another Prefect work pool (`orchestrate.placement: {train: gpu}`).

The placed step runs as a child flow run of the one-step flow `sft-step`, deployed once per pool as `sft-step/<pool>`
(deployments/prefect.yaml): the parent calls Prefect's `run_deployment(..., as_subflow=True)`, so the UI shows one
parent run with the placed steps as child runs linked to it, and that pool's worker (on the GPU machine) runs it.
The child runs the step's entry of flows/steps.py, as `sftflow task` does: it reads the run's saved config and every
input from the run's layout under the shared runs_dir. What crosses machines is the run's address (runs_dir, run id)
and the MLflow URI with its credentials masked (the worker's own MLFLOW_TRACKING_URI reveals them): no Prefect result,
no pickle.

Why `run_deployment` and not `Flow.submit_to_work_pool`: in Prefect 3.8 the latter cloudpickles the flow into a bundle
that the pool's storage (S3, GCS or Azure blocks, uploaded by a `uv run --with prefect-aws ...` step) carries to the
worker, and needs remote result storage to hand back its result; offline, on a process pool, there is none. A
deployment runs the code the worker's machine has (its checkout or image) and takes JSON parameters.

Retries and failures: the step's task has its configured retries inside the child, as in one process. The parent's
placeholder task retries only when the child *crashed* (its worker or machine died: Prefect's zombie detection, a
heartbeat automation deployments/zombies.py creates, marks it Crashed); the rerun resumes training from the last valid
checkpoint in the shared runs_dir. A child that failed raises its own error in the parent: a user's error (bad data,
diverged loss) as its own class, anything else as PlacedStepFailed; neither is retried twice.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.runtime import flow_run

from flows.steps import STEPS, RunContext, run_names
from tasks.core import errors
from tasks.core.common import stage_logger
from tasks.core.config import PipelineConfig, RunPaths, load_config
from tasks.core.redact import install_log_redaction, redact, reveal
from tasks.core.settings import apply_defaults
from tasks.core.stage import configured

STEP_FLOW = "sft-step"  # the one-step flow; deployment `sft-step/<pool>` runs it on work pool <pool>
POLL_S = 2  # how often the parent asks the API whether a placed step has finished


class PlacedRunCrashed(RuntimeError):
    """A placed step's flow run crashed (its worker or machine was lost): the parent's retry sends it again."""


class PlacedStepFailed(RuntimeError):
    """A placed step failed on its pool after the retries its own task had there; not retried again."""


def retry_if_crashed(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a placed step only when its child flow run crashed: a failed child was retried by its own task, and a
    lost connection to the API does not prove the child dead (a second one would train into the same directory)."""
    try:
        state.result()
    except PlacedRunCrashed:
        return True
    except BaseException:  # noqa: BLE001 -- every other failure is final here
        return False
    return False


def failure_file(run: RunPaths, step: str) -> Path:
    """Return where a placed step's flow run records why it failed (in the shared run directory)."""
    return run.root / "placed" / f"{step}.error.json"


def record_failure(run: RunPaths, step: str, error: BaseException, flow_run_id: str) -> None:
    """Write the failed child's error (type and one-line message, credentials masked) for the parent to raise."""
    path = failure_file(run, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"flow_run_id": flow_run_id, "type": type(error).__name__,
                                "message": redact(" ".join(str(error).split()))}), encoding="utf-8")


def use_tracking_uri(cfg: PipelineConfig, tracking_uri: str | None) -> None:
    """Point this process at the parent's MLflow store, unless the run's config names one itself; a masked URI is
    revealed by this machine's MLFLOW_TRACKING_URI, so credentials never travel in the parameters. (Through the
    environment, not the config: the config's digest, which the data gate compares, stays the parent's.)"""
    if tracking_uri is None or cfg.registry.tracking_uri is not None:
        return
    real = reveal(tracking_uri)
    if real is None:
        raise errors.ConfigError(f"the run's MLflow store is {tracking_uri}: set MLFLOW_TRACKING_URI on this worker to "
                                 "that URI with its credentials (or use MLFLOW_TRACKING_TOKEN)")
    os.environ["MLFLOW_TRACKING_URI"] = real


@flow(name=STEP_FLOW)
def sft_step(step: str, runs_dir: str, run_id: str, refresh: bool = False, tracking_uri: str | None = None,
             pipeline_flow_run_id: str | None = None, fingerprint: str | None = None) -> str | None:
    """Run one step of run `run_id` through its flows/steps.py entry, its inputs read from the run's layout under the
    shared `runs_dir`; return its result (a path) as text. `tracking_uri` is the parent's, credentials masked."""
    apply_defaults()  # a worker may not have sftflow's environment; the user's values still win
    install_log_redaction()
    run = RunPaths(Path(runs_dir), run_id)
    try:
        cfg = load_config(run.config, [f"runs_dir={runs_dir}"])  # where this machine mounts the shared runs_dir
        use_tracking_uri(cfg, tracking_uri)
        handed = {"fingerprint": fingerprint} if fingerprint else {}
        stage = configured(STEPS[step].task, cfg.orchestrate.retry(step), run_names(cfg)[step], refresh)
        result = stage(*STEPS[step].args(RunContext(cfg, run, pipeline_flow_run_id, handed)))
    except BaseException as err:
        record_failure(run, step, err, str(flow_run.id))
        raise
    return None if result is None else str(result)


def check_pool(deployment_name: str, pool: str) -> None:
    """Fail in one line when `sft-step/<pool>` is not deployed on pool `pool`; warn when no worker polls it."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            deployment = client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            raise errors.ConfigError(
                f"orchestrate.placement sends a step to work pool {pool!r}, but deployment {deployment_name!r} does "
                f"not exist: deploy deployments/prefect.yaml (make prefect-up ARGS=--gpu-pool)") from None
        if deployment.work_pool_name != pool:
            raise errors.ConfigError(f"deployment {deployment_name!r} runs on work pool "
                                     f"{deployment.work_pool_name!r}, not {pool!r}: fix its work_pool in "
                                     "deployments/prefect.yaml")
        if not any(w.status == "ONLINE" for w in client.read_workers_for_work_pool(pool)):
            stage_logger().warning("work pool %r has no online worker: the step waits until one starts "
                                   "(prefect worker start --pool %s)", pool, pool)


def child_error(run: RunPaths, step: str, pool: str, child: Any) -> Exception:
    """Return the error a placed step's failed (or cancelled) child ends the parent with: its own user error as it
    is, anything else as PlacedStepFailed naming the pool and the flow run."""
    where = f"{step} on work pool {pool!r} (flow run {child.name})"
    path = failure_file(run, step)
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if record.get("flow_run_id") != str(child.id):  # none of its own: it was cancelled or died before recording
        return PlacedStepFailed(f"{where} ended {child.state.name}: {child.state.message or 'no message'}")
    kind = getattr(errors, record["type"], None)
    if isinstance(kind, type) and issubclass(kind, errors.SftflowError):
        return kind(record["message"])  # bad data, a failed gate, a diverged loss: the user's, never retried
    return PlacedStepFailed(f"{where} failed: {record['type']}: {record['message']}")


@task(name="placed-step", retry_condition_fn=retry_if_crashed, cache_policy=NO_CACHE, persist_result=False)
def run_placed(step: str, pool: str, parameters: dict[str, Any]) -> None:
    """Run `step` as a child flow run of deployment sft-step/<pool> and wait for it to end; raise its failure, or
    PlacedRunCrashed when it crashed. Its result stays in the run's layout, where the next steps read it."""
    from prefect.deployments import run_deployment

    deployment_name, started = f"{STEP_FLOW}/{pool}", time.monotonic()
    check_pool(deployment_name, pool)
    # the flow's --refresh / --refresh-from reach this placeholder as its refresh_cache option: hand it to the step
    refresh = bool(getattr(TaskRunContext.get().task, "refresh_cache", False))
    stage_logger().info("%s: placed on work pool %r (deployment %s)%s", step, pool, deployment_name,
                        ", cache refreshed" * refresh)
    # one key per attempt: Prefect's client sends the create request again when the server answers it late (after
    # PREFECT_API_REQUEST_TIMEOUT on a busy server), and without a key the server makes a second child that runs the
    # step again beside the first; with one, it returns the run it already made
    child = run_deployment(deployment_name, parameters={**parameters, "refresh": refresh}, as_subflow=True,
                           flow_run_name=f"{parameters['run_id']}: {step}", poll_interval=POLL_S,
                           idempotency_key=f"{step}-{uuid.uuid4()}")
    run = RunPaths(Path(parameters["runs_dir"]), parameters["run_id"])
    stage_logger().info("%s: flow run %s on work pool %r ended %s after %.0f s", step, child.name, pool,
                        child.state.name, time.monotonic() - started)
    if child.state.is_crashed():
        raise PlacedRunCrashed(f"{step} crashed on work pool {pool!r} (flow run {child.name}): "
                               f"{child.state.message or 'no message'}; rerunning run {run.run_id} resumes it from "
                               "its last checkpoint")
    if not child.state.is_completed():
        raise child_error(run, step, pool, child)
