"""A new sqlite MLflow store starts as a copy of the cache's empty migrated one (tasks/core/mlflow_store.py) and
behaves as a store MLflow made itself."""

import sqlite3

from mlflow import MlflowClient

from tasks.core.mlflow_store import empty_store, seed_sqlite_store


def schema(db) -> tuple:
    with sqlite3.connect(db) as con:
        tables = sorted(r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'"))
        return tables, con.execute("SELECT version_num FROM alembic_version").fetchall()


def test_a_seeded_store_is_the_store_mlflow_would_have_made(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTFLOW_CACHE", str(tmp_path / "cache"))
    seeded, made = tmp_path / "seeded" / "mlflow.db", tmp_path / "made" / "mlflow.db"
    seed_sqlite_store(f"sqlite:///{seeded}")
    template = empty_store()
    built = template.stat().st_mtime_ns
    assert seeded.is_file() and list(seeded.parent.iterdir()) == [seeded]  # no partial copy left beside it

    clients = {db: MlflowClient(f"sqlite:///{db}", registry_uri=f"sqlite:///{db}") for db in (seeded, made)}
    assert schema(seeded) == schema(made)

    def state(client):  # what a user of the store sees: the Default experiment, the next ids, the registry
        default = client.get_experiment("0")
        experiment = client.create_experiment("sft", artifact_location=str(tmp_path / "artifacts"))
        client.create_registered_model("m")
        version = client.create_model_version("m", "file:///x", run_id=client.create_run(experiment).info.run_id)
        return default.name, default.artifact_location, experiment, version.version

    assert state(clients[seeded]) == state(clients[made])

    seed_sqlite_store(f"sqlite:///{tmp_path / 'again' / 'mlflow.db'}")  # the template is made once per MLflow version
    assert template.stat().st_mtime_ns == built and [p.name for p in template.parent.iterdir()] == [template.name]


def test_an_existing_store_or_a_server_is_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTFLOW_CACHE", str(tmp_path / "cache"))
    existing = tmp_path / "mlflow.db"
    existing.write_bytes(b"a store of the user's")
    seed_sqlite_store(f"sqlite:///{existing}")
    seed_sqlite_store("http://127.0.0.1:5000")
    assert existing.read_bytes() == b"a store of the user's"
    assert not (tmp_path / "cache").exists()  # nothing was made for them


def test_a_cache_that_cannot_be_written_leaves_the_store_to_mlflow(tmp_path, monkeypatch):
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    monkeypatch.setenv("SFTFLOW_CACHE", str(tmp_path / "cache"))
    seed_sqlite_store(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert not (tmp_path / "runs").exists()
    client = MlflowClient(uri := f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}", registry_uri=uri)
    assert client.get_experiment("0").name == "Default"  # MLflow made it, as it always could
