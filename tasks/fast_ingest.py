"""Fast path of ingest for flat Alpaca JSON Lines: DuckDB parses and maps the records in parallel, in C++.

Only records that the general mapper (tasks/formats.py) would read as plain Alpaca take this path: a JSON object
whose keys are among instruction/input/output/system (after the column mapping), with string or null values and
no <think> trace. Every other line (malformed, other formats, history, reasoning, tools…) is returned to the
general mapper, so the two paths never disagree on what a record means; a test checks they give identical rows.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pyarrow as pa

from tasks.config import SourceConfig
from tasks.formats import NO_INPUT

FIELDS = ("instruction", "input", "output", "system")
WHITESPACE = " \t\n\r\x0b\x0c"

FAST_SQL = """
INSERT INTO staged BY NAME
WITH objects AS (
    SELECT line_number, line, json_keys(line) AS keys FROM lines
    WHERE json_valid(line) AND json_type(line) = 'OBJECT'
), flat AS (
    SELECT line_number, json_extract_string(line, $paths) AS f FROM objects
    WHERE list_has_all($keys, keys) AND list_contains(keys, $keys[1])
      AND list_bool_and(list_transform(json_type(line, $paths), lambda t: t IS NULL OR t IN ('VARCHAR', 'NULL')))
)
SELECT $order AS src_order, line_number, $label AS source, $origin AS source_file, $pinned AS pinned_split,
       $weight AS source_weight, $cap AS source_cap, f[4] AS system,
       [{'role': 'user', 'content': CASE
            WHEN f[1] IS NOT NULL AND f[2] IS NOT NULL AND NOT list_contains($no_input, lower(trim(f[2], $ws)))
            THEN f[1] || chr(10) || chr(10) || f[2] ELSE f[1] END, 'reasoning': NULL::VARCHAR},
        {'role': 'assistant', 'content': f[3], 'reasoning': NULL::VARCHAR}] AS messages,
       NULL::VARCHAR AS tools,
       CASE WHEN f[1] IS NULL OR f[3] IS NULL THEN 'missing_field' END AS problem_rule,
       CASE WHEN f[1] IS NULL THEN 'missing field ''instruction''' WHEN f[3] IS NULL THEN 'missing field ''output'''
       END AS problem,
       NULL::VARCHAR AS record
FROM flat WHERE NOT regexp_matches(coalesce(f[3], ''), '^\\s*<think>')
"""
LEFTOVER_SQL = """
SELECT line_number, line FROM lines
ANTI JOIN (SELECT line_number FROM staged WHERE src_order = $order) USING (line_number) ORDER BY line_number
"""


def fast_path_applies(source: SourceConfig, path: Path) -> bool:
    """Return True for JSON Lines files of a source read as auto-detected or explicit Alpaca."""
    return source.format in ("auto", "alpaca") and path.suffix.lower() in (".jsonl", ".json")


def json_lines(path: Path) -> pa.Table | None:
    """Return the non-blank lines of a JSON Lines file with their line numbers, or None for a JSON array file."""
    with path.open(encoding="utf-8") as f:
        if f.read(4096).lstrip().startswith("["):
            return None  # an array: the general reader parses it once, as a whole
    lines = path.read_text(encoding="utf-8").splitlines()
    numbers = [i for i, line in enumerate(lines, start=1) if line.strip()]
    return pa.table({"line_number": pa.array(numbers, pa.int64()), "line": pa.array([lines[i - 1] for i in numbers])})


def stage_alpaca(con: duckdb.DuckDBPyConnection, lines: pa.Table, source: SourceConfig, origin: str,
                 order: int) -> list[tuple[int, str]]:
    """Insert the flat Alpaca records of `lines` into table `staged`; return the (line, text) pairs left over."""
    paths = ["$." + '"' + source.columns.get(f, f).replace('"', '\\"') + '"' for f in FIELDS]
    con.register("lines", lines)
    try:
        con.execute(FAST_SQL, {
            "paths": paths, "keys": [source.columns.get(f, f) for f in FIELDS], "no_input": sorted(NO_INPUT),
            "ws": WHITESPACE, "order": order, "label": source.label, "origin": origin,
            "pinned": None if source.split == "auto" else source.split, "weight": source.weight,
            "cap": source.max_rows})
        return con.execute(LEFTOVER_SQL, {"order": order}).fetchall()
    finally:
        con.unregister("lines")
