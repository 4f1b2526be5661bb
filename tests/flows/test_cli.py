"""The `sftflow` command as a user types it: a bare environment, a fresh Prefect home, every single step."""

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from prefect.settings import PREFECT_API_URL

from flows.cli import STEPS
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"


def bare_env(home: Path, **extra: str) -> dict:
    """PATH and HOME only, as a new user's shell has them (plus what a test sets on purpose)."""
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), **extra}


def sftflow(*args: str, cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "sftflow"), *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A working directory like the repository root: configs and suites, no .sftflow yet."""
    cwd = tmp_path_factory.mktemp("project")
    for name in ("configs", "expectations"):
        (cwd / name).symlink_to(ROOT / name)
    return cwd


@pytest.fixture(scope="module")
def cli_run(project, tiny_model_dir, tmp_path_factory):
    """`sftflow run configs/tiny.yaml` from a bare environment on a fresh PREFECT_HOME (an ephemeral server)."""
    home = tmp_path_factory.mktemp("home")
    result = sftflow("run", "configs/tiny.yaml", "--run-id", "cli-1", "--set", f"train.base_model={tiny_model_dir}",
                     cwd=project, env=bare_env(home, HF_HUB_OFFLINE="1"))
    return project, home, result


def test_a_bare_environment_run_succeeds_without_a_traceback_and_lands_where_the_ui_reads(cli_run):
    project, home, result = cli_run
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "database is locked" not in output
    assert "run cli-1: rows raw" in result.stdout
    # the database `make ui-prefect` serves: PREFECT_HOME from `sftflow env`, run from the same directory
    exports = sftflow("env", cwd=project, env=bare_env(home)).stdout
    prefect_home = next(line.split("=", 1)[1] for line in exports.splitlines() if "PREFECT_HOME=" in line)
    assert Path(prefect_home) == project / ".sftflow" / "prefect"
    with sqlite3.connect(Path(prefect_home) / "prefect.db") as db:
        runs = db.execute("SELECT flow_run.state_type FROM flow_run JOIN flow ON flow.id = flow_run.flow_id "
                          "WHERE flow.name = 'sft-pipeline'").fetchall()
    assert runs == [("COMPLETED",)]
    assert not (home / ".prefect").exists()  # nothing went to Prefect's own default home


def test_a_prefect_server_that_cannot_start_is_one_line_with_the_fix(project, tmp_path):
    result = sftflow("run", "configs/tiny.yaml", "--set", f"runs_dir={tmp_path}/runs", cwd=project,
                     env=bare_env(tmp_path, SFTFLOW_HOME=str(tmp_path / "fresh"),
                                  PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1"), timeout=300)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("sftflow: error:")]
    assert errors == [("sftflow: error: Prefect's temporary API server did not start within 1 s "
                      "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS); the machine may be busy. Retry, raise that "
                      "setting, or start a server with `make ui-prefect` and set "
                      "PREFECT_API_URL=http://127.0.0.1:4200/api")]


def test_an_unreachable_prefect_api_url_is_one_line_with_the_fix(project, tmp_path):
    result = sftflow("run", "configs/tiny.yaml", "--set", f"runs_dir={tmp_path}/runs", cwd=project,
                     env=bare_env(tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api"), timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "sftflow: error: Failed to reach API at http://127.0.0.1:9/api/ (PREFECT_API_URL): start that server "
        "(e.g. `make ui-prefect`), or unset PREFECT_API_URL to let sftflow start a temporary one")


# What each step writes in the run directory (register: a new model version in the run's MLflow store).
STEP_OUTPUTS = {
    "prepare-base-model": None, "ingest": "ingest.duckdb", "validate-raw": "validation/raw.json",
    "clean": "clean.duckdb", "validate": "validation/clean.json", "format": "formatted/train.parquet",
    "validate-tokens": "validation/tokenized.json", "train": "train/adapter/adapter_model.safetensors",
    "evaluate": "eval/report.json", "register": "mlflow.db",
}


def test_every_step_of_the_cli_has_its_expected_output():
    assert set(STEP_OUTPUTS) == set(STEPS)


@pytest.mark.parametrize("step", STEPS)
def test_every_step_reruns_alone_on_a_finished_run(cli_run, step, tiny_model_dir):
    project, home, first = cli_run
    assert first.returncode == 0, first.stderr[-2000:]
    started = time.time_ns()
    result = sftflow("task", step, "--run", "cli-1", "--set", "evaluate.max_samples=4", cwd=project,
                     env=bare_env(home, PREFECT_API_URL=PREFECT_API_URL.value(), HF_HUB_OFFLINE="1"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    run = project / "runs" / "cli-1"
    if step == "prepare-base-model":
        assert result.stdout.strip().splitlines()[-1] == str(tiny_model_dir)
    elif step == "register":
        assert "'model_version': 2" in result.stdout  # the finished run registered version 1
    else:
        assert (run / STEP_OUTPUTS[step]).stat().st_mtime_ns > started  # rewritten by this step
    if step == "clean":
        with duckdb.connect(str(run / "clean.duckdb"), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM clean").fetchall()[0][0] > 50


SEED_TASK = {"id": "seed_task_{}", "instruction": "Name the relation {}.",
             "instances": [{"input": "Night : Day", "output": "Opposites."}], "is_classification": True}


def seed_tasks(path: Path, n: int = 60) -> Path:
    rows = [{k: v.format(i, i) if isinstance(v, str) else v for k, v in SEED_TASK.items()} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_seed_tasks_without_explode_stop_at_clean_with_one_line_naming_the_fix(project, tmp_path, tiny_model_dir):
    data = seed_tasks(tmp_path / "seed_tasks.jsonl")
    result = sftflow("run", "configs/tiny.yaml", "--set", f"runs_dir={tmp_path}/runs", "--set",
                     f"train.base_model={tiny_model_dir}", "--set", f"data.sources=[{{path: {data}}}]", cwd=project,
                     env=bare_env(tmp_path, PREFECT_API_URL=PREFECT_API_URL.value(), HF_HUB_OFFLINE="1"))
    assert result.returncode == 2 and "Traceback" not in result.stdout + result.stderr
    (line,) = [x for x in result.stderr.splitlines() if x.startswith("sftflow: error:")]
    assert line.startswith(f"sftflow: error: source 'seed_tasks' lost all 60 rows to missing_field, e.g. {data}:1")
    assert "instances=" in line and "this would fit: data.sources[].explode: instances" in line
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "clean_report.json").is_file() and not (run / "formatted").exists()  # stopped before format


def test_with_quarantine_the_run_goes_on_and_the_cleaning_report_artifact_shows_the_warning(finished_tiny_source,
                                                                                            tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    from tasks.clean import clean
    from tasks.config import CleanConfig, DataConfig
    from tasks.ingest import ingest_rows

    data = seed_tasks(tmp_path / "seed_tasks.jsonl", 10)
    cfg = DataConfig(sources=[{"path": str(finished_tiny_source)}, {"path": str(data)}], on_bad_rows="quarantine")
    ingest_rows(cfg, tmp_path, tmp_path / "ingest.duckdb")

    @flow
    def clean_only() -> None:
        clean(tmp_path / "ingest.duckdb", tmp_path / "clean.duckdb", tmp_path / "report.json",
              tmp_path / "q.parquet", CleanConfig(), "quarantine")

    clean_only()
    report = json.loads((tmp_path / "report.json").read_text())
    (warning,) = report["source_warnings"]
    assert warning["source"] == "seed_tasks" and warning["rule"] == "missing_field" and warning["rows"] == 10
    with get_client(sync_client=True) as client:
        artifact = client.read_latest_artifacts(limit=50)
    (cleaning,) = [a for a in artifact if a.key == "cleaning-report"]
    assert f"**Warning:** {warning['message']}" in cleaning.data
    assert "| missing_field | 10 |" in cleaning.data


@pytest.fixture
def finished_tiny_source(tmp_path) -> Path:
    """A clean Alpaca file big enough that one bad source is the only loss."""
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"{i} is said, {i * 7}."}) + "\n"
                            for i in range(80)), encoding="utf-8")
    return path
