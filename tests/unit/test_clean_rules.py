"""Issue-3 cleaning rules: control characters, PII, near duplicates, pinned splits, stability, completeness."""

import duckdb

from tasks.core.config import CleanConfig, DataConfig
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tests.conftest import write_jsonl

BASE = "the quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat near the door"


def clean_sources(tmp_path, sources, **cfg):
    ingest_rows(DataConfig(sources=sources), tmp_path, tmp_path / "i.duckdb")
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(**cfg))
    return counts, tmp_path / "c.duckdb"


def query(db, sql):
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute(sql).fetchall()


def test_control_characters_are_stripped_and_counted_but_newlines_and_tabs_stay(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a\x00b\x07c", "output": "x\x1b[0m\n\ty"}])
    counts, db = clean_sources(tmp_path, [{"path": str(src)}])
    assert query(db, "SELECT messages[1].content, messages[2].content FROM clean") == [("abc", "x[0m\n\ty")]
    assert counts["edited_by_rule"]["control_chars_stripped"] == 1


def test_pii_redaction_is_optional(tmp_path):
    row = {"instruction": "Mail ann.lee@example.co.uk or call +1 (555) 010-9999", "output": "ok"}
    src = write_jsonl(tmp_path / "a.jsonl", [row])
    _, db = clean_sources(tmp_path, [{"path": str(src)}])
    assert query(db, "SELECT messages[1].content FROM clean") == [(row["instruction"],)]
    counts, db = clean_sources(tmp_path, [{"path": str(src)}], redact_pii=True)
    assert query(db, "SELECT messages[1].content FROM clean") == [("Mail [EMAIL] or call [PHONE]",)]
    assert counts["edited_by_rule"]["pii_redacted"] == 1


def test_near_duplicates_are_quarantined_with_the_row_they_repeat(tmp_path):
    rows = [{"instruction": BASE, "output": "answer"},
            {"instruction": BASE.replace("door", "window"), "output": "answer"},  # one word changed at the end
            {"instruction": "something else entirely about spreadsheets and tax forms", "output": "answer"}]
    counts, db = clean_sources(tmp_path, [{"path": str(write_jsonl(tmp_path / "a.jsonl", rows))}])
    assert counts["dropped_by_rule"] == {"near_duplicate": 1}
    assert query(db, "SELECT line_number, rule, detail FROM quarantine") == [(2, "near_duplicate",
                                                                               "near duplicate of row 0")]


def test_kept_near_duplicates_always_share_a_split_side(tmp_path):
    rows = []
    for i in range(60):
        text = f"{BASE} variant number {i} of the story about item {i * 7}"
        rows += [{"instruction": text, "output": "a"}, {"instruction": text + " again", "output": "a"}]
    counts, db = clean_sources(tmp_path, [{"path": str(write_jsonl(tmp_path / "a.jsonl", rows))}],
                               drop_near_duplicates=False, heldout_fraction=0.5, near_dup_threshold=0.7)
    assert counts["rows_clean"] == 120 and counts["split"]["heldout"] > 0
    pairs = query(db, "SELECT (line_number - 1) // 2 AS pair, count(DISTINCT split) FROM clean GROUP BY pair")
    assert len(pairs) == 60 and all(sides == 1 for _, sides in pairs)


def test_a_fixed_heldout_file_is_pinned_and_its_copies_leave_the_training_side(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(20)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"instruction": "q3", "output": "a3"},
                                                 {"instruction": "fresh", "output": "new"}])
    _, db = clean_sources(tmp_path, [{"path": str(train)}, {"path": str(test), "split": "heldout"}])
    assert query(db, "SELECT source, split, count(*) FROM clean WHERE source = 'test' GROUP BY ALL") == [
        ("test", "heldout", 2)]
    assert query(db, "SELECT source, line_number, rule FROM quarantine") == [("train", 4, "duplicate")]


def test_old_rows_keep_their_side_when_data_is_appended(tmp_path):
    first = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(300)]
    (tmp_path / "a").mkdir()
    _, db = clean_sources(tmp_path / "a", [{"path": str(write_jsonl(tmp_path / "a.jsonl", first))}],
                          heldout_fraction=0.2)
    before = dict(query(db, "SELECT content_hash, split FROM clean"))
    more = first + [{"instruction": f"new question {i}", "output": f"new answer {i}"} for i in range(300)]
    (tmp_path / "b").mkdir()
    _, db = clean_sources(tmp_path / "b", [{"path": str(write_jsonl(tmp_path / "b.jsonl", more))}],
                          heldout_fraction=0.2)
    after = dict(query(db, "SELECT content_hash, split FROM clean"))
    assert len(after) == 600 and all(after[h] == side for h, side in before.items())


def test_every_raw_row_is_either_clean_or_quarantined_exactly_once(tmp_path):
    rows = [{"instruction": BASE, "output": "x"}, {"instruction": BASE, "output": "x"}, {"instruction": "a"},
            {"instruction": "b", "output": ""}, {"messages": [{"role": "user", "content": "only"}]},
            {"instruction": BASE + " plus", "output": "x"}, {"instruction": "z" * 5000, "output": "y"}, "oops",
            {"instruction": "fine", "output": "fine"}]
    src = write_jsonl(tmp_path / "a.jsonl", rows)
    ingest_rows(DataConfig(sources=[{"path": str(src)}], on_bad_rows="quarantine"), tmp_path, tmp_path / "i.duckdb")
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(max_chars=1000))
    ids = query(tmp_path / "c.duckdb", "SELECT row_id FROM clean UNION ALL SELECT row_id FROM quarantine ORDER BY 1")
    assert [i for (i,) in ids] == list(range(len(rows)))
    assert counts["dropped_by_rule"] == {"duplicate": 1, "empty_turn": 1, "malformed": 1, "missing_field": 1,
                                         "near_duplicate": 1, "no_assistant_turn": 1, "too_long": 1}
    # every quarantined row keeps its provenance and its content: the canonical turns, or the raw malformed record
    assert query(tmp_path / "c.duckdb", "SELECT count(*) FROM quarantine WHERE source_file IS NULL"
                                        " OR line_number IS NULL OR (messages IS NULL AND record IS NULL)") == [(0,)]
    assert query(tmp_path / "c.duckdb", "SELECT record FROM quarantine WHERE rule = 'malformed'") == [("oops",)]
