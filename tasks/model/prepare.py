"""The prepare-base-model step: train.base_model resolved to the checked local directory the later steps load (a
Hub id fetched, a GGUF converted once, a directory checked), as a Prefect task. Its own module: tasks/model/modeling.py
loads models in processes that run no Prefect task (training ranks, `sftflow serve`), which so import no Prefect."""

from __future__ import annotations

from tasks.core.common import stage_logger
from tasks.core.stage import stage_task
from tasks.model.base_model import resolve_base_model


# Short backoff, transient Hub errors only (a bad train.base_model is a ConfigError, never retried). Not cached: the
# check is cheap once the files are on disk, and a cached path could point at a since-deleted directory.
@stage_task("prepare-base-model", retries=2, retry_delay_seconds=[5, 20], cache=False)
def prepare_base_model(spec: str, trust_remote_code: bool = False) -> str:
    """Return the checked local directory later steps load the base model from (Hub id fetched, GGUF converted); a
    model that ships its own Python code is refused unless `trust_remote_code` (train.trust_remote_code)."""
    resolved = resolve_base_model(spec, trust_remote_code=trust_remote_code)
    stage_logger().info("base model %s -> %s", spec, resolved)
    return resolved
