import random
import unicodedata

import duckdb
from prefect.logging import disable_run_logger

from tasks.core.config import CleanConfig, DataConfig
from tasks.data.clean import CONTROL_CHARS, MACROS_SQL, MAYBE_CHANGED, clean, clean_database, read_accounting
from tasks.data.ingest import ingest_rows
from tests.conftest import write_jsonl


def run_clean(tmp_path, rows, **cfg):
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "ingest.duckdb")
    counts = clean_database(tmp_path / "ingest.duckdb", tmp_path / "clean.duckdb", CleanConfig(**cfg))
    with duckdb.connect(str(tmp_path / "clean.duckdb"), read_only=True) as con:
        kept = con.execute("SELECT line_number, messages FROM clean ORDER BY row_id").fetchall()
        dropped = con.execute("SELECT line_number, rule, detail FROM quarantine ORDER BY row_id").fetchall()
    return counts, kept, dropped


def test_duplicates_after_whitespace_and_unicode_normalisation_are_quarantined_with_their_rule(tmp_path):
    counts, kept, dropped = run_clean(tmp_path, [
        {"instruction": "Ship to Malmö", "output": "ok"},
        {"instruction": "  Ship   to\nMalmö ", "output": "ok"},             # whitespace variant
        {"instruction": "Ship to Malmo\u0308", "output": "ok"},              # decomposed unicode (NFD) variant
        {"instruction": "Ship to Malmö", "output": "ok"},                    # exact duplicate
    ], max_source_loss=1.0)  # three of four rows are duplicates on purpose
    assert [line for line, _ in kept] == [1]
    assert dropped == [(2, "duplicate", "same normalised content as row 0"),
                       (3, "duplicate", "same normalised content as row 0"),
                       (4, "duplicate", "same normalised content as row 0")]
    assert counts["rows_raw"] == counts["rows_clean"] + counts["rows_quarantined"] == 4


def test_empty_missing_and_over_long_rows_are_quarantined_and_accounted_for(tmp_path):
    counts, kept, dropped = run_clean(tmp_path, [
        {"instruction": "fine", "output": "yes"},
        {"instruction": "empty answer", "output": "   \n "},
        {"instruction": "no answer"},
        {"instruction": "long " * 50, "output": "x"},
        {"messages": [{"role": "user", "content": "only a question"}]},
    ], max_chars=100)
    assert [line for line, _ in kept] == [1]
    assert [(line, rule) for line, rule, _ in dropped] == [
        (2, "empty_turn"), (3, "missing_field"), (4, "too_long"), (5, "no_assistant_turn")]
    assert dropped[0][2] == "empty assistant turn" and "clean.max_chars=100" in dropped[2][2]
    assert counts["dropped_by_rule"] == {"empty_turn": 1, "missing_field": 1, "no_assistant_turn": 1, "too_long": 1}


def test_prompt_whitespace_collapses_but_code_indentation_in_responses_survives(tmp_path):
    code = "Here:\n\n```python\ndef f(x):   \n    if x:\n        return 1\n```"
    _, kept, _ = run_clean(tmp_path, [{"instruction": "  Write\t a   function \n", "output": "\n\n" + code + "  \n\n"}])
    (_, messages), = kept
    assert messages[0]["content"] == "Write a function"
    assert messages[1]["content"] == code.replace("f(x):   \n", "f(x):\n")


def test_split_is_deterministic_by_content_and_roughly_the_configured_fraction(tmp_path):
    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(400)]
    counts, _, _ = run_clean(tmp_path, rows, heldout_fraction=0.25)
    assert 70 <= counts["split"]["heldout"] <= 130
    with duckdb.connect(str(tmp_path / "clean.duckdb"), read_only=True) as con:
        first = con.execute("SELECT content_hash, split FROM clean ORDER BY content_hash").fetchall()
    clean_database(tmp_path / "ingest.duckdb", tmp_path / "again.duckdb", CleanConfig(heldout_fraction=0.25))
    with duckdb.connect(str(tmp_path / "again.duckdb"), read_only=True) as con:
        assert con.execute("SELECT content_hash, split FROM clean ORDER BY content_hash").fetchall() == first


def test_clean_task_writes_report_and_quarantine_files(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": "b"}])
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "ingest.duckdb")
    with disable_run_logger():
        out = clean.fn(tmp_path / "ingest.duckdb", tmp_path / "clean.duckdb", tmp_path / "report.json",
                       tmp_path / "q.parquet", CleanConfig())
    assert read_accounting(out)["rows_quarantined"] == 1
    with duckdb.connect() as con:
        assert con.execute("SELECT rule, line_number FROM read_parquet(?)", [str(tmp_path / "q.parquet")]).fetchall() \
            == [("duplicate", 2)]


def test_text_below_u0300_is_already_nfc_so_the_normalisation_guard_is_safe():
    """clean skips NFC for text without C0 controls or characters from U+0300 up; Unicode data must back that."""
    for cp in range(0x300):
        assert unicodedata.normalize("NFC", chr(cp)) == chr(cp) and unicodedata.combining(chr(cp)) == 0
    pairs = [d.split() for cp in range(0x110000)
             if (d := unicodedata.decomposition(chr(cp))) and not d.startswith("<") and len(d.split()) == 2]
    assert min(int(second, 16) for _, second in pairs) >= 0x300  # nothing below U+0300 composes with what precedes


# The normalisation rewrites as plain SQL, without the guards clean puts in front of them for speed.
PLAIN = {
    "scrub": f"regexp_replace(nfc_normalize(x), '{CONTROL_CHARS}', '', 'g')",
    "collapse": "trim(regexp_replace(s, '\\s+', ' ', 'g'))",
    "answer": "rtrim(regexp_replace(regexp_replace(s, '[ \\t]+(\\r?\\n)', '\\1', 'g'), '^([ \\t]*\\r?\\n)+', ''), "
              "chr(32) || chr(9) || chr(10) || chr(13))",
}


def test_guarded_rewrites_give_the_same_text_as_the_plain_ones():
    rng = random.Random(0)
    pieces = [" ", "  ", "\t", "\n", "\r\n", "\r", "\x0b", "\x0c", "\x07", "\x00", "\x7f", "\x85", "a", "b", "é",
              "e\u0301", "\u0301", "A\u030a", "\u212b", "\u2028", "\u00a0", "\ufb01", "\u1100\u1161", "한", "x",
              "\u3000", "\u2009", "\u1680", "\u180e", "\u202f", ".", "~"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(5000)]
    with duckdb.connect() as con:
        for macro in MACROS_SQL:
            con.execute(macro)
        con.execute(f"CREATE TABLE t AS SELECT x, {PLAIN['scrub']} AS s FROM (SELECT unnest($t) AS x)", {"t": texts})
        differing = con.execute(f"""
            SELECT x FROM t WHERE scrub(x, true) IS DISTINCT FROM s
                OR scrub(x, false) IS DISTINCT FROM nfc_normalize(x)
                OR regexp_matches(x, '{CONTROL_CHARS}') AND NOT regexp_matches(x, '{MAYBE_CHANGED}')
                OR collapse(s) IS DISTINCT FROM {PLAIN['collapse']}
                OR answer_edges(line_ends(s)) IS DISTINCT FROM {PLAIN['answer']}""").fetchall()
    assert differing == []


def test_collapse_trims_every_character_duckdb_trim_strips():
    """collapse runs trim() only where a prompt starts or ends with something other than printable ASCII: for every
    code point at either end, it must give what the plain rewrite gives."""
    with duckdb.connect() as con:
        for macro in MACROS_SQL:
            con.execute(macro)
        differing, stripped = con.execute(f"""
            SELECT list(cp) FILTER (collapse(s) IS DISTINCT FROM {PLAIN['collapse']}), count(*) FILTER (trim(s) = 'a')
            FROM (SELECT cp, unnest([chr(cp::INTEGER) || 'a', 'a' || chr(cp::INTEGER)]) AS s  -- each end alone
                  FROM range(1, 1114112) t(cp) WHERE cp NOT BETWEEN 55296 AND 57343)""").fetchall()[0]
    # U+0020, U+00A0, U+1680, U+2000-200A, U+202F, U+205F, U+3000, each at either end
    assert differing is None and stripped >= 2 * 17
