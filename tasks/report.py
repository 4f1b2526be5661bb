"""Summarise a finished run: summary.json in the run directory and Prefect artifacts for the UI."""

from __future__ import annotations

import json
import time
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.common import in_prefect_run, stage_logger, stage_task

SUMMARY_FIELDS = ("base_exact_match", "tuned_exact_match", "eval_loss", "rows_raw", "rows_clean", "rows_quarantined",
                  "registered_model", "model_version", "alias", "mlflow_run_id", "prefect_flow_run_id", "wall_seconds")


def build_summary(run_id: str, clean_report: Path, eval_dir: Path, registered: dict, flow_run_id: str | None,
                  started_at: float) -> dict:
    """Return the run summary: data accounting, eval metrics, registry coordinates and wall time."""
    accounting = json.loads(clean_report.read_text(encoding="utf-8"))
    evaluation = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
    return {"run_id": run_id, **{k: evaluation[k] for k in ("base_exact_match", "tuned_exact_match", "eval_loss",
                                                             "base_eval_loss", "heldout_rows")},
            **{k: accounting[k] for k in ("rows_raw", "rows_clean", "rows_quarantined", "dropped_by_rule")},
            **registered, "prefect_flow_run_id": flow_run_id, "wall_seconds": round(time.time() - started_at, 1)}


def human_summary(s: dict) -> str:
    """Return a short human-readable summary of a run."""
    return (f"run {s['run_id']}: rows raw {s['rows_raw']} -> clean {s['rows_clean']} "
            f"(+{s['rows_quarantined']} quarantined); exact match base {s['base_exact_match']:.2f} -> tuned "
            f"{s['tuned_exact_match']:.2f}, eval loss {s['eval_loss']:.3f}; registered {s['registered_model']} "
            f"v{s['model_version']} @{s['alias']}; {s['wall_seconds']:.0f}s")


def publish_cleaning_report(clean_report: Path) -> None:
    """Show the cleaning report as a Prefect artifact: each source warning first, then the rows dropped per rule."""
    report = json.loads(clean_report.read_text(encoding="utf-8"))
    lines = [f"**Warning:** {w['message']}\n" for w in report.get("source_warnings", [])]
    lines += ["| rule | rows | example | detail |", "|---|---|---|---|"]
    lines += [f"| {r['rule']} | {r['rows']} | {r['example']} | {str(r['example_detail']).replace('|', '/')} |"
              for r in report["rules"]] or ["| - | 0 | | |"]
    create_markdown_artifact(key="cleaning-report", markdown="\n".join(lines),
                             description="Rows dropped by each cleaning rule (kept in the quarantine table)")


def publish_artifacts(summary: dict, clean_report: Path, eval_dir: Path) -> None:
    """Create Prefect artifacts: sample generations and the run summary."""
    samples = [json.loads(line) for line in (eval_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    create_table_artifact(key="eval-samples", table=samples[:20], description="Held-out generations, base vs tuned")
    create_markdown_artifact(key="run-summary", markdown="\n".join(
        ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in summary.items()]))


@stage_task("save-config", cache=False)
def save_config(config_yaml: str, out_file: Path) -> Path:
    """Write the resolved config of a run (what `sftflow task` and MLflow params read back) and return its path."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(config_yaml, encoding="utf-8")
    return out_file


@stage_task("summarize", cache=False)
def write_summary(run_id: str, clean_report: Path, eval_dir: Path, registered: dict, flow_run_id: str | None,
                  started_at: float, out_file: Path) -> dict:
    """Write summary.json, publish the run's artifacts, and return the summary."""
    summary = build_summary(run_id, clean_report, eval_dir, registered, flow_run_id, started_at)
    out_file.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if in_prefect_run():
        publish_artifacts(summary, clean_report, eval_dir)
    stage_logger().info(human_summary(summary))
    return summary
