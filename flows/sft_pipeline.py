"""The SFT pipeline flow: ingest → clean → validate → format → train → evaluate → register."""

from __future__ import annotations

import time
from datetime import datetime
from pathlib import Path

from prefect import flow
from prefect.runtime import flow_run

from tasks.chat_format import format_chats
from tasks.clean import clean
from tasks.config import RunPaths, dump_config, load_config
from tasks.evaluate import evaluate_adapter
from tasks.ingest import fingerprint_sources, ingest
from tasks.modeling import prepare_base_model
from tasks.monitoring import run_tracking
from tasks.register import pipeline_tags, register_model
from tasks.registry import champion_to_compare
from tasks.report import save_config, write_summary
from tasks.settings import apply_defaults
from tasks.train import train_adapter
from tasks.validate import validate_stage


def new_run_id() -> str:
    """Return a sortable, readable run id: timestamp plus the Prefect flow run name."""
    return f"{datetime.now():%Y%m%d-%H%M%S}-{flow_run.get_name() or 'local'}"


@flow(name="sft-pipeline")
def sft_pipeline(config_path: Path = Path("configs/default.yaml"), overrides: list[str] | None = None,
                 run_id: str | None = None) -> dict:
    """Ingest, clean, format (each validated), train, evaluate and register; bad data stops before training."""
    started = time.time()
    apply_defaults()  # a deployment's worker may not have sftflow's environment; the user's values still win
    cfg = load_config(config_path, overrides or [])
    run = RunPaths(cfg.runs_dir, run_id or new_run_id())
    config_file = save_config(dump_config(cfg), run.config)
    base = prepare_base_model(cfg.train.base_model)  # first: a model that cannot be had costs seconds, not a data pass
    # each validate_stage() raises DataValidationError: bad data never reaches training
    data_fingerprint = fingerprint_sources(cfg.data)
    raw_db = ingest(cfg.data, data_fingerprint, run.sources, run.ingest_db)
    validate_stage("raw", raw_db, run, cfg.validation)
    clean_db = clean(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean, cfg.data.on_bad_rows)
    validate_stage("clean", clean_db, run, cfg.validation)
    chats = format_chats(clean_db, base, run.formatted, cfg.chat, run.quarantine)
    validate_stage("tokenized", chats, run, cfg.validation)
    adapter = train_adapter(chats, base, run.train, cfg.train, run_tracking(cfg, run.run_id))
    champion = (champion_to_compare(cfg.tracking_uri(), cfg.registry.model_name, cfg.runs_dir / "champions", adapter)
                if cfg.evaluate.compare_champion else None)  # scored on the same held-out prompts as the new model
    evaluation = evaluate_adapter(chats, base, adapter, run.eval, cfg.evaluate, cfg.train, champion)
    # the promotion gate: @challenger always, @champion only on a win; a model that never stops is refused
    registered = register_model(cfg.tracking_uri(), cfg.artifact_root(), run, base, adapter, evaluation,
                                pipeline_tags(data_fingerprint, flow_run.id, config_file), cfg.registry,
                                cfg.train.method)
    return write_summary(run.run_id, run.clean_report, evaluation, registered, flow_run.id, started, run.summary)
