"""The Prefect side of every stage task: the cache policy, the retry rule, the `stage_task` decorator, and the
per-run options the flow gives each task (retries from the config, a run name that says what ran, a forced
refresh)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import INPUTS, NO_CACHE, TASK_SOURCE, CachePolicy
from prefect.tasks import exponential_backoff

from tasks.core.common import code_version, fingerprint_path
from tasks.core.config import RetryConfig
from tasks.core.errors import SftflowError


@dataclass
class InputFiles(CachePolicy):
    """Key on the state of every file behind a Path argument, so an upstream rewrite invalidates the cache.

    Arguments named `out_*` are outputs: only their names count (INPUTS already hashes them).
    """

    def compute_key(self, task_ctx: Any, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kw: Any) -> str:
        state = [f"{k}={fingerprint_path(v)}" for k, v in sorted(inputs.items())
                 if isinstance(v, Path) and not k.startswith("out")]
        return hashlib.sha256("|".join(state).encode()).hexdigest()


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
