"""A broken internal invariant (an AssertionError: a bug) in a real run, through the real `sftflow` program in its own
process: one attempt, no retry; one error line naming the step, the reason and the saved traceback; a non-zero exit
with nothing after the error line (no `nanobind: leaked ...` from the DuckDB handles the failed step held)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.settings import PREFECT_API_URL

from tasks.reporting.failure import TRACEBACK_FILE, step_of
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # whole pipeline runs in subprocesses

TINY = ROOT / "configs" / "tiny.yaml"

# The program as installed (`main()` reads sys.argv and ends the process itself), with format's row accounting fed
# one row too few: the invariant trips inside the real format code, with its DuckDB connection open in the frame.
BROKEN_FORMAT = """
import sys
import tasks.formatting.chat_format as chat_format
from flows.cli import main

accounting = chat_format.accounting
def broken_accounting(con, formatted, dropped):
    return accounting(con, formatted - 1, dropped)

chat_format.accounting = broken_accounting
sys.exit(main())
"""
REASON = "AssertionError: row accounting broken: clean 120 != formatted 119 + dropped 0"


def sftflow_with_broken_format(*args: str, home: Path) -> subprocess.CompletedProcess:
    """Run `sftflow ARGS` with the broken accounting, on the harness's Prefect API, from a bare environment."""
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(ROOT),
           "SFTFLOW_HOME": str(home / "sftflow"), "PREFECT_API_URL": PREFECT_API_URL.value(), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", BROKEN_FORMAT, *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=900, check=False)


def assert_one_clean_error_line(result: subprocess.CompletedProcess, expected: str) -> None:
    """Exit 1; stderr's error is the one `expected` line, its last, with no traceback and nothing from nanobind."""
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    assert [line for line in result.stderr.splitlines() if "sftflow: error:" in line] == [expected], output[-3000:]
    assert result.stderr.rstrip("\n").splitlines()[-1] == expected
    assert "Traceback" not in output and "nanobind" not in output
    # one attempt: format logs this once per attempt, and a retry would say so
    assert output.count("format: rendering") == 1 and "Retry " not in output


@pytest.fixture(scope="module")
def broken_run(tiny_model_dir, tmp_path_factory):
    """A whole `sftflow run` of configs/tiny.yaml (retries as configured: 2 for format) that fails at format."""
    runs = tmp_path_factory.mktemp("broken")
    result = sftflow_with_broken_format("run", str(TINY), "--run-id", "bug", "--set", f"runs_dir={runs}", "--set",
                                        f"train.base_model={tiny_model_dir}", home=runs)
    return runs, result


def test_a_run_whose_invariant_breaks_fails_once_with_one_line_and_a_clean_exit(broken_run):
    runs, result = broken_run
    run = runs / "bug"
    assert_one_clean_error_line(result, (
        f"sftflow: error: step format failed: {REASON}; outputs so far in {run}; traceback in {run / TRACEBACK_FILE}; "
        f"rerun: sftflow task format --run bug --runs-dir {runs}"))
    trace = (run / TRACEBACK_FILE).read_text()
    assert "in broken_accounting" in trace and trace.rstrip().endswith(REASON)
    flow_run_id = (run / "flow_run_id").read_text().strip()
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
        assert client.read_flow_run(flow_run_id).state.is_failed()
    (format_run,) = [r for r in task_runs if step_of(r.name) == "format"]
    assert format_run.run_count == 1 and format_run.state.is_failed()  # 2 retries configured, none made
    assert not (run / "formatted" / "stats.json").exists()


def test_the_step_alone_on_the_same_run_fails_the_same_way(broken_run):
    runs, first = broken_run
    assert first.returncode == 1, first.stderr[-3000:]
    run = runs / "bug"
    (run / TRACEBACK_FILE).unlink()
    result = sftflow_with_broken_format("task", "format", "--run", "bug", "--runs-dir", str(runs), home=runs)
    assert_one_clean_error_line(result, (
        f"sftflow: error: step format failed: {REASON}; outputs so far in {run}; traceback in {run / TRACEBACK_FILE}; "
        f"rerun: sftflow task format --run bug --runs-dir {runs}"))
    assert "in broken_accounting" in (run / TRACEBACK_FILE).read_text()
