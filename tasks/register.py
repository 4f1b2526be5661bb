"""Register: log the run to MLflow (params, training curve, eval metrics, reports, samples), log the adapter as a
model that reloads and generates, register a version and give it an alias (champion first, then challenger)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.common import stage_logger, stage_task
from tasks.config import RegisterConfig, RunPaths, flatten
from tasks.monitoring import Tracking, mlflow_metrics, new_params, open_mlflow_run, param_values

PIP_REQUIREMENTS = ["torch", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors", "tokenizers"]


def log_history_curve(client, run_id: str, history_file: Path) -> None:
    """Log the training curve from the saved history, unless training already logged it live to this run."""
    if not history_file.is_file() or client.get_metric_history(run_id, "train/loss"):
        return
    from mlflow.entities import Metric

    metrics = [Metric(k, v, 0, int(r.get("step", 0))) for r in json.loads(history_file.read_text(encoding="utf-8"))
               for k, v in mlflow_metrics(r).items()]
    for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def log_run_data(run: RunPaths, eval_dir: Path) -> None:
    """Log to the active run what it lacks of the flattened config and the loss curve, then eval metrics, report
    files and the sample table (once per run: a rerun's register attaches to the same run)."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    client, run_id = MlflowClient(), mlflow.active_run().info.run_id
    params = param_values(flatten(yaml.safe_load(run.config.read_text(encoding="utf-8"))))
    mlflow.log_params(new_params(client, run_id, params))
    log_history_curve(client, run_id, run.train / "log_history.json")
    mlflow.log_metrics(json.loads((eval_dir / "report.json").read_text(encoding="utf-8")))
    reports = (run.clean_report, run.formatted / "stats.json", run.quarantine, *sorted(run.validation.glob("*.json")))
    for path in reports:
        mlflow.log_artifact(str(path), artifact_path="reports")
    if run.data_docs.is_dir():
        mlflow.log_artifacts(str(run.data_docs), artifact_path="data_docs")
    if not any(f.path == "eval/samples.json" for f in client.list_artifacts(run_id, "eval")):  # log_table appends
        mlflow.log_table(pd.read_json(eval_dir / "samples.jsonl", lines=True), artifact_file="eval/samples.json")


def log_adapter_model(model_dir: str, adapter_dir: Path, model_name: str):
    """Log the trained model + tokenizer + chat template and register it; return the version.

    A LoRA adapter is logged with its base referenced, not copied; full weights (train.method full or hft, a
    `model/` directory rather than an adapter) are logged as they are.
    """
    import mlflow
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.modeling import is_adapter_dir

    tokenizer = AutoTokenizer.from_pretrained(str(adapter_dir))
    if not is_adapter_dir(adapter_dir):
        model = AutoModelForCausalLM.from_pretrained(str(adapter_dir), dtype=torch.float32)
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
            pip_requirements=PIP_REQUIREMENTS, registered_model_name=model_name)
        return info.registered_model_version
    from peft import PeftModel

    # Attach the adapter to a full-precision base: a 4-bit model cannot be serialised (mlflow#10878), and the
    # adapter is what is logged anyway. A local base is referenced by path so reloading does not re-init weights.
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    local_base = Path(model_dir).is_dir()
    info = mlflow.transformers.log_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
        base_model_path=str(Path(model_dir).resolve()) if local_base else None,
        pip_requirements=PIP_REQUIREMENTS, registered_model_name=model_name)
    return info.registered_model_version


def model_card(run: RunPaths, eval_dir: Path, model_dir: str) -> str:
    """Return a markdown model card: base model, training data by source, held-out results."""
    stats = json.loads((run.formatted / "stats.json").read_text(encoding="utf-8"))
    report = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
    lines = [f"# sftflow run {run.run_id}", "", f"LoRA adapter on `{model_dir}`.", "",
             "| source | training rows | held-out rows |", "|---|---|---|"]
    for source in sorted(set(stats["train"]["rows_by_source"]) | set(stats["heldout"]["rows_by_source"])):
        lines.append(f"| {source} | {stats['train']['rows_by_source'].get(source, 0)} | "
                     f"{stats['heldout']['rows_by_source'].get(source, 0)} |")
    lines += ["", (f"Held-out exact match: base {report['base_exact_match']:.3f} -> tuned "
                   f"{report['tuned_exact_match']:.3f}; eval loss {report['eval_loss']:.4f}.")]
    return "\n".join(lines)


def assign_alias(model_name: str, version: str | int) -> str:
    """Give `version` the alias champion if the model has none yet, else challenger; return the alias."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        client.get_model_version_by_alias(model_name, "champion")
        alias = "challenger"
    except MlflowException:
        alias = "champion"
    client.set_registered_model_alias(model_name, alias, str(version))
    return alias


def use_experiment(tracking_uri: str, artifact_root: Path, name: str) -> None:
    """Point MLflow at the store and select the experiment, creating it with artifacts under `artifact_root`."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())
    mlflow.set_experiment(name)


def register_run(tracking_uri: str, artifact_root: Path, run: RunPaths, model_dir: str, adapter_dir: Path,
                 eval_dir: Path, tags: dict, cfg: RegisterConfig) -> dict:
    """Log everything about one run to its MLflow run (the one training opened, else found by tag or created) and
    register its model; return the registry coordinates."""
    import mlflow
    from mlflow import MlflowClient

    use_experiment(tracking_uri, artifact_root, cfg.experiment)
    run_id = open_mlflow_run(Tracking(tracking_uri, artifact_root, cfg.experiment, run.run_id), run.train)
    with mlflow.start_run(run_id=run_id) as active:  # the run training created and logged its curve to
        mlflow.set_tags({"sftflow_run_id": run.run_id, **tags})
        log_run_data(run, eval_dir)
        version = log_adapter_model(model_dir, adapter_dir, cfg.model_name)
        card = model_card(run, eval_dir, model_dir)
        mlflow.log_text(card, "model_card.md")
        MlflowClient().update_model_version(cfg.model_name, str(version), description=card)
        alias = assign_alias(cfg.model_name, version)
        mlflow.set_tags({"registered_model": cfg.model_name, "model_version": str(version), "alias": alias})
    return {"registered_model": cfg.model_name, "model_version": int(version), "alias": alias,
            "mlflow_run_id": active.info.run_id}


@stage_task("register", retries=3, retry_delay_seconds=[10, 60, 300], cache=False)
def register_model(tracking_uri: str, artifact_root: Path, run: RunPaths, model_dir: str, adapter_dir: Path,
                   eval_dir: Path, tags: dict, cfg: RegisterConfig) -> dict:
    """Log the run and register the adapter in the MLflow registry; return name, version, alias and run id."""
    result = register_run(tracking_uri, artifact_root, run, model_dir, adapter_dir, eval_dir, tags, cfg)
    stage_logger().info("register: %s", result)
    return result
