"""Shared fixtures: hermetic environment, a tiny random llama with the real SmolLM2 tokenizer, helper writers."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tasks.settings import apply_defaults

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# sftflow's own environment (tasks/settings.py), with its state in a throwaway home rather than the project's
# .sftflow, and the Hub forbidden: tests are hermetic. Set before anything imports Prefect.
os.environ["SFTFLOW_HOME"] = tempfile.mkdtemp(prefix="sftflow-tests-")
os.environ.pop("PREFECT_HOME", None)
os.environ["HF_HUB_OFFLINE"] = "1"
apply_defaults()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random llama (hidden 64) saved with the SmolLM2 tokenizer and chat template (tasks/tiny_model.py)."""
    from tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written verbatim) as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def formatted_run(runs: Path, base_model_dir: Path, run_id: str = "run-a"):
    """Return (config, RunPaths) of a run of configs/tiny.yaml in `runs` taken up to its formatted rows, laid out as
    the flow lays it out (train.base_model = `base_model_dir`)."""
    from tasks.chat_format import format_chats
    from tasks.clean import clean
    from tasks.config import RunPaths, dump_config, load_config
    from tasks.ingest import fingerprint_sources, ingest
    from tasks.report import save_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={runs}", f"train.base_model={base_model_dir}"])
    run = RunPaths(runs, run_id)
    save_config.fn(dump_config(cfg), run.config)
    raw_db = ingest.fn(cfg.data, fingerprint_sources.fn(cfg.data), run.sources, run.ingest_db)
    clean_db = clean.fn(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean)
    format_chats.fn(clean_db, str(base_model_dir), run.formatted, cfg.chat)
    return cfg, run
