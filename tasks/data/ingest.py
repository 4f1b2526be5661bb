"""Ingest: read the configured sources (JSONL/JSON/CSV/Parquet) into one DuckDB table of conversations.

Record formats, detected per record from its columns: chat `messages`, ShareGPT `conversations`, `prompt` +
`completion` (strings or chat lists), Alpaca `instruction`/`input`/`output` (+ `history`), and plain `text`; the
chosen side of preference pairs with `format: chosen` (tasks/data/formats.py).

Every record read becomes a row of `raw`, including records that are malformed or miss a field: those carry a
`problem_rule` and are quarantined by the clean step, so raw = clean + quarantine always holds; so are the rows a
KTO flag marks undesirable (`undesirable`, with their turns).
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import orjson
import pyarrow as pa
from tqdm.auto import tqdm

from tasks.core.common import COMPRESSION_SQL, fingerprint_path, stage_logger
from tasks.core.config import DataConfig, SourceConfig, content_hash
from tasks.core.errors import InputError
from tasks.core.stage import stage_task
from tasks.data import synth
from tasks.data.fast_ingest import fast_path_applies, json_lines, lone_surrogate_error, stage_alpaca
from tasks.data.formats import desirable, detect_format, explode_record, missing_fields, to_conversation
from tasks.data.synth import write_orders
from tasks.data.turns import RecordProblem, tools_json

# weight: a turn's loss weight, 0 or 1 (null = 1); only an assistant turn's weight matters. tool_calls: the JSON
# array of an assistant turn's calls, [{"type": "function", "function": {"name", "arguments": {...}}}], else null.
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning", pa.string()),
                     ("weight", pa.float64()), ("tool_calls", pa.string())])
KEPT_RECORD = frozenset({"malformed", "missing_field", "unsupported_part"})  # rules whose rows keep `record`
RAW_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("source", pa.string()), ("source_file", pa.string()), ("line_number", pa.int64()),
    ("pinned_split", pa.string()), ("source_weight", pa.float64()), ("source_cap", pa.int64()),
    ("system", pa.string()), ("messages", pa.list_(MESSAGE)), ("tools", pa.string()),
    ("problem_rule", pa.string()), ("problem", pa.string()), ("record", pa.string()),
])


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, parsed record or the JSONDecodeError) for each record of a supported file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        reader = "read_csv" if suffix == ".csv" else "read_parquet"
        with duckdb.connect() as con:
            try:
                cursor = con.execute(f"SELECT * FROM {reader}($p)", {"p": str(path)})  # reader is a constant
                names = [d[0] for d in cursor.description]
                rows = cursor.fetchall()
            except duckdb.Error as e:  # not a CSV / Parquet file DuckDB can read: nothing to quarantine row by row
                raise InputError(f"{path}: cannot read as {suffix[1:]}: {str(e).splitlines()[0]}") from None
        offset = 2 if suffix == ".csv" else 1  # CSV line 1 is the header
        for i, row in enumerate(rows):
            yield i + offset, dict(zip(names, row))
        return
    if suffix not in (".jsonl", ".json"):
        raise InputError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    lines = json_lines(path)
    if lines is not None:
        yield from lines.records()
        return
    try:
        records = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not valid UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    for n, record in enumerate(records, start=1):  # numbered by position in the array
        yield n, lone_surrogate_error(record) or record


def new_row(origin: str, line: int, source: SourceConfig) -> dict:
    """Return a raw row (without row_id) with its provenance and source settings, and no conversation yet."""
    return {"source": source.label, "source_file": origin, "line_number": line, "system": None,
            "messages": None, "tools": None, "problem_rule": None, "problem": None,
            "pinned_split": None if source.split == "auto" else source.split,
            "source_weight": source.weight, "source_cap": source.max_rows, "record": None}


def checked_record(record: Any, renames: dict[str, str]) -> dict:
    """Return a record as a dict with its columns renamed; raise RecordProblem if it cannot be one."""
    if isinstance(record, RecordProblem):
        raise record
    if isinstance(record, json.JSONDecodeError):
        raise RecordProblem("malformed", "", f"invalid JSON: {record.msg} (column {record.colno})")
    if not isinstance(record, dict):
        raise RecordProblem("malformed", "", f"expected a JSON object, got {type(record).__name__}")
    return {renames.get(k, k): v for k, v in record.items()}


def fill_conversation(row: dict, record: dict, fmt: str, source: SourceConfig) -> None:
    """Set a row's system, messages and tools from a (renamed) record, and mark an undesirable (KTO) row or a
    missing required field."""
    system, messages = to_conversation(record, fmt, source.roles)
    tools, (wanted, flag) = tools_json(record.get("tools")), desirable(record, fmt)
    row["system"], row["messages"], row["tools"] = system, messages, tools
    if not wanted:
        row["problem_rule"], row["problem"] = "undesirable", f"{flag} is false: an undesirable example (KTO data)"
    if missing := missing_fields(record, fmt):
        row["problem_rule"], row["problem"] = "missing_field", f"missing field '{missing[0]}'"


def record_text(record: Any) -> str:
    """Return a record as stored in the quarantine: its JSON, or for a JSON error the line as read."""
    if isinstance(record, json.JSONDecodeError):
        return record.doc
    try:
        return orjson.dumps(record, default=str).decode()
    except orjson.JSONEncodeError:  # e.g. an integer beyond 64 bits
        return json.dumps(record, default=str, ensure_ascii=False)


def read_records(origin: str, records: Iterable[tuple[int, Any]], source: SourceConfig,
                 on_bad_rows: str) -> Iterator[dict]:
    """Yield canonical rows (without row_id) for every (line, record) of one file or dataset named `origin`.

    With `explode`, a record yields one row per element of its list, all with the record's line number.
    """
    fmt, renames = None, {column: canonical for canonical, column in source.columns.items()}
    for line, record in tqdm(records, desc=f"ingest {Path(origin).name}", unit=" rows", disable=None, leave=False):
        for item in explode_record(record, source.explode):
            row = new_row(origin, line, source)
            try:
                mapped = checked_record(item, renames)
                fmt = detect_format(mapped, source, f"{origin}:{line}", fmt)
                fill_conversation(row, mapped, fmt, source)
            except RecordProblem as p:
                if on_bad_rows == "fail" and p.rule != "missing_field":  # a missing field is always quarantined
                    raise InputError(f"{origin}:{line}: {p} (set data.on_bad_rows=quarantine to keep going)") from None
                row["problem_rule"], row["problem"] = p.rule, str(p)
            # The record as read is kept for the rows that have no (complete) canonical form; every other row is
            # recoverable from its canonical turns and its file:line.
            if row["problem_rule"] in KEPT_RECORD:
                row["record"] = record_text(record if isinstance(item, RecordProblem) else item)
            yield row


def hf_records(source: SourceConfig) -> Iterable[tuple[int, dict]]:
    """Return (row number, record) pairs of a `datasets.load_dataset` source (Hub id or local path)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.hf_dataset, source.hf_config, split=source.hf_split)
    except Exception as e:  # noqa: BLE001 -- many types (not found, offline, bad split), all a bad source
        raise InputError(f"{source.hf_dataset}: datasets.load_dataset failed: {str(e).splitlines()[0]}") from None
    return enumerate(dataset, start=1)


def source_streams(source: SourceConfig, sources_dir: Path) -> Iterator[tuple[str, Iterable[tuple[int, Any]]]]:
    """Yield (origin, records) for each file or dataset of one source (writing the synthetic set first)."""
    if source.hf_dataset is not None:
        yield f"hf://{source.hf_dataset}[{source.hf_split}]", hf_records(source)
        return
    if source.synthetic is not None:
        out = sources_dir / f"{source.label}.jsonl"
        files = [write_orders(out, source.synthetic.rows, source.synthetic.seed)]
    else:
        files = sorted(Path(p) for p in glob.glob(source.path, recursive=True)) if glob.has_magic(source.path) else [
            Path(source.path)]
        missing = [f for f in files if not f.is_file()]
        if not files or missing:
            raise InputError(f"{missing[0] if missing else source.path}: source file not found")
    for path in files:
        yield str(path), iter_records(path)


# Rows are staged with their final row_id (position in source order); the hash is of the conversation as read, and
# clean re-hashes the normalised conversation to find duplicates.
RAW_SQL = f"""
CREATE TABLE raw AS
SELECT *, {content_hash("system", "messages", "tools")} AS content_hash FROM staged
"""


def stage_stream(con: duckdb.DuckDBPyConnection, source: SourceConfig, origin: str, records: Iterable[tuple[int, Any]],
                 first_row_id: int, on_bad_rows: str) -> tuple[int, bool]:
    """Insert one file's or dataset's rows into `staged` (flat Alpaca lines via DuckDB, the rest here).

    Row ids are consecutive from `first_row_id`, in the order of the records in the file or dataset. Return the
    number of rows and whether they went in out of row_id order (a file whose records took both paths).
    """
    path, lines = Path(origin), None
    if not origin.startswith("hf://") and fast_path_applies(source, path) and (lines := json_lines(path)) is not None:
        records = lines.records(stage_alpaca(con, lines.table, source, origin, first_row_id))
    rows = list(read_records(origin, records, source, on_bad_rows))
    if lines is None:  # every record went through read_records, in order
        positions, count = np.arange(len(rows)), len(rows)
    else:  # the records the fast path left over: their position among all of the file's records
        positions, count = np.searchsorted(lines.numbers, [row["line_number"] for row in rows]), len(lines.numbers)
    for row, position in zip(rows, positions.tolist()):
        row["row_id"] = first_row_id + position
    con.register("slow", pa.Table.from_pylist(rows, schema=RAW_SCHEMA))
    con.execute("INSERT INTO staged SELECT * FROM slow")
    con.unregister("slow")
    return count, lines is not None and 0 < len(rows) < count


def ingest_rows(cfg: DataConfig, sources_dir: Path, out_db: Path) -> dict[str, int]:
    """Write every record of every source into table `raw` of a fresh DuckDB file; return rows per source."""
    out_db.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_db.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    counts: dict[str, int] = {source.label: 0 for source in cfg.sources}
    reorder = False  # staged holds the rows in row_id order unless a file took both paths
    with duckdb.connect(str(tmp)) as con:
        con.execute(COMPRESSION_SQL)
        con.register("empty", RAW_SCHEMA.empty_table())
        con.execute("CREATE TEMP TABLE staged AS SELECT * FROM empty")
        for k, source in enumerate(cfg.sources, 1):
            started = time.perf_counter()
            for origin, records in source_streams(source, sources_dir):
                count, out_of_order = stage_stream(con, source, origin, records, sum(counts.values()),
                                                   cfg.on_bad_rows)
                counts[source.label] += count
                reorder |= out_of_order
            stage_logger().info("ingest: source %s (%d/%d): %d rows in %.1f s", source.label, k, len(cfg.sources),
                                counts[source.label], time.perf_counter() - started)
        con.execute(RAW_SQL + (" ORDER BY row_id" if reorder else ""))
    tmp.replace(out_db)  # atomic: a retry never sees a half-written table
    return counts


def fingerprint_data(cfg: DataConfig) -> str:
    """Return a hash of the source config and the bytes of every local source file (changed data re-runs all)."""
    h = hashlib.sha256(cfg.model_dump_json().encode())
    h.update(inspect.getsource(synth).encode())  # generator code is part of a synthetic source's identity
    for source in cfg.sources:
        if source.hf_dataset and Path(source.hf_dataset).exists():  # a local dataset; Hub ids are keyed by name
            h.update(fingerprint_path(Path(source.hf_dataset)).encode())
        if source.path:
            paths = glob.glob(source.path, recursive=True) if glob.has_magic(source.path) else [source.path]
            for p in sorted(paths):
                h.update(p.encode())
                h.update(Path(p).read_bytes() if Path(p).is_file() else b"<missing>")
    return h.hexdigest()


@stage_task("fingerprint-sources", cache=False)
def fingerprint_sources(cfg: DataConfig) -> str:
    """Return the content fingerprint of the configured sources (never cached: it is what detects new data)."""
    return fingerprint_data(cfg)


@stage_task("ingest")
def ingest(cfg: DataConfig, sources_fingerprint: str, out_sources: Path, out_db: Path) -> Path:
    """Ingest all sources into `out_db` (table `raw`) and return its path."""
    counts = ingest_rows(cfg, out_sources, out_db)
    stage_logger().info("ingest read %d rows (%s) -> %s", sum(counts.values()), counts, out_db)
    return out_db
