import json

import duckdb
import pytest
from prefect.logging import disable_run_logger

from tasks.core.config import DataConfig
from tasks.core.errors import InputError
from tasks.data.ingest import ingest, ingest_rows
from tests.conftest import write_jsonl


def raw_rows(db):
    """Rows of the raw table; a turn's null reasoning and weight fields are left out."""
    with duckdb.connect(str(db), read_only=True) as con:
        cur = con.execute("SELECT * FROM raw ORDER BY row_id")
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r)) for r in cur.fetchall()]
    for row in rows:
        row["messages"] = row["messages"] and [{k: v for k, v in m.items() if k in ("role", "content") or v is not None}
                                               for m in row["messages"]]
    return rows


def test_alpaca_rows_become_user_and_assistant_turns_with_input_appended(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi", "input": "", "output": "hi", "system": "Be brief."},
    ])
    with disable_run_logger():
        db = ingest.fn(DataConfig(sources=[{"path": str(src)}]), "fp", tmp_path / "s", tmp_path / "ingest.duckdb")
    rows = raw_rows(db)
    assert [list(map(dict, r["messages"])) for r in rows] == [
        [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
    ]
    assert rows[1]["system"] == "Be brief." and [r["line_number"] for r in rows] == [1, 2]
    assert all(r["source"] == "a" and r["source_file"] == str(src) for r in rows)


def test_chat_messages_keep_their_turns_and_a_leading_system_turn_moves_to_system(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
        {"role": "assistant", "content": [{"type": "text", "text": "a1"}]}]}])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    (row,) = raw_rows(tmp_path / "i.duckdb")
    assert row["system"] == "S"
    assert [dict(m) for m in row["messages"]] == [{"role": "user", "content": "u1"},
                                                  {"role": "assistant", "content": "a1"}]


def test_malformed_json_line_fails_with_file_and_line(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, '{"instruction": "x", "output"'])
    with pytest.raises(InputError) as err:
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    assert str(err.value).startswith(f"{src}:2: invalid JSON") and "\n" not in str(err.value)


def test_malformed_line_is_kept_as_a_raw_row_when_quarantining(tmp_path):
    src = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, "not json"])
    ingest_rows(DataConfig(sources=[{"path": str(src)}], on_bad_rows="quarantine"), tmp_path, tmp_path / "i.duckdb")
    rows = raw_rows(tmp_path / "i.duckdb")
    assert [(r["line_number"], r["problem_rule"]) for r in rows] == [(1, None), (2, "malformed")]
    assert rows[1]["record"] == "not json"


def test_wrongly_typed_field_is_named(tmp_path):
    src = write_jsonl(tmp_path / "chat.jsonl", [{"messages": "hello"}])
    with pytest.raises(InputError, match=r"chat.jsonl:1: field 'messages': expected a list"):
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")


def test_missing_output_is_ingested_and_marked_for_quarantine(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a"}])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    (row,) = raw_rows(tmp_path / "i.duckdb")
    assert (row["problem_rule"], row["problem"]) == ("missing_field", "missing field 'output'")


def test_unknown_columns_get_an_error_listing_them_and_the_fitting_mappings(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(InputError) as err:
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    assert "['answer', 'question']" in str(err.value) and "instruction: question" in str(err.value)


def test_column_mapping_reads_question_answer_as_alpaca(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "answer": "a."}])
    cfg = DataConfig(sources=[{"path": str(src), "columns": {"instruction": "question", "output": "answer"}}])
    ingest_rows(cfg, tmp_path, tmp_path / "i.duckdb")
    (row,) = raw_rows(tmp_path / "i.duckdb")
    assert [dict(m)["content"] for m in row["messages"]] == ["q?", "a."]


def test_csv_and_parquet_sources_are_read_with_row_numbers(tmp_path):
    with duckdb.connect() as con:
        con.execute(f"COPY (SELECT 'i' || x AS instruction, 'o' || x AS output FROM range(3) t(x)) "
                    f"TO '{tmp_path / 'a.csv'}' (HEADER)")
        con.execute(f"COPY (SELECT 'i' || x AS instruction, 'o' || x AS output FROM range(2) t(x)) "
                    f"TO '{tmp_path / 'b.parquet'}' (FORMAT parquet)")
    counts = ingest_rows(DataConfig(sources=[{"path": str(tmp_path / "a.csv")}, {"path": str(tmp_path / "b.parquet")}]),
                         tmp_path, tmp_path / "i.duckdb")
    assert counts == {"a": 3, "b": 2}
    assert [r["line_number"] for r in raw_rows(tmp_path / "i.duckdb")] == [2, 3, 4, 1, 2]


def test_missing_source_file_is_named(tmp_path):
    with pytest.raises(InputError, match="nope.jsonl: source file not found"):
        ingest_rows(DataConfig(sources=[{"path": str(tmp_path / "nope.jsonl")}]), tmp_path, tmp_path / "i.duckdb")


def ingest_messages(tmp_path, records, **source):
    src = write_jsonl(tmp_path / "data.jsonl", records)
    cfg = DataConfig(sources=[{"path": str(src), **source}], on_bad_rows="quarantine")
    ingest_rows(cfg, tmp_path, tmp_path / "i.duckdb")
    return [(r["system"], [dict(m) for m in r["messages"] or []], r["problem_rule"])
            for r in raw_rows(tmp_path / "i.duckdb")]


def test_sharegpt_conversations_map_roles_and_a_leading_system_turn_moves_to_system(tmp_path):
    rows = ingest_messages(tmp_path, [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "weather?"},
        {"from": "function_call", "value": '{"name": "weather"}'}, {"from": "observation", "value": "sunny"},
        {"from": "gpt", "value": "It is sunny."}, {"from": "human", "value": "thanks"}, {"from": "gpt", "value": "np"},
    ], "tools": '[{"name": "weather"}]'}])
    call = '[{"type": "function", "function": {"name": "weather", "arguments": {}}}]'
    assert rows == [("S", [
        {"role": "user", "content": "weather?"}, {"role": "assistant", "content": "", "tool_calls": call},
        {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "It is sunny."},
        {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "np"}], None)]


def test_sharegpt_top_level_system_is_the_system_prompt(tmp_path):
    rows = ingest_messages(tmp_path, [{"system": "Be brief.", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}])
    assert rows == [("Be brief.", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], None)]


def test_unknown_sharegpt_role_fails_in_one_line_naming_file_line_and_field(tmp_path):
    src = write_jsonl(tmp_path / "sg.jsonl", [
        {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
        {"conversations": [{"from": "human", "value": "a"}, {"from": "xyz", "value": "b"}]},
    ])
    with pytest.raises(InputError) as err:
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    assert str(err.value).startswith(f"{src}:2: field 'conversations': unknown role 'xyz' "
                                     "(expected human, gpt, system, function_call, observation; "
                                     "map others with data.sources[].roles)")
    assert "\n" not in str(err.value)


def test_string_prompt_and_completion_become_a_user_and_an_assistant_turn(tmp_path):
    rows = ingest_messages(tmp_path, [{"prompt": "2+2?", "completion": "4"}])
    assert rows == [(None, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], None)]


def test_conversational_prompt_and_completion_are_concatenated_in_order(tmp_path):
    rows = ingest_messages(tmp_path, [{
        "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
                   {"role": "assistant", "content": "a1"},
                   {"role": "user", "content": [{"type": "text", "text": "u2"}]}],
        "completion": [{"role": "assistant", "content": [{"type": "text", "text": "a2"}]}],
    }])
    assert rows == [("S", [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
                           {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}], None)]


def test_a_string_prompt_with_a_list_completion_is_quarantined_as_malformed(tmp_path):
    rows = ingest_messages(tmp_path, [{"prompt": "p", "completion": [{"role": "assistant", "content": "c"}]}])
    assert rows == [(None, [], "malformed")]


def test_missing_completion_is_ingested_and_marked_for_quarantine(tmp_path):
    rows = ingest_messages(tmp_path, [{"prompt": "p", "completion": None}])
    assert rows == [(None, [{"role": "user", "content": "p"}, {"role": "assistant", "content": None}],
                     "missing_field")]


def test_plain_text_becomes_one_text_turn_for_continued_pretraining(tmp_path):
    rows = ingest_messages(tmp_path, [{"text": "Once upon a time."}])
    assert rows == [(None, [{"role": "text", "content": "Once upon a time."}], None)]


def test_alpaca_history_pairs_come_before_the_current_turn(tmp_path):
    rows = ingest_messages(tmp_path, [{"instruction": "i3", "input": "", "output": "o3",
                                       "history": [["i1", "o1"], ["i2", "o2"]]}])
    assert rows == [(None, [
        {"role": "user", "content": "i1"}, {"role": "assistant", "content": "o1"},
        {"role": "user", "content": "i2"}, {"role": "assistant", "content": "o2"},
        {"role": "user", "content": "i3"}, {"role": "assistant", "content": "o3"}], None)]


@pytest.mark.parametrize("placeholder", ["Not applicable", " N/A ", "none", "<noinput>", "<NOINPUT>"])
def test_alpaca_placeholder_input_counts_as_no_input(tmp_path, placeholder):
    rows = ingest_messages(tmp_path, [{"instruction": "Say hi", "input": placeholder, "output": "hi"}])
    assert rows == [(None, [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}], None)]


def test_format_error_lists_the_columns_of_every_format(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"question": "q"}])
    with pytest.raises(InputError) as err:
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    for hint in ("messages needs columns messages", "sharegpt needs columns conversations",
                 "prompt_completion needs columns prompt, completion", "alpaca needs columns instruction, output",
                 "text needs columns text"):
        assert hint in str(err.value)


def test_explicit_format_is_used_instead_of_detection(tmp_path):
    rows = ingest_messages(tmp_path, [{"text": "t", "instruction": "i", "output": "o"}], format="text")
    assert rows == [(None, [{"role": "text", "content": "t"}], None)]


def test_thinking_traces_and_tools_are_kept_as_their_own_fields(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [
        {"messages": [{"role": "user", "content": "2+2?"},
                      {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"}],
         "tools": [{"name": "calc"}]},
        {"instruction": "3+3?", "output": "6", "reasoning": "double three"},
    ])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    first, second = raw_rows(tmp_path / "i.duckdb")
    assert first["messages"][1] == {"role": "assistant", "content": "4", "reasoning": "add them"}
    assert json.loads(first["tools"]) == [{"type": "function", "function": {"name": "calc"}}]
    assert second["messages"][1] == {"role": "assistant", "content": "6", "reasoning": "double three"}


def test_role_names_can_be_mapped_for_chat_and_sharegpt_records(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [
        {"messages": [{"role": "customer", "content": "hi"}, {"role": "bot", "content": "hello"}]},
        {"conversations": [{"from": "customer", "value": "q"}, {"from": "bot", "value": "a"}]},
    ])
    cfg = DataConfig(sources=[{"path": str(src), "roles": {"customer": "user", "bot": "assistant"}}])
    ingest_rows(cfg, tmp_path, tmp_path / "i.duckdb")
    assert [[m["role"] for m in r["messages"]] for r in raw_rows(tmp_path / "i.duckdb")] == [
        ["user", "assistant"], ["user", "assistant"]]


def test_the_raw_table_has_the_canonical_schema_with_a_content_hash(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"},
                                             {"instruction": "a", "output": "c"}])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    rows = raw_rows(tmp_path / "i.duckdb")
    assert set(rows[0]) == {"row_id", "source", "source_file", "line_number", "pinned_split", "source_weight",
                            "source_cap", "system", "messages", "tools", "problem_rule", "problem", "record",
                            "content_hash"}
    assert rows[0]["content_hash"] == rows[1]["content_hash"] != rows[2]["content_hash"]


def test_json_lines_end_at_newline_only_and_blank_lines_keep_the_numbering(tmp_path):
    """A U+2028 inside a string is part of its record (Python's splitlines would cut it); CRLF and a BOM are fine."""
    src = tmp_path / "a.jsonl"
    lines = [json.dumps({"instruction": "a\u2028b\u0085c", "output": "x"}, ensure_ascii=False), "   ", "",
             json.dumps({"instruction": "q", "output": "y"}), "\t"]
    src.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    rows = raw_rows(tmp_path / "i.duckdb")
    assert [(r["row_id"], r["line_number"], r["messages"][0]["content"]) for r in rows] == [
        (0, 1, "a\u2028b\u0085c"), (1, 4, "q")]


def test_a_line_that_is_not_utf8_fails_with_file_and_line_or_is_quarantined(tmp_path):
    src = tmp_path / "a.jsonl"
    src.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n'
                    b'{"instruction": "c", "output": "d"}\n')
    with pytest.raises(InputError) as err:
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    assert str(err.value).startswith(f"{src}:2: invalid JSON: not valid UTF-8") and "\n" not in str(err.value)
    ingest_rows(DataConfig(sources=[{"path": str(src)}], on_bad_rows="quarantine"), tmp_path, tmp_path / "i.duckdb")
    rows = raw_rows(tmp_path / "i.duckdb")
    assert [(r["row_id"], r["line_number"], r["problem_rule"]) for r in rows] == [
        (0, 1, None), (1, 2, "malformed"), (2, 3, None)]
    assert rows[1]["record"] == '{"instruction": "caf\ufffd", "output": "b"}'


def test_row_ids_run_on_across_files_and_sources_in_order(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a1", "output": "x"}, "",
                                           {"messages": [{"role": "user", "content": "a2"},
                                                         {"role": "assistant", "content": "y"}]}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": "b1", "output": "z"}])
    ingest_rows(DataConfig(sources=[{"path": str(a)}, {"path": str(b)}]), tmp_path, tmp_path / "i.duckdb")
    rows = raw_rows(tmp_path / "i.duckdb")
    assert [(r["row_id"], r["source"], r["line_number"], r["messages"][0]["content"]) for r in rows] == [
        (0, "a", 1, "a1"), (1, "a", 3, "a2"), (2, "b", 1, "b1")]


@pytest.mark.parametrize("content", [b"", b"\n\n  \n", b'{"instruction": "q", "output": "a"}'])
def test_empty_blank_and_unterminated_json_lines_files(tmp_path, content):
    src = tmp_path / "a.jsonl"
    src.write_bytes(content)
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    assert [r["line_number"] for r in raw_rows(tmp_path / "i.duckdb")] == ([1] if b"{" in content else [])


def test_a_lone_surrogate_escape_is_a_malformed_record_not_a_crash(tmp_path):
    """Python's json accepts "\\ud800" but no text can hold it: one line naming the file and line, or quarantine."""
    src = tmp_path / "a.jsonl"
    src.write_text('{"instruction": "ok \\ud83d\\ude00", "output": "x"}\n'
                   '{"messages": [{"role": "user", "content": "q\\udc00"}, {"role": "assistant", "content": "a"}]}\n')
    with pytest.raises(InputError) as err:
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    assert str(err.value).startswith(f"{src}:2: invalid JSON: a \\u escape encodes a lone surrogate")
    assert "(column 45)" in str(err.value)  # where the escape starts
    ingest_rows(DataConfig(sources=[{"path": str(src)}], on_bad_rows="quarantine"), tmp_path, tmp_path / "i.duckdb")
    rows = raw_rows(tmp_path / "i.duckdb")
    assert [(r["line_number"], r["problem_rule"]) for r in rows] == [(1, None), (2, "malformed")]
    assert rows[0]["messages"][0]["content"] == "ok \U0001f600"  # a surrogate pair is one character


def test_a_lone_surrogate_in_a_json_array_file_is_named_by_its_position(tmp_path):
    src = tmp_path / "a.json"
    src.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "\\ud800", "output": "b"}]')
    with pytest.raises(InputError, match=r"a.json:2: invalid JSON: a \\u escape encodes a lone surrogate"):
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")


def test_an_unreadable_parquet_file_is_one_line(tmp_path):
    src = tmp_path / "broken.parquet"
    src.write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"broken.parquet: cannot read as parquet: Invalid Input Error") as err:
        ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    assert "\n" not in str(err.value)
