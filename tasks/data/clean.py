"""Clean: normalise text, quarantine bad rows with the rule that dropped them, dedupe, and split by content hash.

All in DuckDB SQL, except the MinHash arithmetic of near-duplicate detection (tasks/data/dedup.py). Every turn is NFC
normalised and stripped of control characters; prompt turns have their whitespace collapsed, while assistant and
plain-text turns keep their inner layout (code indentation survives) and lose only trailing spaces and surrounding
blank lines. Tool calls and tool definitions are JSON and pass unchanged. A source of weight below 1 keeps that share
of its training rows (the rest are quarantined as source_weight). Row accounting is checked on every run:
raw = clean + quarantine. A source that loses most of its rows to one rule is named in one line
(tasks/data/source_check.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import pyarrow as pa

from tasks.core.common import COMPRESSION_SQL, in_prefect_run, stage_logger
from tasks.core.config import CleanConfig, content_hash
from tasks.core.stage import stage_task
from tasks.data.cleaning_report import publish_cleaning_report
from tasks.data.dedup import near_duplicate_clusters
from tasks.data.source_check import enforce_source_checks, source_warnings

CONTROL_CHARS = "[\\x00-\\x08\\x0B\\x0C\\x0E-\\x1F\\x7F]"
# Only these characters can be changed by NFC or the control-character rule: C0 controls other than tab and line
# ends, DEL, and everything from U+0300 (combining marks) up. A character below U+0300 is NFC on its own and never
# composes with a neighbour (a unit test checks this against Python's unicodedata), so text without any of them --
# nearly all text -- skips both. Every rewrite below is guarded like this by a cheap test that it would change
# something: the guards decide only whether to run a rewrite, never what it produces.
MAYBE_CHANGED = "[^\\t\\n\\r\\x20-\\x7E\\x{80}-\\x{2FF}]"
EMAIL = "[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)*\\.[A-Za-z]{2,}"
PHONE = "\\+?[0-9][0-9 ().-]{7,}[0-9]"

# Macros take a plain column, never another macro call: DuckDB inlines a macro's argument at every use.
MACROS_SQL = [
    f"""CREATE TEMP MACRO scrub_flagged(x, maybe_changed, strip) AS CASE  -- NFC, control characters
        WHEN NOT maybe_changed THEN x
        WHEN strip THEN regexp_replace(nfc_normalize(x), '{CONTROL_CHARS}', '', 'g') ELSE nfc_normalize(x) END""",
    f"""CREATE TEMP MACRO scrub(x, strip) AS
        scrub_flagged(x, coalesce(regexp_matches(x, '{MAYBE_CHANGED}'), false), strip)""",
    f"""CREATE TEMP MACRO redact(x) AS
        regexp_replace(regexp_replace(x, '{EMAIL}', '[EMAIL]', 'g'), '{PHONE}', '[PHONE]', 'g')""",
    # Prompts: every run of whitespace (RE2's \s) becomes one space, ends trimmed. trim(x) strips Unicode spaces
    # such as U+00A0, too; it decodes the whole string to find its end, so it runs only where x starts or ends with
    # something other than printable ASCII (RE2 tests the end from the end).
    """CREATE TEMP MACRO collapse(x) AS CASE
        WHEN contains(x, '  ') OR contains(x, chr(9)) OR contains(x, chr(10)) OR contains(x, chr(12))
            OR contains(x, chr(13)) THEN trim(regexp_replace(x, '\\s{2,}|[\\t\\n\\f\\r]', ' ', 'g'))
        WHEN regexp_matches(x, '^[^!-~]') OR regexp_matches(x, '[^!-~]$') THEN trim(x)
        ELSE x END""",
    # Answers keep their layout (code indentation) and lose only trailing spaces per line (one pass), then leading
    # blank lines and trailing whitespace (the next pass).
    """CREATE TEMP MACRO line_ends(x) AS CASE
        WHEN contains(x, ' ' || chr(10)) OR contains(x, chr(9) || chr(10)) OR contains(x, ' ' || chr(13))
            OR contains(x, chr(9) || chr(13)) THEN regexp_replace(x, '[ \\t]+(\\r?\\n)', '\\1', 'g') ELSE x END""",
    """CREATE TEMP MACRO leading_lines(x) AS CASE
        WHEN regexp_matches(x, '^[ \\t]*\\r?\\n') THEN regexp_replace(x, '^([ \\t]*\\r?\\n)+', '') ELSE x END""",
    # leading_lines(x) only removes a prefix: if x does not end in whitespace, neither does the result.
    """CREATE TEMP MACRO answer_edges(x) AS CASE  -- rtrim(x) alone trims spaces only
        WHEN ends_with(x, ' ') OR ends_with(x, chr(9)) OR ends_with(x, chr(10)) OR ends_with(x, chr(13))
            THEN rtrim(leading_lines(x), chr(32) || chr(9) || chr(10) || chr(13)) ELSE leading_lines(x) END""",
]


def turn_pass(content: str, reasoning: str, extra: str = "") -> str:
    """Return a lambda that rewrites each turn: `content` and `reasoning` are expressions of m (a role-aware CASE);
    the other fields of the turn are carried through."""
    return (f"lambda m: {{'role': m.role, 'content': {content}, 'reasoning': {reasoning}, 'weight': m.weight, "
            f"'tool_calls': m.tool_calls{extra}}}")


def chain(turns: str, *passes: str) -> str:
    """Return the SQL that applies the turn passes to list column `turns`, one after another."""
    for lambda_ in passes:
        turns = f"list_transform({turns}, {lambda_})"
    return turns


REDACT = "CASE WHEN $redact THEN redact({0}) ELSE {0} END"
SCRUB = REDACT.format("scrub({0}, $strip)")
ANSWERS_ONLY = "CASE WHEN m.role IN ('assistant', 'text') THEN {0}(m.content) ELSE m.content END"
# Pass 1 tests each turn once for characters NFC or the control-character rule could change; pass 2 scrubs and notes
# whether a control character was stripped; the later passes drop that note.
SCRUB_PASSES = [
    turn_pass("m.content", "m.reasoning",
              f", 'maybe_changed': coalesce(regexp_matches(m.content, '{MAYBE_CHANGED}'), false)"),
    turn_pass(REDACT.format("scrub_flagged(m.content, m.maybe_changed, $strip)"), SCRUB.format("m.reasoning"),
              # CASE, not AND: DuckDB evaluates both sides of an AND for every turn
              f", 'ctrl': CASE WHEN m.maybe_changed THEN regexp_matches(m.content, '{CONTROL_CHARS}') ELSE false END"),
]
LAYOUT_PASSES = [
    turn_pass("CASE WHEN m.role IN ('assistant', 'text') THEN line_ends(m.content) ELSE collapse(m.content) END",
              "line_ends(m.reasoning)"),
    turn_pass(ANSWERS_ONLY.format("answer_edges"), "answer_edges(m.reasoning)"),
]

NORMALISE_SQL = f"""
CREATE TEMP TABLE normalised AS
WITH scrubbed AS (
    SELECT *, {chain("messages", *SCRUB_PASSES)} AS scrubbed, {SCRUB.format("system")} AS scrubbed_system,
        $redact AND list_bool_or(list_transform(messages, lambda m: regexp_matches(m.content, '{EMAIL}|{PHONE}')))
            AS had_pii
    FROM src.raw
), turns AS (
    SELECT * EXCLUDE (scrubbed, scrubbed_system), {chain("scrubbed", *LAYOUT_PASSES)} AS turns,
           list_bool_or(list_transform(scrubbed, lambda m: m.ctrl)) AS had_ctrl,
           collapse(scrubbed_system) AS norm_system
    FROM scrubbed
)
SELECT row_id, source, source_file, line_number, pinned_split, source_weight, source_cap, norm_system AS system,
       turns AS messages, tools,
       problem_rule, problem, record, had_ctrl, had_pii,
       CASE WHEN turns = messages AND norm_system IS NOT DISTINCT FROM system THEN content_hash  -- unchanged: as read
            ELSE {content_hash("norm_system", "turns", "tools")} END AS content_hash,
       coalesce(list_sum(list_transform(turns, lambda t: length(coalesce(t.content, ''))
                                                         + coalesce(length(t.tool_calls), 0))), 0)
           + coalesce(length(norm_system), 0) AS n_chars,
       CASE pinned_split WHEN 'heldout' THEN 0 ELSE 1 END AS priority  -- a fixed held-out row wins over its copies
FROM turns
"""

# The first rule that matches a row drops it; the order is the report's order.
RULES_SQL = """
CREATE TEMP TABLE judged AS
WITH copied AS (  -- content seen more than once, and the row that stays: a fixed held-out one, else the first
    SELECT content_hash, arg_min(row_id, (priority, row_id)) AS dup_of FROM normalised
    GROUP BY content_hash HAVING count(*) > 1
), ranked AS (
    SELECT normalised.*, dup_of, list_filter(messages, lambda t: t.content = '' AND t.tool_calls IS NULL) AS empties
    FROM normalised LEFT JOIN copied USING (content_hash)
), ruled AS (
    SELECT *, CASE
        WHEN problem_rule IS NOT NULL THEN problem_rule
        WHEN len(messages) = 0 OR list_bool_or(list_transform(messages, lambda t: t.content IS NULL))
            THEN 'missing_field'
        -- a lone plain-text turn (continued pre-training) is supervised like an answer
        WHEN NOT list_bool_or(list_transform(messages, lambda t: t.role IN ('assistant', 'text')))
            THEN 'no_assistant_turn'
        WHEN NOT list_bool_or(list_transform(messages, lambda t: t.role IN ('assistant', 'text')
                                                                 AND coalesce(t.weight, 1) <> 0))
            THEN 'no_supervised_turn'  -- every answer has loss weight 0: nothing to learn
        WHEN len(empties) > 0 THEN 'empty_turn'
        WHEN n_chars > $max_chars THEN 'too_long'
        WHEN $dedupe AND row_id <> dup_of THEN 'duplicate'
    END AS rule
    FROM ranked
)
SELECT * EXCLUDE (dup_of, empties), CASE
    WHEN rule = problem_rule THEN problem
    WHEN rule = 'empty_turn' THEN 'empty ' || empties[1].role || ' turn'
    WHEN rule = 'no_supervised_turn' THEN 'every assistant turn has loss weight 0'
    WHEN rule = 'too_long' THEN n_chars || ' characters > clean.max_chars=' || $max_chars
    WHEN rule = 'duplicate' THEN 'same normalised content as row ' || dup_of
END AS detail, content_hash AS split_key
FROM ruled
"""

# What near-duplicate detection compares: the rows no earlier rule dropped, as one text each (tool calls included,
# so rows that differ in their calls are not near duplicates).
DEDUP_ROWS_SQL = """
SELECT row_id, priority, concat_ws(chr(10), system, array_to_string(list_transform(messages,
       lambda t: concat_ws(' ', t.content, t.tool_calls)), chr(10))) AS text
FROM judged WHERE rule IS NULL
"""

# Decisions taken after the SQL rules, for the few rows they concern: near duplicates are dropped, or kept on their
# representative's side of the split so no cluster straddles it; a source's row cap keeps the rows with the lowest
# content hash (a stable choice as data is appended).
LATE_SQL = """
CREATE TEMP TABLE late AS
WITH near_rows AS (
    SELECT near.row_id, CASE WHEN $drop THEN 'near_duplicate' END AS rule,
           CASE WHEN $drop THEN 'near duplicate of row ' || near.rep END AS detail, rep_row.content_hash AS split_key
    FROM near JOIN judged AS rep_row ON rep_row.row_id = near.rep
), capped AS (
    SELECT row_id, 'source_cap' AS rule, 'over data.sources[].max_rows=' || source_cap AS detail
    FROM (SELECT row_id, source_cap, row_number() OVER (PARTITION BY source ORDER BY content_hash, row_id) AS n
          FROM judged ANTI JOIN (SELECT row_id FROM near_rows WHERE rule IS NOT NULL) USING (row_id)
          WHERE judged.rule IS NULL AND source_cap IS NOT NULL)
    WHERE n > source_cap
)
SELECT row_id, coalesce(capped.rule, near_rows.rule) AS rule, coalesce(capped.detail, near_rows.detail) AS detail,
       near_rows.split_key
FROM near_rows FULL JOIN capped USING (row_id)
"""
# Every row with its final rule: the SQL rules' verdict, else the late one; then its side of the split, and for a
# training row of a source of weight below 1 that falls outside the weight's share, rule source_weight. Hash-based
# split: a row's side depends on its content alone, so appending data never moves old rows. The share is chosen by
# the hash rule format uses for the fractional part of a weight above 1 (its low bits; the split uses the high bits).
VERDICT_SQL = """
CREATE TEMP VIEW decided AS
SELECT judged.* REPLACE (coalesce(judged.rule, late.rule) AS rule, coalesce(judged.detail, late.detail) AS detail),
       CASE WHEN pinned_split IS NOT NULL THEN pinned_split
            WHEN (md5_number(coalesce(late.split_key, judged.split_key)) >> 64)::UBIGINT % 1000000
                 < getvariable('heldout_fraction') * 1000000 THEN 'heldout'
            ELSE 'train' END AS split
FROM judged LEFT JOIN late USING (row_id);
CREATE TEMP VIEW verdict AS  -- CASE, not AND: the split and the hash are computed for weighed kept rows only
SELECT * EXCLUDE (dropped) REPLACE (
    CASE WHEN dropped THEN 'source_weight' ELSE rule END AS rule,
    CASE WHEN dropped THEN 'not in the ' || source_weight || ' share of data.sources[].weight' ELSE detail END
        AS detail)
FROM (SELECT *, CASE WHEN rule IS NULL AND source_weight < 1
                     THEN split = 'train' AND md5_number(content_hash) % 1000000 >= source_weight * 1000000
                     ELSE false END AS dropped
      FROM decided);
"""

SPLIT_SQL = """
CREATE TABLE clean AS
SELECT row_id, source, source_file, line_number, source_weight, system, messages, tools, content_hash, n_chars, split
FROM verdict WHERE rule IS NULL
"""

QUARANTINE_SQL = """
CREATE TABLE quarantine AS
SELECT row_id, source, source_file, line_number, rule, coalesce(detail, rule) AS detail, system, messages, record
FROM verdict WHERE rule IS NOT NULL;
CREATE TABLE report AS  -- from the in-memory view: reading the new table back costs more
SELECT rule, count(*) AS rows, arg_min(source_file || ':' || line_number, row_id) AS example,
       arg_min(coalesce(detail, rule), row_id) AS example_detail
FROM verdict WHERE rule IS NOT NULL GROUP BY rule;
"""
REPORT_ORDER = "ORDER BY rows DESC, rule"
EXAMPLES_SQL = """
SELECT rule, row_id, source_file, line_number, detail, system, messages, record FROM (
    SELECT *, row_number() OVER (PARTITION BY rule ORDER BY row_id) AS nth FROM quarantine)
WHERE nth <= $per_rule ORDER BY rule, row_id
"""
EXAMPLES_PER_RULE = 3
TURN_CHARS = 100  # each turn of an example is cut to this many characters, so the answer still shows


def decide_late(con: duckdb.DuckDBPyConnection, cfg: CleanConfig) -> None:
    """Cluster the rows the SQL rules kept by MinHash similarity, then create table `late` and view `verdict`."""
    reps = near_duplicate_clusters(con, DEDUP_ROWS_SQL, cfg.near_dup_threshold)
    con.register("near_pairs", pa.table({"row_id": list(reps), "rep": list(reps.values())},
                                        schema=pa.schema([("row_id", pa.int64()), ("rep", pa.int64())])))
    con.execute("CREATE TEMP TABLE near AS SELECT * FROM near_pairs")
    con.execute(LATE_SQL, {"drop": cfg.drop_near_duplicates})
    con.execute("SET VARIABLE heldout_fraction = $heldout", {"heldout": cfg.heldout_fraction})
    con.execute(VERDICT_SQL)


def write_clean_database(raw_db: Path, out_db: Path, cfg: CleanConfig) -> dict:
    """Write tables clean, quarantine and report to a fresh DuckDB file; return the row accounting."""
    tmp = out_db.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with duckdb.connect(str(tmp)) as con:
        con.execute("ATTACH ? AS src (READ_ONLY)", [str(raw_db)])
        con.execute(COMPRESSION_SQL)
        # Tables are written in whatever order the threads finish (faster); every reader orders by row_id.
        con.execute("SET preserve_insertion_order = false")
        for macro in MACROS_SQL:
            con.execute(macro)
        log, started = stage_logger(), time.monotonic()
        log.info("clean: normalising the rows of %s (NFC, control characters%s, whitespace)", raw_db,
                 ", PII" if cfg.redact_pii else "")
        con.execute(NORMALISE_SQL, {"strip": cfg.strip_control_chars, "redact": cfg.redact_pii})
        con.execute(RULES_SQL, {"max_chars": cfg.max_chars, "dedupe": cfg.dedupe_exact})
        log.info("clean: rules applied in %.1f s; near-duplicate search (MinHash, threshold %s)",
                 time.monotonic() - started, cfg.near_dup_threshold)
        decide_late(con, cfg)
        con.execute(SPLIT_SQL)
        con.execute(QUARANTINE_SQL)
        counts = row_counts(con, cfg)
        for rule, rows in counts["dropped_by_rule"].items():
            log.info("clean: rule %s quarantined %d rows", rule, rows)
        log.info("clean: %d of %d rows kept after %.1f s", counts["rows_clean"], counts["rows_raw"],
                 time.monotonic() - started)
        con.execute("CREATE TABLE meta AS SELECT $a::JSON AS accounting", {"a": json.dumps(counts)})
        con.execute("DETACH src")
    tmp.replace(out_db)
    return counts


def clean_database(raw_db: Path, out_db: Path, cfg: CleanConfig, on_bad_rows: str = "fail") -> dict:
    """Write the clean DuckDB file and return the row accounting; a source that lost most of its rows to one rule
    raises a one-line InputError (on_bad_rows=fail) or is logged as a warning (quarantine)."""
    counts = write_clean_database(raw_db, out_db, cfg)
    enforce_source_checks(counts["source_warnings"], on_bad_rows, cfg.max_source_loss)
    return counts


def row_counts(con: duckdb.DuckDBPyConnection, cfg: CleanConfig) -> dict:
    """Return raw/clean/quarantine counts, per-rule drops and edits, split sizes; raise if any row went missing."""
    raw = con.execute("SELECT count(*) FROM src.raw").fetchall()[0][0]
    clean = con.execute("SELECT count(*) FROM clean").fetchall()[0][0]
    quarantined = con.execute("SELECT count(*) FROM quarantine").fetchall()[0][0]
    if raw != clean + quarantined:  # an internal invariant: every raw row lands on exactly one side
        raise AssertionError(f"row accounting broken: raw {raw} != clean {clean} + quarantine {quarantined}")
    ctrl, pii = con.execute("SELECT count(*) FILTER (had_ctrl), count(*) FILTER (had_pii) FROM verdict "
                            "WHERE rule IS NULL").fetchall()[0]
    return {
        "rows_raw": raw, "rows_clean": clean, "rows_quarantined": quarantined,
        "dropped_by_rule": dict(con.execute(f"SELECT rule, rows FROM report {REPORT_ORDER}").fetchall()),
        "edited_by_rule": {"control_chars_stripped": ctrl if cfg.strip_control_chars else 0,
                           "pii_redacted": pii if cfg.redact_pii else 0},
        "split": dict(con.execute("SELECT split, count(*) FROM clean GROUP BY split ORDER BY split").fetchall()),
        "source_warnings": source_warnings(con, cfg.max_source_loss),
    }


def read_accounting(clean_db: Path) -> dict:
    """Return the row accounting stored in a clean DuckDB file by `clean_database`."""
    with duckdb.connect(str(clean_db), read_only=True) as con:
        return json.loads(con.execute("SELECT accounting FROM meta").fetchall()[0][0])


def example_preview(system: str | None, messages: list[dict] | None, record: str | None) -> str:
    """Return a quarantined row as one line: each turn `role: content` (or its tool calls) cut to TURN_CHARS, else
    the raw record."""
    from tasks.core.artifacts import shorten, truncate

    turns = ([{"role": "system", "content": system}] if system else []) + list(messages or [])

    def text(c: str | None) -> str:
        return "(missing)" if c is None else shorten(c, TURN_CHARS) if c.strip() else "(empty)"

    shown = [f"{t['role']}: {text(t.get('content'))}" if not t.get("tool_calls") or (t.get("content") or "").strip()
             else f"{t['role']}: (calls) {shorten(t['tool_calls'], TURN_CHARS)}" for t in turns]
    has_text = any(t.get("content") for t in turns)
    return " ⏎ ".join(shown) if has_text or not record else f"record: {truncate(record, 2 * TURN_CHARS)}"


def quarantine_examples(con: duckdb.DuckDBPyConnection, per_rule: int = EXAMPLES_PER_RULE) -> dict[str, list[dict]]:
    """Return the first `per_rule` quarantined rows of each rule: where (file:line), why, and a short preview."""
    examples: dict[str, list[dict]] = {}
    for rule, row_id, file, line, detail, system, messages, record in con.execute(
            EXAMPLES_SQL, {"per_rule": per_rule}).fetchall():
        examples.setdefault(rule, []).append({
            "row_id": row_id, "where": f"{Path(file).name}:{line}" if file else f"row {row_id}",
            "detail": detail, "preview": example_preview(system, messages, record)})
    return examples


def export_report(clean_db: Path, out_report: Path, out_quarantine: Path) -> None:
    """Write the cleaning report (accounting, rule -> rows with an example, a few examples per rule) as JSON and
    the quarantine as Parquet."""
    with duckdb.connect(str(clean_db), read_only=True) as con:
        cur = con.execute(f"SELECT * FROM report {REPORT_ORDER}")
        names = [d[0] for d in cur.description]
        rules = [dict(zip(names, r)) for r in cur.fetchall()]
        examples = quarantine_examples(con)
        con.execute("COPY (SELECT * FROM quarantine ORDER BY row_id) TO $p (FORMAT parquet)",
                    {"p": str(out_quarantine)})
    report = {**read_accounting(clean_db), "rules": rules, "examples": examples, "quarantine_file": str(out_quarantine)}
    out_report.write_text(json.dumps(report, indent=1, ensure_ascii=False), encoding="utf-8")


@stage_task("clean")
def clean(raw_db: Path, out_db: Path, out_report: Path, out_quarantine: Path, cfg: CleanConfig,
          on_bad_rows: str = "fail") -> Path:
    """Clean the `raw` table of `raw_db` into `out_db` (plus report and quarantine files) and return its path.

    The files are written before a source that lost most of its rows stops the step (on_bad_rows=fail).
    """
    counts = write_clean_database(raw_db, out_db, cfg)
    export_report(out_db, out_report, out_quarantine)
    if in_prefect_run():
        publish_cleaning_report(out_report)
    enforce_source_checks(counts["source_warnings"], on_bad_rows, cfg.max_source_loss)
    stage_logger().info(
        "clean kept %d of %d rows, quarantined %d %s, edited %s; split %s -> %s", counts["rows_clean"],
        counts["rows_raw"], counts["rows_quarantined"], counts["dropped_by_rule"], counts["edited_by_rule"],
        counts["split"], out_db)
    return out_db
