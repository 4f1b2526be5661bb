"""data.sources[].explode: one row per element of a nested list of examples (self-instruct seed tasks)."""

import json
from pathlib import Path

import duckdb
import pytest

from tasks.core.config import CleanConfig, DataConfig, SourceConfig
from tasks.core.errors import InputError
from tasks.data.clean import clean_database
from tasks.data.fast_ingest import fast_path_applies
from tasks.data.ingest import ingest_rows
from tests.conftest import write_jsonl

SEED_TASKS = [
    {"id": "seed_task_0", "name": "breakfast", "instruction": "Suggest a breakfast.",
     "instances": [{"input": "", "output": "Oatmeal."}], "is_classification": False},
    {"id": "seed_task_1", "name": "antonyms", "instruction": "Name the relation.",
     "instances": [{"input": "Night : Day", "output": "Opposites."}, {"input": "Big : Large", "output": "Synonyms."}],
     "is_classification": True},
    {"id": "seed_task_2", "name": "nothing", "instruction": "No examples.", "instances": [],
     "is_classification": False},
    {"id": "seed_task_3", "name": "lost", "instruction": "No list at all.", "is_classification": False},
]


def ingest(tmp_path, records, on_bad_rows="fail", **source):
    src = write_jsonl(tmp_path / "seed_tasks.jsonl", records)
    cfg = DataConfig(sources=[{"path": str(src), "explode": "instances", **source}], on_bad_rows=on_bad_rows)
    counts = ingest_rows(cfg, tmp_path, tmp_path / "i.duckdb")
    with duckdb.connect(str(tmp_path / "i.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT row_id, line_number, [m.content FOR m IN coalesce(messages, [])], problem_rule, "
                           "problem, record FROM raw ORDER BY row_id").fetchall()
    return counts, rows


def test_each_instance_becomes_a_row_with_the_parents_instruction_and_line(tmp_path):
    counts, rows = ingest(tmp_path, SEED_TASKS)
    assert counts == {"seed_tasks": 5}
    assert [r[:5] for r in rows] == [
        (0, 1, ["Suggest a breakfast.", "Oatmeal."], None, None),
        (1, 2, ["Name the relation.\n\nNight : Day", "Opposites."], None, None),
        (2, 2, ["Name the relation.\n\nBig : Large", "Synonyms."], None, None),
        (3, 3, [], "missing_field", "field 'instances' to explode is an empty list"),
        (4, 4, [], "missing_field", "field 'instances' to explode is missing"),
    ]


def test_an_empty_or_missing_list_is_quarantined_as_missing_field_with_its_record(tmp_path):
    _, rows = ingest(tmp_path, SEED_TASKS)
    assert [(line, rule, record and json.loads(record)["id"]) for _, line, _, rule, _, record in rows] == [
        (1, None, None), (2, None, None), (2, None, None), (3, "missing_field", "seed_task_2"),
        (4, "missing_field", "seed_task_3")]
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.3))
    assert counts["rows_raw"] == counts["rows_clean"] + counts["rows_quarantined"] == 5
    assert counts["dropped_by_rule"] == {"missing_field": 2}


def test_an_element_field_wins_over_the_parents_and_columns_apply_after_exploding(tmp_path):
    records = [{"question": "parent", "name": "n", "instances": [{"question": "child", "answer": "a"}]}]
    _, rows = ingest(tmp_path, records, columns={"instruction": "question", "output": "answer"})
    assert [r[2] for r in rows] == [["child", "a"]]


def test_a_list_field_that_is_not_a_list_of_objects_is_malformed(tmp_path):
    records = [{"instruction": "i", "instances": "not a list"}]
    with pytest.raises(InputError) as err:
        ingest(tmp_path, records)
    assert str(err.value) == (f"{tmp_path / 'seed_tasks.jsonl'}:1: field 'instances': expected a list of objects to "
                              "explode (set data.on_bad_rows=quarantine to keep going)")
    _, rows = ingest(tmp_path, records, on_bad_rows="quarantine")
    assert [(r[3], json.loads(r[5])) for r in rows] == [("malformed", records[0])]


def test_exploded_sources_never_take_the_flat_alpaca_fast_path():
    assert fast_path_applies(SourceConfig(path="a.jsonl"), Path("a.jsonl"))
    assert not fast_path_applies(SourceConfig(path="a.jsonl", explode="instances"), Path("a.jsonl"))
