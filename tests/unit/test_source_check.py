"""A source that loses all its rows, or most of them to one rule, is named in one line with a mapping that fits."""

import json
import logging

import duckdb
import pytest
from prefect.logging import disable_run_logger

from tasks.core.config import CleanConfig, DataConfig
from tasks.core.errors import InputError
from tasks.data.clean import clean, clean_database
from tasks.data.ingest import ingest_rows
from tasks.data.source_check import column_guess, guess_options
from tests.conftest import write_jsonl

SEED_TASKS = [
    {"id": "seed_task_0", "name": "breakfast_suggestion", "instruction": "Is there anything I can eat for breakfast?",
     "instances": [{"input": "", "output": "Yes, oatmeal."}], "is_classification": False},
    {"id": "seed_task_1", "name": "antonym_relation", "instruction": "What is the relation between the pairs?",
     "instances": [{"input": "Night : Day", "output": "Opposites."}, {"input": "Hot : Cold", "output": "Opposites."}],
     "is_classification": False},
]


def ingest(tmp_path, records, name="seed_tasks", **source):
    src = write_jsonl(tmp_path / f"{name}.jsonl", records)
    ingest_rows(DataConfig(sources=[{"path": str(src), **source}]), tmp_path, tmp_path / "i.duckdb")
    return src


def test_a_source_that_lost_every_row_stops_with_one_line_naming_columns_and_the_explode_that_fits(tmp_path):
    src = ingest(tmp_path, SEED_TASKS)
    with pytest.raises(InputError) as err:
        clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig())
    assert str(err.value) == (
        f"source 'seed_tasks' lost all 2 rows to missing_field, e.g. {src}:1: missing field 'output'; columns found: "
        'id="seed_task_0", name="breakfast_suggestion", instruction="Is there anything I can eat for breakf…, '
        'instances=[{"input": "", "output": "Yes, oatmeal.…, is_classification=false; this would fit: '
        "data.sources[].explode: instances (set data.on_bad_rows=quarantine to keep going)")


def test_the_synonym_mapping_that_fits_is_named(tmp_path):
    ingest(tmp_path, [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(3)], name="pr")
    with pytest.raises(InputError, match=r"lost all 3 rows to missing_field, .*: missing field 'completion'; "
                                         r"columns found: prompt=\"p0\", response=\"r0\"; this would fit: "
                                         r"data.sources\[\].columns: \{completion: response\} \(set"):
        clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig())


def test_more_than_max_source_loss_to_one_rule_stops_and_names_the_share_and_the_key(tmp_path):
    rows = [{"instruction": f"q{i}", "output": "" if i < 3 else f"a{i}"} for i in range(5)]
    src = ingest(tmp_path, rows, name="half")
    with pytest.raises(InputError) as err:
        clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig())
    assert str(err.value) == (
        f"source 'half' lost 3 of 5 rows to empty_turn, e.g. {src}:1: empty assistant turn; columns found: "
        'instruction="q0", output="" (raise clean.max_source_loss (now 0.5) or set data.on_bad_rows=quarantine '
        "to keep going)")
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(max_source_loss=0.6))
    assert counts["rows_clean"] == 2 and counts["source_warnings"] == []


def test_with_quarantine_the_run_goes_on_and_the_line_is_a_warning_in_the_log_and_the_report(tmp_path, caplog):
    ingest(tmp_path, SEED_TASKS)
    with disable_run_logger(), caplog.at_level(logging.WARNING, logger="sftflow"):
        clean.fn(tmp_path / "i.duckdb", tmp_path / "c.duckdb", tmp_path / "clean_report.json", tmp_path / "q.parquet",
                 CleanConfig(), on_bad_rows="quarantine")
    (warning,) = json.loads((tmp_path / "clean_report.json").read_text())["source_warnings"]
    assert {k: warning[k] for k in ("source", "rule", "rows", "of", "kept")} == {
        "source": "seed_tasks", "rule": "missing_field", "rows": 2, "of": 2, "kept": 0}
    assert warning["message"].endswith("this would fit: data.sources[].explode: instances")
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        f"clean: {warning['message']}"]


def test_the_users_own_source_cap_is_no_loss(tmp_path):
    ingest(tmp_path, [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(10)], max_rows=2)
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig())
    assert counts["dropped_by_rule"] == {"source_cap": 8} and counts["source_warnings"] == []


def test_the_missing_field_row_keeps_its_record_on_the_fast_path_too(tmp_path):
    ingest(tmp_path, [{"instruction": "only a question"}, {"instruction": "q", "output": "a"}], name="flat")
    with duckdb.connect(str(tmp_path / "i.duckdb"), read_only=True) as con:
        assert con.execute("SELECT problem_rule, record FROM raw ORDER BY row_id").fetchall() == [
            ("missing_field", '{"instruction": "only a question"}'), (None, None)]


@pytest.mark.parametrize("keys, mapping", [
    ({"question", "answer"}, {"instruction": "question", "output": "answer"}),
    ({"prompt", "response"}, {"completion": "response"}),
    ({"query", "target", "id"}, {"instruction": "query", "output": "target"}),
    ({"conversation"}, {"messages": "conversation"}),
    ({"instruction", "output", "extra"}, {}),
    ({"foo", "bar"}, None),
])
def test_column_guess_completes_a_format_from_common_synonyms(keys, mapping):
    assert column_guess(keys) == mapping


def test_guess_options_explodes_a_nested_list_and_maps_its_fields():
    assert guess_options(SEED_TASKS[0]) == {"explode": "instances"}
    assert guess_options({"task": "t", "examples": [{"question": "q", "answer": "a"}]}) == {
        "explode": "examples", "columns": {"instruction": "question", "output": "answer"}}
    assert guess_options({"messages": [{"role": "user", "content": "x"}]}) is None  # complete: not the columns
