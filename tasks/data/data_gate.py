"""The data gate: a scheduled retraining run ends early, Completed "no new data", when neither the sources nor the
config changed since the last registered version (its tags record both: `dataset_fingerprint`, `config_digest`).

The sources' fingerprint is their bytes and their config (tasks/data/ingest.py fingerprint_data). The config digest
leaves out what cannot change the model: where runs are kept (runs_dir) and how steps are retried (orchestrate).
A run with `force` (`sftflow run --force`, the deployments' `force` parameter) trains whatever the gate says.
"""

from __future__ import annotations

import hashlib
import json

from tasks.core.common import in_prefect_run, stage_logger
from tasks.core.config import PipelineConfig, RunPaths, absent_sqlite_store
from tasks.core.stage import stage_task

NO_NEW_DATA = "no new data"  # the name of the Completed state a gated run ends in
NOT_MODEL_INPUTS = ("runs_dir", "orchestrate")


def config_digest(cfg: PipelineConfig) -> str:
    """Return a hash of the config sections that shape the model (all but runs_dir and orchestrate)."""
    data = cfg.model_dump(mode="json", by_alias=True)
    for key in NOT_MODEL_INPUTS:
        data.pop(key, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def last_registered(tracking_uri: str, model_name: str):
    """Return the newest registered version of `model_name` (an MLflow ModelVersion), or None when there is none
    or the store does not exist yet (a sqlite store is not created by looking)."""
    if absent_sqlite_store(tracking_uri):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        versions = MlflowClient(tracking_uri, registry_uri=tracking_uri).search_model_versions(
            f"name = '{model_name}'")
    except MlflowException:
        return None
    return max(versions, key=lambda v: int(v.version), default=None)


def unchanged_since(cfg: PipelineConfig, data_fingerprint: str) -> tuple[str | None, str]:
    """Return (why this run need not train, or None when it must; what the gate compared)."""
    name = cfg.registry.model_name
    latest = last_registered(cfg.tracking_uri(), name)
    if latest is None:
        return None, f"no version of {name} is registered yet: training"
    tags, digest = latest.tags or {}, config_digest(cfg)
    changed = [what for what, tag, now in (("sources", "dataset_fingerprint", data_fingerprint),
                                           ("config", "config_digest", digest)) if tags.get(tag) != now]
    where = f"{name} v{latest.version} (run {tags.get('sftflow_run_id', '?')})"
    if changed:
        return None, f"the {' and the '.join(changed)} changed since {where}: training"
    return (f"the sources (fingerprint {data_fingerprint[:12]}) and the config are unchanged since {where}; "
            "nothing to retrain (`sftflow run --force`, or the deployment's `force` parameter, trains anyway)"), where


@stage_task("data-gate", cache=False)
def data_gate(cfg: PipelineConfig, data_fingerprint: str) -> str | None:
    """Return why the run can end without training (nothing changed since the last registered version), or None;
    the decision and its reason are a Prefect artifact of the run either way."""
    reason, compared = unchanged_since(cfg, data_fingerprint)
    stage_logger().info("data gate: %s", reason or compared)
    if in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        verdict = f"**{NO_NEW_DATA}**: {reason}" if reason else f"**train**: {compared}"
        create_markdown_artifact(key="data-gate", markdown=f"### Data gate\n\n{verdict}\n\nSources fingerprint: "
                                 f"`{data_fingerprint}`; config digest: `{config_digest(cfg)}`",
                                 description="Whether this run trains: new data or config since the last version")
    return reason


def skipped_summary(run: RunPaths, reason: str, flow_run_id: str | None) -> dict:
    """Write and return the summary of a run the data gate ended: why, and no model."""
    summary = {"run_id": run.run_id, "skipped": NO_NEW_DATA, "reason": reason, "trained": False,
               "prefect_flow_run_id": str(flow_run_id) if flow_run_id else None}
    run.summary.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary
