"""The `sftflow` command as a user types it: a bare environment, a fresh Prefect home, every single step."""

import json
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest
from mlflow import MlflowClient
from prefect.settings import PREFECT_API_URL

from flows.cli import STEPS
from tests.conftest import ROOT, registry_client

pytestmark = pytest.mark.slow  # the CLI in subprocesses, from a bare environment and a fresh Prefect home

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
                     cwd=project, env=bare_env(home, HF_HUB_OFFLINE="1"))  # tiny.yaml: no stop check (a random model)
    return project, home, result


def test_a_bare_environment_run_succeeds_without_a_traceback_and_lands_where_the_ui_reads(cli_run):
    project, home, result = cli_run
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "database is locked" not in output
    assert "run cli-1: rows raw" in result.stdout and "exact_match base 0.000 -> tuned " in result.stdout
    # the last line: what the gate decided and why (configs/tiny.yaml gates on the held-out loss, which training
    # lowers below the base's on every held-out row: the paired bootstrap's lower bound is above the margin too)
    assert re.fullmatch(r"gate: v1 takes @champion: eval_loss [\d.]+ beats base's [\d.]+ by [\d.e-]+ > margin 0 "
                        r"\(lower is better\); 0\.95 paired-bootstrap lower bound [\d.e-]+ over 8 items",
                        result.stdout.strip().splitlines()[-1]), result.stdout[-500:]
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


def assert_step_reran(step: str, project: Path, stdout: str, started: int, tiny_model_dir: Path,
                      tmp_path: Path) -> None:
    """The step's output in run cli-1 is new (register: a version holding the run's trained weights as they are)."""
    run = project / "runs" / "cli-1"
    if step == "prepare-base-model":
        assert stdout.strip().splitlines()[-1] == str(tiny_model_dir)
    elif step == "register":  # the version registered holds the run's trained weights as they are now
        assert_registered_as_trained(project, run, stdout, tmp_path)
    else:
        assert (run / STEP_OUTPUTS[step]).stat().st_mtime_ns > started  # rewritten by this step
    if step == "clean":
        with duckdb.connect(str(run / "clean.duckdb"), read_only=True) as con:
            assert con.execute("SELECT count(*) FROM clean").fetchall()[0][0] > 50


def test_a_step_reruns_alone_as_the_command_from_a_bare_environment(cli_run, tiny_model_dir, tmp_path):
    """`sftflow task STEP --run ID` as typed, in its own process from a bare environment (the other steps run
    through the same entry point in this process below: one process start each would only add imports)."""
    project, home, first = cli_run
    assert first.returncode == 0, first.stderr[-2000:]
    started = time.time_ns()
    result = sftflow("task", "format", "--run", "cli-1", "--set", "evaluate.max_samples=4", cwd=project,
                     env=bare_env(home, PREFECT_API_URL=PREFECT_API_URL.value(), HF_HUB_OFFLINE="1"))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    assert_step_reran("format", project, result.stdout, started, tiny_model_dir, tmp_path)


@pytest.mark.parametrize("step", STEPS)
def test_every_step_reruns_alone_on_a_finished_run(cli_run, step, tiny_model_dir, tmp_path, capsys, monkeypatch):
    project, _, first = cli_run
    assert first.returncode == 0, first.stderr[-2000:]
    monkeypatch.chdir(project)  # runs/ and configs/ as the user's working directory has them
    started = time.time_ns()
    code, out, err = cli(capsys, "task", step, "--run", "cli-1", "--set", "evaluate.max_samples=4")
    assert code == 0, (out + err)[-3000:]
    assert "Traceback" not in out + err
    assert_step_reran(step, project, out, started, tiny_model_dir, tmp_path)


def assert_registered_as_trained(project: Path, run: Path, stdout: str, tmp_path: Path) -> None:
    """The register step's version holds the run's current trained weights; after the train step retrained them in
    place a new version does, and version 1 still holds the weights it was registered with (in its own run)."""
    from tasks.model.modeling import trained_model_dir
    from tasks.registry.registry import directory_digest, find_version

    uri = f"sqlite:///{project / 'runs' / 'mlflow.db'}"
    number = int(re.search(r"'model_version': (\d+)", stdout).group(1))
    found = find_version(uri, f"sftflow-tiny/{number}", tmp_path)
    assert directory_digest(found.trained_dir) == directory_digest(trained_model_dir(run / "train"))
    first = find_version(uri, "sftflow-tiny/1", tmp_path)
    assert directory_digest(first.trained_dir) == registry_client(uri).get_model_version("sftflow-tiny", "1").tags[
        "trained_sha256"]


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

    from tasks.core.config import CleanConfig, DataConfig
    from tasks.data.clean import clean
    from tasks.data.ingest import ingest_rows

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


# ---- the registry commands, through flows.cli.main on a real sqlite MLflow store ----

MODEL = "cli-model"


@pytest.fixture(scope="module")
def store_template(tmp_path_factory) -> Path:
    """runs/mlflow.db with versions 1-3 of MODEL as register leaves them: v1 champion over the base, v2 not better,
    v3 champion over v1 (the gate's decisions applied by the registry's own code). Built once: a new sqlite store
    runs MLflow's migrations, 2-7 s a time on 2 cores; each test gets its own copy (`store`)."""
    from tasks.registry.registry import GateDecision, apply_decision

    root = tmp_path_factory.mktemp("cli-store")
    uri = f"sqlite:///{root / 'runs' / 'mlflow.db'}"
    (root / "runs").mkdir()
    client = MlflowClient(uri, registry_uri=uri)
    # no artifacts are logged: the runs only anchor the versions, so the copies need no artifact directory
    experiment = client.create_experiment("cli", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model(MODEL)
    decisions = [GateDecision("field_match", 0.5, "base", 0.1, 0.0, True, "field_match 0.5 beats base's 0.1"),
                 GateDecision("field_match", 0.4, "champion v1", 0.5, 0.0, False, "0.4 does not beat v1's 0.5"),
                 GateDecision("field_match", 0.7, "champion v1", 0.5, 0.0, True, "0.7 beats v1's 0.5")]
    for decision in decisions:
        run = client.create_run(experiment)
        version = client.create_model_version(MODEL, f"runs:/{run.info.run_id}/model", run.info.run_id,
                                              tags=decision.tags())
        apply_decision(client, MODEL, str(version.version), decision, "tester")
    return root / "runs" / "mlflow.db"


@pytest.fixture
def store(tmp_path, store_template):
    """A copy of `store_template` in tmp_path/runs: (tmp_path, its URI, a client of it)."""
    (tmp_path / "runs").mkdir()
    shutil.copyfile(store_template, tmp_path / "runs" / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    return tmp_path, uri, MlflowClient(uri, registry_uri=uri)


def cli(capsys, *argv):
    from flows.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.strip(), err.strip()


def test_models_lists_every_version_with_aliases_scores_and_decisions(store, capsys):
    tmp_path, _, _ = store
    code, out, _ = cli(capsys, "models", MODEL, "--runs-dir", str(tmp_path / "runs"))
    assert code == 0
    assert out.splitlines() == [
        f"{MODEL}: 3 versions, @champion v3",
        "v3 @challenger @champion; gate promoted: 0.7 beats v1's 0.5",
        "v2 -; gate not promoted: 0.4 does not beat v1's 0.5",
        "v1 -; gate promoted: field_match 0.5 beats base's 0.1"]


def test_promote_by_hand_records_who_and_why_and_rollback_returns_to_the_champion_before(store, capsys,
                                                                                          monkeypatch):
    import getpass

    tmp_path, uri, client = store
    code, out, _ = cli(capsys, "promote", MODEL, "2", "--reason", "better on the new orders", "--tracking-uri", uri)
    assert (code, out) == (0, f"{MODEL} v2 is now @champion (was v3): better on the new orders")
    v2 = client.get_model_version(MODEL, "2")
    assert (v2.tags["promotion"], v2.tags["promoted_by"], v2.tags["promoted_reason"]) == (
        "manual", getpass.getuser(), "better on the new orders")
    monkeypatch.chdir(tmp_path)  # the default store: configs/default.yaml's runs_dir, runs/mlflow.db
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert "manual by" in cli(capsys, "models", MODEL)[1].splitlines()[2]
    assert cli(capsys, "rollback", MODEL, "--reason", "v2 broke the dates")[1] == (
        f"{MODEL} @champion rolled back from v2 to v3")
    assert str(client.get_registered_model(MODEL).aliases["champion"]) == "3"
    assert client.get_model_version(MODEL, "2").tags["demoted_reason"] == "rolled back to v3: v2 broke the dates"
    assert cli(capsys, "rollback", MODEL)[1] == f"{MODEL} @champion rolled back from v3 to v1"
    first = f"sftflow: error: {MODEL} v1 is its first champion: there is no previous one to roll back to"
    assert cli(capsys, "rollback", MODEL) == (2, "", first)
    again = cli(capsys, "promote", MODEL, "1", "--reason", "again")
    assert again == (0, f"{MODEL} v1 is already @champion; nothing changed", "")


def test_an_mlflow_tracking_uri_in_the_environment_is_the_default_store(store, capsys, monkeypatch):
    tmp_path, uri, _ = store
    monkeypatch.chdir(tmp_path)  # no configs/ here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    code, out, _ = cli(capsys, "models", MODEL)
    assert code == 0 and out.startswith(f"{MODEL}: 3 versions")


@pytest.mark.parametrize(("argv", "error"), [
    (["promote", MODEL, "9", "--reason", "x"], f"{MODEL} has no version '9' (versions: 1, 2, 3)"),
    (["promote", "nope", "1", "--reason", "x"], f"no registered model 'nope' in this store (models: {MODEL})"),
    (["rollback", "nope"], f"no registered model 'nope' in this store (models: {MODEL})"),
    (["models", "nope"], f"no registered model 'nope' in this store (models: {MODEL})"),
])
def test_an_unknown_model_or_version_is_one_line_and_a_non_zero_exit(store, capsys, argv, error):
    tmp_path, _, client = store
    code, out, err = cli(capsys, *argv, "--runs-dir", str(tmp_path / "runs"))
    assert (code, out, err) == (2, "", f"sftflow: error: {error}")
    assert {k: str(v) for k, v in client.get_registered_model(MODEL).aliases.items()} == {
        "champion": "3", "challenger": "3"}  # nothing moved


def test_a_store_that_does_not_exist_is_one_line_and_is_not_created(tmp_path, capsys):
    code, _, err = cli(capsys, "models", MODEL, "--runs-dir", str(tmp_path / "elsewhere"))
    assert code == 2 and err == (f"sftflow: error: no MLflow store at {tmp_path / 'elsewhere' / 'mlflow.db'}: pass "
                                 "--runs-dir or --tracking-uri (or set MLFLOW_TRACKING_URI) to the store `sftflow run` "
                                 "wrote")
    assert not (tmp_path / "elsewhere").exists()


def test_promote_needs_a_reason(capsys):
    with pytest.raises(SystemExit) as stopped:
        cli(capsys, "promote", MODEL, "1")
    assert stopped.value.code == 2 and "--reason" in capsys.readouterr().err


@pytest.mark.parametrize("ref", ["no-such-model@champion", f"{MODEL}/99", f"{MODEL}@nope"])
def test_serve_with_a_ref_that_names_no_version_is_one_line_and_exit_2(store, capsys, ref):
    _, uri, _ = store
    code, _, err = cli(capsys, "serve", ref, "--tracking-uri", uri, "--port", "0")
    assert code == 2 and err.startswith("sftflow: error: ") and len(err.splitlines()) == 1 and ref.split("@")[0].split(
        "/")[0] in err
