"""What every stage task shares: the cache policy, the retry rule, and the `stage_task` decorator."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy

from tasks.errors import SftflowError

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


STAGE_CACHE = INPUTS + TASK_SOURCE + InputFiles()


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient failures only: bad config, bad data and failed gates fail the same way every time."""
    try:
        state.result()
    except SftflowError:
        return False
    except Exception:  # noqa: BLE001 -- anything else (network, OOM, a bug) may pass on a retry
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
    """Return a Prefect task decorator with sftflow's defaults: retries, input-keyed cache, persisted results."""
    return task(
        name=name,
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_unless_user_error,
        cache_policy=STAGE_CACHE if cache else NO_CACHE,
        persist_result=cache,
    )
