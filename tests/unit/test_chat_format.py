import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.config import ChatConfig, CleanConfig, DataConfig
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tasks.formatting.chat_format import (
    TEMPLATES,
    conversations_of,
    format_rows,
    prompt_at,
    tokenize_conversation,
    training_template,
)
from tests.conftest import write_jsonl

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"}],
    [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "a=1?"},
     {"role": "assistant", "content": '{"a": 1}'}, {"role": "user", "content": "and b?"},
     {"role": "assistant", "content": "def f():\n    return 2"}],
]


def supervised_text(tokenizer, encoded):
    return tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m])


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_the_training_template_renders_exactly_like_the_models_own(tiny_tokenizer, messages):
    template = training_template(tiny_tokenizer)
    assert template != tiny_tokenizer.chat_template  # patched: SmolLM2's own has no generation markers
    for gen in (False, True):
        assert tiny_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                  add_generation_prompt=gen) == \
            tiny_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_labelled_tokens_are_exactly_the_assistant_turns_plus_end_of_turn(tiny_tokenizer, messages):
    out = tokenize_conversation(tiny_tokenizer, training_template(tiny_tokenizer), messages, max_length=512)
    expected = "".join(m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant")
    assert supervised_text(tiny_tokenizer, out) == expected
    assert out["n_supervised"] == sum(out["assistant_masks"]) and not out["truncated"]


def test_truncation_is_flagged_and_cuts_ids_and_masks_together(tiny_tokenizer):
    out = tokenize_conversation(tiny_tokenizer, training_template(tiny_tokenizer), CONVERSATIONS[1], max_length=20)
    assert out["truncated"] and len(out["input_ids"]) == len(out["assistant_masks"]) == out["n_tokens"] == 20


def test_an_unpatchable_template_without_markers_asks_for_chat_chat_template(tiny_tokenizer, tmp_path):
    from tasks.core.errors import ConfigError

    original = tiny_tokenizer.chat_template
    try:
        tiny_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
        with pytest.raises(ConfigError, match="chat.chat_template"):
            training_template(tiny_tokenizer)
        custom = tmp_path / "t.jinja"
        custom.write_text((TEMPLATES / "smollm2_training.jinja").read_text())
        assert training_template(tiny_tokenizer, custom) == custom.read_text()
    finally:
        tiny_tokenizer.chat_template = original


def test_format_writes_both_splits_with_prompts_references_and_length_stats(tiny_model_dir, tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in CONVERSATIONS] +
                      [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(40)])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.3))
    stats = format_rows(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", ChatConfig())
    assert stats["train"]["rows"] + stats["heldout"]["rows"] == 42 and stats["heldout"]["rows"] > 0
    train = pq.read_table(tmp_path / "fmt" / "train.parquet").to_pylist()
    heldout = pq.read_table(tmp_path / "fmt" / "heldout.parquet").to_pylist()
    rows = train + heldout
    # the last answer of the multi-turn chat
    multi = next(r for r in rows if r["reference"] == "def f():\n    return 2")
    prompt, reference = prompt_at(CONVERSATIONS[1], 4)  # what a held-out copy of it holds
    assert json.loads(prompt) == CONVERSATIONS[1][:4] and reference == multi["reference"]
    if multi in heldout:  # the split is the hash's: a held-out copy carries its prompt, a training one none
        assert json.loads(multi["prompt"]) == CONVERSATIONS[1][:4]
    else:
        assert multi in train and multi["prompt"] is None
    # evaluate generates from the held-out prompts: each is the turns before its reference, ending with the user's
    assert all(json.loads(r["prompt"])[-1]["role"] == "user" for r in heldout)
    assert all(r["prompt"] is None for r in train)
    assert all(r["n_supervised"] > 0 for r in rows)
    assert json.loads((tmp_path / "fmt" / "stats.json").read_text())["train"]["truncation_rate"] == 0.0


def test_thinking_traces_are_dropped_unless_kept():
    turns = [{"role": "user", "content": "q", "reasoning": None, "weight": None},
             {"role": "assistant", "content": "4", "reasoning": "add", "weight": None}]
    table = pa.table({"system": pa.array([None], pa.string()), "messages": [turns]})
    assert conversations_of(table, keep_reasoning=False)[0][0][1] == {"role": "assistant", "content": "4"}
    assert conversations_of(table, keep_reasoning=True)[0][0][1] == {"role": "assistant", "content": "4",
                                                                      "reasoning": "add"}


@pytest.mark.parametrize("keep_reasoning", [False, True])
def test_rows_read_as_arrow_are_what_the_per_row_conversion_gives(tmp_path, keep_reasoning, monkeypatch):
    import duckdb

    from tasks.formatting.chat_format import ROWS_SQL, Conversations, read_split, split_rows

    def conversation(system, messages):  # the rule, one row at a time, from DuckDB's Python rows
        head = [{"role": "system", "content": system}] if system else []
        return head + [{"role": m["role"], "content": m["content"],
                        **({"reasoning": m["reasoning"]} if keep_reasoning and m["reasoning"] else {})}
                       for m in messages]

    def weights(messages):
        return [1.0 if m["weight"] is None else m["weight"] for m in messages if m["role"] == "assistant"]

    def reference(convo, messages):  # the last answer whose weight is not 0, as rendered
        head = len(convo) - len(messages)
        return convo[head + max(i for i, m in enumerate(messages) if m["role"] == "assistant" and m["weight"] != 0)]

    monkeypatch.setattr(Conversations, "BLOCK", 4)  # rows are converted a block at a time: many blocks here

    records = [{"messages": m} for m in CONVERSATIONS] + [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>add</think>4"}]},
        {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g1", "weight": 0},
                           {"from": "human", "value": "h2"}, {"from": "gpt", "value": "g2", "weight": 1},
                           {"from": "human", "value": "h3"}, {"from": "gpt", "value": "g3", "weight": 0}]},
        {"instruction": "é ü 中", "input": "x", "output": "y", "system": "Be brief."},
    ] + [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)]
    src = write_jsonl(tmp_path / "c.jsonl", records)
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.3))
    seen = []
    with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
        for split in ("train", "heldout"):
            expected = con.execute(ROWS_SQL, {"split": split}).fetchall()
            rows = split_rows(read_split(con, split), keep_reasoning)
            assert rows.row_ids == [r[0] for r in expected] and rows.sources == [r[1] for r in expected]
            assert rows.copies.tolist() == [r[5] for r in expected]
            convos = [conversation(system, messages) for _, _, system, messages, _, _ in expected]
            assert list(rows.convos) == convos and rows.convos[2:7] == convos[2:7] and rows.convos[-1] == convos[-1]
            assert list(rows.weights) == [weights(messages) for _, _, _, messages, _, _ in expected]
            assert [convo[ref]["content"] for convo, ref in zip(rows.convos, rows.refs)] == [
                reference(convo, r[3])["content"] for convo, r in zip(convos, expected)]
            seen += [(convo, convo[ref]["content"]) for convo, ref in zip(rows.convos, rows.refs)]
    assert len(seen) == len(records)
    assert any(m.get("reasoning") == "add" for c, _ in seen for m in c) == keep_reasoning
    assert next(ref for c, ref in seen if c[-1]["content"] == "g3") == "g2"  # the last answer weighs 0
