"""Every test here runs against a real Prefect API: the session's test harness (tests/conftest.py `prefect_backend`).
Shared here: a real `mlflow server` (`mlflow_server`, or `module_mlflow_server` for a module's tests), and report.json
as evaluate writes it for register's tests."""

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.config import TrainConfig
from tasks.core.mlflow_store import seed_sqlite_store
from tests.conftest import free_port, wait_for_http


@pytest.fixture(scope="session", autouse=True)
def flows_prefect_backend(prefect_backend):
    yield


def live_processes(pgid: int) -> list[int]:
    """Return the processes of a process group that are still running (zombies aside), from /proc."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


@contextlib.contextmanager
def running_mlflow_server(folder: Path):
    """`mlflow server` as `make ui-mlflow` starts it (sqlite store, job execution off) on a free loopback port, its
    store and artifacts in `folder`: (its URL, its process), stopped with every worker it started on the way out."""
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    seed_sqlite_store(f"sqlite:///{folder / 'server.db'}")  # as sftflow's own stores start: migrated, empty
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri",
         f"sqlite:///{folder / 'server.db'}", "--default-artifact-root", str(folder / "server-artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc)
        yield url, proc
    finally:
        if live_processes(proc.pid):
            os.killpg(proc.pid, signal.SIGTERM)  # its own session: the server and every worker it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` of the test's own, its store in the test's tmp_path: (its URL, its process)."""
    with running_mlflow_server(tmp_path) as server:
        yield server


@pytest.fixture(scope="module")
def module_mlflow_server(tmp_path_factory):
    """One real `mlflow server` for a module's tests that neither stop it nor share a model name (a server costs
    ~10 CPU-s to start): (its URL, its process)."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as server:
        yield server


def lora_config(seed: int) -> TrainConfig:
    return TrainConfig(method="lora", learning_rate=2e-2, max_steps=4, batch_size=4, gradient_accumulation_steps=1,
                       logging_steps=1, save_steps=4, lora_r=4, packing=False, seed=seed)


def scores(metric: float, loss: float, stop_rate: float = 1.0) -> dict:
    return {"eval_loss": loss, "perplexity": 2.718281828 ** loss, "exact_match": metric, "token_f1": metric,
            "stop_rate": stop_rate, "runaway_rate": 0.0}


def write_report(eval_dir, base: dict, tuned: dict, champion: dict | None = None, fingerprint: str = "set-1"):
    """report.json and samples.jsonl as evaluate writes them (the contract between evaluate and register), with
    per-item scores equal to each model's mean (the gate's bootstrap then sees the difference of the means)."""
    models = {"base": base, "tuned": tuned, **({"champion": champion} if champion else {})}
    flat = {f"{m}_{k}": v for m, s in models.items() for k, v in s.items() if isinstance(v, (int, float))}
    items = {m: {k: [v] * 8 for k, v in s.items() if k in ("exact_match", "token_f1", "eval_loss") and v is not None}
             for m, s in models.items()}
    report = {"heldout_rows": 8, "heldout_fingerprint": fingerprint, "metrics": ["exact_match", "token_f1"],
              "generation": {"max_new_tokens": 12, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "seed": 0,
                             "batch_size": 8},
              "models": models, "eval_loss": tuned["eval_loss"], "base_eval_loss": base["eval_loss"], **flat,
              "items": items, "item_tokens": [10] * 8}
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "report.json").write_text(json.dumps(report), encoding="utf-8")
    row = {"row_id": "r1", "prompt": "p", "reference": "r", "base": "b", "tuned": "t", "base_score": 0.0,
           "tuned_score": 1.0, "base_stopped": True, "tuned_stopped": True}
    (eval_dir / "samples.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    return eval_dir
