"""Reading JSON Lines files fast, and the fast path of ingest for flat Alpaca records.

`json_lines` splits a file into lines with one numpy pass and hands them to DuckDB as an Arrow column without
copying the text. `stage_alpaca` lets DuckDB parse and map the flat Alpaca records in parallel, in C++.
Only records that the general mapper (tasks/data/formats.py) would read as plain Alpaca take this path: a JSON object
whose keys are among instruction/input/output/system (after the column mapping), with string or null values and
no <think> trace. Every other line (malformed, other formats, history, reasoning, tools, labels, media…) is returned
to the general mapper, so the two paths never disagree on what a record means; a test checks they give identical rows.
"""

from __future__ import annotations

import heapq
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa

from tasks.core.config import SourceConfig
from tasks.data.formats import NO_INPUT

FIELDS = ("instruction", "input", "output", "system")
WHITESPACE = " \t\n\r\x0b\x0c"
BOM = b"\xef\xbb\xbf"
LONE_SURROGATE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])"  # high, no low after it
                            r"|(?<!\\u[dD][89abAB][0-9a-fA-F]{2})\\u[dD][c-fC-F][0-9a-fA-F]{2}")  # low alone
BLANK_START = np.frombuffer(b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f", np.uint8)  # bytes str.strip() removes


@dataclass(frozen=True)
class JsonLines:
    """The non-blank, decodable lines of a JSON Lines file, and its lines that are not UTF-8 (as parse errors)."""

    table: pa.Table  # position (among the file's records), line_number, line (with its line end)
    undecodable: list[tuple[int, json.JSONDecodeError]]
    numbers: np.ndarray  # the line number of every record, in order: decodable or not

    def records(self, leftover: Iterable[tuple[int, str]] | None = None) -> Iterator[tuple[int, Any]]:
        """Yield (line number, parsed record or JSONDecodeError) for `leftover` lines (default: all), in order."""
        if leftover is None:
            leftover = zip(self.table.column("line_number").to_pylist(), self.table.column("line").to_pylist())
        parsed = ((n, parse_line(line.removesuffix("\n").removesuffix("\r"))) for n, line in leftover)
        return heapq.merge(parsed, self.undecodable, key=lambda pair: pair[0])


FAST_SQL = """
INSERT INTO staged BY NAME
WITH objects AS (  -- keys: NULL for a line that is not JSON, [] for JSON that is not an object
    SELECT position, line_number, line, keys, json_type(line, $paths) AS types
    FROM (SELECT *, try(json_keys(line)) AS keys FROM lines)
    WHERE list_has_all($keys, keys) AND list_contains(keys, $keys[1])
), flat AS (  -- string or null values; a repeated key (more keys than fields found) takes the general mapper
    SELECT position, line_number, line, json_extract_string(line, $paths) AS f FROM objects
    WHERE list_bool_and(list_transform(types, lambda t: t IS NULL OR t IN ('VARCHAR', 'NULL')))
      AND len(keys) = len(list_filter(types, lambda t: t IS NOT NULL))
)
SELECT $first_row_id + position AS row_id, line_number, $label AS source, $origin AS source_file,
       $pinned AS pinned_split,
       $weight AS source_weight, $cap AS source_cap, f[4] AS system,
       [{'role': 'user', 'content': CASE
            WHEN f[1] IS NOT NULL AND f[2] IS NOT NULL AND NOT list_contains($no_input, lower(trim(f[2], $ws)))
            THEN f[1] || chr(10) || chr(10) || f[2] ELSE f[1] END, 'reasoning': NULL::VARCHAR, 'weight': NULL::DOUBLE,
         'tool_calls': NULL::VARCHAR},
        {'role': 'assistant', 'content': f[3], 'reasoning': NULL::VARCHAR, 'weight': NULL::DOUBLE,
         'tool_calls': NULL::VARCHAR}] AS messages,
       NULL::VARCHAR AS tools,
       CASE WHEN f[1] IS NULL OR f[3] IS NULL THEN 'missing_field' END AS problem_rule,
       CASE WHEN f[1] IS NULL THEN 'missing field ''instruction''' WHEN f[3] IS NULL THEN 'missing field ''output'''
       END AS problem,
       CASE WHEN f[1] IS NULL OR f[3] IS NULL THEN rtrim(line, chr(13) || chr(10)) END AS record  -- as read
FROM flat WHERE NOT regexp_matches(coalesce(f[3], ''), '^\\s*<think>')
"""
LEFTOVER_SQL = """
SELECT line_number, line FROM lines
ANTI JOIN (SELECT row_id FROM staged WHERE row_id >= $first_row_id) ON row_id = $first_row_id + position
ORDER BY line_number
"""


def parse_line(line: str) -> Any:
    """Return the parsed JSON line (orjson, fast), or the standard library's JSONDecodeError for a readable message."""
    try:
        return orjson.loads(line)
    except orjson.JSONDecodeError:
        try:
            record = json.loads(line)  # valid JSON that orjson rejects (e.g. NaN): parse it anyway
        except json.JSONDecodeError as e:
            return e
        return lone_surrogate_error(record, line) or record


def lone_surrogate_error(record: Any, doc: str | None = None) -> json.JSONDecodeError | None:
    """Return an error if a parsed record holds a lone surrogate (a \\ud800-style escape): no valid text holds one,
    and it could not be stored. Python's json accepts such escapes; orjson and DuckDB reject them."""
    try:
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        doc = json.dumps(record) if doc is None else doc  # the record's own text, escapes kept, for the quarantine
        at = LONE_SURROGATE.search(doc)
        return json.JSONDecodeError("a \\u escape encodes a lone surrogate, which is not text", doc,
                                    at.start() if at else 0)
    return None


def fast_path_applies(source: SourceConfig, path: Path) -> bool:
    """Return True for JSON Lines files of a source read as auto-detected or explicit Alpaca, not exploded."""
    return source.format in ("auto", "alpaca") and source.explode is None and path.suffix.lower() in (".jsonl",
                                                                                                        ".json")


def json_lines(path: Path) -> JsonLines | None:
    """Return the records of a JSON Lines file as text, or None for a .json file that holds one JSON array.

    A line ends at "\\n" (a "\\r" before it is dropped), as JSON Lines defines it, so a U+2028 inside a string
    stays in its record. Blank lines are no records. The file is split with numpy and handed to DuckDB as one Arrow
    column without copying its text: a line's string keeps its line end, which JSON ignores as whitespace.
    """
    with path.open("rb") as f:
        if path.suffix.lower() == ".json" and f.read(4096).lstrip(BOM + WHITESPACE.encode()).startswith(b"["):
            return None  # an array: the general reader parses it once, as a whole
    data = path.read_bytes()
    buf = np.frombuffer(data, np.uint8)
    start = len(BOM) if data.startswith(BOM) else 0
    offsets = np.concatenate(([start], np.flatnonzero(buf == 10) + 1, [len(buf)])).astype(np.int64)
    if offsets[-1] == offsets[-2]:
        offsets = offsets[:-1]  # the file ends with a line end: no empty last line
    lines = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets), pa.py_buffer(data))
    numbers = np.arange(1, len(lines) + 1, dtype=np.int64)
    # A blank line starts with whitespace (or a non-ASCII byte: Unicode spaces); only those are decoded to check,
    # unless the file is not all UTF-8: then every line is.
    first = buf[np.minimum(offsets[:-1], max(len(buf) - 1, 0))] if len(buf) else np.empty(0, np.uint8)
    suspects = (offsets[1:] == offsets[:-1]) | np.isin(first, BLANK_START) | (first >= 0x80)
    try:
        lines.validate(full=True)
    except pa.ArrowInvalid:
        suspects[:] = True
    blank, undecodable = np.zeros(len(lines), dtype=bool), []
    for i in np.flatnonzero(suspects).tolist():
        raw = data[offsets[i]:offsets[i + 1]]
        try:
            blank[i] = not raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:  # kept as a malformed record, never dropped
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            undecodable.append((i + 1, json.JSONDecodeError("not valid UTF-8", text, e.start)))
    records = ~blank
    keep = records.copy()  # the records DuckDB gets: the undecodable ones go to the general mapper as errors
    keep[[n - 1 for n, _ in undecodable]] = False
    position = np.cumsum(records) - 1
    table = pa.table({"position": position, "line_number": numbers, "line": lines})
    return JsonLines(table if keep.all() else table.filter(pa.array(keep)), undecodable, numbers[records])


def stage_alpaca(con: duckdb.DuckDBPyConnection, lines: pa.Table, source: SourceConfig, origin: str,
                 first_row_id: int) -> list[tuple[int, str]]:
    """Insert the flat Alpaca records of `lines` into table `staged`; return the (line, text) pairs left over."""
    paths = ["$." + '"' + source.columns.get(f, f).replace('"', '\\"') + '"' for f in FIELDS]
    con.register("lines", lines)
    try:
        con.execute(FAST_SQL, {
            "paths": paths, "keys": [source.columns.get(f, f) for f in FIELDS], "no_input": sorted(NO_INPUT),
            "ws": WHITESPACE, "first_row_id": first_row_id, "label": source.label, "origin": origin,
            "pinned": None if source.split == "auto" else source.split, "weight": source.weight,
            "cap": source.max_rows})
        return con.execute(LEFTOVER_SQL, {"first_row_id": first_row_id}).fetchall()
    finally:
        con.unregister("lines")
