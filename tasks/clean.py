"""Clean: normalise text, quarantine bad rows with the rule that dropped them, dedupe, and split by content hash.

All in DuckDB SQL. Prompt turns have their whitespace collapsed; assistant turns keep their inner layout (code
indentation survives) and lose only trailing spaces and surrounding blank lines. Row accounting is checked on
every run: raw = clean + quarantine.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
from prefect import get_run_logger

from tasks.common import stage_task
from tasks.config import CleanConfig

NORMALISE_SQL = """
CREATE TEMP TABLE normalised AS
WITH turns AS (
    SELECT *, list_transform(messages, lambda m: {
        'role': m.role,
        'content': CASE
            WHEN m.content IS NULL THEN NULL
            WHEN m.role = 'assistant' THEN rtrim(regexp_replace(regexp_replace(
                nfc_normalize(m.content), '[ \\t]+(\\r?\\n)', '\\1', 'g'), '^([ \\t]*\\r?\\n)+', ''),
                chr(32) || chr(9) || chr(10) || chr(13))  -- rtrim() alone trims spaces only
            ELSE trim(regexp_replace(nfc_normalize(m.content), '\\s+', ' ', 'g'))
        END}) AS turns,
        trim(regexp_replace(nfc_normalize(system), '\\s+', ' ', 'g')) AS norm_system
    FROM src.raw
)
SELECT row_id, source, source_file, line_number, norm_system AS system, turns AS messages, problem_rule, problem,
       record,
       md5(coalesce(norm_system, '') || chr(1) || array_to_string(
           list_transform(turns, lambda t: t.role || chr(2) || coalesce(t.content, '')), chr(3))) AS content_hash,
       coalesce(list_sum(list_transform(turns, lambda t: length(coalesce(t.content, '')))), 0)
           + coalesce(length(norm_system), 0) AS n_chars
FROM turns
"""

# The first rule that matches a row drops it; the order is the report's order.
RULES_SQL = """
CREATE TEMP TABLE judged AS
SELECT *, CASE
    WHEN problem_rule IS NOT NULL THEN problem_rule
    WHEN len(messages) = 0 OR list_bool_or(list_transform(messages, lambda t: t.content IS NULL)) THEN 'missing_field'
    WHEN NOT list_bool_or(list_transform(messages, lambda t: t.role = 'assistant')) THEN 'no_assistant_turn'
    WHEN list_bool_or(list_transform(messages, lambda t: t.content = '')) THEN 'empty_turn'
    WHEN n_chars > $max_chars THEN 'too_long'
    WHEN row_number() OVER (PARTITION BY content_hash ORDER BY row_id) > 1 THEN 'duplicate'
END AS rule,
CASE
    WHEN problem_rule IS NOT NULL THEN problem
    WHEN list_bool_or(list_transform(messages, lambda t: t.content = ''))
        THEN 'empty ' || list_filter(messages, lambda t: t.content = '')[1].role || ' turn'
    WHEN n_chars > $max_chars THEN n_chars || ' characters > clean.max_chars=' || $max_chars
    WHEN row_number() OVER (PARTITION BY content_hash ORDER BY row_id) > 1
        THEN 'same normalised content as row ' || first(row_id) OVER (PARTITION BY content_hash ORDER BY row_id)
END AS detail
FROM normalised
"""

# Hash-based split: a row's side depends on its content alone, so appending data never moves old rows.
SPLIT_SQL = """
CREATE TABLE clean AS
SELECT row_id, source, source_file, line_number, system, messages, content_hash, n_chars,
       CASE WHEN (md5_number(content_hash) % 1000000) < $heldout * 1000000 THEN 'heldout' ELSE 'train' END AS split
FROM judged WHERE rule IS NULL ORDER BY row_id
"""

QUARANTINE_SQL = """
CREATE TABLE quarantine AS
SELECT row_id, source, source_file, line_number, rule, coalesce(detail, rule) AS detail, record
FROM judged WHERE rule IS NOT NULL ORDER BY row_id;
CREATE TABLE report AS
SELECT rule, count(*) AS rows, min(source_file || ':' || line_number) AS example
FROM quarantine GROUP BY rule ORDER BY rows DESC, rule;
"""


def clean_database(raw_db: Path, out_db: Path, cfg: CleanConfig) -> dict:
    """Write tables clean, quarantine and report to a fresh DuckDB file; return the row accounting."""
    tmp = out_db.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with duckdb.connect(str(tmp)) as con:
        con.execute("ATTACH ? AS src (READ_ONLY)", [str(raw_db)])
        con.execute(NORMALISE_SQL)
        con.execute(RULES_SQL, {"max_chars": cfg.max_chars})
        con.execute(SPLIT_SQL, {"heldout": cfg.heldout_fraction})
        con.execute(QUARANTINE_SQL)
        counts = row_counts(con)
        con.execute("CREATE TABLE meta AS SELECT $a::JSON AS accounting", {"a": json.dumps(counts)})
        con.execute("DETACH src")
    tmp.replace(out_db)
    return counts


def row_counts(con: duckdb.DuckDBPyConnection) -> dict:
    """Return raw/clean/quarantine counts, per-rule drops and split sizes; raise if any row went missing."""
    raw = con.execute("SELECT count(*) FROM src.raw").fetchall()[0][0]
    clean = con.execute("SELECT count(*) FROM clean").fetchall()[0][0]
    quarantined = con.execute("SELECT count(*) FROM quarantine").fetchall()[0][0]
    if raw != clean + quarantined:  # an internal invariant: every raw row lands on exactly one side
        raise AssertionError(f"row accounting broken: raw {raw} != clean {clean} + quarantine {quarantined}")
    return {
        "rows_raw": raw, "rows_clean": clean, "rows_quarantined": quarantined,
        "dropped_by_rule": dict(con.sql("SELECT rule, rows FROM report").fetchall()),
        "split": dict(con.sql("SELECT split, count(*) FROM clean GROUP BY split ORDER BY split").fetchall()),
    }


def read_accounting(clean_db: Path) -> dict:
    """Return the row accounting stored in a clean DuckDB file by `clean_database`."""
    with duckdb.connect(str(clean_db), read_only=True) as con:
        return json.loads(con.execute("SELECT accounting FROM meta").fetchall()[0][0])


def export_report(clean_db: Path, out_report: Path, out_quarantine: Path) -> None:
    """Write the cleaning report (accounting, rule -> rows with an example) as JSON and the quarantine as Parquet."""
    with duckdb.connect(str(clean_db), read_only=True) as con:
        rules = [dict(zip(("rule", "rows", "example"), r)) for r in con.execute("SELECT * FROM report").fetchall()]
        con.execute("COPY quarantine TO $p (FORMAT parquet)", {"p": str(out_quarantine)})
    out_report.write_text(json.dumps({**read_accounting(clean_db), "rules": rules}, indent=1), encoding="utf-8")


@stage_task("clean")
def clean(raw_db: Path, out_db: Path, out_report: Path, out_quarantine: Path, cfg: CleanConfig) -> Path:
    """Clean the `raw` table of `raw_db` into `out_db` (plus report and quarantine files) and return its path."""
    counts = clean_database(raw_db, out_db, cfg)
    export_report(out_db, out_report, out_quarantine)
    get_run_logger().info(
        "clean kept %d of %d rows, quarantined %d %s; split %s -> %s", counts["rows_clean"], counts["rows_raw"],
        counts["rows_quarantined"], counts["dropped_by_rule"], counts["split"], out_db)
    return out_db
