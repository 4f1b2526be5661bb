"""Run one pipeline step alone on an earlier run's outputs (`sftflow task <step> --run <run-id>`), for debugging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flows.steps import STEPS, RunContext, run_names
from tasks.core.config import RunPaths, load_config
from tasks.core.errors import ConfigError, SftflowError, StepFailed
from tasks.core.stage import configured
from tasks.formatting.chat_format import inspect_rows
from tasks.model.prepare import prepare_base_model
from tasks.reporting.failure import step_failure


def run_step(step: str, runs_dir: Path, run_id: str, overrides: list[str]) -> Any:
    """Re-run `step` of run `run_id` as a Prefect task (cache refreshed; the retries and run name the flow gives
    it) and return its result; a failure that is not the user's raises StepFailed with the failure hook's line."""
    run = RunPaths(runs_dir, run_id)
    if not run.config.is_file():
        raise ConfigError(f"{run.config}: no such run (expected the config saved by `sftflow run`)")
    cfg = load_config(run.config, overrides)
    args = STEPS[step].args(RunContext(cfg, run))  # what earlier steps returned, read from the run's layout
    try:
        return configured(STEPS[step].task, cfg.orchestrate.retry(step), run_names(cfg)[step], refresh=True)(*args)
    except (SftflowError, ConnectionError):  # the user's to fix, or an outage: the CLI words those itself
        raise
    except Exception as e:  # a bug (a broken invariant) or a crash: one line, the traceback kept in a file
        raise StepFailed(step_failure(step, runs_dir, run.root, e).line()) from e


def inspect_format(runs_dir: Path, run_id: str, n: int, overrides: list[str], colour: bool = False) -> str:
    """Return `n` of the run's formatted training rows with the supervised tokens marked (`--inspect N`)."""
    run = RunPaths(runs_dir, run_id)
    cfg = load_config(run.config, overrides)
    return inspect_rows(run.formatted, prepare_base_model.fn(cfg.train.base_model, cfg.train.trust_remote_code), n,
                        colour)
