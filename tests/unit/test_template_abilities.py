"""What each row becomes for templates that can and cannot say things: thinking mode follows the row, tool
definitions and calls reach the training text (the template's own way, else the documented fallback), plain text
rows train as continued pre-training, and source weights keep their share through format."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import trl

from tasks.core.config import ChatConfig, CleanConfig, DataConfig
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tasks.formatting.chat_format import chat_encoder, format_rows
from tasks.model.tokenizer import load_tokenizer
from tests.conftest import write_jsonl

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Look up the weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
CALL = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]


def template_file(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_text((TRL_TEMPLATES / name).read_text(encoding="utf-8"), encoding="utf-8")
    return path


def supervised(tokenizer, ids, mask) -> str:
    return tokenizer.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)


def formatted(tmp_path, tiny_model_dir, records, heldout=0.3, **chat) -> tuple[list[dict], list[dict], dict]:
    src = write_jsonl(tmp_path / "rows.jsonl", records)
    ingest_rows(DataConfig(sources=[{"path": str(src)}], on_bad_rows="fail"), tmp_path, tmp_path / "i.duckdb")
    clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=heldout))
    stats = format_rows(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", ChatConfig(**chat),
                        tmp_path / "q.parquet")
    train, held = (pq.read_table(tmp_path / "fmt" / f"{s}.parquet").to_pylist() for s in ("train", "heldout"))
    return train, held, stats


def test_rows_with_a_trace_train_in_thinking_mode_and_rows_without_in_non_thinking_mode(tiny_tokenizer, tmp_path):
    template = (TRL_TEMPLATES / "qwen3.jinja").read_text(encoding="utf-8")
    encoder = chat_encoder(tiny_tokenizer, template, fast=False)
    assert encoder.renderer.features.thinking_switch == "enable_thinking"
    q = {"role": "user", "content": "What is 2+2?"}
    thinking = encoder.encode([[q, {"role": "assistant", "content": "4", "reasoning": "2 and 2 make 4"}]], [[1.0]])
    plain = encoder.encode([[q, {"role": "assistant", "content": "4"}]], [[1.0]])
    text = {name: tiny_tokenizer.decode(e.ids[0]) for name, e in (("thinking", thinking), ("plain", plain))}
    prompt = {name: tiny_tokenizer.decode(e.ids[0][:e.prompt_tokens[0]]) for name, e in
              (("thinking", thinking), ("plain", plain))}
    # thinking mode: the trace inside the block, all of it supervised after the bare assistant header
    assert prompt["thinking"].endswith("<|im_start|>assistant\n")
    assert supervised(tiny_tokenizer, thinking.ids[0], thinking.masks[0]) == \
        "<think>\n2 and 2 make 4\n</think>\n\n4<|im_end|>"
    # non-thinking mode: the template's enable_thinking=False prompt (an empty block), the answer alone supervised
    assert prompt["plain"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert supervised(tiny_tokenizer, plain.ids[0], plain.masks[0]) == "4<|im_end|>"
    assert text["plain"].startswith(prompt["plain"]) and text["thinking"].startswith(prompt["thinking"])


def test_a_held_out_prompt_keeps_its_rows_thinking_mode_for_evaluate(tiny_model_dir, tmp_path):
    records = [{"messages": [{"role": "user", "content": f"q{i}"},
                             {"role": "assistant", "content": f"a{i}",
                              **({"reasoning_content": f"r{i}"} if i % 2 else {})}]}
               for i in range(30)]
    _, held, _ = formatted(tmp_path, tiny_model_dir, records, keep_reasoning=True,
                           chat_template=template_file(tmp_path, "qwen3.jinja"))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    assert held
    for row in held:
        prompt = tokenizer.decode(row["input_ids"][:row["prompt_tokens"]])
        has_trace = int(json.loads(row["prompt"])[0]["content"][1:]) % 2 == 1
        assert prompt.endswith("<think>\n\n</think>\n\n") != has_trace, prompt
        assert row["assistant_masks"][row["prompt_tokens"]] == 1


def test_a_template_without_a_thinking_switch_that_always_thinks_says_so_in_one_line(tiny_model_dir, tmp_path,
                                                                                      caplog):
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(12)]
    with caplog.at_level(logging.WARNING):
        train, _, stats = formatted(tmp_path, tiny_model_dir, records,
                                    chat_template=template_file(tmp_path, "deepseekv3.jinja"))
    note = next(n for n in stats["template"]["notes"] if "thinking switch" in n)
    assert "(enable_thinking)" in note and "empty <think></think> block" in note and note in caplog.text
    tokenizer = load_tokenizer(str(tiny_model_dir))
    row = train[0]
    assert supervised(tokenizer, row["input_ids"], row["assistant_masks"]).startswith("\n</think>\n\na")


@pytest.mark.parametrize(("name", "way"), [("qwen2_5.jinja", "the template's own"),
                                           ("phi3.jinja", "the system turn")])
def test_tool_definitions_and_calls_reach_the_training_text(tiny_model_dir, tmp_path, name, way, caplog):
    records = [{"messages": [{"role": "user", "content": f"Weather in Oslo? ({i})"},
                             {"role": "assistant", "content": "", "tool_calls": CALL},
                             {"role": "tool", "content": f"{{\"temp\": {i}}}"},
                             {"role": "assistant", "content": f"It is {i} degrees."}], "tools": TOOLS}
               for i in range(12)]
    with caplog.at_level(logging.WARNING):
        train, _, stats = formatted(tmp_path, tiny_model_dir, records, chat_template=template_file(tmp_path, name))
    tokenizer = load_tokenizer(str(tiny_model_dir))
    row = train[0]
    text = tokenizer.decode(row["input_ids"])
    assert "Look up the weather in a city" in text and '"temp":' in text
    assert "get_weather" in supervised(tokenizer, row["input_ids"], row["assistant_masks"])  # the call is learned
    assert "Look up the weather" not in supervised(tokenizer, row["input_ids"], row["assistant_masks"])
    fallbacks = stats["template"]["fallbacks"]
    if way == "the template's own":
        assert fallbacks == {}
    else:
        assert set(fallbacks) == {"tools-in-system", "tool-calls-as-text", "tool-results-as-user"}
        assert "list them as JSON in the system turn" in caplog.text


def test_plain_text_rows_train_as_continued_pretraining_with_every_token_supervised(tiny_model_dir, tmp_path):
    records = [{"text": f"Document {i}: the quick brown fox jumps over the lazy dog."} for i in range(10)]
    records += [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)]
    train, held, stats = formatted(tmp_path, tiny_model_dir, records)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    texts = [r for r in train + held if r["reference"] and r["reference"].startswith("Document")]
    assert texts and stats["accounting"]["rows_formatted"] == 20
    for row in texts:
        assert tokenizer.decode(row["input_ids"]) == row["reference"] + tokenizer.eos_token
        assert all(row["assistant_masks"]) and row["prompt"] is None and row["prompt_tokens"] == 0


@pytest.mark.parametrize(("weight", "kept"), [(0.5, 0.5), (0.25, 0.25), (1.5, 1.5)])
def test_a_source_weight_keeps_its_share_of_training_rows_and_the_accounting_holds(tiny_model_dir, tmp_path,
                                                                                   weight, kept):
    records = [{"instruction": f"question number {i}", "output": f"answer {i}"} for i in range(200)]
    src = write_jsonl(tmp_path / "rows.jsonl", records)
    ingest_rows(DataConfig(sources=[{"path": str(src), "weight": weight}]), tmp_path, tmp_path / "i.duckdb")
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.1))
    stats = format_rows(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", ChatConfig(),
                        tmp_path / "q.parquet")
    acc, held = stats["accounting"], counts["split"]["heldout"]
    assert acc["rows_raw"] == 200 == acc["rows_formatted"] + acc["rows_quarantined"]
    train_rows = 200 - held
    dropped = counts["dropped_by_rule"].get("source_weight", 0)
    assert dropped == (0 if weight >= 1 else train_rows - counts["split"]["train"])
    assert stats["train"]["rows"] == pytest.approx(train_rows * kept, rel=0.25)  # hash-chosen: about the share
    assert stats["heldout"]["rows"] == held  # held-out rows are never dropped or repeated
    quarantine = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert sum(r["rule"] == "source_weight" for r in quarantine) == dropped


@pytest.mark.parametrize(("share", "stops"), [(0.1, True), (0.6, False)])
def test_a_run_that_drops_more_than_max_drop_share_for_length_stops_with_one_line(tiny_model_dir, tmp_path, share,
                                                                                   stops):
    from prefect.logging import disable_run_logger

    from tasks.core.errors import DataValidationError
    from tasks.formatting.chat_format import format_chats

    records = [{"instruction": f"question {i}", "output": " ".join(["word"] * (5 if i % 2 else 80))}
               for i in range(40)]
    src = write_jsonl(tmp_path / "rows.jsonl", records)
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.3))
    cfg = ChatConfig(max_length=60, max_drop_share=share)
    with disable_run_logger():
        if not stops:
            assert format_chats.fn(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", cfg,
                                   tmp_path / "q.parquet") == tmp_path / "fmt"
            return
        with pytest.raises(DataValidationError) as e:
            format_chats.fn(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", cfg, tmp_path / "q.parquet")
    message = str(e.value)
    assert "\n" not in message and "format dropped 50.0% of the clean rows (20 of 40)" in message
    assert "chat.max_length=60" in message and "chat.max_drop_share=0.1" in message
    assert sum(r["rule"] == "too_many_tokens" for r in pq.read_table(tmp_path / "q.parquet").to_pylist()) == 20
