"""What every stage task shares: the cache policy, the retry rule, the `stage_task` decorator, and the per-run
options the flow gives each task (retries from the config, a run name that says what ran, a forced refresh)."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.tasks import exponential_backoff

from tasks.core.config import RetryConfig
from tasks.core.errors import SftflowError

# The DuckDB files the stages write keep their text zstd-compressed: smaller than with DuckDB's default choice
# (FSST or dictionary) and about 1.7x faster to write (bench/README.md). Numbers keep their own encodings.
COMPRESSION_SQL = "SET force_compression = 'zstd'"


def fingerprint_path(path: Path) -> str:
    """Return a cheap fingerprint of a file or directory tree: relative names, sizes and modification times."""
    if path.is_file():
        st = path.stat()
        return f"{st.st_size}:{st.st_mtime_ns}"
    if not path.is_dir():
        return "missing"
    parts = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.stat()
            parts.append(f"{p.relative_to(path)}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


@dataclass
class InputFiles(CachePolicy):
    """Key on the state of every file behind a Path argument, so an upstream rewrite invalidates the cache.

    Arguments named `out_*` are outputs: only their names count (INPUTS already hashes them).
    """

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any) -> str:
        state = [f"{k}={fingerprint_path(v)}" for k, v in sorted(inputs.items())
                 if isinstance(v, Path) and not k.startswith("out")]
        return hashlib.sha256("|".join(state).encode()).hexdigest()


@cache
def code_version() -> str:
    """Return a hash of sftflow's task package (every module and template under tasks/): its code version."""
    root = Path(__file__).parents[1]  # tasks/
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".jinja") and "__pycache__" not in p.parts):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


@dataclass
class CodeVersion(CachePolicy):
    """Key on the code version of the whole task package: TASK_SOURCE sees the task function alone, not the helpers
    it calls, so a fix in one of them would otherwise keep serving results the old code made."""

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any) -> str:
        return code_version()


# a task's cache key: its arguments (config sections included), its source and the package's, its input files' state
STAGE_CACHE = INPUTS + TASK_SOURCE + CodeVersion() + InputFiles()


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: bad config, bad data, failed gates and broken invariants (a bug) fail the same
    way every time."""
    try:
        state.result()
    except (SftflowError, AssertionError):  # an AssertionError is a broken invariant: a bug, which the same code
        return False                        # meets again on the same inputs
    except Exception:  # noqa: BLE001 -- anything else (network, OOM, a crash) may pass on a retry
        return True
    return True


def in_prefect_run() -> bool:
    """Return True inside a Prefect task or flow run (artifacts belong to runs; `task.fn()` calls have none)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


def stage_logger(name: str = "sftflow") -> logging.Logger | logging.LoggerAdapter:
    """Return the Prefect run logger inside a task or flow run, else the standard `logging` logger `name`.

    So a stage's plain function (`task.fn(...)`, a helper called from a notebook) logs without a Prefect run.
    """
    if in_prefect_run():
        from prefect import get_run_logger

        return get_run_logger()
    return logging.getLogger(name)


def stage_task(name: str, retries: int = 2, retry_delay_seconds: int | list[int] = 5, cache: bool = True):
    """Return a Prefect task decorator with sftflow's defaults: retries, input-keyed cache, results persisted as
    JSON (every stage returns plain values: paths, strings, dicts), not pickles. The flow replaces the retries with
    the configured ones (`configured`)."""
    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_unless_user_error,
        cache_policy=STAGE_CACHE if cache else NO_CACHE,
        persist_result=cache,
        result_serializer="json",
    )


def configured(stage: Any, retry: RetryConfig, run_name: str, refresh: bool = False) -> Any:
    """Return the task `stage` with this run's options: the configured retries (exponential backoff from
    `retry.delay_s`, with jitter), the task run name the UI shows, and a refreshed cache when `refresh`."""
    options: dict[str, Any] = {"task_run_name": run_name, "retries": retry.retries,
                               "retry_delay_seconds": exponential_backoff(retry.delay_s)(retry.retries) or 0,
                               "retry_jitter_factor": retry.jitter or None}
    if refresh:
        options["refresh_cache"] = True
    return stage.with_options(**options)
