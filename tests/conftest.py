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
    """A 2-layer random llama (hidden 64) saved with the SmolLM2 tokenizer and chat template from the packaged GGUF.

    A wide init (0.4) gives logits enough range for LoRA on the linear layers to move them (0.02 would not).
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tasks.base_model import resolve_gguf
    from tasks.config import DEFAULT_BASE_MODEL

    gguf = resolve_gguf(DEFAULT_BASE_MODEL)
    out = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True, initializer_range=0.4, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


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
