"""`sftflow run CONFIG --until STEP`: the run stops after STEP with its outputs, reports and quarantine written, its
last line says where they are and how to go on; the same run id goes on from there with the steps done as cache hits.

One chain of runs on configs/tiny.yaml with chat.max_length=108, so format drops a few rows for length: --until
format, then `sftflow task format --inspect`, then --until validate-tokens, then the printed command to the end."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.settings import PREFECT_API_URL

from flows.cli import main
from tasks.core.config import STEP_NAMES
from tasks.reporting.failure import step_of
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # pipeline runs in subprocesses, stopped and resumed

TINY = ROOT / "configs" / "tiny.yaml"
SFTFLOW = Path(sys.executable).parent / "sftflow"
ROW = re.compile(r"--- row (\d+) \((\w+)\): (\d+) tokens, (\d+) supervised")


def sftflow(*args: str, home: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the installed `sftflow` program on the harness's Prefect API from a bare environment."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home),
           "SFTFLOW_HOME": str(home / "sftflow"), "PREFECT_API_URL": PREFECT_API_URL.value(), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(SFTFLOW), *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout,
                          check=False)


def last_lines(result: subprocess.CompletedProcess, n: int = 2) -> list[str]:
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "Traceback" not in result.stdout + result.stderr
    return result.stdout.strip().splitlines()[-n:]


def step_states(flow_run_id: str) -> dict[str, str]:
    """Return each pipeline step's final state name in a flow run, from the Prefect API."""
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    return {step_of(r.name): r.state.name for r in runs if step_of(r.name)}


@pytest.fixture(scope="module")
def chain(tiny_model_dir, tmp_path_factory):
    """The runs dir and the `--set` options every run of the chain shares."""
    runs = tmp_path_factory.mktemp("until")
    sets = ["--set", f"runs_dir={runs}", "--set", f"train.base_model={tiny_model_dir}", "--set", "chat.max_length=108"]
    return runs, sets


@pytest.fixture(scope="module")
def stopped(chain):
    """`--until format`, then `sftflow task format --inspect 2` on the stopped run (in this process)."""
    runs, sets = chain
    result = sftflow("run", str(TINY), "--run-id", "pre", *sets, "--until", "format", home=runs)
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        code = main(["task", "format", "--run", "pre", "--runs-dir", str(runs), "--inspect", "2"])
    return result, code, shown.getvalue()


@pytest.fixture(scope="module")
def tokenized(chain, stopped):
    runs, sets = chain
    return sftflow("run", str(TINY), "--run-id", "pre", *sets, "--until", "validate-tokens", home=runs)


@pytest.fixture(scope="module")
def resumed(chain, tokenized):
    """The command the stopped run printed, run as printed."""
    runs, _ = chain
    command = json.loads((runs / "pre" / "summary.json").read_text())["resume"]
    program, *args = shlex.split(command)
    assert program == "sftflow"
    return sftflow(*args, home=runs)


def test_until_format_writes_the_splits_the_reports_and_the_quarantine_and_says_how_to_go_on(chain, stopped):
    runs, sets = chain
    result, _, _ = stopped
    rows, where = last_lines(result)
    run = runs / "pre"
    accounting = json.loads((run / "formatted" / "stats.json").read_text())["accounting"]
    clean = json.loads((run / "clean_report.json").read_text())
    dropped = accounting["dropped_by_rule"]["too_many_tokens"]
    assert dropped > 0 and accounting["rows_raw"] == accounting["rows_formatted"] + accounting["rows_quarantined"]
    assert rows.startswith(f"run pre: rows raw {accounting['rows_raw']} -> clean {clean['rows_clean']} -> formatted "
                           f"{accounting['rows_formatted']} (+{accounting['rows_quarantined']} quarantined); "
                           "stopped after format (--until); ")
    resume = shlex.join(["sftflow", "run", str(TINY), "--run-id", "pre", *sets])
    assert where == (f"outputs in {run} (ingest.duckdb, clean.duckdb, clean_report.json, quarantine.parquet, "
                     f"validation/, formatted/); go on with: {resume}")
    for name in ("formatted/train.parquet", "formatted/heldout.parquet", "formatted/stats.json", "quarantine.parquet",
                 "clean_report.json", "validation/raw.json", "validation/clean.json"):
        assert (run / name).is_file(), name
    assert not (run / "validation" / "tokenized.json").exists() and not (run / "train").exists()
    with duckdb.connect() as con:
        assert con.execute("SELECT count(*) FROM read_parquet(?) WHERE rule = 'too_many_tokens'",
                           [str(run / "quarantine.parquet")]).fetchone()[0] == dropped
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stopped_after"] == "format" and summary["resume"] == resume
    assert summary["rows_dropped_format"] == dropped and summary["rows_quarantined"] == accounting["rows_quarantined"]
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(summary["prefect_flow_run_id"]).state
    assert state.is_completed() and state.name == "stopped after format"
    # the data gate guards training: a run that stops before it prepares the data whatever the gate would say
    assert set(step_states(summary["prefect_flow_run_id"])) == set(STEP_NAMES[:STEP_NAMES.index("format") + 1])


def test_inspect_shows_the_stopped_runs_formatted_rows(stopped):
    _, code, shown = stopped
    assert code == 0
    assert len(ROW.findall(shown)) == 2 and shown.count("]](") == 2  # two rows, each answer marked with its count


def test_until_validate_tokens_goes_on_from_the_stopped_run_with_the_steps_done_cached(chain, tokenized):
    runs, _ = chain
    rows, _ = last_lines(tokenized)
    assert "; stopped after validate-tokens (--until); " in rows
    summary = json.loads((runs / "pre" / "summary.json").read_text())
    states = step_states(summary["prefect_flow_run_id"])
    assert {s: states[s] for s in ("ingest", "validate-raw", "clean", "validate", "format")} == dict.fromkeys(
        ("ingest", "validate-raw", "clean", "validate", "format"), "Cached")
    assert states["validate-tokens"] == "Completed" and "train" not in states
    assert (runs / "pre" / "validation" / "tokenized.json").is_file() and not (runs / "pre" / "train").exists()


def test_the_printed_command_finishes_the_run_and_its_last_line_counts_the_format_drops(chain, resumed):
    runs, _ = chain
    rows, gate = last_lines(resumed)
    summary = json.loads((runs / "pre" / "summary.json").read_text())
    accounting = json.loads((runs / "pre" / "formatted" / "stats.json").read_text())["accounting"]
    assert "stopped_after" not in summary and summary["model_version"] == 1 and gate.startswith("gate: v1 ")
    assert (summary["rows_formatted"], summary["rows_quarantined"], summary["rows_dropped_format"]) == (
        accounting["rows_formatted"], accounting["rows_quarantined"], accounting["dropped_by_rule"]["too_many_tokens"])
    assert summary["dropped_by_rule"]["too_many_tokens"] == summary["rows_dropped_format"]
    assert rows.startswith(f"run pre: rows raw {summary['rows_raw']} -> clean {summary['rows_clean']} -> formatted "
                           f"{summary['rows_formatted']} (+{summary['rows_quarantined']} quarantined); ")
    states = step_states(summary["prefect_flow_run_id"])
    assert all(states[s] == "Cached" for s in STEP_NAMES[1:STEP_NAMES.index("validate-tokens") + 1]), states
    assert all(states[s] == "Completed" for s in ("train", "evaluate", "register")), states


def test_an_unknown_until_step_is_one_line_listing_the_steps(tmp_path):
    result = sftflow("run", str(TINY), "--until", "trian", home=tmp_path, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"sftflow: error: --until trian: not a step; use one of {', '.join(STEP_NAMES)}\n"
