"""The SFT pipeline flow: ingest → clean → validate → format → train → evaluate → register.

Each step is a Prefect task with the run's options (tasks/core/common.py `configured`): the retries the config gives
it (orchestrate.retries), a run name that says what ran (`train[qlora r=16, 40 steps]`), and a refreshed cache
when asked (`refresh`, or `refresh_from` a step on). Cached results are keyed on each task's arguments, input
files and code version, so a rerun of the same run id only redoes what changed. The data gate (tasks/data/data_gate.py)
ends a run that has nothing new to learn from before any step runs. A run may stop after any step (`until`, as
`sftflow run --until format` asks, like Axolotl's `preprocess`); the same run id then goes on from there.
"""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.runtime import flow_run
from prefect.states import Completed

from tasks.formatting.chat_format import format_chats
from tasks.data.clean import clean
from tasks.core.common import configured
from tasks.core.config import STEP_NAMES, PipelineConfig, RunPaths, dump_config, load_config
from tasks.data.data_gate import NO_NEW_DATA, config_digest, data_gate, skipped_summary
from tasks.core.errors import ConfigError
from tasks.evaluate.evaluate import evaluate_adapter
from tasks.reporting.failure import report_failure, rerun_command
from tasks.data.ingest import fingerprint_sources, ingest
from tasks.model.modeling import prepare_base_model
from tasks.train.monitoring import run_tracking
from tasks.registry.register import pipeline_tags, register_model
from tasks.registry.registry import champion_to_compare
from tasks.reporting.report import human_stopped, save_config, write_stopped_summary, write_summary
from tasks.core.settings import apply_defaults
from tasks.train.train import train_adapter
from tasks.data.validate import validate, validation_args


def new_run_id() -> str:
    """Return a sortable, readable run id: timestamp plus the Prefect flow run name."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{flow_run.get_name() or 'local'}"


def run_names(cfg: PipelineConfig) -> dict[str, str]:
    """Return each step's task run name: the step (as `sftflow task` spells it) and what it runs with."""
    t, c = cfg.train, cfg.chat
    method = f"{t.method} r={t.lora_r}" if t.uses_lora else t.method
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.num_epochs:g} epochs"
    template = c.chat_template.name if c.chat_template else c.template
    sources = len(cfg.data.sources)
    return {
        "prepare-base-model": f"prepare-base-model[{Path(t.base_model).name}]",
        "ingest": f"ingest[{sources} source{'s' * (sources != 1)}]", "validate-raw": "validate-raw[raw rows]",
        "clean": f"clean[max {cfg.clean.max_chars} chars, {cfg.clean.heldout_fraction:.0%} held out]",
        "validate": "validate[clean rows]", "format": f"format[{template} template, {c.mask} mask, {c.max_length} max]",
        "validate-tokens": "validate-tokens[tokenized rows]", "train": f"train[{method}, {length}]",
        "evaluate": f"evaluate[{cfg.evaluate.max_samples} prompts]",
        "register": f"register[{cfg.registry.model_name}, gate {cfg.registry.gate_metric}]",
    }


class Stop(Exception):
    """The step `until` names has finished: the run ends there (raised after that step, caught by the flow)."""


def stop_after(task: Any) -> Any:
    """Return `task` as a call that raises Stop once the task has finished (the step `until` names)."""
    def call(*args: Any) -> None:
        task(*args)
        raise Stop

    return call


def trains(until: str | None) -> bool:
    """Return True when a run that stops after `until` (None: the whole pipeline) gets as far as training."""
    return until is None or STEP_NAMES.index(until) >= STEP_NAMES.index("train")


def step_tasks(cfg: PipelineConfig, refresh: bool, refresh_from: str | None, until: str | None = None) -> dict:
    """Return each step's task with this run's retries, name and refresh (`refresh`: all; `refresh_from`: that step
    and every later one); the step `until` names raises Stop once it has finished."""
    for option, value in (("refresh_from", refresh_from), ("until", until)):
        if value is not None and value not in STEP_NAMES:
            raise ConfigError(f"{option}={value!r} is not a step; use one of {', '.join(STEP_NAMES)}")
    first = STEP_NAMES.index(refresh_from) if refresh_from else len(STEP_NAMES)
    tasks = {"prepare-base-model": prepare_base_model, "ingest": ingest, "validate-raw": validate, "clean": clean,
             "validate": validate, "format": format_chats, "validate-tokens": validate, "train": train_adapter,
             "evaluate": evaluate_adapter, "register": register_model}
    names = run_names(cfg)
    steps = {step: configured(task, cfg.orchestrate.retry(step), names[step],
                              refresh or STEP_NAMES.index(step) >= first) for step, task in tasks.items()}
    if until is not None and until != STEP_NAMES[-1]:  # after the last step the run ends anyway, with its summary
        steps[until] = stop_after(steps[until])
    return steps


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
    cfg = load_config(config_path, overrides or [])
    step = step_tasks(cfg, refresh, refresh_from, until)
    run = RunPaths(cfg.runs_dir, run_id or new_run_id())
    config_file = save_config(dump_config(cfg), run.config)
    (run.root / "flow_run_id").write_text(str(flow_run.id or ""), encoding="utf-8")  # the failure hook finds it
    data_fingerprint = fingerprint_sources(cfg.data)
    gate = data_gate.with_options(task_run_name=f"data-gate[{data_fingerprint[:12]}]")
    if cfg.orchestrate.data_gate and not force and trains(until) and (reason := gate(cfg, data_fingerprint)):
        return Completed(name=NO_NEW_DATA, message=reason, data=skipped_summary(run, reason, flow_run.id))
    try:
        # first: a model that cannot be had costs seconds, not a data pass
        base = step["prepare-base-model"](cfg.train.base_model, cfg.train.trust_remote_code)
        # each validate step raises DataValidationError: bad data never reaches training
        raw_db = step["ingest"](cfg.data, data_fingerprint, run.sources, run.ingest_db)
        step["validate-raw"](*validation_args("raw", raw_db, run, cfg.validation))
        clean_db = step["clean"](raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean,
                                 cfg.data.on_bad_rows)
        step["validate"](*validation_args("clean", clean_db, run, cfg.validation))
        chats = step["format"](clean_db, base, run.formatted, cfg.chat, run.quarantine)
        step["validate-tokens"](*validation_args("tokenized", chats, run, cfg.validation))
        adapter = step["train"](chats, base, run.train, cfg.train, run_tracking(cfg, run.run_id),
                                cfg.orchestrate.train_slots)
        champion = (champion_to_compare(cfg.tracking_uri(), cfg.registry.model_name, cfg.runs_dir / "champions",
                                        adapter) if cfg.evaluate.compare_champion else None)  # on the same prompts
        evaluation = step["evaluate"](chats, base, adapter, run.eval, cfg.evaluate, cfg.train, champion)
        # the promotion gate: @challenger always, @champion only on a win; a model that never stops is refused
        registered = step["register"](cfg.tracking_uri(), cfg.artifact_root(), run, base, adapter, evaluation,
                                      pipeline_tags(data_fingerprint, flow_run.id, config_file, config_digest(cfg)),
                                      cfg.registry, cfg.train.method)
    except Stop:  # `until` reached: say where the outputs are and how to go on
        resume = rerun_command(None, cfg.runs_dir, run.root, {"config_path": config_path, "overrides": overrides,
                                                               "force": force})
        summary = write_stopped_summary(run, until, resume, flow_run.id, started)
        return Completed(name=f"stopped after {until}", message=human_stopped(summary), data=summary)
    return write_summary(run.run_id, run.clean_report, evaluation, registered, flow_run.id, started, run.summary)
