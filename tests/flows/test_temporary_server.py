"""`sftflow run` and `sftflow task` start Prefect's temporary server themselves, first thing, so it boots while they
import (flows/temporary_server.py): the run lands in the project's Prefect database, no second server starts, none is
left behind, and an API URL Prefect has from anywhere (the environment, a profile) is used instead."""

import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
from prefect.settings import PREFECT_API_URL

from flows.temporary_server import healthy, spawn_early
from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # Prefect's temporary server started by the CLI

USING = re.compile(r"Using temporary server on (http://127\.0\.0\.1:\d+/api)")


def bare_env(home: Path, **extra: str) -> dict:
    return {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(home), "HF_HUB_OFFLINE": "1",
            **extra}


@pytest.fixture
def project(tmp_path, tiny_model_dir) -> Path:
    """A working directory like the repository root with one earlier run, `t`, to rerun a step of."""
    cwd = tmp_path / "project"
    cwd.mkdir()
    for name in ("configs", "expectations"):
        (cwd / name).symlink_to(ROOT / name)
    run = cwd / "runs" / "t"
    run.mkdir(parents=True)
    config = (ROOT / "configs" / "tiny.yaml").read_text()
    (run / "config.yaml").write_text(config.replace("train:\n", f"train:\n  base_model: {tiny_model_dir}\n", 1))
    return cwd


def sftflow_task(project: Path, env: dict) -> tuple[subprocess.CompletedProcess, str]:
    result = subprocess.run([str(Path(sys.executable).parent / "sftflow"), "task", "prepare-base-model", "--run", "t"],
                            cwd=project, env=env, capture_output=True, text=True, timeout=300, check=False)
    return result, result.stdout + result.stderr


def servers_in(cwd: Path) -> list[int]:
    """Return the pids of Prefect API server processes running in directory `cwd`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if b"prefect.server.api.server:create_app" in (proc / "cmdline").read_bytes() and \
                    os.readlink(proc / "cwd") == str(cwd):
                pids.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return pids


def test_without_an_api_url_the_step_runs_on_the_server_the_command_started_and_none_is_left(project, tmp_path,
                                                                                              tiny_model_dir):
    result, output = sftflow_task(project, bare_env(tmp_path))
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output
    url = USING.search(output).group(1)
    assert "Starting temporary server" not in output  # Prefect did not start a second one of its own
    assert not healthy(url) and servers_in(project) == []  # stopped with the command
    with sqlite3.connect(project / ".sftflow" / "prefect" / "prefect.db") as db:  # what `make ui-prefect` serves
        names = [row[0] for row in db.execute("SELECT name FROM task_run")]
    assert names == [f"prepare-base-model[{tiny_model_dir.name}]"]


def test_an_api_url_from_a_prefect_profile_is_used_and_the_early_server_stopped_unused(project, tmp_path,
                                                                                        tiny_model_dir):
    # the command cannot see a profile's URL before Prefect is imported: it starts a server, then stops it unused
    url = PREFECT_API_URL.value()  # the test harness's server
    prefect_home = project / ".sftflow" / "prefect"
    prefect_home.mkdir(parents=True)
    (prefect_home / "profiles.toml").write_text(f'active = "team"\n\n[profiles.team]\nPREFECT_API_URL = "{url}"\n')
    started = time.time()
    result, output = sftflow_task(project, bare_env(tmp_path))
    assert result.returncode == 0, output[-3000:]
    assert not USING.search(output) and "Starting temporary server" not in output
    assert servers_in(project) == []
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(any_=[
            f"prepare-base-model[{tiny_model_dir.name}]"])))
    assert any(r.start_time and r.start_time.timestamp() >= started - 1 for r in runs)  # it ran on the profile's


def test_no_server_is_started_when_prefect_has_an_api_url(monkeypatch):
    assert PREFECT_API_URL.value()  # in-process, the harness's settings: Prefect is imported and knows its server
    assert spawn_early() is None
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    assert spawn_early() is None


def test_a_temporary_server_that_cannot_open_its_database_is_one_line_naming_its_log(project, tmp_path):
    env = bare_env(tmp_path, PREFECT_API_DATABASE_CONNECTION_URL="sqlite+aiosqlite:////no/such/dir/prefect.db")
    result, output = sftflow_task(project, env)
    assert result.returncode == 2 and "Traceback" not in output, output[-3000:]
    log = project / ".sftflow" / "prefect" / "temporary-server.log"
    assert result.stderr.strip().splitlines()[-1] == (
        f"sftflow: error: Prefect's temporary API server exited with code 3 before it answered; its output is in {log}")
    assert "Application startup failed" in log.read_text()  # the server's own account of why
    assert servers_in(project) == []
