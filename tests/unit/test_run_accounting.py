"""The run's row accounting counts the rows format drops for length: summary.json, the run's last line, the model
card, and the summary of a run stopped early (--until)."""

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.config import RunPaths
from tasks.registry.card import card_data
from tasks.reporting.report import build_summary, human_stopped, human_summary, stopped_summary

CLEAN_REPORT = {"rows_raw": 100, "rows_clean": 80, "rows_quarantined": 20, "dropped_by_rule": {"duplicate": 20},
                "rules": [{"rule": "duplicate", "rows": 20, "example": "data.jsonl:7"}]}
FORMAT_ACCOUNTING = {"rows_raw": 100, "rows_formatted": 77, "rows_quarantined": 23,
                     "dropped_by_rule": {"too_many_tokens": 3}}


def write_run(runs: Path, formatted: bool = True) -> RunPaths:
    """Write a run's clean report, and (when `formatted`) format's stats.json and the quarantine, as the steps do."""
    run = RunPaths(runs, "r1")
    run.root.mkdir(parents=True)
    run.clean_report.write_text(json.dumps(CLEAN_REPORT))
    if formatted:
        run.formatted.mkdir()
        stats = {"train": {"rows": 70, "rows_by_source": {"orders": 70}},
                 "heldout": {"rows": 7, "rows_by_source": {"orders": 7}}, "accounting": FORMAT_ACCOUNTING}
        (run.formatted / "stats.json").write_text(json.dumps(stats))
        pq.write_table(pa.table({"row_id": [9, 4], "source_file": ["data.jsonl"] * 2, "line_number": [10, 5],
                                 "rule": ["too_many_tokens"] * 2, "detail": ["600 tokens > chat.max_length=512",
                                                                            "513 tokens > chat.max_length=512"]}),
                       run.quarantine)
    return run


def test_the_summary_and_its_last_line_count_the_rows_format_dropped(tmp_path):
    run = write_run(tmp_path)
    run.eval.mkdir()
    (run.eval / "report.json").write_text(json.dumps({"metrics": ["exact_match"], "heldout_rows": 7, "models": {},
                                                      "eval_loss": 1.5, "base_exact_match": 0.1,
                                                      "tuned_exact_match": 0.5}))
    registered = {"registered_model": "m", "model_version": 1, "alias": "champion", "decision": "v1 takes @champion"}
    summary = build_summary("r1", run.clean_report, run.eval, registered, None, 0.0)
    assert {k: summary[k] for k in ("rows_raw", "rows_clean", "rows_formatted", "rows_dropped_format",
                                    "rows_quarantined", "dropped_by_rule")} == {
        "rows_raw": 100, "rows_clean": 80, "rows_formatted": 77, "rows_dropped_format": 3, "rows_quarantined": 23,
        "dropped_by_rule": {"duplicate": 20, "too_many_tokens": 3}}
    assert summary["rows_raw"] == summary["rows_formatted"] + summary["rows_quarantined"]
    assert sum(summary["dropped_by_rule"].values()) == summary["rows_quarantined"]
    assert human_summary(summary).startswith("run r1: rows raw 100 -> clean 80 -> formatted 77 (+23 quarantined); ")


def test_the_model_card_counts_and_shows_an_example_of_the_rows_format_dropped(tmp_path):
    card = "\n".join(card_data(write_run(tmp_path)))
    assert "Rows: raw 100 -> clean 80 -> formatted 77 (+23 quarantined); each quarantined row is kept" in card
    assert "| duplicate | 20 | data.jsonl:7 |" in card
    assert "| too_many_tokens | 3 | data.jsonl:5 (513 tokens > chat.max_length=512) |" in card  # the first row's


def test_a_run_stopped_before_format_counts_what_clean_did(tmp_path):
    run = write_run(tmp_path, formatted=False)
    summary = stopped_summary(run, "validate", "sftflow run c.yaml --run-id r1", None, 0.0)
    assert "rows_formatted" not in summary and summary["rows_quarantined"] == 20
    assert summary["written"] == ["clean_report.json"]
    assert human_stopped(summary).splitlines()[0].startswith(
        "run r1: rows raw 100 -> clean 80 (+20 quarantined); stopped after validate (--until); ")


def test_a_stopped_run_says_last_where_its_outputs_are_and_how_to_go_on(tmp_path):
    run = write_run(tmp_path)
    summary = stopped_summary(run, "format", "sftflow run c.yaml --run-id r1", "f-1", 0.0)
    assert summary["stopped_after"] == "format" and summary["rows_formatted"] == 77
    assert summary["written"] == ["clean_report.json", "quarantine.parquet", "formatted/"]
    assert human_stopped(summary).splitlines()[-1] == (
        f"outputs in {run.root} (clean_report.json, quarantine.parquet, formatted/); go on with: sftflow run c.yaml "
        "--run-id r1")
