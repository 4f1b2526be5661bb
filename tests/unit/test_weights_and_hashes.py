"""Source weights below 1 keep that share of a source's training rows; the content hash covers everything a row
trains on (reasoning, loss weights, tool calls, tools) and is unchanged for rows that have none of them."""

import json

import duckdb
import pytest

from tasks.core.config import CleanConfig, DataConfig
from tasks.data.clean import clean_database, export_report
from tasks.data.ingest import ingest_rows
from tests.conftest import write_jsonl


def query(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def weighed(tmp_path, weight, n=400):
    """Clean one weighed source of n rows and a plain one of 50; return the accounting and the clean database."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(n)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"other {i}", "output": f"reply {i}"} for i in range(50)])
    ingest_rows(DataConfig(sources=[{"path": str(a), "weight": weight}, {"path": str(b)}]), tmp_path,
                tmp_path / "i.duckdb")
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.2))
    return counts, tmp_path / "c.duckdb"


@pytest.mark.parametrize("weight", [0.5, 0.25])
def test_a_weight_below_1_keeps_that_share_of_the_training_rows_and_every_heldout_row(tmp_path, weight):
    counts, db = weighed(tmp_path, weight)  # with on_bad_rows=fail: losing 75% to source_weight is no loss
    assert counts["rows_raw"] == counts["rows_clean"] + counts["rows_quarantined"] == 450
    assert set(counts["dropped_by_rule"]) == {"source_weight"} and counts["source_warnings"] == []
    (heldout,) = query(db, "SELECT count(*) FROM clean WHERE source = 'a' AND split = 'heldout'")[0]
    (train,) = query(db, "SELECT count(*) FROM clean WHERE source = 'a' AND split = 'train'")[0]
    dropped = counts["dropped_by_rule"]["source_weight"]
    assert 50 < heldout < 110 and train + dropped + heldout == 400  # held-out rows are never dropped
    assert abs(train / (train + dropped) - weight) < 0.08
    # exactly the rows the hash rule (the one format uses for the fraction of a weight above 1) chooses
    assert query(db, "SELECT count(*) FROM clean WHERE split = 'train' AND source_weight < 1 AND "
                     "md5_number(content_hash) % 1000000 >= source_weight * 1000000") == [(0,)]
    assert query(db, "SELECT count(*) FROM clean WHERE source = 'b'") == [(50,)]
    assert query(db, "SELECT DISTINCT source, detail FROM quarantine") == [
        ("a", f"not in the {weight} share of data.sources[].weight")]
    assert counts["rows_quarantined"] == dropped


def test_the_kept_rows_of_a_smaller_weight_are_among_those_of_a_larger_one(tmp_path):
    (tmp_path / "half").mkdir()
    (tmp_path / "quarter").mkdir()
    _, half = weighed(tmp_path / "half", 0.5)
    _, quarter = weighed(tmp_path / "quarter", 0.25)
    kept = "SELECT row_id FROM clean WHERE source = 'a' AND split = 'train'"
    assert {r for (r,) in query(quarter, kept)} < {r for (r,) in query(half, kept)}  # one hash rule for all weights


def test_a_weight_above_1_keeps_every_row_in_clean(tmp_path):
    counts, db = weighed(tmp_path, 1.5)
    assert counts["rows_clean"] == 450 and counts["dropped_by_rule"] == {}
    assert query(db, "SELECT DISTINCT source_weight FROM clean WHERE source = 'a'") == [(1.5,)]


def test_the_cleaning_report_counts_source_weight_like_every_rule(tmp_path):
    counts, db = weighed(tmp_path, 0.5)
    export_report(db, tmp_path / "report.json", tmp_path / "q.parquet")
    report = json.loads((tmp_path / "report.json").read_text())
    assert [(r["rule"], r["rows"]) for r in report["rules"]] == [
        ("source_weight", counts["dropped_by_rule"]["source_weight"])]
    assert report["examples"]["source_weight"][0]["detail"] == "not in the 0.5 share of data.sources[].weight"


CHAT = [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"}, {"role": "assistant", "content": "Rome."}]


def variant(turn, **fields):
    return {"messages": [dict(m, **fields) if i == turn else m for i, m in enumerate(CHAT)]}


def test_rows_differing_only_in_reasoning_weights_tool_calls_or_tools_are_not_duplicates(tmp_path):
    rows = [{"messages": CHAT}, variant(1, reasoning_content="France's capital is Paris."), variant(1, loss_weight=0),
            variant(1, tool_calls=[{"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}]),
            {"messages": CHAT, "tools": [{"type": "function", "function": {"name": "lookup"}}]},
            {"messages": CHAT},                  # a true copy
            variant(1, loss_weight=1)]           # weight 1 is the default: the same row
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(drop_near_duplicates=False))
    assert counts["dropped_by_rule"] == {"duplicate": 2}
    assert query(tmp_path / "c.duckdb", "SELECT line_number, detail FROM quarantine ORDER BY row_id") == [
        (6, "same normalised content as row 0"), (7, "same normalised content as row 0")]


OLD_HASH = ("md5(coalesce(system, '') || chr(1) || array_to_string("
            "list_transform(messages, lambda t: t.role || chr(2) || coalesce(t.content, '')), chr(3)))")


def test_rows_without_reasoning_weights_or_tools_keep_the_hash_and_so_the_split_they_always_had(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "q", "output": "a", "system": "S"}, {"messages": CHAT},
                                             {"messages": CHAT, "tools": []}, variant(1, loss_weight=1)])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    assert query(tmp_path / "i.duckdb", f"SELECT count(*) FROM raw WHERE content_hash = {OLD_HASH}") == [(4,)]
