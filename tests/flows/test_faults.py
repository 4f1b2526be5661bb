"""Faults injected into a real pipeline run (real Prefect API, DuckDB, GX, MLflow, a tiny model): a step whose first
attempt fails transiently is retried and the run completes; a step that always fails stops the run with one line,
keeps what was produced, and leaves failure.md and a `failure` artifact whose rerun command works."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, FlowRunFilter
from prefect.settings import PREFECT_API_URL

import flows.sft_pipeline
from flows.cli import main
from tasks.reporting.failure import FailureReport, report_failure, rerun_command, step_of
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # whole pipeline runs in subprocesses with faults injected

TINY = ROOT / "configs" / "tiny.yaml"
NO_WAIT = "orchestrate.retries={clean: {retries: 1, delay_s: 0, jitter: 0}}"  # one quick retry


def run_args(runs: Path, run_id: str, tiny_model_dir: Path) -> list[str]:
    """Return `sftflow run` arguments for a tiny run `run_id` in `runs`."""
    return ["run", str(TINY), "--run-id", run_id, "--set", f"runs_dir={runs}", "--set",
            f"train.base_model={tiny_model_dir}", "--set", NO_WAIT]


def task_runs(flow_run_id: str) -> list:
    """Return the task runs of a flow run from the Prefect API."""
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))


# The real `sftflow run` in its own process (so its output is what a user sees), on the test harness's Prefect API,
# with the flow's clean swapped for a real Prefect task whose first FAILURES calls raise before doing clean's work.
FAULTY_CLEAN = """
import dataclasses, functools, sys
import flows.steps
from flows.cli import main
from tasks.data.clean import clean
from tasks.core.stage import stage_task

FAILURES, calls = {failures}, []

@functools.wraps(clean.fn)
def clean_with_faults(*args, **kwargs):
    calls.append(1)
    if len(calls) <= FAILURES:
        raise ConnectionError("DuckDB spill file: connection to the NFS server lost")
    return clean.fn(*args, **kwargs)

flows.steps.STEPS["clean"] = dataclasses.replace(flows.steps.STEPS["clean"],
                                               task=stage_task("clean", cache=False)(clean_with_faults))
sys.exit(main(sys.argv[1:]))
"""


def cli_env(home: Path, **extra: str) -> dict:
    """A bare environment (PATH, HOME) on the harness's Prefect API, with the Hub off."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "PYTHONPATH": str(ROOT),
            "SFTFLOW_HOME": str(home / "sftflow"), "PREFECT_API_URL": PREFECT_API_URL.value(), "HF_HUB_OFFLINE": "1",
            **extra}


def run_with_faults(failures: int, runs: Path, run_id: str, tiny_model_dir: Path, **env: str):
    """Run `sftflow run` on configs/tiny.yaml with clean's first `failures` attempts failing; return the process."""
    return subprocess.run([sys.executable, "-c", FAULTY_CLEAN.format(failures=failures),
                           *run_args(runs, run_id, tiny_model_dir)], capture_output=True, text=True, cwd=ROOT,
                          env=cli_env(runs, **env), timeout=900, check=False)


@pytest.fixture(scope="module")
def flaky_run(tiny_model_dir, tmp_path_factory):
    """A whole tiny run whose clean fails once, with a Hugging Face token planted in its environment."""
    runs, token = tmp_path_factory.mktemp("flaky"), f"hf_{secrets.token_hex(16)}"
    return runs, token, run_with_faults(1, runs, "flaky", tiny_model_dir, HF_TOKEN=token)


def test_a_transient_error_on_the_first_attempt_is_retried_and_the_run_completes(flaky_run):
    runs, _, result = flaky_run
    assert result.returncode == 0, result.stderr[-3000:]
    run = runs / "flaky"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model_version"] == 1 and not (run / "failure.md").exists()
    assert "Task run failed with exception: ConnectionError" in result.stderr  # the first attempt did fail
    (clean_run,) = [r for r in task_runs(summary["prefect_flow_run_id"]) if step_of(r.name) == "clean"]
    assert clean_run.run_count == 2 and clean_run.state.is_completed()  # passed on the retry the config allowed
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(summary["prefect_flow_run_id"]).state.is_completed()


def test_a_step_failing_every_time_stops_with_one_line_keeps_its_outputs_and_says_how_to_rerun_it(
        tiny_model_dir, tmp_path):
    result = run_with_faults(99, tmp_path, "broken", tiny_model_dir)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("sftflow: error:")]
    assert errors == [(f"sftflow: error: step clean failed: ConnectionError: DuckDB spill file: connection to the "
                       f"NFS server lost; outputs so far in {tmp_path / 'broken'}; traceback in "
                       f"{tmp_path / 'broken' / 'failure-traceback.txt'}; rerun: sftflow task clean --run "
                       f"broken --runs-dir {tmp_path}")], result.stderr[-3000:]
    assert "Traceback" not in result.stdout + result.stderr, result.stderr[-3000:]
    run = tmp_path / "broken"
    # what ran before the failure stays; nothing after it ran
    assert (run / "ingest.duckdb").is_file() and (run / "validation" / "raw.json").is_file()
    assert not (run / "clean.duckdb").exists() and not (run / "formatted").exists()
    report = (run / "failure.md").read_text()
    command = f"sftflow task clean --run broken --runs-dir {tmp_path}"
    assert "**Step:** `clean`" in report
    assert "**Why:** ConnectionError: DuckDB spill file: connection to the NFS server lost" in report
    assert f"**Rerun it alone:** `{command}`" in report
    assert "| `ingest.duckdb` |" in report and "| `validation/` |" in report
    assert "Traceback (most recent call last)" not in report  # one line; the traceback has a file of its own
    assert "in clean_with_faults" in (run / "failure-traceback.txt").read_text()
    flow_run_id = (run / "flow_run_id").read_text().strip()
    (clean_run,) = [r for r in task_runs(flow_run_id) if step_of(r.name) == "clean"]
    assert clean_run.run_count == 2 and clean_run.state.is_failed()  # the first attempt and the one retry
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(key={"any_": ["failure"]},
                                                                           flow_run_id={"any_": [flow_run_id]}))
        assert client.read_flow_run(flow_run_id).state.is_failed()
    assert artifact.type == "markdown" and artifact.data == report
    # the command it names works, here with the real clean
    assert main(shlex.split(command)[1:]) == 0
    assert (run / "clean.duckdb").is_file()


def test_a_run_whose_config_does_not_load_still_gets_a_failure_artifact_with_the_whole_run_command(tmp_path):
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lora_rank: 8}\ndata: {sources: [{synthetic: {rows: 10}}]}\n")
    with pytest.raises(Exception, match="unknown key `train.lora_rank`"):
        flows.sft_pipeline.sft_pipeline(bad, [f"runs_dir={tmp_path}/runs"])
    with get_client(sync_client=True) as client:
        failed = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["FAILED"]))))
        (flow_run,) = [r for r in failed if r.parameters.get("config_path") == str(bad)]
        (artifact,) = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id={"any_": [str(flow_run.id)]},
                                                                           key={"any_": ["failure"]}))
    assert "**Step:** none" in artifact.data and "unknown key `train.lora_rank`" in artifact.data
    assert f"`sftflow run {bad} --set runs_dir={tmp_path}/runs`" in artifact.data
    assert not (tmp_path / "runs").exists()


def test_the_hook_never_raises_and_the_rerun_command_quotes_what_needs_it(tmp_path):
    report_failure(None, None, None)  # nothing to report from: it logs and returns
    run = tmp_path / "my runs" / "r 1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    assert rerun_command("train", run.parent, run, {}) == f"sftflow task train --run 'r 1' --runs-dir '{run.parent}'"
    assert rerun_command("train", Path("runs"), Path("runs/r1"), {"config_path": "c.yaml"}) == \
        "sftflow run c.yaml --run-id r1"  # no saved config yet: `sftflow task` could not read it
    assert step_of("train[qlora r=16, 40 steps]") == "train" and step_of("validate-raw[raw rows]") == "validate-raw"
    assert step_of("clean-3f2") == "clean" and step_of("save-config-0") is None
    assert FailureReport("id", "clean", "boom", None, [], "cmd").line() == "step clean failed: boom; rerun: cmd"


def files_under(*roots: Path) -> list[Path]:
    """Return every file under the given directories (or the files themselves)."""
    return [p for root in roots for p in ([root] if root.is_file() else root.rglob("*")) if p.is_file()]


def test_a_planted_hugging_face_token_is_in_no_output_of_the_run(flaky_run):
    from prefect.client.schemas.filters import LogFilter
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_DATABASE_CONNECTION_URL

    runs, token, result = flaky_run
    assert result.returncode == 0, result.stderr[-3000:]
    assert token not in result.stdout + result.stderr
    prefect_db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    # the run directory, the MLflow store and its artifacts, sftflow's home, the Prefect database and its results
    stores = files_under(runs, prefect_db.parent, Path(PREFECT_LOCAL_STORAGE_PATH.value()))
    assert [p for p in stores if token.encode() in p.read_bytes()] == []
    # the search reads what the run wrote: its id is in the Prefect database and in the MLflow store
    assert any(b"flaky" in p.read_bytes() for p in files_under(prefect_db.parent))
    assert b"sftflow_run_id" in (runs / "mlflow.db").read_bytes() and (runs / "mlartifacts").is_dir()
    flow_run_id = json.loads((runs / "flaky" / "summary.json").read_text())["prefect_flow_run_id"]
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(log_filter=LogFilter(flow_run_id={"any_": [flow_run_id]}))
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id={"any_": [flow_run_id]}))
    assert len(logs) > 20 and artifacts  # the API has the run's logs and artifacts, and none holds the token
    seen = json.dumps([flow_run.parameters, [r.task_inputs for r in task_runs(flow_run_id)],
                       [log.message for log in logs], [a.data for a in artifacts]], default=str)
    assert token not in seen


def test_a_full_disk_at_the_artifact_root_is_one_line_naming_it_and_not_retried(flaky_run, capsys, monkeypatch):
    runs = flaky_run[0]
    root, create = (runs / "mlartifacts").resolve(), tempfile.mkstemp

    def mkstemp_on_a_full_disk(*args, dir=None, **kwargs):
        """Create the file as usual; under the artifact root its writes go to /dev/full (the kernel: ENOSPC)."""
        fd, path = create(*args, dir=dir, **kwargs)
        if dir is not None and Path(dir).resolve().is_relative_to(root):
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_a_full_disk)  # MLflow stages every artifact write this way
    started = time.monotonic()
    code = main(["task", "register", "--run", "flaky", "--runs-dir", str(runs)])
    assert code == 2
    assert capsys.readouterr().err.strip() == (f"sftflow: error: no space left on {root} (the disk is full); free "
                                               "space there, or set register.artifact_root to a disk with room")
    assert time.monotonic() - started < 60  # register's retries wait 10, 60 and 300 s: none was made
