"""Run one pipeline step alone on an earlier run's outputs (`sftflow task <step> --run <run-id>`), for debugging."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.formatting.chat_format import format_chats, inspect_rows
from tasks.data.clean import clean
from tasks.core.common import configured
from tasks.core.config import RunPaths, load_config
from tasks.data.data_gate import config_digest
from tasks.core.errors import ConfigError, SftflowError, StepFailed
from tasks.evaluate.evaluate import evaluate_adapter
from tasks.reporting.failure import step_failure
from tasks.data.ingest import fingerprint_data, ingest
from tasks.model.modeling import prepare_base_model, trained_model_dir
from tasks.train.monitoring import run_tracking
from tasks.registry.register import pipeline_tags, register_model
from tasks.registry.registry import champion_to_compare
from tasks.train.train import train_adapter
from tasks.data.validate import validate, validation_args


def step_call(step: str, cfg: Any, run: RunPaths) -> tuple[Any, tuple]:
    """Return the task and the arguments it takes for `step`, all derived from the run's saved layout."""
    base = lambda: prepare_base_model.fn(cfg.train.base_model, cfg.train.trust_remote_code)
    champion = lambda: (champion_to_compare(cfg.tracking_uri(), cfg.registry.model_name, cfg.runs_dir / "champions",
                                            trained_model_dir(run.train)) if cfg.evaluate.compare_champion else None)
    calls = {
        "prepare-base-model": lambda: (prepare_base_model, (cfg.train.base_model, cfg.train.trust_remote_code)),
        "ingest": lambda: (ingest, (cfg.data, fingerprint_data(cfg.data), run.sources, run.ingest_db)),
        "clean": lambda: (clean, (run.ingest_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean,
                                  cfg.data.on_bad_rows)),
        "validate-raw": lambda: (validate, validation_args("raw", run.ingest_db, run, cfg.validation)),
        "validate": lambda: (validate, validation_args("clean", run.clean_db, run, cfg.validation)),
        "validate-tokens": lambda: (validate, validation_args("tokenized", run.formatted, run, cfg.validation)),
        "format": lambda: (format_chats, (run.clean_db, base(), run.formatted, cfg.chat, run.quarantine)),
        "train": lambda: (train_adapter, (run.formatted, base(), run.train, cfg.train, run_tracking(cfg, run.run_id),
                                          cfg.orchestrate.train_slots)),
        "evaluate": lambda: (evaluate_adapter, (run.formatted, base(), trained_model_dir(run.train), run.eval,
                                                cfg.evaluate, cfg.train, champion())),
        "register": lambda: (register_model, (cfg.tracking_uri(), cfg.artifact_root(), run, base(),
                                              trained_model_dir(run.train), run.eval,
                                              pipeline_tags(fingerprint_data(cfg.data), None, run.config,
                                                            config_digest(cfg)),
                                              cfg.registry, cfg.train.method)),
    }
    return calls[step]()


def run_step(step: str, runs_dir: Path, run_id: str, overrides: list[str]) -> Any:
    """Re-run `step` of run `run_id` as a Prefect task (cache refreshed; the retries and run name the flow gives
    it) and return its result; a failure that is not the user's raises StepFailed with the failure hook's line."""
    run = RunPaths(runs_dir, run_id)
    if not run.config.is_file():
        raise ConfigError(f"{run.config}: no such run (expected the config saved by `sftflow run`)")
    cfg = load_config(run.config, overrides)
    task, args = step_call(step, cfg, run)
    from flows.sft_pipeline import run_names

    try:
        return configured(task, cfg.orchestrate.retry(step), run_names(cfg)[step], refresh=True)(*args)
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
