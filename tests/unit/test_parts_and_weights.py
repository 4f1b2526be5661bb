"""Typed content parts with a `value` key, parts that are not text, and per-turn loss weights down to the masks."""

import duckdb
import pyarrow.parquet as pq
import pytest

from tasks.core.config import ChatConfig, CleanConfig, DataConfig
from tasks.core.errors import InputError
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tasks.formatting.chat_format import conversations_of, format_rows, tokenize_conversation, training_template
from tests.conftest import write_jsonl


def parts(*texts, key="value"):
    return [{"type": "text", key: t} for t in texts]


def ingest(tmp_path, records, on_bad_rows="fail"):
    src = write_jsonl(tmp_path / "chat.jsonl", records)
    ingest_rows(DataConfig(sources=[{"path": str(src)}], on_bad_rows=on_bad_rows), tmp_path, tmp_path / "i.duckdb")
    with duckdb.connect(str(tmp_path / "i.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT messages, problem_rule, problem, record FROM raw ORDER BY row_id").fetchall()
    return src, rows


WEIGHTED = {"messages": [
    {"role": "system", "content": parts("Be brief.")},
    {"role": "user", "content": parts("Hi ", "there")},
    {"role": "assistant", "content": parts("Hello!"), "loss_weight": 1.0},
    {"role": "user", "content": parts("Name?")},
    {"role": "assistant", "content": parts("I am a bad answer."), "loss_weight": 0.0},
    {"role": "user", "content": parts("Again?")},
    {"role": "assistant", "content": parts("I am Ada."), "loss_weight": 1.0},
]}


def test_text_parts_under_value_are_read_with_their_text_and_loss_weights(tmp_path):
    _, [(messages, rule, _, _)] = ingest(tmp_path, [WEIGHTED])
    assert [(m["role"], m["content"], m["weight"]) for m in messages] == [
        ("user", "Hi there", None), ("assistant", "Hello!", 1.0), ("user", "Name?", None),
        ("assistant", "I am a bad answer.", 0.0), ("user", "Again?", None), ("assistant", "I am Ada.", 1.0)]
    assert rule is None


def test_openai_weight_key_is_read_as_the_loss_weight(tmp_path):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b", "weight": 1}]}
    _, [(messages, _, _, _)] = ingest(tmp_path, [record])
    assert [m["weight"] for m in messages] == [None, 0.0, None, 1.0]


@pytest.mark.parametrize("weight", [0.5, "0", True, 2])
def test_a_loss_weight_other_than_0_or_1_is_a_malformed_field(tmp_path, weight):
    record = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a",
                                                               "loss_weight": weight}]}
    with pytest.raises(InputError) as err:
        ingest(tmp_path, [record])
    assert str(err.value) == (f"{tmp_path / 'chat.jsonl'}:1: field 'messages': a turn's loss_weight must be 0 or 1, "
                              f"got {weight!r} (set data.on_bad_rows=quarantine to keep going)")


IMAGE = {"messages": [{"role": "user", "content": [{"type": "text", "value": "What is this?"},
                                                   {"type": "image_url", "image_url": {"url": "x.png"}}]},
                      {"role": "assistant", "content": "A cat."}]}


def test_an_image_part_fails_in_one_line_naming_file_line_and_field(tmp_path):
    with pytest.raises(InputError) as err:
        ingest(tmp_path, [{"messages": [{"role": "user", "content": "ok"}, {"role": "assistant", "content": "y"}]},
                          IMAGE])
    assert str(err.value) == (f"{tmp_path / 'chat.jsonl'}:2: field 'content': unsupported content part of type "
                              "'image_url'; this is multimodal data, and sftflow trains text-only models (only text, "
                              "reasoning and tool_call parts are read) (set data.on_bad_rows=quarantine to keep going)")


def test_an_image_part_is_quarantined_as_unsupported_part_with_its_record(tmp_path):
    _, [(messages, rule, problem, record)] = ingest(tmp_path, [IMAGE], on_bad_rows="quarantine")
    assert (messages, rule) == (None, "unsupported_part") and "image_url" in problem and '"x.png"' in record
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(), on_bad_rows="quarantine")
    assert counts["dropped_by_rule"] == {"unsupported_part": 1}


def test_a_row_whose_answers_all_weigh_0_is_quarantined_as_no_supervised_turn(tmp_path):
    unsupervised = {"messages": [{"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a", "loss_weight": 0}]}
    fine = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(3)]
    ingest(tmp_path, [unsupervised, *fine])
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig())
    assert counts["dropped_by_rule"] == {"no_supervised_turn": 1}
    with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
        assert con.execute("SELECT line_number, detail FROM quarantine").fetchall() == [
            (1, "every assistant turn has loss weight 0")]


def supervised_text(tokenizer, encoded):
    return tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m])


TURNS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name?"},
         {"role": "assistant", "content": "I am a bad answer."}, {"role": "user", "content": "Again?"},
         {"role": "assistant", "content": "I am Ada."}]


def test_a_weight_0_answer_is_rendered_but_its_tokens_are_not_supervised(tiny_tokenizer):
    template = training_template(tiny_tokenizer)
    plain = tokenize_conversation(tiny_tokenizer, template, TURNS, max_length=512)
    weighed = tokenize_conversation(tiny_tokenizer, template, TURNS, max_length=512, weights=[1.0, 0.0, 1.0])
    assert weighed["input_ids"] == plain["input_ids"]  # the same text is shown to the model
    assert "I am a bad answer." in tiny_tokenizer.decode(weighed["input_ids"])
    assert supervised_text(tiny_tokenizer, weighed) == "Hello!<|im_end|>I am Ada.<|im_end|>"
    assert weighed["last_eot_supervised"] and weighed["n_supervised"] == sum(weighed["assistant_masks"])


def test_a_weight_0_last_answer_leaves_the_earlier_answer_supervised_to_its_end_of_turn(tiny_tokenizer):
    out = tokenize_conversation(tiny_tokenizer, training_template(tiny_tokenizer), TURNS, max_length=512,
                                weights=[1.0, 1.0, 0.0])
    assert supervised_text(tiny_tokenizer, out) == "Hello!<|im_end|>I am a bad answer.<|im_end|>"
    assert out["last_eot_supervised"]


def test_loss_weights_from_the_file_reach_the_formatted_masks(tiny_model_dir, tiny_tokenizer, tmp_path):
    ingest(tmp_path, [WEIGHTED])
    clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.01))
    format_rows(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", ChatConfig())
    (row,) = pq.read_table(tmp_path / "fmt" / "train.parquet").to_pylist()
    assert supervised_text(tiny_tokenizer, row) == "Hello!<|im_end|>I am Ada.<|im_end|>"
    assert "I am a bad answer." in tiny_tokenizer.decode(row["input_ids"])
    assert row["reference"] == "I am Ada."


def test_a_template_without_generation_markers_takes_loss_weights_too(tiny_tokenizer):
    out = tokenize_conversation(tiny_tokenizer, tiny_tokenizer.chat_template, TURNS, max_length=512,
                                weights=[0.0, 1.0, 0.0])
    assert supervised_text(tiny_tokenizer, out) == "I am a bad answer.<|im_end|>"


def test_a_weight_on_a_user_turn_has_no_effect_and_sharegpt_turns_take_weights_too(tmp_path):
    records = [{"messages": [{"role": "user", "content": "q", "loss_weight": 0},
                             {"role": "assistant", "content": "a"}]},
               {"conversations": [{"from": "human", "value": "h"}, {"from": "gpt", "value": "g1", "weight": 0},
                                  {"from": "human", "value": "h2"}, {"from": "gpt", "value": "g2", "weight": 1}]}]
    _, rows = ingest(tmp_path, records)
    assert [[m["weight"] for m in messages] for messages, *_ in rows] == [[0.0, None], [None, 0.0, None, 1.0]]
    with duckdb.connect(str(tmp_path / "i.duckdb"), read_only=True) as con:
        raw = con.sql("SELECT system, messages FROM raw ORDER BY row_id").to_arrow_table()
    assert conversations_of(raw, keep_reasoning=False)[1] == [[1.0], [0.0, 1.0]]
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(), on_bad_rows="quarantine")
    assert counts["rows_clean"] == 2 and counts["dropped_by_rule"] == {}
