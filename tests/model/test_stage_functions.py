"""Every stage's plain function (`task.fn(...)`, as the README shows) runs with no Prefect run and logs to `logging`."""

import json
import logging

from prefect.context import FlowRunContext, TaskRunContext

from tasks.core.config import RunPaths, dump_config, load_config
from tasks.data.clean import clean
from tasks.data.ingest import fingerprint_sources, ingest
from tasks.data.validate import validate, validation_args
from tasks.evaluate.evaluate import evaluate_adapter
from tasks.formatting.chat_format import format_chats
from tasks.model.prepare import prepare_base_model
from tasks.registry.register import register_model
from tasks.reporting.report import save_config, write_summary
from tasks.train.train import train_adapter
from tests.conftest import ROOT


def test_each_stage_function_runs_without_prefect_and_logs_to_the_standard_logger(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="sftflow")
    assert FlowRunContext.get() is None and TaskRunContext.get() is None
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={tmp_path}", f"train.base_model={tiny_model_dir}",
                                                       "train.max_steps=2", "evaluate.max_samples=4"])
    run = RunPaths(tmp_path, "plain")
    save_config.fn(dump_config(cfg), run.config)
    base = prepare_base_model.fn(cfg.train.base_model)
    raw_db = ingest.fn(cfg.data, fingerprint_sources.fn(cfg.data), run.sources, run.ingest_db)
    validate.fn(*validation_args("raw", raw_db, run, cfg.validation))
    clean_db = clean.fn(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean)
    validate.fn(*validation_args("clean", clean_db, run, cfg.validation))
    chats = format_chats.fn(clean_db, base, run.formatted, cfg.chat)
    validate.fn(*validation_args("tokenized", chats, run, cfg.validation))
    adapter = train_adapter.fn(chats, base, run.train, cfg.train)
    evaluation = evaluate_adapter.fn(chats, base, adapter, run.eval, cfg.evaluate, cfg.train)
    registered = register_model.fn(cfg.tracking_uri(), cfg.artifact_root(), run, base, adapter, evaluation, {},
                                   cfg.registry)
    summary = write_summary.fn(run.run_id, run.clean_report, evaluation, registered, None, 0.0, run.summary)

    assert json.loads(run.summary.read_text()) == summary and summary["model_version"] == 1
    messages = [r.getMessage() for r in caplog.records if r.name == "sftflow"]
    for prefix in ("base model ", "ingest read ", "clean kept ", "validate raw: ", "validate clean: ",
                   "validate tokenized: ", "format: ", "train: compute dtype ", "train step 2/2  loss ",
                   "evaluate: 4 held-out prompts",
                   "evaluate: generating (base), prompts 1-4 of 4: token 8/12  elapsed ", "register: ",
                   "run plain: rows raw "):
        assert any(m.startswith(prefix) for m in messages), (prefix, messages)
