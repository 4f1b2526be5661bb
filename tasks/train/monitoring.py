"""Monitoring of a training run: its MLflow run (one per sftflow run id), live metrics and the NaN/inf stop.

Why a callback of our own rather than transformers' MLflowCallback: that one is pointed at a run only through
process-wide environment variables (MLFLOW_RUN_ID, MLFLOW_TRACKING_URI, MLFLOW_EXPERIMENT_NAME), which would leak into
every later task of the same process; it logs every TrainingArguments field as a param (~150, several that depend on
the machine, and a rerun with a changed value fails because MLflow params cannot change), and it knows nothing of
tokens/s or peak memory. Here the Prefect task opens the run and writes its id to train/mlflow_run.json;
`LiveMetrics` logs to that id through an MlflowClient, from the world-zero process only; register attaches the
model to the same run.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.core.common import stage_logger
from tasks.core.config import PipelineConfig, TrainConfig, flatten
from tasks.core.errors import TrainingDiverged
from tasks.core.mlflow_store import seed_sqlite_store
from tasks.core.redact import install_log_redaction, redact, remember, reveal
from tasks.train.diagnose import diagnosis_tags, publish_diagnoses, write_diagnoses

RUN_FILE = "mlflow_run.json"  # in the run's train dir: the MLflow run of this sftflow run
WATCHED = ("loss", "grad_norm", "eval_loss")  # logged values that stop training when not finite


@dataclass(frozen=True)
class Tracking:
    """Where a run's MLflow record lives: the store, the experiment's artifact root and name, and the sftflow run id."""

    tracking_uri: str
    artifact_root: Path
    experiment: str
    run_name: str


def run_tracking(cfg: PipelineConfig, run_name: str) -> Tracking:
    """Return the tracking coordinates of sftflow run `run_name` under `cfg` (the ones register uses too)."""
    return Tracking(cfg.tracking_uri(), cfg.artifact_root(), cfg.registry.experiment, run_name)


def experiment_id(client, tracking: Tracking) -> str:
    """Return the id of the tracking experiment, creating it with its artifacts under tracking.artifact_root."""
    found = client.get_experiment_by_name(tracking.experiment)
    if found is not None:
        return found.experiment_id
    return client.create_experiment(tracking.experiment, artifact_location=tracking.artifact_root.resolve().as_uri())


def saved_run_id(client, train_dir: Path, tracking: Tracking) -> str | None:
    """Return the MLflow run id recorded in train_dir, if that run still exists, is live and carries this run id."""
    from mlflow.exceptions import MlflowException

    path = train_dir / RUN_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    if saved.get("tracking_uri") != redact(tracking.tracking_uri):  # the file keeps the URI without credentials
        return None
    try:
        run = client.get_run(saved["run_id"])
    except MlflowException:  # the store was replaced or the run deleted for good
        return None
    ok = run.info.lifecycle_stage == "active" and run.data.tags.get("sftflow_run_id") == tracking.run_name
    return run.info.run_id if ok else None


def tagged_run_id(client, exp_id: str, run_name: str) -> str | None:
    """Return the newest live run of the experiment tagged with this sftflow run id, if any."""
    if "'" in run_name:  # not expressible in MLflow's filter syntax; the run file is the main record anyway
        return None
    runs = client.search_runs([exp_id], filter_string=f"tags.sftflow_run_id = '{run_name}'", max_results=1,
                              order_by=["attributes.start_time DESC"])
    return runs[0].info.run_id if runs else None


def open_mlflow_run(tracking: Tracking, train_dir: Path) -> str:
    """Return the MLflow run of this sftflow run (reused on a retry or rerun, else created); record it in train_dir."""
    from mlflow import MlflowClient

    install_log_redaction()
    seed_sqlite_store(tracking.tracking_uri)
    client = MlflowClient(remember(tracking.tracking_uri))
    exp_id = experiment_id(client, tracking)
    run_id = saved_run_id(client, train_dir, tracking) or tagged_run_id(client, exp_id, tracking.run_name)
    if run_id is None:
        run = client.create_run(exp_id, run_name=tracking.run_name, tags={"sftflow_run_id": tracking.run_name})
        run_id = run.info.run_id
    else:
        client.update_run(run_id, status="RUNNING")
    train_dir.mkdir(parents=True, exist_ok=True)
    record = {"run_id": run_id, "tracking_uri": redact(tracking.tracking_uri), "experiment_id": exp_id,
              "run_name": tracking.run_name}
    (train_dir / RUN_FILE).write_text(json.dumps(record, indent=1), encoding="utf-8")
    return run_id


def recorded_run(train_dir: Path) -> dict | None:
    """Return train_dir's MLflow run record ({run_id, tracking_uri, ...}) if the train task opened one."""
    path = train_dir / RUN_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def param_values(flat: dict) -> dict[str, str]:
    """Return flattened config values as MLflow params (lists and dicts as JSON, credentials redacted), the one form
    train and register use."""
    return {k: redact(json.dumps(v) if isinstance(v, (list, dict)) else str(v)) for k, v in flat.items()}


def new_params(client, run_id: str, params: dict[str, str]) -> dict[str, str]:
    """Return the params the run lacks; warn about any whose value differs (MLflow keeps a param's first value)."""
    logged = client.get_run(run_id).data.params
    changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
    if changed:
        stage_logger().warning("mlflow run %s keeps its first values of %s (a rerun with a changed config)", run_id,
                               ", ".join(changed))
    return {k: v for k, v in params.items() if k not in logged}


def log_params(tracking_uri: str, run_id: str, params: dict[str, str]) -> None:
    """Log the params the run does not have yet."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri)
    fresh = new_params(client, run_id, params)
    items = [Param(k, v) for k, v in fresh.items()]
    for start in range(0, len(items), 100):  # MLflow's limit per batch
        client.log_batch(run_id, params=items[start:start + 100])


def mlflow_metrics(record: dict) -> dict[str, float]:
    """Return the MLflow metrics of one log_history record: train/<key> for a training step, eval/<key> for an
    evaluation, the trainer's end-of-run summary (train_runtime, train_loss = mean over the run, …) as it is."""
    numbers = {k: float(v) for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
    if "loss" in record:
        return {f"train/{k}": v for k, v in numbers.items()}
    if "eval_loss" in record:
        return {f"eval/{k.removeprefix('eval_')}": v for k, v in numbers.items() if k != "epoch"}
    return numbers


def peak_memory_mb() -> float:
    """Return this process's peak memory in MiB: allocated CUDA memory on a GPU, else the peak resident set size."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def non_finite(values) -> bool:
    """Return True if any tensor in `values` holds a nan or inf."""
    import torch

    return any(not bool(torch.isfinite(v).all()) for v in values)


def save_history(path: Path, history: list[dict]) -> None:
    """Write the trainer's log history (nan and inf as JSON's NaN / Infinity)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(history, indent=1), encoding="utf-8")


def throughput_callback():
    """Return a TrainerCallback adding tokens_per_second and peak_memory_mb to each training log (and its history).

    Tokens are TRL's `num_tokens` (input tokens seen, all processes), counted between two logs of this process.
    """
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.since, self.tokens = time.perf_counter(), 0.0  # TRL counts tokens from 0 in each process

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            now, extra = time.perf_counter(), {"peak_memory_mb": round(peak_memory_mb(), 1)}
            if "num_tokens" in logs:
                extra["tokens_per_second"] = round((logs["num_tokens"] - self.tokens) / max(now - self.since, 1e-9), 2)
                self.since, self.tokens = now, logs["num_tokens"]
            logs.update(extra)  # the callbacks after this one see it
            if state.log_history and state.log_history[-1].get("step") == state.global_step:
                state.log_history[-1].update(extra)

    return Throughput()


def divergence_callback(history_path: Path):
    """Return a TrainerCallback that stops training at the first step whose weights or logged loss are nan/inf.

    The loss itself is not visible to callbacks, and the Trainer replaces a nan loss by the running mean in what it
    logs (logging_nan_inf_filter); a nan or inf loss makes nan gradients and the optimizer then writes nan into the
    trainable weights in that same step, so the weights are checked after every optimizer step (a few ms for LoRA).
    The history, with the step marked, is saved before TrainingDiverged is raised (never retried).
    """
    from transformers import TrainerCallback

    class StopOnNonFinite(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None and non_finite(p.detach() for p in model.parameters() if p.requires_grad):
                self.stop(args, state, control, "the trainable weights became nan/inf (a nan or inf loss or gradient)")

        def on_log(self, args, state, control, logs=None, **kwargs):
            bad = [k for k in WATCHED if isinstance((logs or {}).get(k), float) and not math.isfinite(logs[k])]
            if bad:
                self.stop(args, state, control, ", ".join(f"{k} is {logs[k]}" for k in bad))

        def stop(self, args, state, control, reason):
            control.should_training_stop = True
            if state.is_world_process_zero:
                state.log_history.append({"step": state.global_step, "diverged": reason})
                save_history(history_path, state.log_history)
            raise TrainingDiverged(f"training diverged at step {state.global_step}: {reason}; lower "
                                   f"train.learning_rate (now {args.learning_rate:g}) or check the data")

    return StopOnNonFinite()


def live_metrics_callback(tracking_uri: str, run_id: str):
    """Return a TrainerCallback that logs every training and eval log to the MLflow run as it happens (world zero)."""
    from transformers import TrainerCallback

    class LiveMetrics(TrainerCallback):
        client = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            self.client = self.client or MlflowClient(tracking_uri)
            stamp = int(time.time() * 1000)
            metrics = [Metric(k, v, stamp, state.global_step) for k, v in mlflow_metrics(logs).items()]
            if metrics:
                self.client.log_batch(run_id, metrics=metrics)

    return LiveMetrics()


def log_outcome(run_id: str, tracking_uri: str, tags: dict[str, str], files: list[Path], failed: bool) -> None:
    """Tag the MLflow run (diagnoses), log the files under train/ and mark the training part finished or failed."""
    from mlflow import MlflowClient
    from mlflow.entities import RunTag

    client = MlflowClient(tracking_uri)
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    for path in files:
        client.log_artifact(run_id, str(path), artifact_path="train")
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def monitoring_callbacks(out_dir: Path) -> list:
    """Return [tokens/s + peak memory, live MLflow metrics (if out_dir records a run), the nan/inf stop], in the
    order they must run: the measures join each log before it is sent, the stop comes last."""
    callbacks = [throughput_callback()]
    record = recorded_run(out_dir)
    # the record keeps the URI without credentials: the real one comes from this process or MLFLOW_TRACKING_URI; a
    # worker process that cannot have it logs no live metrics (register logs the curve from the saved history)
    if record is not None and (uri := reveal(record["tracking_uri"])) is not None:
        callbacks.append(live_metrics_callback(uri, record["run_id"]))
    return [*callbacks, divergence_callback(out_dir / "log_history.json")]


def open_training_run(tracking: Tracking, out_dir: Path, cfg: TrainConfig) -> str:
    """Create or resume the sftflow run's MLflow run (recorded in out_dir) and log the train config as its params."""
    run_id = open_mlflow_run(tracking, out_dir)
    log_params(tracking.tracking_uri, run_id, param_values(flatten({"train": cfg.model_dump(mode="json")})))
    return run_id


def report_training(out_dir: Path, tracking: Tracking | None, run_id: str | None, failed: bool) -> list[dict]:
    """Diagnose the saved history: diagnoses.json, loss_curve.png, a warning line each, the Prefect artifact, and
    the MLflow run's tags and artifacts (then marked finished or failed); return the diagnoses."""
    diagnoses, json_path, image = write_diagnoses(out_dir)
    for d in diagnoses:
        stage_logger().warning("train: %s (step %s): %s", d["name"], d["step"], d["message"])
    image_url = None
    if run_id is not None:
        from tasks.core.links import mlflow_file_url

        image_url = mlflow_file_url(tracking.tracking_uri, run_id, f"train/{image.name}")  # logged just below
    publish_diagnoses(out_dir.parent.name, diagnoses, image, image_url)
    if run_id is not None:
        log_outcome(run_id, tracking.tracking_uri, diagnosis_tags(diagnoses),
                    [json_path, image, out_dir / "log_history.json"], failed)
    return diagnoses
