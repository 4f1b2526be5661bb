"""Summarise a run: summary.json in the run directory, its last lines at the terminal and the Prefect artifact for
the UI (a finished run, or one stopped early with --until)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tasks.core.artifacts import markdown_table, publish_markdown
from tasks.core.common import in_prefect_run, stage_logger
from tasks.core.config import RUN_LAYOUT, RunPaths
from tasks.core.redact import redact, redact_value
from tasks.core.stage import stage_task
from tasks.registry.card import data_accounting, numbers, rows_line

# what a run stopped early (--until) lists of its directory, in pipeline order, when it is there
STOPPED_OUTPUTS = ("ingest_db", "clean_db", "clean_report", "quarantine", "validation", "formatted", "train", "eval")


def build_summary(run_id: str, clean_report: Path, eval_dir: Path, registered: dict, flow_run_id: str | None,
                  started_at: float, format_stats: Path | None = None) -> dict:
    """Return the run summary: data accounting (format's drops included; `format_stats` defaults to the run's
    formatted/stats.json beside `clean_report`), eval scores (headline metric first), the gate's decision, registry
    coordinates and wall time."""
    stats = format_stats or clean_report.parent / RUN_LAYOUT["formatted"] / "stats.json"
    evaluation = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
    champion = evaluation.get("models", {}).get("champion")
    return {"run_id": run_id, "headline_metric": evaluation["metrics"][0], "heldout_rows": evaluation["heldout_rows"],
            **numbers(evaluation), **({"champion_version": str(champion["version"])} if champion else {}),
            **data_accounting(clean_report, stats), **registered,
            "prefect_flow_run_id": str(flow_run_id) if flow_run_id else None,
            "wall_seconds": round(time.time() - started_at, 1)}


def human_summary(s: dict) -> str:
    """Return a short human-readable summary of a run; its last line says what the promotion gate decided and why."""
    m = s["headline_metric"]
    champion = (f", champion v{s['champion_version']} {s[f'champion_{m}']:.3f}"
                if f"champion_{m}" in s and "champion_version" in s else "")
    stops = f", stop rate {s['tuned_stop_rate']:.0%}" if "tuned_stop_rate" in s else ""
    return (f"run {s['run_id']}: {rows_line(s)}; {m} base {s[f'base_{m}']:.3f} -> tuned {s[f'tuned_{m}']:.3f}"
            f"{champion}, eval loss {s['eval_loss']:.3f}{stops}; {s['registered_model']} v{s['model_version']} "
            f"@{s['alias']}; {s['wall_seconds']:.0f}s\ngate: {s['decision']}")


def stopped_summary(run: RunPaths, until: str, resume: str, flow_run_id: str | None, started_at: float) -> dict:
    """Return the summary of a run stopped after step `until` (`sftflow run --until`): its rows so far, what it
    wrote, and the command that goes on from there."""
    written = [f"{RUN_LAYOUT[k]}{'/' * getattr(run, k).is_dir()}" for k in STOPPED_OUTPUTS if getattr(run, k).exists()]
    return {"run_id": run.run_id, "stopped_after": until, **data_accounting(run.clean_report,
                                                                            run.formatted / "stats.json"),
            "outputs": str(run.root), "written": written, "resume": resume,
            "prefect_flow_run_id": str(flow_run_id) if flow_run_id else None,
            "wall_seconds": round(time.time() - started_at, 1)}


def human_stopped(s: dict) -> str:
    """Return the lines of a stopped run: its rows so far, then where its outputs are and how to go on."""
    rows = f"{rows_line(s)}; " if "rows_raw" in s else ""
    return (f"run {s['run_id']}: {rows}stopped after {s['stopped_after']} (--until); {s['wall_seconds']:.0f}s\n"
            f"outputs in {s['outputs']} ({', '.join(s['written']) or 'none yet'}); go on with: {s['resume']}")


def publish_artifacts(summary: dict, text: str) -> None:
    """Create the Prefect artifact of the run summary: the run's last lines (`text`), then every field of
    summary.json."""
    headline = text.splitlines()
    publish_markdown("run-summary", "\n".join([f"# Run {summary['run_id']}", "", headline[0], "", f"**{headline[-1]}**",
                                               "", *markdown_table(["field", "value"], list(summary.items()), 200)]),
                     headline[0])


@stage_task("save-config", cache=False)
def save_config(config_yaml: str, out_file: Path) -> Path:
    """Write the resolved config of a run (what `sftflow task` and MLflow params read back) and return its path; a
    tracking URI's credentials are written as `***` (PipelineConfig.tracking_uri reveals them from the environment)."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(redact(config_yaml), encoding="utf-8")
    return out_file


@stage_task("summarize", cache=False)
def write_summary(run_id: str, clean_report: Path, eval_dir: Path, registered: dict, flow_run_id: str | None,
                  started_at: float, out_file: Path) -> dict:
    """Write summary.json, publish the run's artifacts, and return the summary."""
    summary = redact_value(build_summary(run_id, clean_report, eval_dir, registered, flow_run_id, started_at))
    out_file.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if in_prefect_run():
        publish_artifacts(summary, human_summary(summary))
    stage_logger().info(human_summary(summary))
    return summary


@stage_task("summarize", cache=False)
def write_stopped_summary(run: RunPaths, until: str, resume: str, flow_run_id: str | None, started_at: float) -> dict:
    """Write summary.json of a run stopped after step `until`, publish it as the `run-summary` artifact, and return
    it."""
    summary = redact_value(stopped_summary(run, until, resume, flow_run_id, started_at))
    run.summary.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if in_prefect_run():
        publish_artifacts(summary, human_stopped(summary))
    stage_logger().info(human_stopped(summary))
    return summary
