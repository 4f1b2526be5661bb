"""The DuckDB fast path for flat Alpaca lines must read every record exactly as the general mapper does."""

import json

import duckdb

from tasks.core.config import DataConfig, SourceConfig
from tasks.data.ingest import ingest_rows, iter_records, read_records
from tests.conftest import write_jsonl

EDGE_CASES = [
    {"instruction": "Add", "input": "2 and 3", "output": "5"},
    {"instruction": "Say hi", "input": "  N/A \n", "output": "hi"},             # placeholder input
    {"instruction": "Say hi", "input": "", "output": "hi", "system": "Be brief."},
    {"instruction": "q", "output": None},                                        # missing output
    {"instruction": None, "output": "a"},                                        # missing instruction
    {"instruction": "q", "input": None, "output": "  a\n\n"},                    # null input
    {"instruction": "q", "output": "<think>hmm</think>a"},                       # thinking trace: general mapper
    {"instruction": "q", "output": "a", "history": [["h1", "r1"]]},              # history: general mapper
    {"instruction": "q", "output": 5},                                           # wrong type: general mapper
    {"messages": [{"role": "user", "content": "m"}, {"role": "assistant", "content": "n"}]},
    "not json at all",
    {"instruction": "Ünïcödé ✓", "input": "Café", "output": "ok\ttab"},
    '{"instruction": "first", "instruction": "second", "output": "o"}',              # repeated key: the last wins
    '[{"instruction": "in an array", "output": "o"}]',                              # not an object
    '  {"instruction": "indented", "output": "o"}  ',
]


def canonical(rows):
    """Rows as compared; a kept record (a missing_field row's) is compared as JSON: the fast path keeps the line."""
    return [(r["line_number"], r["system"], [dict(m) for m in r["messages"]] if r["messages"] else r["messages"],
             r["problem_rule"], r["problem"],
             json.loads(r["record"]) if r["problem_rule"] == "missing_field" else r["record"]) for r in rows]


def test_fast_and_general_paths_give_identical_rows(tmp_path):
    src = write_jsonl(tmp_path / "mixed.jsonl", EDGE_CASES)
    source = SourceConfig(path=str(src))
    expected = list(read_records(str(src), iter_records(src), source, "quarantine"))
    ingest_rows(DataConfig(sources=[source], on_bad_rows="quarantine"), tmp_path, tmp_path / "i.duckdb")
    with duckdb.connect(str(tmp_path / "i.duckdb"), read_only=True) as con:
        cur = con.execute("SELECT * FROM raw ORDER BY row_id")
        names = [d[0] for d in cur.description]
        got = [dict(zip(names, r)) for r in cur.fetchall()]
        stored_order = [r[0] for r in con.execute("SELECT row_id FROM raw").fetchall()]
    assert canonical(got) == canonical(expected)
    assert [r["row_id"] for r in got] == list(range(len(EDGE_CASES)))
    assert stored_order == sorted(stored_order)  # the rows of both paths are stored in file order


def test_column_mappings_apply_on_the_fast_path(tmp_path):
    src = write_jsonl(tmp_path / "q.jsonl", [{"question": "q?", "answer": "a.", "extra_col": 1},
                                            {"question": "q2?", "answer": "b."}])
    cfg = DataConfig(sources=[{"path": str(src), "columns": {"instruction": "question", "output": "answer"}}])
    ingest_rows(cfg, tmp_path, tmp_path / "i.duckdb")
    with duckdb.connect(str(tmp_path / "i.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT messages[1].content, messages[2].content FROM raw ORDER BY row_id").fetchall()
    assert rows == [("q?", "a."), ("q2?", "b.")]


def test_fast_and_general_paths_give_identical_content_hashes(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "mixed.jsonl", EDGE_CASES)
    cfg = DataConfig(sources=[SourceConfig(path=str(src))], on_bad_rows="quarantine")
    hashes = "SELECT row_id, content_hash, messages FROM raw ORDER BY row_id"
    ingest_rows(cfg, tmp_path, tmp_path / "fast.duckdb")
    monkeypatch.setattr("tasks.data.ingest.fast_path_applies", lambda source, path: False)
    ingest_rows(cfg, tmp_path, tmp_path / "general.duckdb")
    with duckdb.connect(str(tmp_path / "fast.duckdb"), read_only=True) as fast, \
            duckdb.connect(str(tmp_path / "general.duckdb"), read_only=True) as general:
        assert fast.execute(hashes).fetchall() == general.execute(hashes).fetchall()
        assert fast.execute("SELECT count(*) FROM raw WHERE content_hash IS NOT NULL").fetchall() == [(12,)]
