"""Every Great Expectations failure reads for a person: what was expected, what was observed, the likely cause."""

import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.logging import disable_run_logger

from tasks.core.config import ChatConfig, CleanConfig, DataConfig, ValidateConfig
from tasks.core.errors import DataValidationError
from tasks.data.clean import clean, clean_database
from tasks.data.gx_messages import explain_failure, likely_cause
from tasks.data.ingest import ingest_rows
from tasks.data.validate import config_expectations, summarise_failures, validate, validate_table
from tasks.formatting.chat_format import format_rows
from tests.conftest import ROOT, write_jsonl

CFG = ValidateConfig(min_rows=10)
SEED_TASK = {"id": "seed_task_0", "name": "breakfast", "instruction": "Suggest a breakfast.",
             "instances": [{"input": "", "output": "Oatmeal."}], "is_classification": False}


def test_no_clean_rows_says_every_row_was_quarantined_with_the_report_and_its_counts(tmp_path):
    src = write_jsonl(tmp_path / "seed_tasks.jsonl", [{**SEED_TASK, "id": f"seed_task_{i}"} for i in range(3)])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    with disable_run_logger():
        db = clean.fn(tmp_path / "i.duckdb", tmp_path / "clean.duckdb", tmp_path / "clean_report.json",
                      tmp_path / "q.parquet", CleanConfig(), on_bad_rows="quarantine")
        with pytest.raises(DataValidationError) as err:
            validate.fn("clean", db, CFG.clean_suite, tmp_path / "v.json", tmp_path, CFG)
    assert (f"failed: expect_table_row_count_to_be_between(table): expected at least 10 rows, observed 0 rows "
            f"(likely cause: every row was quarantined: see {tmp_path / 'clean_report.json'} (missing_field: 3)) "
            f"(details: {tmp_path / 'v.json'})") in str(err.value)


def test_a_raw_schema_change_names_the_extra_column_and_the_suite_to_update(tmp_path):
    src = write_jsonl(tmp_path / "r.jsonl", [{"instruction": "q", "output": "a"}])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    with duckdb.connect(str(tmp_path / "i.duckdb")) as con:
        con.execute("ALTER TABLE raw ADD COLUMN surprise INT")
    results, _ = validate_table("raw", tmp_path / "i.duckdb", CFG.raw_suite, CFG)
    assert summarise_failures(results, "raw", tmp_path / "i.duckdb").startswith(
        "expect_table_columns_to_match_set(table): expected exactly the columns ['content_hash', 'line_number', "
        "'n_turns', 'pinned_split', 'problem', 'problem_rule', 'row_id', 'source', 'source_cap', 'source_file', "
        "'source_weight', 'system', 'tools'], observed extra ['surprise'], missing [] (likely cause: the raw table's "
        "schema (tasks/data/ingest.py RAW_SCHEMA) and expectations/raw_rows.json disagree: update the suite)")


def test_too_much_truncation_names_the_rate_its_bound_and_the_keys_to_change(tiny_model_dir, tmp_path):
    rows = [{"instruction": f"question number {i}", "output": f"answer number {i}"} for i in range(30)]
    ingest_rows(DataConfig(sources=[{"path": str(write_jsonl(tmp_path / "r.jsonl", rows))}]), tmp_path,
                tmp_path / "i.duckdb")
    clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.2))
    format_rows(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", ChatConfig(max_length=64))
    table = pq.read_table(tmp_path / "fmt" / "train.parquet").to_pylist()
    for row in table[:5]:
        row["truncated"] = True
    pq.write_table(pa.Table.from_pylist(table, schema=pq.read_schema(tmp_path / "fmt" / "train.parquet")),
                   tmp_path / "fmt" / "train.parquet")
    results, _ = validate_table("tokenized", tmp_path / "fmt", CFG.tokenized_suite, CFG)
    rate = 5 / len(table)
    assert summarise_failures(results, "tokenized", tmp_path / "fmt") == (
        f"expect_column_mean_to_be_between(truncated): expected mean truncated at most 0.05, observed mean {rate:.3g} "
        "(likely cause: conversations longer than chat.max_length are cut: raise chat.max_length, lower "
        "clean.max_chars, or raise validate.max_truncation_rate)")


def suite_expectations():
    for suite in sorted((ROOT / "expectations").glob("*.json")):
        stage = suite.stem.removesuffix("_rows")
        for e in json.loads(suite.read_text())["expectations"] + config_expectations(stage, CFG):
            yield pytest.param(stage, e, id=f"{stage}-{e['type']}-{e['kwargs'].get('column', 'table')}")


@pytest.mark.parametrize("stage, expectation", suite_expectations())
def test_every_expectation_of_every_suite_has_words_and_a_likely_cause(stage, expectation):
    failed = {"expectation": expectation["type"], "kwargs": expectation["kwargs"], "success": False,
              "unexpected_count": 1 if "_values_" in expectation["type"] else None, "element_count": 3,
              "observed_value": 0, "examples": ["x"]}
    text = explain_failure(stage, failed)
    assert "expected " in text and "observed " in text and "{" not in text.split("(likely cause")[0]
    assert likely_cause(stage, failed, None) != "see the suite's Data Docs page for the failing rows"
