"""Ingest: read the configured sources (JSONL/JSON/CSV/Parquet) into one DuckDB table of conversations.

Record formats, detected per record from its columns: chat `messages`, ShareGPT `conversations`, `prompt` +
`completion` (strings or chat lists), Alpaca `instruction`/`input`/`output` (+ `history`), and plain `text`.

Every record read becomes a row of `raw`, including records that are malformed or miss a field: those carry a
`problem_rule` and are quarantined by the clean step, so raw = clean + quarantine always holds.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from prefect import get_run_logger
from tqdm.auto import tqdm

from tasks.common import fingerprint_path, stage_task
from tasks.config import DataConfig, SourceConfig
from tasks.errors import InputError
from tasks import synth
from tasks.synth import write_orders

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string()), ("reasoning", pa.string())])
RAW_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("source", pa.string()), ("source_file", pa.string()), ("line_number", pa.int64()),
    ("pinned_split", pa.string()), ("source_weight", pa.float64()), ("source_cap", pa.int64()), ("system", pa.string()), ("messages", pa.list_(MESSAGE)), ("tools", pa.string()),
    ("problem_rule", pa.string()), ("problem", pa.string()), ("record", pa.string()),
])
# Required fields per format, in auto-detection priority order.
FORMAT_FIELDS = {
    "messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"), "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool"}
THINK = re.compile(r"\s*<think>(.*?)</think>\s*(.*)", re.DOTALL)
NO_INPUT = frozenset({"", "n/a", "none", "not applicable", "<noinput>", "no input"})  # Alpaca `input` placeholders


class RecordProblem(Exception):
    """A record that cannot become a conversation; `rule` names the quarantine rule."""

    def __init__(self, rule: str, field: str, message: str):
        super().__init__(message)
        self.rule, self.field = rule, field


def iter_records(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line or row number, parsed record or the JSONDecodeError) for each record of a supported file."""
    suffix = path.suffix.lower()
    if suffix in (".csv", ".parquet"):
        reader = "read_csv" if suffix == ".csv" else "read_parquet"
        with duckdb.connect() as con:
            rows = con.sql(f"SELECT * FROM {reader}($p)", params={"p": str(path)}).fetchall()  # reader is a constant
            cols = con.sql(f"DESCRIBE SELECT * FROM {reader}($p)", params={"p": str(path)}).fetchall()
        names = [c[0] for c in cols]
        offset = 2 if suffix == ".csv" else 1  # CSV line 1 is the header
        for i, row in enumerate(rows):
            yield i + offset, dict(zip(names, row))
        return
    if suffix not in (".jsonl", ".json"):
        raise InputError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .json, .csv or .parquet")
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
        yield from enumerate(records, start=1)  # numbered by position in the array
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, e


def detect_format(keys: set[str], source: SourceConfig, path: str, previous: str | None = None) -> str:
    """Return a record's format from its (mapped) column names; else the file's format so far; else raise."""
    if source.format != "auto":
        return source.format
    for fmt, needed in FORMAT_FIELDS.items():
        if keys.issuperset(needed):
            return fmt
    for fmt, needed in FORMAT_FIELDS.items():
        if needed[0] in keys:
            return fmt  # e.g. an Alpaca row without `output`: quarantined as missing_field
    if previous:
        return previous  # e.g. an Alpaca row whose instruction is missing: quarantined as missing_field
    hints = "; ".join(f"{fmt} needs columns {', '.join(f)}" for fmt, f in FORMAT_FIELDS.items())
    raise InputError(
        f"{path}: cannot tell the record format from columns {sorted(keys)}: {hints}. "
        f"Map yours in the source config, e.g. columns: {{instruction: question, output: answer}}"
    )


def text_of(value: Any, field: str) -> str | None:
    """Return a turn's text: a string, or the text parts of a typed content list; None when absent."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(p.get("text", "") for p in value if isinstance(p, dict) and p.get("type", "text") == "text")
    raise RecordProblem("malformed", field, f"field '{field}': expected text, got {type(value).__name__}")


def chat_turns(value: Any, field: str) -> list[dict]:
    """Return the turns of a chat list of {role, content} objects (none when absent); raise when it is not one."""
    if value is None:
        return []  # missing: marked missing_field by the caller
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RecordProblem("malformed", field, f"field '{field}': expected a list of {{role, content}} objects")
    return [{"role": str(m.get("role")), "content": text_of(m.get("content"), "content"),
             "reasoning": text_of(m.get("reasoning_content", m.get("reasoning")), "reasoning")} for m in value]


def split_system(system: str | None, turns: list[dict]) -> tuple[str | None, list[dict]]:
    """Move a leading system turn into the system prompt (it wins over a top-level `system`)."""
    if turns and turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return system, turns


def sharegpt_turns(value: Any) -> list[dict]:
    """Return the turns of a ShareGPT `conversations` list of {from, value} objects with roles mapped."""
    if value is None:
        return []  # missing: marked missing_field by the caller
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RecordProblem("malformed", "conversations",
                            "field 'conversations': expected a list of {from, value} objects")
    turns = []
    for m in value:
        role = SHAREGPT_ROLES.get(str(m.get("from")))
        if role is None:
            raise RecordProblem("malformed", "conversations", f"field 'conversations': unknown role {m.get('from')!r} "
                                f"(expected {', '.join(SHAREGPT_ROLES)})")
        turns.append({"role": role, "content": text_of(m.get("value"), "conversations")})
    return turns


def prompt_completion_turns(prompt: Any, completion: Any) -> list[dict]:
    """Return user + assistant turns for string prompt/completion, or both chat lists concatenated."""
    if isinstance(prompt, list) or isinstance(completion, list):
        if not all(v is None or isinstance(v, list) for v in (prompt, completion)):
            raise RecordProblem("malformed", "completion" if isinstance(prompt, list) else "prompt",
                                "fields 'prompt' and 'completion': expected both strings or both chat lists")
        return [*chat_turns(prompt, "prompt"), *chat_turns(completion, "completion")]
    return [{"role": "user", "content": text_of(prompt, "prompt")},
            {"role": "assistant", "content": text_of(completion, "completion")}]


def alpaca_turns(record: dict) -> list[dict]:
    """Return the `history` pairs as turns, then the instruction (+ a non-placeholder input) and the output."""
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise RecordProblem("malformed", "history", "field 'history': expected a list of [instruction, response] pairs")
    turns = [{"role": role, "content": text_of(text, "history")}
             for pair in history for role, text in zip(("user", "assistant"), pair)]
    prompt = text_of(record.get("instruction"), "instruction")
    extra = text_of(record.get("input"), "input")
    if prompt is not None and extra and extra.strip().lower() not in NO_INPUT:
        prompt = f"{prompt}\n\n{extra}"
    return [*turns, {"role": "user", "content": prompt},
            {"role": "assistant", "content": text_of(record.get("output"), "output")}]


def to_conversation(record: dict, fmt: str) -> tuple[str | None, list[dict]]:
    """Return (system, messages) for one record; a missing required field leaves its content None.

    Plain `text` becomes a single assistant turn, so the whole text is supervised (language modelling on it).
    """
    system = text_of(record.get("system"), "system")
    if fmt == "alpaca":
        turns = alpaca_turns(record)
    elif fmt == "text":
        turns = [{"role": "assistant", "content": text_of(record.get("text"), "text")}]
    elif fmt == "sharegpt":
        system, turns = split_system(system, sharegpt_turns(record.get("conversations")))
    elif fmt == "prompt_completion":
        system, turns = split_system(system, prompt_completion_turns(record.get("prompt"), record.get("completion")))
    else:
        system, turns = split_system(system, chat_turns(record.get("messages"), "messages"))
    return system, split_reasoning(turns, text_of(record.get("reasoning"), "reasoning"))


def split_reasoning(turns: list[dict], record_reasoning: str | None) -> list[dict]:
    """Move thinking traces (a leading <think>…</think> or a `reasoning` field) of assistant turns to `reasoning`."""
    for turn in turns:
        turn.setdefault("reasoning", None)
        match = THINK.match(turn["content"] or "") if turn["role"] == "assistant" else None
        if match:
            turn["reasoning"], turn["content"] = match.group(1).strip(), match.group(2)
    last = next((t for t in reversed(turns) if t["role"] == "assistant"), None)
    if record_reasoning and last is not None and not last["reasoning"]:
        last["reasoning"] = record_reasoning  # a record-level trace belongs to the final answer
    return turns


def missing_fields(record: dict, fmt: str) -> list[str]:
    """Return the required fields of `fmt` that are absent or null in `record`."""
    return [f for f in FORMAT_FIELDS[fmt] if record.get(f) is None]


def read_records(origin: str, records: Iterable[tuple[int, Any]], source: SourceConfig,
                 on_bad_rows: str) -> Iterator[dict]:
    """Yield canonical rows (without row_id) for every (line, record) of one file or dataset named `origin`."""
    fmt = None
    renames = {column: canonical for canonical, column in source.columns.items()}
    for line, record in tqdm(records, desc=f"ingest {Path(origin).name}", unit=" rows", disable=None, leave=False):
        base = {"source": source.label, "source_file": origin, "line_number": line, "system": None,
                "messages": None, "tools": None, "problem_rule": None, "problem": None,
                "pinned_split": None if source.split == "auto" else source.split,
                "source_weight": source.weight, "source_cap": source.max_rows}
        try:
            if isinstance(record, json.JSONDecodeError):
                raise RecordProblem("malformed", "", f"invalid JSON: {record.msg} (column {record.colno})")
            if not isinstance(record, dict):
                raise RecordProblem("malformed", "", f"expected a JSON object, got {type(record).__name__}")
            record = {renames.get(k, k): v for k, v in record.items()}
            fmt = detect_format(set(record), source, origin, fmt)
            base["system"], base["messages"] = to_conversation(record, fmt)
            if record.get("tools") is not None:
                base["tools"] = json.dumps(record["tools"], ensure_ascii=False)
            if missing := missing_fields(record, fmt):
                base["problem_rule"], base["problem"] = "missing_field", f"missing field '{missing[0]}'"
        except RecordProblem as p:
            if on_bad_rows == "fail":
                raise InputError(f"{origin}:{line}: {p} (set data.on_bad_rows=quarantine to keep going)") from None
            base["problem_rule"], base["problem"] = p.rule, str(p)
        # The original record, kept verbatim for the quarantine (for a JSON error, the line as it stands).
        base["record"] = record.doc if isinstance(record, json.JSONDecodeError) else json.dumps(
            record, ensure_ascii=False, default=str)
        yield base


def hf_records(source: SourceConfig) -> Iterable[tuple[int, dict]]:
    """Return (row number, record) pairs of a `datasets.load_dataset` source (Hub id or local path)."""
    from datasets import load_dataset

    try:
        dataset = load_dataset(source.hf_dataset, source.hf_config, split=source.hf_split)
    except Exception as e:  # the library raises many types (not found, offline, bad split): all mean a bad source
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


def ingest_rows(cfg: DataConfig, sources_dir: Path, out_db: Path) -> dict[str, int]:
    """Write every record of every source into table `raw` of a fresh DuckDB file; return rows per source."""
    rows: list[dict] = []
    counts: dict[str, int] = {}
    for source in cfg.sources:
        before = len(rows)
        for origin, records in source_streams(source, sources_dir):
            rows.extend(read_records(origin, records, source, cfg.on_bad_rows))
        counts[source.label] = len(rows) - before
    for i, row in enumerate(rows):
        row["row_id"] = i
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    out_db.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_db.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    with duckdb.connect(str(tmp)) as con:
        con.register("incoming", table)
        con.execute("CREATE TABLE raw AS SELECT * FROM incoming ORDER BY row_id")
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
    get_run_logger().info("ingest read %d rows (%s) -> %s", sum(counts.values()), counts, out_db)
    return out_db
