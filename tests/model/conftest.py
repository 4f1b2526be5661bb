"""Shared by the model tests: the tiny training set they train on (`formatted`) and the config they train with."""

import pytest

from tasks.core.config import ChatConfig, CleanConfig, DataConfig, TrainConfig
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tasks.formatting.chat_format import format_rows
from tests.conftest import write_jsonl

ANSWER = '{"customer": "Ada", "item": "lamp", "quantity": 2, "city": "Oslo"}'


@pytest.fixture(scope="session")
def formatted(tiny_model_dir, tmp_path_factory):
    """One memorisable conversation (repeated under distinct prompts) plus a multi-turn one, tokenized: read-only to
    the tests, built once per test process for the model tests that train on it."""
    tmp = tmp_path_factory.mktemp("qlora")
    rows = [{"instruction": f"Extract the order #{i}.", "output": ANSWER} for i in range(24)]
    multi_turn = {"messages": [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "first"},
                               {"role": "user", "content": "u2"}, {"role": "assistant", "content": "second"}]}
    sources = [{"path": str(write_jsonl(tmp / "d.jsonl", rows))},
               {"path": str(write_jsonl(tmp / "multi.jsonl", [multi_turn])), "split": "train"}]
    ingest_rows(DataConfig(sources=sources), tmp, tmp / "i.duckdb")
    clean_database(tmp / "i.duckdb", tmp / "c.duckdb", CleanConfig(heldout_fraction=0.1))
    format_rows(tmp / "c.duckdb", str(tiny_model_dir), tmp / "fmt", ChatConfig(max_length=128))
    return tmp / "fmt"


def tiny_train_config(**kw):
    return TrainConfig(**{"learning_rate": 2e-2, "max_steps": 30, "batch_size": 4, "gradient_accumulation_steps": 2,
                          "logging_steps": 5, "save_steps": 15, "lora_r": 8, **kw})
