"""The SFT pipeline flow: ingest → clean → validate → format → train → evaluate → register.

Each step is a Prefect task with the run's options (tasks/core/common.py `configured`): the retries the config gives
it (orchestrate.retries), a run name that says what ran (`train[qlora r=16, 40 steps]`), and a refreshed cache
when asked (`refresh`, or `refresh_from` a step on). Cached results are keyed on each task's arguments, input
files and code version, so a rerun of the same run id only redoes what changed. The data gate (tasks/data/data_gate.py)
ends a run that has nothing new to learn from before any step runs. A run may stop after any step (`until`, as
`sftflow run --until format` asks, like Axolotl's `preprocess`); the same run id then goes on from there. A step
in `orchestrate.placement` runs as a child flow run on another work pool's worker (flows/placement.py).
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed

from flows.placement import run_placed
from flows.steps import STEPS, RunContext, run_names
from tasks.core.config import STEP_NAMES, PipelineConfig, RunPaths, dump_config, load_config
from tasks.core.errors import ConfigError
from tasks.core.redact import install_log_redaction
from tasks.core.settings import apply_defaults
from tasks.core.stage import configured
from tasks.data.data_gate import NO_NEW_DATA, data_gate, skipped_summary
from tasks.data.ingest import fingerprint_sources
from tasks.reporting.failure import report_failure, rerun_command
from tasks.reporting.report import human_stopped, save_config, write_stopped_summary, write_summary


def new_run_id() -> str:
    """Return a sortable, readable run id: timestamp plus the Prefect flow run name."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{flow_run.get_name() or 'local'}"


def trains(until: str | None) -> bool:
    """Return True when a run that stops after `until` (None: the whole pipeline) gets as far as training."""
    return until is None or STEP_NAMES.index(until) >= STEP_NAMES.index("train")


def step_tasks(cfg: PipelineConfig, refresh: bool, refresh_from: str | None, until: str | None = None) -> dict:
    """Return each step's task with this run's retries, name and refresh (`refresh`: all; `refresh_from`: that step
    and every later one); check that `refresh_from` and `until` name steps."""
    for option, value in (("refresh_from", refresh_from), ("until", until)):
        if value is not None and value not in STEP_NAMES:
            raise ConfigError(f"{option}={value!r} is not a step; use one of {', '.join(STEP_NAMES)}")
    first = STEP_NAMES.index(refresh_from) if refresh_from else len(STEP_NAMES)
    names, placed = run_names(cfg), cfg.orchestrate.placement  # a placed step: a child flow run on another pool
    return {name: configured(run_placed if name in placed else step.task, cfg.orchestrate.retry(name), names[name],
                             refresh or STEP_NAMES.index(name) >= first) for name, step in STEPS.items()}


@flow(name="sft-pipeline", on_failure=[report_failure], on_crashed=[report_failure])
def sft_pipeline(config_path: Path = Path("configs/default.yaml"), overrides: list[str] | None = None,
                 run_id: str | None = None, force: bool = False, refresh: bool = False,
                 refresh_from: str | None = None, until: str | None = None):
    """Ingest, clean, format (each validated), train, evaluate and register; bad data stops before training.

    Unless `force`, a run whose sources and config are unchanged since the last registered version ends at once in
    a Completed state named "no new data". `refresh` reruns every step; `refresh_from` a step and the ones after.
    `until` a step: stop after it, in a Completed state named "stopped after STEP"; the same run id goes on from
    there, the steps done being cache hits. A run that stops before training passes no data gate: it trains nothing.
    """
    started = time.time()
    apply_defaults()  # a deployment's worker may not have sftflow's environment; the user's values still win
    install_log_redaction()  # no credentials (a tracking URI's user info or token) in the run's logs
    cfg = load_config(config_path, overrides or [])
    step = step_tasks(cfg, refresh, refresh_from, until)
    run = RunPaths(cfg.runs_dir, run_id or new_run_id())
    save_config(dump_config(cfg), run.config)
    (run.root / "flow_run_id").write_text(str(flow_run.id or ""), encoding="utf-8")  # the failure hook finds it
    data_fingerprint = fingerprint_sources(cfg.data)
    gate = data_gate.with_options(task_run_name=f"data-gate[{data_fingerprint[:12]}]")
    if cfg.orchestrate.data_gate and not force and trains(until) and (reason := gate(cfg, data_fingerprint)):
        return Completed(name=NO_NEW_DATA, message=reason, data=skipped_summary(run, reason, flow_run.id))
    # in order (prepare-base-model first: a model that cannot be had costs seconds, not a data pass); each validate
    # step raises DataValidationError, so bad data never reaches training; register's gate gives @champion only on a
    # win; each result is handed to the steps after it (flows/steps.py), a placed step's read from the run's layout
    context = RunContext(cfg, run, flow_run.id, {"fingerprint": data_fingerprint})
    for name, task in step.items():
        context.hand_over(name, task(*context.step_args(name)))
        if name == until and until != STEP_NAMES[-1]:  # stopped: say where the outputs are and how to go on
            resume = rerun_command(None, cfg.runs_dir, run.root, {"config_path": config_path, "overrides": overrides,
                                                                   "force": force})
            summary = write_stopped_summary(run, until, resume, flow_run.id, started)
            return Completed(name=f"stopped after {until}", message=human_stopped(summary), data=summary)
    return write_summary(run.run_id, run.clean_report, context["evaluation"], context["registered"], flow_run.id,
                         started, run.summary)
