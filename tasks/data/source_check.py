"""The per-source check of the clean step: a source that lost all its rows, or more than clean.max_source_loss of
them to one rule, is named in one line with the rule, an example, the columns found and the source options that
would have fit (a guess from the record's shape and common column names).

The user's own sampling (`source_cap`, `source_weight`) never counts as a loss; rows a KTO flag marks
`undesirable` are the data's own choice, so they do not count towards max_source_loss either, but a source left with
no row at all is still named. With data.on_bad_rows=fail the line stops the run; with quarantine it is a warning,
logged and kept in clean_report.json under `source_warnings`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb
import orjson

from tasks.core.common import stage_logger
from tasks.core.errors import InputError
from tasks.data.formats import FORMAT_FIELDS
from tasks.data.ingest import iter_records

SAMPLING_RULES = ("source_cap", "source_weight")  # the user's own choice of rows: never a loss
CHOSEN_RULES = ("undesirable",)  # the data's own choice: not a share lost, but a source left empty is still named
# Per source: rows, rows kept, and each losing rule with its count and first row; the losses come first.
SOURCE_LOSS_SQL = """
WITH per_source AS (
    SELECT source, count(*) AS total, count(*) FILTER (rule IS NULL) AS kept, min(row_id) AS first_row
    FROM verdict GROUP BY source
), per_rule AS (
    SELECT source, rule, count(*) AS rows, NOT list_contains($chosen, rule) AS loss,
           arg_min({'file': source_file, 'line': line_number, 'detail': coalesce(detail, rule), 'record': record},
                   row_id) AS example
    FROM verdict WHERE rule IS NOT NULL AND NOT list_contains($sampling, rule) GROUP BY source, rule
)
SELECT source, total, kept, list({'rule': rule, 'rows': rows, 'example': example} ORDER BY loss DESC, rows DESC, rule)
FROM per_source JOIN per_rule USING (source)
GROUP BY source, total, kept, first_row
HAVING kept = 0 OR coalesce(max(rows) FILTER (loss), 0) > $max_loss * total
ORDER BY first_row
"""

# Column names that usually hold a canonical field, tried in this order.
SYNONYMS = {
    "instruction": ("question", "prompt", "query", "problem", "task", "inputs"),
    "output": ("answer", "response", "completion", "target", "solution", "outputs", "targets"),
    "prompt": ("question", "instruction", "query", "input"),
    "completion": ("answer", "response", "output", "target", "solution"),
    "messages": ("conversation", "chat", "dialog", "dialogue", "turns"),
    "text": ("content", "document", "body", "passage"),
}
GUESS_ORDER = ("alpaca", "prompt_completion", "messages", "sharegpt", "text")
SAMPLE_CHARS = 40


def column_guess(keys: set[str]) -> dict[str, str] | None:
    """Return the `columns` mapping that completes a record format from `keys`: {} if one is complete already,
    None if no synonym fits. Formats that share a column with the record are tried first."""
    for fmt in sorted(GUESS_ORDER, key=lambda f: not keys.intersection(FORMAT_FIELDS[f])):
        mapping, free = {}, keys - set(FORMAT_FIELDS[fmt])
        for field in FORMAT_FIELDS[fmt]:
            column = field if field in keys else next((c for c in SYNONYMS.get(field, ()) if c in free), None)
            if column is None:
                break
            if column != field:
                mapping[field] = column
                free.discard(column)
        else:
            return mapping
    return None


def guess_options(record: Any) -> dict | None:
    """Return source options (`columns`, `explode`) under which `record` would map; None if none or none needed."""
    if not isinstance(record, dict):
        return None
    columns = column_guess(set(record))
    if columns is not None:
        return {"columns": columns} if columns else None
    for key, value in record.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            inner = column_guess(set(record) - {key} | set(value[0]))
            if inner is not None:
                return {"explode": key, **({"columns": inner} if inner else {})}
    return None


def render_options(options: dict) -> str:
    """Return source options in the YAML flow style a user writes, e.g. `columns: {instruction: question}`."""
    parts = [f"explode: {options['explode']}"] if "explode" in options else []
    if options.get("columns"):
        parts.append("columns: {" + ", ".join(f"{k}: {v}" for k, v in options["columns"].items()) + "}")
    return ", ".join(parts)


def sample(value: Any) -> str:
    """Return a short one-line rendering of a value (JSON, cut at SAMPLE_CHARS characters)."""
    text = json.dumps(value, ensure_ascii=False, default=str)  # strings quoted, line ends escaped
    return text if len(text) <= SAMPLE_CHARS else text[: SAMPLE_CHARS - 1] + "…"


def example_record(record: str | None, source_file: str, line: int) -> Any:
    """Return an example row's record as read: the quarantine's copy, else read again from its local file."""
    if record is not None:
        try:
            return orjson.loads(record)
        except orjson.JSONDecodeError:  # a malformed line: no columns to show
            return None
    path = Path(source_file)
    if source_file.startswith("hf://") or not path.is_file():
        return None
    try:
        return next((r for n, r in iter_records(path) if n == line), None)
    except InputError:
        return None


def loss_warning(source: str, total: int, kept: int, rules: list[dict]) -> dict:
    """Return the warning for one source: the losing rule, its counts and the one-line message."""
    top, example = rules[0], rules[0]["example"]
    if kept:
        lost = f"lost {top['rows']} of {total} rows to {top['rule']}"
    elif len(rules) == 1:
        lost = f"lost all {total} rows to {top['rule']}"
    else:
        lost = f"lost all {total} rows ({', '.join(str(r['rule']) + ': ' + str(r['rows']) for r in rules)})"
    parts = [f"source '{source}' {lost}, e.g. {example['file']}:{example['line']}: {example['detail']}"]
    record = example_record(example["record"], example["file"], example["line"])
    if isinstance(record, dict):
        parts.append("columns found: " + ", ".join(f"{k}={sample(v)}" for k, v in record.items()))
        if options := guess_options(record):
            parts.append(f"this would fit: data.sources[].{render_options(options)}")
    message = "; ".join(parts).replace("\n", " ")
    return {"source": source, "rule": top["rule"], "rows": top["rows"], "of": total, "kept": kept, "message": message}


def source_warnings(con: duckdb.DuckDBPyConnection, max_loss: float) -> list[dict]:
    """Return a warning for each source that lost all its rows, or more than `max_loss` of them to one rule."""
    rows = con.execute(SOURCE_LOSS_SQL, {"max_loss": max_loss, "sampling": list(SAMPLING_RULES),
                                         "chosen": list(CHOSEN_RULES)}).fetchall()
    return [loss_warning(source, total, kept, rules) for source, total, kept, rules in rows]


def enforce_source_checks(warnings: list[dict], on_bad_rows: str, max_loss: float) -> None:
    """Raise the first warning as a one-line InputError (on_bad_rows=fail), else log each as a warning."""
    if warnings and on_bad_rows == "fail":
        first = warnings[0]
        fix = "set data.on_bad_rows=quarantine to keep going" if not first["kept"] else (
            f"raise clean.max_source_loss (now {max_loss}) or set data.on_bad_rows=quarantine to keep going")
        raise InputError(f"{first['message']} ({fix})")
    for warning in warnings:
        stage_logger().warning("clean: %s", warning["message"])
