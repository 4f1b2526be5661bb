"""A remote MLflow store: a real `mlflow server` on a loopback port, found through MLFLOW_TRACKING_URI, receives the
run, the model version and its aliases; the server is stopped with nothing left running. With credentials in that
URI (`http://user:TOKEN@host:port`), a whole pipeline run writes the token nowhere: not under runs/, the sftflow
home, the server's store and artifacts, Prefect's database and result storage, nor the console."""

import os
import signal
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tasks.core.config import RunPaths, dump_config, load_config
from tasks.data.clean import clean
from tasks.data.ingest import fingerprint_sources, ingest
from tasks.formatting.chat_format import format_chats
from tasks.registry.register import register_run
from tasks.reporting.report import save_config
from tasks.train.train import train_model
from tests.conftest import ROOT
from tests.flows.conftest import live_processes, lora_config, scores, write_report

pytestmark = pytest.mark.slow  # a real mlflow server and a whole run against it


def test_register_honours_a_remote_tracking_uri_and_the_server_keeps_version_and_aliases(
        mlflow_server, tiny_model_dir, tmp_path, monkeypatch):
    url, server = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={tmp_path / 'runs'}",
                                                       f"train.base_model={tiny_model_dir}"])
    assert cfg.tracking_uri() == url  # the environment wins over the sqlite default
    run = RunPaths(cfg.runs_dir, "remote-1")
    save_config.fn(dump_config(cfg), run.config)
    raw_db = ingest.fn(cfg.data, fingerprint_sources.fn(cfg.data), run.sources, run.ingest_db)
    clean_db = clean.fn(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean)
    format_chats.fn(clean_db, str(tiny_model_dir), run.formatted, cfg.chat)
    adapter = train_model(run.formatted, str(tiny_model_dir), run.train, lora_config(0))
    write_report(run.eval, scores(0.1, 3.0), scores(0.5, 2.0))

    result = register_run(cfg.tracking_uri(), cfg.artifact_root(), run, str(tiny_model_dir), adapter, run.eval, {},
                          cfg.registry, "lora")

    client = MlflowClient(url, registry_uri=url)  # read back from the server, as the UI would
    model = client.get_registered_model("sftflow-tiny")
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "1", "challenger": "1"}
    version = client.get_model_version("sftflow-tiny", "1")
    assert version.tags["gate.promoted"] == "true" and version.run_id == result["mlflow_run_id"]
    assert client.get_run(result["mlflow_run_id"]).data.tags["model_version"] == "1"
    assert result["model_version_url"] == f"{url}/#/models/sftflow-tiny/versions/1"  # the server is the UI
    assert not (cfg.runs_dir / "mlflow.db").exists()  # nothing went to the local default store
    assert live_processes(server.pid)  # the server (and its worker) ran in its own process group
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)
    deadline = time.monotonic() + 30
    while live_processes(server.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live_processes(server.pid) == []  # no server or worker process left behind


def files_holding(secret: bytes, *roots: Path) -> list[str]:
    """Return every file under `roots` whose bytes hold `secret` (databases and their -wal files included)."""
    found = []
    for root in roots:
        for path in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
            try:
                if secret in path.read_bytes():
                    found.append(str(path))
            except OSError:  # removed meanwhile (a temporary file)
                continue
    return found


def test_a_pipeline_run_with_credentials_in_the_tracking_uri_writes_them_nowhere(
        mlflow_server, tiny_model_dir, tmp_path, monkeypatch, capfd):
    import json
    import uuid

    from prefect.logging.handlers import APILogHandler
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, PREFECT_SERVER_DATABASE_CONNECTION_URL

    from flows.sft_pipeline import sft_pipeline

    url, _ = mlflow_server
    token = f"TOKEN{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url.replace("http://", f"http://user:{token}@"))
    runs = tmp_path / "runs"
    summary = sft_pipeline(ROOT / "configs" / "tiny.yaml", [f"runs_dir={runs}", f"train.base_model={tiny_model_dir}",
                                                            "evaluate.max_samples=4"], "secret-1")
    APILogHandler().flush()  # the run's logs, into Prefect's database
    assert summary["model_version"] == 1 and summary["mlflow_run_url"].startswith(f"{url}/#/experiments/")
    client = MlflowClient(url, registry_uri=url)  # the run really went to the server
    assert client.get_run(summary["mlflow_run_id"]).data.tags["model_version"] == "1"
    record = json.loads((runs / "secret-1" / "train" / "mlflow_run.json").read_text())
    assert record["tracking_uri"] == url.replace("http://", "http://***@")
    prefect_db = Path(PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1]).parent
    roots = [runs, Path(os.environ["SFTFLOW_HOME"]), tmp_path / "server.db", tmp_path / "server-artifacts",
             prefect_db, Path(PREFECT_LOCAL_STORAGE_PATH.value())]
    assert all(root.exists() for root in (*roots[:3], prefect_db)), roots  # server-artifacts only if it was used
    assert (runs / "secret-1" / "summary.json").is_file() and (prefect_db / "prefect-test.db").is_file()
    # what is searched holds what would leak: the run's logs and its link artifacts (the server's address) are there
    assert files_holding(b"register: v1 ", prefect_db) and files_holding(url.encode(), prefect_db)
    assert files_holding(token.encode(), *roots) == []
    out, err = capfd.readouterr()
    assert token not in out + err  # the console: sftflow's logs, and no "View run at" line of MLflow's with it
