"""The clean-rows GX suite passes good data and each expectation fails on data built to break it."""

import json

import duckdb
import pytest
from prefect.logging import disable_run_logger

from tasks.core.config import CleanConfig, DataConfig, ValidateConfig
from tasks.core.errors import DataValidationError
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tasks.data.validate import validate, validate_table
from tests.conftest import shared_data, write_jsonl

GOOD = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(30)]


def clean_db_from(tmp_path, rows):
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig())
    return tmp_path / "c.duckdb"


CHECK_CONFIG = ValidateConfig(min_rows=30)


def check(db, cfg=CHECK_CONFIG):
    return validate_table("clean", db, cfg.clean_suite, cfg)[0]


def failed(results):
    return sorted((r["expectation"], r["kwargs"].get("column", "")) for r in results if not r["success"])


def test_the_suite_passes_clean_rows(tmp_path):
    assert failed(check(clean_db_from(tmp_path, GOOD))) == []


# Each case corrupts the clean table the way a bug upstream could, and names the expectation that must catch it.
BREAKERS = {
    "content_hash null": ("UPDATE clean SET content_hash = NULL WHERE row_id = 0",
                          ("expect_column_values_to_not_be_null", "content_hash")),
    "duplicate": ("UPDATE clean SET content_hash = (SELECT content_hash FROM clean WHERE row_id = 1) WHERE row_id = 0",
                  ("expect_column_values_to_be_unique", "content_hash")),
    "bad split": ("UPDATE clean SET split = 'test' WHERE row_id = 0",
                  ("expect_column_values_to_be_in_set", "split")),
    "no turns": ("UPDATE clean SET messages = [] WHERE row_id = 0",
                 ("expect_column_values_to_be_between", "n_turns"), ("expect_column_values_to_match_regex", "roles")),
    "empty turn": ("UPDATE clean SET messages = [messages[1], {'role': 'assistant', 'content': ''}] WHERE row_id = 0",
                   ("expect_column_values_to_be_between", "min_turn_chars")),
    "huge": ("UPDATE clean SET n_chars = 200000 WHERE row_id = 0", ("expect_column_values_to_be_between", "n_chars")),
    "ends on user": ("UPDATE clean SET messages = [messages[2], messages[1]] WHERE row_id = 0",
                     ("expect_column_values_to_be_in_set", "last_role"),
                     ("expect_column_values_to_match_regex", "roles")),
    "odd role": ("UPDATE clean SET messages = [{'role': 'narrator', 'content': 'x'}, messages[2]] WHERE row_id = 0",
                 ("expect_column_values_to_match_regex", "roles")),
    "role order": ("UPDATE clean SET messages = [messages[1], messages[1], messages[2]] WHERE row_id = 0",
                   ("expect_column_values_to_match_regex", "roles")),
    "text among chat turns": ("UPDATE clean SET messages = [messages[1], {'role': 'text', 'content': 'x'}] "
                              + "WHERE row_id = 0", ("expect_column_values_to_match_regex", "roles")),
    "too few rows": ("DELETE FROM clean WHERE row_id > 5", ("expect_table_row_count_to_be_between", "")),
}


@pytest.mark.parametrize("case", BREAKERS, ids=list(BREAKERS))
def test_each_expectation_fails_on_data_built_to_break_it(tmp_path, case):
    sql, *expected = BREAKERS[case]
    db = clean_db_from(tmp_path, GOOD)
    with duckdb.connect(str(db)) as con:
        con.execute(sql)
    assert failed(check(db)) == sorted(expected)


def test_a_failed_suite_stops_with_a_readable_summary_and_keeps_the_details(tmp_path):
    db = clean_db_from(tmp_path, GOOD)
    with duckdb.connect(str(db)) as con:
        con.execute(BREAKERS["bad split"][0])
    with disable_run_logger(), pytest.raises(DataValidationError) as err:
        validate.fn("clean", db, ValidateConfig().clean_suite, tmp_path / "v.json", tmp_path,
                    ValidateConfig(min_rows=30))
    assert ("expect_column_values_to_be_in_set(split): expected split in ['train', 'heldout'], observed 1 of 30 rows "
            "outside that set, e.g. ['test'] (likely cause: a clean bug (rows are split into train and heldout))") \
        in str(err.value)
    assert (tmp_path / "v.json").is_file()


def test_gsm8k_goes_through_ingest_clean_and_validate_via_a_column_mapping(tmp_path):
    source = {"path": str(shared_data("gsm8k_train.jsonl")), "columns": {"instruction": "question",
                                                                           "output": "answer"}}
    counts = ingest_rows(DataConfig(sources=[source]), tmp_path, tmp_path / "i.duckdb")
    assert counts == {"gsm8k_train": 7473}
    accounting = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig())
    assert accounting["rows_raw"] == accounting["rows_clean"] + accounting["rows_quarantined"] == 7473
    assert accounting["rows_clean"] > 7400 and 600 < accounting["split"]["heldout"] < 900
    assert failed(check(tmp_path / "c.duckdb", ValidateConfig(min_rows=1000))) == []
    with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
        (answer,) = con.execute("SELECT messages[2].content FROM clean WHERE line_number = 1").fetchall()[0]
    assert answer.endswith("#### 72") and "\n" in answer  # the answer's line structure survives cleaning


def test_plain_text_rows_are_one_text_turn_and_pass_the_suite(tmp_path):
    rows = [{"text": f"Document number {i}: some prose."} for i in range(30)]
    db = clean_db_from(tmp_path, rows)
    assert failed(check(db)) == []
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT DISTINCT len(messages), messages[1].role FROM clean").fetchall() == [(1, "text")]


def test_tool_calling_rows_whose_call_turns_have_no_text_pass_the_suite(tmp_path):
    rows = [{"messages": [
        {"role": "user", "content": f"Weather in city {i}?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": f"call_{i}", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": f"city {i}"})}}]},
        {"role": "tool", "tool_call_id": f"call_{i}", "content": f"{i} degrees"},
        {"role": "assistant", "content": f"It is {i} degrees in city {i}."}]} for i in range(30)]
    db = clean_db_from(tmp_path, rows)
    assert failed(check(db)) == []
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT DISTINCT messages[2].content FROM clean").fetchall() == [("",)]


def test_the_alpaca_demo_set_is_auto_detected_and_passes_ingest_clean_and_validate(tmp_path):
    counts = ingest_rows(DataConfig(sources=[{"path": str(shared_data("alpaca_en_demo.json"))}]), tmp_path,
                         tmp_path / "i.duckdb")
    assert counts == {"alpaca_en_demo": 999}
    accounting = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig())
    assert accounting["rows_raw"] == accounting["rows_clean"] + accounting["rows_quarantined"] == 999
    assert accounting["rows_clean"] > 950 and set(accounting["dropped_by_rule"]) <= {"duplicate", "near_duplicate"}
    assert failed(check(tmp_path / "c.duckdb", ValidateConfig(min_rows=500))) == []
    with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
        (prompt, answer), = con.execute("SELECT messages[1].content, messages[2].content FROM clean "
                                        "WHERE line_number = 6").fetchall()
    # the input is appended to the instruction (prompt whitespace collapsed); the answer keeps its layout
    assert prompt == "Given the parameters of a triangle, find out its perimeter. Side 1 = 4 Side 2 = 6 Side 3 = 8"
    assert "Perimeter = Side 1 + Side 2 + Side 3\n          = 4 + 6 + 8" in answer
