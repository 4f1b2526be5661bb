"""Format: render each clean conversation with its chat template and tokenize it with loss masks.

The template is the model's own unless chat.template names one of sftflow's (tasks/formatting/templates.py) or
chat.chat_template gives a file. Each conversation is cut into pieces tokenized one by one (tasks/formatting/masks.py),
so every answer's inference prompt is a token prefix of its training ids by construction, for any template, with or
without `{% generation %}` markers: chat.mask picks every assistant turn, the last one, everything after the last
answer's prompt, or the whole sequence; the end-of-turn token after a supervised turn is always supervised, and a
turn whose loss weight is 0 is rendered but not supervised. Held-out rows keep their prompt's length
(prompt_tokens), which evaluate generates from. Conversations over chat.max_length tokens are dropped to the run's
quarantine as too_many_tokens, or truncated (chat.too_long); more than chat.max_drop_share dropped stops the run.
The inference form of the template is saved as chat_template.jinja, for the adapter's tokenizer and for evaluation.
"""

from __future__ import annotations

import gc
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.artifacts import publish_table
from tasks.core.common import stage_logger
from tasks.core.config import ChatConfig
from tasks.core.errors import ConfigError, DataValidationError
from tasks.core.stage import stage_task
from tasks.formatting.encoding import TEXT_ROLE, ChatEncoder, Encoded, Rows, encode_all, is_checked
from tasks.formatting.fast_tokenizer import fast_tokenizer
from tasks.formatting.masks import marked_text
from tasks.formatting.templates import TEMPLATES, ChatRenderer, inference_template, resolve_template, special_tokens
from tasks.model.tokenizer import TEMPLATE_FILE, load_tokenizer

# Inference template -> training variant with generation markers (the reference the prefix masks are tested against).
KNOWN_TRAINING_TEMPLATES = {"smollm2.jinja": "smollm2_training.jinja"}
FORMATTED_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("source", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("assistant_masks", pa.list_(pa.int8())), ("n_tokens", pa.int32()), ("n_supervised", pa.int32()),
    ("truncated", pa.bool_()), ("last_eot_supervised", pa.bool_()),
    ("prompt_tokens", pa.int32()),  # the first prompt_tokens ids are the inference prompt of the row's reference
    ("prompt", pa.string()), ("reference", pa.string()),
])
ROWS_SQL = """
SELECT row_id, source, system, messages, tools,
       -- a source's weight above 1 repeats its training rows: floor(w) copies, plus one more for a hash-chosen share
       -- (below 1, clean already quarantined the rows outside its share as source_weight)
       CASE WHEN split = 'heldout' OR source_weight < 1 THEN 1 ELSE floor(source_weight)::INT + CASE WHEN
           (md5_number(content_hash) % 1000000) < (source_weight - floor(source_weight)) * 1000000 THEN 1 ELSE 0 END
       END AS copies
FROM clean WHERE split = $split ORDER BY row_id
"""
# The clean step's quarantine plus the rows format dropped for length: raw = formatted + quarantine still holds.
QUARANTINE_SQL = """
COPY (SELECT * FROM quarantine
      UNION ALL BY NAME
      SELECT c.row_id, c.source, c.source_file, c.line_number, 'too_many_tokens' AS rule, d.detail, c.system,
             c.messages, NULL::VARCHAR AS record
      FROM clean c JOIN dropped d USING (row_id)
      ORDER BY row_id) TO $p (FORMAT parquet)
"""


def training_template(tokenizer, override: Path | None = None) -> str:
    """Return a chat template with `{% generation %}` markers that renders exactly like the tokenizer's own.

    TRL's way to masks; format no longer needs it (any template works), but the tests check the masks against it.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if override is not None:
        return override.read_text(encoding="utf-8")
    template = tokenizer.chat_template
    if template and has_generation_markers(template):
        return template
    for inference, training in KNOWN_TRAINING_TEMPLATES.items():
        if template == (TEMPLATES / inference).read_text(encoding="utf-8"):
            return (TEMPLATES / training).read_text(encoding="utf-8")
    try:
        return get_training_chat_template(tokenizer) or template
    except ValueError:
        raise ConfigError(
            "the model's chat template has no {% generation %} markers and neither TRL nor sftflow knows a training "
            "variant; save a copy with the assistant content wrapped in {% generation %}…{% endgeneration %} and set "
            "chat.chat_template=<path>") from None


def chat_encoder(tokenizer, template: str, mode: str = "assistant", fast: bool = True) -> ChatEncoder:
    """Return the encoder that renders with `template` and tokenizes with `tokenizer`'s fast (Rust) tokenizer, or
    with tiktoken where `fast` and tiktoken is proved to give the same ids (tasks/formatting/fast_tokenizer.py)."""
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{type(tokenizer).__name__} is a slow tokenizer; format needs a fast one (tokenizer.json)")
    backend = tokenizer.backend_tokenizer
    if backend.truncation or backend.padding:  # left set by an earlier call: the rows must be whole and unpadded
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(backend.to_str())
        backend.no_truncation()
        backend.no_padding()
    fast_path, why = fast_tokenizer(backend) if fast else (None, "not asked for")
    if fast:
        stage_logger().info("format: tokenizing with %s", "tiktoken (proved to give the tokenizer's ids)"
                            if fast_path else f"the HF tokenizer (tiktoken not used: {why})")
    added = tuple(t.content for t in tokenizer.added_tokens_decoder.values())
    renderer = ChatRenderer(template, special_tokens(tokenizer), added_tokens=added)
    return ChatEncoder(renderer, backend, mode, fast_path, text_ends(tokenizer))


def text_ends(tokenizer) -> tuple[str | None, str | None]:
    """Return the BOS the tokenizer puts before a text (None if it puts none) and its EOS: what a plain text row
    (continued pre-training) is wrapped in."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token if tokenizer.bos_token_id is not None and ids[:1] == [tokenizer.bos_token_id] else None
    return bos, tokenizer.eos_token


def tokenize_conversation(tokenizer, template: str, messages: list[dict], max_length: int,
                          weights: list[float] | None = None, mode: str = "assistant", tools: list | None = None
                          ) -> dict:
    """Return input_ids, assistant_masks (1 = supervised) and prompt_tokens for one conversation's last part (its
    only one unless the template splits it: tasks/formatting/masks.py), truncated to max_length.

    `weights` holds each assistant turn's loss weight: a weight-0 turn is rendered but not supervised.
    """
    weights = weights or [1.0] * sum(m["role"] == "assistant" for m in messages)
    enc = chat_encoder(tokenizer, template, mode, fast=False).encode([messages], [weights], [tools])
    return encoded_row(enc.ids[-1], enc.masks[-1], enc.last_token[-1], max_length) | {
        "prompt_tokens": enc.prompt_tokens[-1], "parts": len(enc.ids)}


def encoded_row(ids: np.ndarray, mask: np.ndarray, last_token: int, max_length: int) -> dict:
    """Return one row's columns, cut to max_length tokens."""
    kept_mask = mask[:max_length]
    return {"input_ids": ids[:max_length].tolist(), "assistant_masks": kept_mask.tolist(),
            "n_tokens": min(len(ids), max_length), "n_supervised": int(kept_mask.sum()),
            "truncated": len(ids) > max_length,
            # the model learns to stop only if the final supervised turn keeps its end-of-turn token
            "last_eot_supervised": 0 <= last_token < max_length}


@dataclass
class SplitRows:
    """One split's clean rows, in row_id order, as the format step needs them."""

    row_ids: list[int]
    sources: list[str]
    copies: np.ndarray  # how many times each row is trained on (its source's weight)
    convos: Sequence[list[dict]]  # what to render (`conversations_of`)
    weights: Sequence[list[float]]  # each assistant turn's loss weight, in order
    refs: Sequence[int]  # the index in its conversation of each row's reference: the last supervised answer
    tools: Sequence[list | None]  # each row's tool definitions


def read_split(con: duckdb.DuckDBPyConnection, split: str) -> pa.Table:
    """Return one split's clean rows (ROWS_SQL) as an Arrow table."""
    return con.sql(ROWS_SQL, params={"split": split}).to_arrow_table()


def split_rows(table: pa.Table, keep_reasoning: bool = False) -> SplitRows:
    """Return the rows of a `read_split` table (see `conversations_of` for what each conversation becomes), built
    from Arrow's flat columns rather than a Python dict per message from DuckDB. The conversations, weights and
    reference indices are made a block of rows at a time when first asked for (`Conversations`), so encoding
    starts on the first block."""
    conversations = Conversations(table, keep_reasoning)
    tools = [json.loads(t) if t else None for t in table.column("tools").to_pylist()]
    return SplitRows(table.column("row_id").to_pylist(), table.column("source").to_pylist(),
                     table.column("copies").to_numpy(), *(conversations.column(k) for k in range(3)), tools)


class Conversations:
    """A split's conversations, answer weights and reference indices, converted from Arrow BLOCK rows at a time
    when first asked for: the tokenizer threads get the first rows while the rest wait their turn."""

    BLOCK = 1000

    def __init__(self, table: pa.Table, keep_reasoning: bool):
        self.table, self.keep_reasoning, self.blocks = table, keep_reasoning, {}

    def block(self, b: int) -> tuple[list[list[dict]], list[list[float]], list[int]]:
        """Return the (conversations, weights, reference indices) of rows b*BLOCK…"""
        if b not in self.blocks:
            self.blocks[b] = conversations_of(self.table.slice(b * self.BLOCK, self.BLOCK), self.keep_reasoning)
        return self.blocks[b]

    def column(self, k: int) -> BlockColumn:
        """Return the conversations (0), weights (1) or reference indices (2) as a sequence."""
        return BlockColumn(self, k)


class BlockColumn(Sequence):
    """One of Conversations' three lists, read through its blocks."""

    def __init__(self, conversations: Conversations, k: int):
        self.conversations, self.k = conversations, k

    def __len__(self) -> int:
        return self.conversations.table.num_rows

    def __getitem__(self, i):
        size = self.conversations.BLOCK
        if isinstance(i, slice):
            start, stop, step = i.indices(len(self))
            if step != 1:
                return [self[j] for j in range(start, stop, step)]
            out = []
            for b in range(start // size, (stop - 1) // size + 1 if stop > start else start // size):
                out += self.conversations.block(b)[self.k][max(start - b * size, 0):stop - b * size]
            return out
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self.conversations.block(i // size)[self.k][i % size]


def conversations_of(table: pa.Table, keep_reasoning: bool) -> tuple[list[list[dict]], list[list[float]], list[int]]:
    """Return, for rows with `system` and `messages` columns: each conversation as canonical turns (the system turn
    if any, then role/content turns, with `reasoning` where a thinking trace is kept and `tool_calls` where the
    assistant calls tools; tasks/formatting/templates.py turns them into the template's own messages), each one's
    assistant turns' loss weights (1 where none is given), and the index in it of its reference: the last assistant turn
    whose weight is not 0 (for a plain text row, its one turn)."""
    messages = table.column("messages").combine_chunks()
    offsets = messages.offsets.to_numpy()
    fields = dict(zip([f.name for f in messages.type.value_type], messages.flatten().flatten()))
    roles, contents = fields["role"].to_pylist(), fields["content"].to_pylist()
    weights_of = fields["weight"].to_pylist() if "weight" in fields else [None] * len(roles)
    reasoning = fields["reasoning"].to_pylist() if keep_reasoning and "reasoning" in fields else None
    calls = fields["tool_calls"].to_pylist() if "tool_calls" in fields else None
    convos, weights, refs = [], [], []
    base = int(offsets[0]) if len(offsets) else 0
    for system, a, b in zip(table.column("system").to_pylist(), (offsets[:-1] - base).tolist(),
                            (offsets[1:] - base).tolist()):
        convo = [{"role": "system", "content": system}] if system else []
        head, w, ref = len(convo) - a, [], -1
        for k in range(a, b):
            role = roles[k]
            turn = {"role": role, "content": contents[k] or ""}
            if reasoning is not None and reasoning[k]:
                turn["reasoning"] = reasoning[k]
            if calls is not None and calls[k]:
                turn["tool_calls"] = json.loads(calls[k])
            convo.append(turn)
            if role == "assistant":
                weight = weights_of[k]
                w.append(1.0 if weight is None else weight)
                if weight != 0:
                    ref = head + k
            elif role == TEXT_ROLE:
                ref = head + k
        convos.append(convo)
        weights.append(w)
        refs.append(ref)
    return convos, weights, refs


def format_split(rows: SplitRows, split: str, encoder: ChatEncoder, cfg: ChatConfig, path: Path
                 ) -> tuple[pa.Table, list[tuple[int, str]], Encoded]:
    """Write the tokenized rows of one split (prompt and reference answer kept for evaluation) to `path` as they
    encode; return their length columns (`SplitWriter.close`), the (row_id, detail) of the rows dropped for length,
    and the encoding's findings (fallbacks taken, which tokenizer).

    The reference is the last supervised assistant turn; the prompt is everything before it. Each held-out prompt's
    tokens are its row's first `prompt_tokens` ids by construction (tasks/formatting/masks.py); sampled held-out rows
    are checked against `ChatEncoder.encode_prompt` all the same, as an internal invariant.
    """
    writer = SplitWriter(path, rows, cfg, with_prompts=split == "heldout", encoder=encoder)
    try:
        enc = encode_all(encoder, rows.convos, rows.weights, rows.tools, num_proc=cfg.num_proc, sink=writer)
        lengths, dropped = writer.close()
        enc.extra_parts = writer.extra_parts
        return lengths, dropped, enc
    finally:
        writer.abort()


class SplitWriter:
    """Takes a split's encoded rows in order (an encode_all sink) and, on a thread of its own, applies the length rule
    and the source weights' copies, adds each row's prompt and reference and writes the Parquet file (pyarrow releases
    the GIL), so the file is made while later rows encode. The file appears, whole, at `close`."""

    ROWS_PER_GROUP = 10_000  # rows per Parquet row group (one write)

    def __init__(self, path: Path, rows: SplitRows, cfg: ChatConfig, with_prompts: bool,
                 encoder: ChatEncoder | None = None):
        self.path, self.rows, self.cfg, self.with_prompts, self.encoder = path, rows, cfg, with_prompts, encoder
        self.tmp = path.with_name(path.name + ".tmp")
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="sftflow-parquet")
        self.writer, self.writes = None, []
        self.restart()

    def restart(self) -> None:
        """Forget every row taken and the file so far."""
        self.wait(raise_errors=False)
        self.pending, self.lengths, self.dropped, self.extra_parts = [], [], [], 0
        self.tmp.unlink(missing_ok=True)

    def add(self, part: Encoded, start: int) -> None:
        """Take the encoded rows start… of the split: their Parquet rows are made (`take`) and written on the
        writing thread, in order, so the encoding thread goes on planning meanwhile (it would otherwise spend there
        the time it waits for the tokenizer threads)."""
        self.writes.append(self.thread.submit(self.take, part, start))

    def take(self, part: Encoded, start: int) -> None:
        """Make the Parquet rows of the encoded rows start… and write a row group when enough are pending (on the
        writing thread)."""
        table, lengths = self.table_of(part, start)
        self.pending.append(table)
        self.lengths.append(lengths)
        if sum(t.num_rows for t in self.pending) >= self.ROWS_PER_GROUP:
            self.write_pending()

    def table_of(self, part: Encoded, start: int) -> tuple[pa.Table, pa.Table]:
        """Return the Parquet rows of the encoded rows start… (one per part, repeated by its source's weight) and
        their length columns; record the rows dropped (a row is dropped whole when any of its parts is too long)."""
        rows, max_length = self.rows, self.cfg.max_length
        ids, masks = flat_rows(part.ids), flat_rows(part.masks)
        n_all = np.diff(ids.bounds)
        row_of = np.asarray(part.row_of, dtype=np.int64)
        longest = np.zeros(int(row_of.max()) + 1 if len(row_of) else 0, dtype=np.int64)
        np.maximum.at(longest, row_of, n_all)
        drop = (longest > max_length) & (self.cfg.too_long == "drop")
        self.dropped += [(rows.row_ids[start + r], f"{longest[r]} tokens > chat.max_length={max_length}")
                         for r in np.flatnonzero(drop).tolist()]
        kept = np.flatnonzero(~drop[row_of])
        take = np.repeat(kept, rows.copies[start + row_of[kept]])  # a source's weight repeats rows
        id_values, offsets = take_rows(ids, take, max_length)
        mask_values, _ = take_rows(masks, take, max_length)
        supervised = np.zeros(len(mask_values) + 1, dtype=np.int64)
        np.cumsum(mask_values, out=supervised[1:])
        last = np.asarray(part.last_token, dtype=np.int64).reshape(-1)[take]
        prompt_tokens = np.asarray(part.prompt_tokens, dtype=np.int64).reshape(-1)[take]
        # a row's last part holds its reference answer, and (held-out rows) the prompt evaluate generates from
        is_last = np.append(row_of[1:] != row_of[:-1], True) if len(row_of) else np.zeros(0, dtype=bool)
        self.extra_parts += int((~is_last[kept]).sum())
        prompts = {k: self.prompt_of(part, k, start) if is_last[k] else (None, None) for k in kept.tolist()}
        take_rows_of = row_of[take].tolist()
        take = take.tolist()
        lengths = pa.table({
            "row_id": pa.array([rows.row_ids[start + r] for r in take_rows_of], pa.int64()),
            "source": pa.array([rows.sources[start + r] for r in take_rows_of], pa.string()),
            "n_tokens": np.diff(offsets).astype(np.int32),
            "n_supervised": (supervised[offsets[1:]] - supervised[offsets[:-1]]).astype(np.int32),
            "truncated": n_all[take] > max_length})
        offsets = pa.array(offsets.astype(np.int32))
        return pa.table({
            **{name: lengths.column(name) for name in ("row_id", "source")},
            "input_ids": pa.ListArray.from_arrays(offsets, pa.array(id_values, pa.int32())),
            "assistant_masks": pa.ListArray.from_arrays(offsets, pa.array(mask_values, pa.int8())),
            **{name: lengths.column(name) for name in ("n_tokens", "n_supervised", "truncated")},
            # the model learns to stop only if the final supervised turn keeps its end-of-turn token
            "last_eot_supervised": (last >= 0) & (last < max_length),
            "prompt_tokens": np.minimum(prompt_tokens, max_length).astype(np.int32),
            "prompt": pa.array([prompts[k][0] for k in take], pa.string()),
            "reference": pa.array([prompts[k][1] for k in take], pa.string()),
        }, schema=FORMATTED_SCHEMA), lengths

    def prompt_of(self, part: Encoded, k: int, start: int) -> tuple[str | None, str]:
        """Return the prompt (JSON; held-out rows only) and reference of the row whose last part is part k; for a
        sampled held-out row, check that the prompt's own encoding is the part's first prompt_tokens ids."""
        r = start + part.row_of[k]
        convo, ref = self.rows.convos[r], self.rows.refs[r]
        if convo[ref]["role"] == TEXT_ROLE:  # plain text: nothing to prompt with
            return None, convo[ref]["content"]
        prompt, reference = prompt_at(convo, ref, self.with_prompts)
        if self.with_prompts and self.encoder is not None and is_checked(r):
            thinking = any(m.get("reasoning") for m in convo)
            ids = self.encoder.encode_prompt(convo[:ref], self.rows.tools[r], thinking)
            # an internal invariant: see tasks/formatting/masks.py
            if ids != part.ids[k][:part.prompt_tokens[k]].tolist():
                raise AssertionError(f"held-out row {self.rows.row_ids[r]}: its prompt's ids are not its training "
                                     "ids' prefix (a bug in tasks/formatting/masks.py)")
        return prompt, reference

    def write_pending(self) -> None:
        """Write the rows taken so far as one row group (on the writing thread); with none taken at all, the file
        still gets its columns."""
        if self.pending:
            table, self.pending = pa.concat_tables(self.pending), []
            self.write(table)
        elif not self.lengths and self.writer is None:
            self.write(FORMATTED_SCHEMA.empty_table())

    def write(self, table: pa.Table) -> None:
        """Append a row group to the file (on the writing thread)."""
        if self.writer is None:
            # dictionary-encoding the token lists only costs time (they hardly repeat): 1.5 s -> 1.1 s per 100k rows
            self.writer = pq.ParquetWriter(self.tmp, FORMATTED_SCHEMA, use_dictionary=["source"])
        self.writer.write_table(table)

    def wait(self, raise_errors: bool = True) -> None:
        """Wait for the writes handed over; close the file."""
        writes, self.writes = self.writes, []
        try:
            for write in writes:
                write.result() if raise_errors else write.exception()
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None

    def close(self) -> tuple[pa.Table, list[tuple[int, str]]]:
        """Finish the file; return the length columns of its rows (row_id, source, n_tokens, n_supervised,
        truncated) and the (row_id, detail) of the rows dropped for length."""
        self.writes.append(self.thread.submit(self.write_pending))  # after every row taken: the writes are in order
        self.wait()
        self.tmp.replace(self.path)
        names = ("row_id", "source", "n_tokens", "n_supervised", "truncated")
        lengths = pa.concat_tables(self.lengths) if self.lengths else FORMATTED_SCHEMA.empty_table().select(names)
        return lengths, self.dropped

    def abort(self) -> None:
        """Stop the writing thread; leave no partial file."""
        self.wait(raise_errors=False)
        self.thread.shutdown()
        self.tmp.unlink(missing_ok=True)


def prompt_at(convo: list[dict], ref: int, with_prompt: bool = True) -> tuple[str | None, str]:
    """Return the prompt before turn `ref` of `convo` (JSON; None unless `with_prompt`) and that turn's content."""
    return json.dumps(convo[:ref], ensure_ascii=False) if with_prompt else None, convo[ref]["content"]


def flat_rows(rows: list[np.ndarray] | Rows) -> Rows:
    """Return rows as one flat array with bounds."""
    if isinstance(rows, Rows):
        return rows
    bounds = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([len(r) for r in rows], out=bounds[1:])
    return Rows(np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32), bounds)


def take_rows(rows: Rows, take: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Return the values and offsets of rows `take` (in that order, repeats allowed), each cut to max_length tokens:
    one gather for all of them, none when they are every row, whole, in order."""
    starts = rows.bounds[take]
    lengths = np.minimum(rows.bounds[take + 1] - starts, max_length)
    offsets = np.zeros(len(take) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(take) == len(rows) and offsets[-1] == rows.bounds[-1] - rows.bounds[0] and (
            take == np.arange(len(rows))).all():
        return rows.values[rows.bounds[0]:rows.bounds[-1]], offsets
    return rows.values[np.arange(offsets[-1]) + np.repeat(starts - offsets[:-1], lengths)], offsets


def length_stats(table: pa.Table, dropped: int) -> dict:
    """Return token length statistics of a formatted split, with its drop (too_many_tokens) and truncation rates."""
    n = np.array(table.column("n_tokens").to_pylist() or [0])
    sup = np.array(table.column("n_supervised").to_pylist() or [0])
    sources = table.column("source").to_pylist()
    unique = len(set(table.column("row_id").to_pylist()))
    return {"rows": table.num_rows, "rows_by_source": {k: sources.count(k) for k in sorted(set(sources))},
            "tokens_mean": float(n.mean()), "tokens_p50": float(np.percentile(n, 50)),
            "tokens_p95": float(np.percentile(n, 95)), "tokens_max": int(n.max()),
            "supervised_share": float(sup.sum() / max(n.sum(), 1)), "min_supervised": int(sup.min()),
            "truncation_rate": float(np.mean(table.column("truncated").to_pylist() or [0])),
            "rows_dropped_too_long": dropped, "drop_rate": dropped / max(unique + dropped, 1)}


def write_quarantine(con: duckdb.DuckDBPyConnection, dropped: list[tuple[int, str]], out: Path) -> None:
    """Write the clean step's quarantine plus the `dropped` rows (rule too_many_tokens) to `out`, atomically."""
    con.register("dropped", pa.table({"row_id": [r for r, _ in dropped], "detail": [d for _, d in dropped]},
                                     schema=pa.schema([("row_id", pa.int64()), ("detail", pa.string())])))
    tmp = out.with_suffix(".tmp")
    con.execute(QUARANTINE_SQL, {"p": str(tmp)})
    tmp.replace(out)


def accounting(con: duckdb.DuckDBPyConnection, formatted: int, dropped: int) -> dict:
    """Return raw/formatted/quarantined counts; raise if a clean row went missing."""
    clean, quarantined = (con.execute(f"SELECT count(*) FROM {t}").fetchall()[0][0] for t in ("clean", "quarantine"))
    if clean != formatted + dropped:  # an internal invariant: every clean row is formatted or dropped
        raise AssertionError(f"row accounting broken: clean {clean} != formatted {formatted} + dropped {dropped}")
    return {"rows_raw": clean + quarantined, "rows_formatted": formatted, "rows_quarantined": quarantined + dropped,
            "dropped_by_rule": {"too_many_tokens": dropped} if dropped else {}}


# one line each when a run takes a template fallback (tasks/formatting/templates.py), with its row count
FALLBACK_NOTES = {
    "inline-reasoning": "the chat template has no field for thinking traces (reasoning_content, thinking): {n} rows "
                        "keep theirs inline as <think>…</think> before the answer",
    "tool-calls-as-text": "the chat template does not render an assistant's tool_calls: {n} rows have the calls as "
                          "JSON text in the answer",
    "tool-results-as-user": "the chat template does not render tool turns: {n} rows show tool results as user turns",
    "tools-in-system": "the chat template does not render tool definitions (tools): {n} rows list them as JSON in "
                       "the system turn",
}


def template_notes(encoder: ChatEncoder, fallbacks: dict, unthinking_rows: int) -> list[str]:
    """Return one line per template fallback the run took, and one when rows without a trace meet a template that
    always opens a thinking block and has no switch to say otherwise."""
    notes = [FALLBACK_NOTES[k].format(n=n) for k, n in sorted(fallbacks.items())]
    features = encoder.renderer.features
    if unthinking_rows and features.opens_thinking and not features.thinking_switch:
        notes.append(f"the chat template opens <think> in its generation prompt and has no thinking switch "
                     f"(enable_thinking): {unthinking_rows} rows without a trace train with an empty "
                     "<think></think> block")
    return notes


def format_rows(clean_db: Path, model_dir: str, out_dir: Path, cfg: ChatConfig,
                out_quarantine: Path | None = None) -> dict:
    """Write train.parquet, heldout.parquet, chat_template.jinja and stats.json to `out_dir`; return the stats.

    Rows dropped for length are added to `out_quarantine` (the run's quarantine.parquet) when given. DuckDB reads
    the rows (on a thread: it releases the GIL) while the tokenizer loads. Python's cyclic garbage collector is
    paused meanwhile: the rows are millions of small acyclic objects (freed by reference counting), which it would
    otherwise scan again and again (100k GSM8K rows: 9.5 s -> 8.5 s).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    stats, dropped, formatted, fallbacks, unthinking, parts = {}, [], 0, {}, 0, 0  # parts: rows split (masks.py)
    with (gc_paused(), duckdb.connect(str(clean_db), read_only=True) as con, closing(con.cursor()) as cursor,
          ThreadPoolExecutor(1) as reader):
        tables = {split: reader.submit(read_split, cursor, split) for split in ("train", "heldout")}
        tokenizer = load_tokenizer(model_dir)
        template = resolve_template(tokenizer, cfg)
        encoder = chat_encoder(tokenizer, template, cfg.mask)
        for split in ("train", "heldout"):
            rows = split_rows(tables[split].result(), cfg.keep_reasoning)
            lengths, split_dropped, enc = format_split(rows, split, encoder, cfg, out_dir / f"{split}.parquet")
            stats[split] = length_stats(lengths, len(split_dropped))
            dropped += split_dropped
            formatted += len(set(lengths.column("row_id").to_pylist()))
            parts += enc.extra_parts
            for k, n in enc.fallbacks.items():
                fallbacks[k] = fallbacks.get(k, 0) + n
            unthinking += sum(not any(m.get("reasoning") for m in c) for c in rows.convos if c[-1]["role"] != TEXT_ROLE)
        stats["accounting"] = accounting(con, formatted, len(dropped))
        if out_quarantine is not None:
            write_quarantine(con, dropped, out_quarantine)
    stats["template"] = {"fallbacks": fallbacks, "notes": template_notes(encoder, fallbacks, unthinking),
                         "thinking_switch": encoder.renderer.features.thinking_switch,
                         "answers_in_rows_of_their_own": parts}
    for note in stats["template"]["notes"]:
        stage_logger().warning("format: %s", note)
    (out_dir / TEMPLATE_FILE).write_text(inference_template(template), encoding="utf-8")
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return stats


def check_drop_share(stats: dict, cfg: ChatConfig, clean_db: Path) -> None:
    """Raise one line when format dropped more than chat.max_drop_share of the clean rows for length."""
    acc = stats["accounting"]
    dropped = acc["dropped_by_rule"].get("too_many_tokens", 0)
    share = dropped / max(acc["rows_formatted"] + dropped, 1)
    if share > cfg.max_drop_share:
        raise DataValidationError(
            f"{clean_db}: format dropped {share:.1%} of the clean rows ({dropped} of {acc['rows_formatted'] + dropped})"
            f" as longer than chat.max_length={cfg.max_length} tokens, above chat.max_drop_share={cfg.max_drop_share}"
            f"; raise chat.max_length, set chat.too_long=truncate, or raise chat.max_drop_share (the rows are in the "
            "quarantine as too_many_tokens)")


@contextmanager
def gc_paused():
    """Pause Python's cyclic garbage collector inside the block (if it was running); it collects at the end."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@stage_task("format")
def format_chats(clean_db: Path, model_dir: str, out_dir: Path, cfg: ChatConfig,
                 out_quarantine: Path | None = None) -> Path:
    """Tokenize the clean conversations with loss masks into `out_dir` and return it."""
    stage_logger().info("format: rendering %s with the chat template and tokenizing (max_length %d) -> %s",
                        clean_db, cfg.max_length, out_dir)
    stats = format_rows(clean_db, model_dir, out_dir, cfg, out_quarantine)
    check_drop_share(stats, cfg, clean_db)
    splits = {split: stats[split] for split in ("train", "heldout")}
    empty = [split for split, s in splits.items() if s["rows"] == 0]
    if empty:
        longer = " or raise chat.max_length" if stats["accounting"]["dropped_by_rule"] else ""
        raise DataValidationError(f"{clean_db}: the {' and '.join(empty)} split is empty; add rows or change "
                                  f"clean.heldout_fraction{longer}")
    rows = [{"split": split, **{k: round(v, 4) if isinstance(v, float) else v for k, v in st.items()
                                if k != "rows_by_source"}} for split, st in splits.items()]
    train = splits["train"]
    publish_table("token-length-stats", rows, (
        f"Tokens per row: train {train['rows']} rows, mean {train['tokens_mean']:.0f}, p95 {train['tokens_p95']:.0f}, "
        f"max {train['tokens_max']} of chat.max_length {cfg.max_length}; {train['supervised_share']:.0%} of tokens "
        f"supervised; truncated {train['truncation_rate']:.1%}, dropped as too long {train['drop_rate']:.1%}"))
    stage_logger().info("format: %s -> %s", json.dumps(stats), out_dir)
    return out_dir


def inspect_rows(formatted_dir: Path, model_dir: str, n: int, colour: bool = False) -> str:
    """Return the first `n` formatted training rows as text with the supervised tokens marked, with counts."""
    tokenizer = load_tokenizer(model_dir)
    rows = pq.read_table(formatted_dir / "train.parquet").slice(0, n).to_pylist()
    out = []
    for r in rows:
        out.append(f"--- row {r['row_id']} ({r['source']}): {r['n_tokens']} tokens, {r['n_supervised']} supervised"
                   f"{', truncated' if r['truncated'] else ''}")
        out.append(marked_text(tokenizer, r["input_ids"], r["assistant_masks"], colour))
    return "\n".join(out)
