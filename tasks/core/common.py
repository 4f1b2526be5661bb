"""What every stage shares without Prefect: its logger (Prefect's run logger inside a run, else `logging`'s), the
fingerprints its cache keys are made of, and DuckDB's compression setting. The Prefect side of a stage (the cache
policy, the retry rule, the `stage_task` decorator) is tasks/core/stage.py: a process that never runs a Prefect task
(a training rank, `sftflow serve`) imports none of Prefect (~1.5 CPU-s)."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import sys
from functools import cache
from pathlib import Path

# The DuckDB files the stages write keep their text zstd-compressed: smaller than with DuckDB's default choice
# (FSST or dictionary) and about 1.7x faster to write (bench/README.md). Numbers keep their own encodings.
COMPRESSION_SQL = "SET force_compression = 'zstd'"

# CPython collects its youngest generation after every 700 net allocations. A process of sftflow's imports ~850k objects
# (torch, transformers, Prefect, MLflow, GX): at 700 that is ~2,200 collections and 2.2 CPU-s, a fifth of the imports'
# CPU; at 20,000 it is ~70 collections and 0.8 s (2-core AMD EPYC with AVX512-BF16, timed with gc.callbacks). Young
# garbage waits for 20,000 allocations instead of 700, a few MB at most.
GC_THRESHOLDS = (20_000, 10, 10)


def collect_garbage_less_often() -> None:
    """Raise CPython's collection thresholds to GC_THRESHOLDS. Each process sftflow starts calls it before its heavy
    imports: the CLI (flows/__init__.py, which a worker's flow run imports too) and a training rank."""
    gc.set_threshold(*GC_THRESHOLDS)


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


@cache
def code_version() -> str:
    """Return a hash of sftflow's task package (every module and template under tasks/): its code version."""
    root = Path(__file__).parents[1]  # tasks/
    digest = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".jinja") and "__pycache__" not in p.parts):
        digest.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return digest.hexdigest()


def in_prefect_run() -> bool:
    """Return True inside a Prefect task or flow run (artifacts belong to runs; `task.fn()` calls have none). A process
    that has not imported Prefect is in no run: it is not imported for the question."""
    if "prefect" not in sys.modules:
        return False
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
