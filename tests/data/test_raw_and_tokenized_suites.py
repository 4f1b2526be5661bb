"""The raw-rows and tokenized-rows GX suites: pass on good data, each expectation seen failing, Data Docs built."""

import tempfile

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.config import ChatConfig, CleanConfig, DataConfig, ValidateConfig
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tasks.data.validate import validate_table
from tasks.formatting.chat_format import format_rows
from tests.conftest import write_jsonl

CFG = ValidateConfig(min_rows=10)
ROWS = [{"instruction": f"question number {i}", "output": f"answer number {i}"} for i in range(30)]


def failed(stage, data, suite, cfg=CFG):
    return sorted((r["expectation"], r["kwargs"].get("column", "")) for r in validate_table(stage, data, suite, cfg)[0]
                  if not r["success"])


@pytest.fixture
def raw_db(tmp_path):
    ingest_rows(DataConfig(sources=[{"path": str(write_jsonl(tmp_path / "r.jsonl", ROWS))}]), tmp_path,
                tmp_path / "i.duckdb")
    return tmp_path / "i.duckdb"


@pytest.fixture
def formatted(raw_db, tiny_model_dir, tmp_path):
    clean_database(raw_db, tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.2))
    format_rows(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", ChatConfig(max_length=64))
    return tmp_path / "fmt"


def test_raw_suite_passes_ingested_rows_and_fails_on_a_schema_change_or_anonymous_rows(raw_db):
    assert failed("raw", raw_db, CFG.raw_suite) == []
    with duckdb.connect(str(raw_db)) as con:
        con.execute("UPDATE raw SET source_file = NULL WHERE row_id = 0")
        con.execute("ALTER TABLE raw ADD COLUMN surprise INT")
    assert failed("raw", raw_db, CFG.raw_suite) == [("expect_column_values_to_not_be_null", "source_file"),
                                                    ("expect_table_columns_to_match_set", "")]


def test_raw_suite_knows_every_rule_ingest_marks_and_fails_on_an_unknown_one(tmp_path):
    records = [{"prompt": "p", "completion": "c", "label": False}, {"prompt": "p", "completion": None},
               {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"}]}]}, "not json"]
    ingest_rows(DataConfig(sources=[{"path": str(write_jsonl(tmp_path / "r.jsonl", records))}],
                           on_bad_rows="quarantine"), tmp_path, tmp_path / "i.duckdb")
    with duckdb.connect(str(tmp_path / "i.duckdb")) as con:
        assert con.execute("SELECT problem_rule FROM raw ORDER BY row_id").fetchall() == [
            ("undesirable",), ("missing_field",), ("unsupported_part",), ("malformed",)]
    assert failed("raw", tmp_path / "i.duckdb", CFG.raw_suite) == []
    with duckdb.connect(str(tmp_path / "i.duckdb")) as con:
        con.execute("UPDATE raw SET problem_rule = 'surprise' WHERE row_id = 0")
    assert failed("raw", tmp_path / "i.duckdb", CFG.raw_suite) == [("expect_column_values_to_be_in_set",
                                                                    "problem_rule")]


def rewrite(fmt, **changes):
    """Apply column changes to the first training row of formatted Parquet, in place."""
    rows = pq.read_table(fmt / "train.parquet").to_pylist()
    for key, value in changes.items():
        for row in rows[: value[1]]:
            row[key] = value[0]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(fmt / "train.parquet")), fmt / "train.parquet")


@pytest.mark.parametrize("changes, expected", [
    ({"n_supervised": (0, 1)}, [("expect_column_values_to_be_between", "n_supervised")]),
    ({"last_eot_supervised": (False, 1)}, [("expect_column_values_to_be_in_set", "eot_supervised_or_truncated")]),
    ({"truncated": (True, 10)}, [("expect_column_mean_to_be_between", "truncated")]),
    ({"n_supervised": (1, 999), "n_tokens": (900, 999)},
     [("expect_column_mean_to_be_between", "supervised_share")]),
    ({"n_tokens": (2, 1)}, [("expect_column_values_to_be_between", "n_tokens")]),
    ({"n_tokens": (5, 999), "n_supervised": (3, 999)}, [("expect_column_median_to_be_between", "n_tokens")]),
], ids=["no-labels", "eot-unsupervised", "truncation-rate", "supervised-share", "too-short", "median-length"])
def test_tokenized_suite_fails_on_rows_built_to_break_each_expectation(formatted, changes, expected):
    assert failed("tokenized", formatted, CFG.tokenized_suite) == []
    rewrite(formatted, **changes)
    assert failed("tokenized", formatted, CFG.tokenized_suite) == expected


def test_each_run_gets_data_docs_in_its_own_directory(raw_db, tmp_path):
    _, url = validate_table("raw", raw_db, CFG.raw_suite, CFG, docs_root=tmp_path / "run")
    index = tmp_path / "run" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
    assert url == index.as_uri() and "raw_rows" in index.read_text()


def test_a_suite_run_without_a_docs_folder_writes_nothing_outside_it(raw_db, tmp_path, monkeypatch):
    """GX's ephemeral context would build Data Docs in a fresh temporary folder on every run and never remove it."""
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    results, url = validate_table("raw", raw_db, CFG.raw_suite, CFG)
    assert url is None and results and all(r["success"] for r in results)
    assert list((tmp_path / "tmp").iterdir()) == []


def test_every_suite_gets_its_data_docs_validation_page(raw_db, formatted, tmp_path, caplog):
    """GX reads string notes that contain "format" as a dict and drops the page: notes are markdown dicts."""
    clean_db = tmp_path / "c.duckdb"
    for stage, data, suite in (("raw", raw_db, CFG.raw_suite), ("clean", clean_db, CFG.clean_suite),
                               ("tokenized", formatted, CFG.tokenized_suite)):
        validate_table(stage, data, suite, CFG, docs_root=tmp_path / "run")
    assert not [r for r in caplog.records if "data docs rendering" in r.getMessage()]
    pages = tmp_path / "run" / "gx" / "uncommitted" / "data_docs" / "local_site" / "validations"
    assert sorted(page.name for page in pages.rglob("*.html")) == [
        "sftflow-clean_rows.html", "sftflow-raw_rows.html", "sftflow-tokenized_rows.html"]
