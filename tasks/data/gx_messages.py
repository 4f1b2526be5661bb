"""Great Expectations failures in words: what was expected, what was observed, and the likely cause.

One clause per failed expectation, for every expectation type the suites in expectations/ and the config-driven
checks (tasks/data/validate.py `config_expectations`) use; an unknown type still gets its kwargs and observed value.
"""

from __future__ import annotations

from pathlib import Path

import duckdb

from tasks.core.config import RUN_LAYOUT

# What fails, per expectation type: the noun for the rows that break a column-map expectation.
FAILING_ROWS = {
    "expect_column_values_to_not_be_null": "null",
    "expect_column_values_to_be_unique": "with a repeated value",
    "expect_column_values_to_be_in_set": "outside that set",
    "expect_column_values_to_be_between": "out of those bounds",
    "expect_column_values_to_match_regex": "not matching",
}

# Likely causes by (stage, column or "table", expectation type); the config-driven row count is worded apart.
CAUSES = {
    ("raw", "table", "expect_table_columns_to_match_set"):
        "the raw table's schema (tasks/data/ingest.py RAW_SCHEMA) and expectations/raw_rows.json disagree: "
        "update the suite",
    ("raw", "table", "expect_table_row_count_to_be_between"):
        "no record was read: the source files are empty or hold only blank lines (check data.sources[].path)",
    ("raw", "row_id", "expect_column_values_to_be_unique"): "an ingest bug (row ids are positions): please report it",
    ("raw", "source", "expect_column_values_to_not_be_null"): "an ingest bug (every row names its source)",
    ("raw", "source_file", "expect_column_values_to_not_be_null"): "an ingest bug (every row names its file)",
    ("raw", "line_number", "expect_column_values_to_not_be_null"): "an ingest bug (every row has its line)",
    ("raw", "problem_rule", "expect_column_values_to_be_in_set"):
        "ingest marks rows with a rule the suite does not know: add it to expectations/raw_rows.json",
    ("clean", "content_hash", "expect_column_values_to_not_be_null"): "a clean bug (every kept row is hashed)",
    ("clean", "content_hash", "expect_column_values_to_be_unique"):
        "repeated conversations were kept: clean.dedupe_exact is false",
    ("clean", "split", "expect_column_values_to_be_in_set"): "a clean bug (rows are split into train and heldout)",
    ("clean", "n_turns", "expect_column_values_to_be_between"): "conversations with no turns reached the clean table",
    ("clean", "min_turn_chars", "expect_column_values_to_be_between"):
        "a turn is empty after cleaning (only whitespace or control characters) but was not quarantined",
    ("clean", "n_chars", "expect_column_values_to_be_between"):
        "conversations of under 2 or over 100000 characters: lower clean.max_chars to quarantine long ones",
    ("clean", "last_role", "expect_column_values_to_be_in_set"):
        "conversations end on a user or tool turn, with no answer to learn: drop the trailing turn, or map your "
        "role names with data.sources[].roles",
    ("clean", "roles", "expect_column_values_to_match_regex"):
        "turns out of order (two user turns in a row, a role other than user/assistant/tool, a text turn among "
        "chat turns): merge consecutive turns, or map your role names with data.sources[].roles",
    ("tokenized", "n_supervised", "expect_column_values_to_be_between"):
        "rows with no supervised token: the chat template's {% generation %} markers miss the answers "
        "(chat.chat_template), or chat.max_length cuts before the first answer",
    ("tokenized", "eot_supervised_or_truncated", "expect_column_values_to_be_in_set"):
        "the last answer's end-of-turn token is not supervised, so the model never learns to stop: the template's "
        "{% generation %} block must end after the end-of-turn token (chat.chat_template)",
    ("tokenized", "truncated", "expect_column_mean_to_be_between"):
        "conversations longer than chat.max_length are cut: raise chat.max_length, lower clean.max_chars, or "
        "raise validate.max_truncation_rate",
    ("tokenized", "supervised_share", "expect_column_mean_to_be_between"):
        "answers are a tiny share of the tokens (long system prompts or contexts): check the column mapping",
    ("tokenized", "n_tokens", "expect_column_values_to_be_between"):
        "near-empty conversations: check that the right columns are mapped",
    ("tokenized", "n_tokens", "expect_column_median_to_be_between"):
        "most conversations are a few tokens long: check that the right columns are mapped",
}


# Expectations whose kwargs read poorly, described in words instead.
EXPECTED_WORDS = {
    ("roles", "expect_column_values_to_match_regex"):
        "roles in the order [user,] assistant, then tool results or a user turn, each followed by an assistant turn "
        "(or one plain text turn)",
}


def number(value: object) -> object:
    """Return a whole float as an int (GX hands bounds back as floats: 1.0)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def bounds(kwargs: dict) -> str:
    """Return the min/max of an expectation's kwargs in words."""
    low, high = number(kwargs.get("min_value")), number(kwargs.get("max_value"))
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def expected_text(kind: str, kwargs: dict) -> str:
    """Return what an expectation asks for, in words."""
    column = kwargs.get("column")
    if (column, kind) in EXPECTED_WORDS:
        return EXPECTED_WORDS[column, kind]
    texts = {
        "expect_table_columns_to_match_set": f"exactly the columns {sorted(kwargs.get('column_set') or [])}",
        "expect_table_row_count_to_be_between": f"{bounds(kwargs)} rows",
        "expect_column_values_to_not_be_null": f"no null {column}",
        "expect_column_values_to_be_unique": f"every {column} unique",
        "expect_column_values_to_be_in_set": f"{column} in {kwargs.get('value_set')}",
        "expect_column_values_to_be_between": f"{column} {bounds(kwargs)}",
        "expect_column_values_to_match_regex": f"{column} matching {kwargs.get('regex')}",
        "expect_column_mean_to_be_between": f"mean {column} {bounds(kwargs)}",
        "expect_column_median_to_be_between": f"median {column} {bounds(kwargs)}",
    }
    return texts.get(kind, f"{kwargs}")


def observed_text(r: dict) -> str:
    """Return what the data showed for a failed expectation, in words."""
    kind, observed = r["expectation"], r["observed_value"]
    if r["unexpected_count"] is not None:
        total = f" of {r['element_count']}" if r.get("element_count") is not None else ""
        examples = "" if kind == "expect_column_values_to_not_be_null" else f", e.g. {r['examples']}"
        return f"{r['unexpected_count']}{total} rows {FAILING_ROWS.get(kind, 'failing')}{examples}"
    if kind == "expect_table_columns_to_match_set":
        wanted, seen = set(r["kwargs"].get("column_set") or []), set(observed or [])
        return f"extra {sorted(seen - wanted)}, missing {sorted(wanted - seen)}"
    if kind == "expect_table_row_count_to_be_between":
        return f"{observed} rows"
    if kind in ("expect_column_mean_to_be_between", "expect_column_median_to_be_between"):
        return f"{kind.split('_')[2]} {observed:.3g}" if isinstance(observed, (int, float)) else f"{observed}"
    return f"{observed}"


def rules_text(clean_db: Path) -> str:
    """Return the quarantine rules of a clean DuckDB file with their counts, e.g. `missing_field: 175`."""
    try:
        with duckdb.connect(str(clean_db), read_only=True) as con:
            rows = con.execute("SELECT rule, rows FROM report ORDER BY rows DESC, rule").fetchall()
    except duckdb.Error:  # a file without the report table: no counts to give
        return "no counts"
    return ", ".join(f"{rule}: {n}" for rule, n in rows) or "nothing quarantined"


def row_count_cause(r: dict, data: Path | None) -> str:
    """Return the likely cause of too few clean rows: the quarantine, with its counts."""
    report = data.parent / RUN_LAYOUT["clean_report"] if data is not None else Path(RUN_LAYOUT["clean_report"])
    counts = rules_text(data) if data is not None else "no counts"
    if r["observed_value"] == 0:
        return f"every row was quarantined: see {report} ({counts})"
    return (f"too few rows survived cleaning: see {report} ({counts}); add data or lower validate.min_rows")


def likely_cause(stage: str, r: dict, data: Path | None) -> str:
    """Return the likely cause of one failed expectation on a stage's data."""
    if (stage, r["expectation"]) == ("clean", "expect_table_row_count_to_be_between"):
        return row_count_cause(r, data)
    column = r["kwargs"].get("column", "table")
    return CAUSES.get((stage, column, r["expectation"]), "see the suite's Data Docs page for the failing rows")


def explain_failure(stage: str, r: dict, data: Path | None = None) -> str:
    """Return one clause: the expectation, what it expected, what was observed and the likely cause."""
    column = r["kwargs"].get("column", "table")
    return (f"{r['expectation']}({column}): expected {expected_text(r['expectation'], r['kwargs'])}, "
            f"observed {observed_text(r)} (likely cause: {likely_cause(stage, r, data)})")
