"""A new sqlite MLflow store starts as a copy of an empty, migrated one.

MLflow creates a sqlite store the first time a client opens a file that is not there: it creates the tables and runs
its alembic migrations, about 2 CPU-s on a 2-core AMD EPYC (against 1 s to open an existing store). Every new
runs_dir pays that once, and the test suite creates about 45 of them. sftflow keeps one empty store per MLflow
version in its cache, made by MLflow itself, and copies it where a new store is about to be created. The copy holds
MLflow's schema, its alembic revision and its default workspace, but no Default experiment: MLflow creates that on
the first open, with the artifact root of whoever opens it, as it would in a store of its own making.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from pathlib import Path

from tasks.core.config import absent_sqlite_store
from tasks.core.settings import cache_root


def seed_sqlite_store(tracking_uri: str) -> None:
    """Where `tracking_uri` names a sqlite store that does not exist yet, put an empty migrated one there; any other
    store (a server, an existing file) is left alone."""
    path = absent_sqlite_store(tracking_uri)
    if path is None:
        return
    try:
        template = empty_store()
    except (OSError, sqlite3.Error):  # a cache it cannot write: MLflow makes the store itself, as without sftflow
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
    shutil.copyfile(template, partial)
    try:
        os.link(partial, path)  # whole, and only where no store appeared meanwhile (another process's is kept)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links
        if not path.exists():
            os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def empty_store() -> Path:
    """Return the cache's empty store for the installed MLflow, made by MLflow the first time it is asked for. Two
    processes that ask at once may both make one: each is whole, and the last one stays."""
    import mlflow

    template = cache_root() / "mlflow-stores" / f"empty-{mlflow.__version__}.db"
    if template.is_file():
        return template
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    template.parent.mkdir(parents=True, exist_ok=True)
    build = template.with_name(f".{uuid.uuid4().hex}.db")
    try:
        store = SqlAlchemyStore(f"sqlite:///{build}", str(template.parent / "artifacts"))
        store.engine.dispose()
        with sqlite3.connect(build) as con:  # the Default experiment is made again on the first open, as MLflow would
            con.execute("DELETE FROM experiments")
        con.close()
        os.replace(build, template)
    finally:
        build.unlink(missing_ok=True)
    return template
