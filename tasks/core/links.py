"""Addresses of MLflow pages (runs, model versions, logged files), for Prefect artifacts, logs and model cards.

Every address is built from the tracking URI with its credentials dropped (tasks/core/redact.py `public_url`): a
link is written to summary.json, the Prefect database and logs, and a browser asks for credentials itself."""

from __future__ import annotations

from urllib.parse import quote, urlencode

from tasks.core.redact import public_url

MLFLOW_UI = "http://127.0.0.1:5000"  # `make ui-mlflow` serves a local (sqlite) store here


def mlflow_ui(tracking_uri: str) -> str:
    """Return the base URL of the MLflow UI for a store: the server itself (without user info or a token), or
    `make ui-mlflow`'s address."""
    if tracking_uri.startswith(("http://", "https://")):
        return public_url(tracking_uri).rstrip("/")
    return MLFLOW_UI


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """Return the MLflow UI address of a run."""
    return f"{mlflow_ui(tracking_uri)}/#/experiments/{experiment_id}/runs/{run_id}"


def version_url(tracking_uri: str, name: str, version: str) -> str:
    """Return the MLflow UI address of a model version."""
    return f"{mlflow_ui(tracking_uri)}/#/models/{quote(name)}/versions/{version}"


def mlflow_file_url(tracking_uri: str, run_id: str, path: str) -> str:
    """Return the address at which the MLflow UI's server hands out one file the run logged (an image shows in place:
    `make ui-mlflow` for a local store, the server itself for a remote one)."""
    return f"{mlflow_ui(tracking_uri)}/get-artifact?{urlencode({'path': path, 'run_uuid': run_id}, quote_via=quote)}"
