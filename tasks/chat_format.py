"""Format: render each clean conversation with its chat template and tokenize it with loss masks.

The template is the model's own unless chat.template names one of sftflow's (tasks/templates.py) or
chat.chat_template gives a file. Masks come from rendering prefixes (tasks/masks.py), so any template works, with
or without `{% generation %}` markers: chat.mask picks every assistant turn, the last one, the completion of
prompt–completion data, or the whole sequence; the end-of-turn token after a supervised turn is always supervised,
and a turn whose loss weight is 0 is rendered but not supervised. Every held-out prompt, rendered with the
generation prompt, must tokenize as a prefix of its training tokens. Conversations over chat.max_length tokens are
dropped to the run's quarantine as too_many_tokens, or truncated (chat.too_long). The inference form of the
template is saved as chat_template.jinja, for the adapter's tokenizer and for evaluation.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.artifacts import publish_table
from tasks.common import stage_logger, stage_task
from tasks.config import ChatConfig
from tasks.encoding import ChatEncoder, encode_all
from tasks.errors import ConfigError, DataValidationError
from tasks.fast_tokenizer import fast_tokenizer
from tasks.masks import marked_text
from tasks.templates import TEMPLATE_FILE, TEMPLATES, ChatRenderer, inference_template, resolve_template, special_tokens

__all__ = ["TEMPLATES", "TEMPLATE_FILE", "format_chats", "format_rows", "load_tokenizer", "tokenize_conversation"]
# Inference template -> training variant with generation markers (the reference the prefix masks are tested against).
KNOWN_TRAINING_TEMPLATES = {"smollm2.jinja": "smollm2_training.jinja"}
FORMATTED_SCHEMA = pa.schema([
    ("row_id", pa.int64()), ("source", pa.string()), ("input_ids", pa.list_(pa.int32())),
    ("assistant_masks", pa.list_(pa.int8())), ("n_tokens", pa.int32()), ("n_supervised", pa.int32()),
    ("truncated", pa.bool_()), ("last_eot_supervised", pa.bool_()), ("prompt", pa.string()),
    ("reference", pa.string()),
])
ROWS_SQL = """
SELECT row_id, source, system, messages,
       -- a source's weight repeats its training rows: floor(w) copies, plus one more for a hash-chosen share
       CASE WHEN split = 'heldout' THEN 1 ELSE floor(source_weight)::INT + CASE WHEN
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


def load_tokenizer(model_dir: str, formatted_dir: Path | None = None, trust_remote_code: bool = False):
    """Return the tokenizer of a local model directory or Hub id; given the format step's output directory, with
    the (inference form of the) chat template the rows were formatted with, so training and prompting agree. A
    tokenizer's own Python code runs only when `trust_remote_code` (train.trust_remote_code)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if formatted_dir is not None and (Path(formatted_dir) / TEMPLATE_FILE).is_file():
        tokenizer.chat_template = (Path(formatted_dir) / TEMPLATE_FILE).read_text(encoding="utf-8")
    return tokenizer


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


def conversation(system: str | None, messages: list[dict], keep_reasoning: bool = False) -> list[dict]:
    """Return the message list to render: the system turn (if any), then the turns, thinking traces inline if kept."""
    def content(m: dict) -> str:
        if keep_reasoning and m.get("reasoning"):
            return f"<think>\n{m['reasoning']}\n</think>\n\n{m['content']}"
        return m["content"]

    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": m["role"], "content": content(m)} for m in messages]


def assistant_weights(messages: list[dict]) -> list[float]:
    """Return the loss weight of each assistant turn, in order (a turn without one weighs 1)."""
    return [1.0 if m.get("weight") is None else m["weight"] for m in messages if m["role"] == "assistant"]


def chat_encoder(tokenizer, template: str, mode: str = "assistant", fast: bool = True) -> ChatEncoder:
    """Return the encoder that renders with `template` and tokenizes with `tokenizer`'s fast (Rust) tokenizer, or
    with tiktoken where `fast` and tiktoken is proved to give the same ids (tasks/fast_tokenizer.py)."""
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
    return ChatEncoder(ChatRenderer(template, special_tokens(tokenizer)), backend, mode, fast_path)


def tokenize_conversation(tokenizer, template: str, messages: list[dict], max_length: int,
                          weights: list[float] | None = None, mode: str = "assistant") -> dict:
    """Return input_ids and assistant_masks (1 = supervised) for one conversation, truncated to max_length.

    `weights` holds each assistant turn's loss weight: a weight-0 turn is rendered but not supervised.
    """
    weights = weights or [1.0] * sum(m["role"] == "assistant" for m in messages)
    enc = chat_encoder(tokenizer, template, mode, fast=False).encode([messages], [weights])
    return encoded_row(enc.ids[0], enc.masks[0], enc.last_token[0], max_length)


def encoded_row(ids: np.ndarray, mask: np.ndarray, last_token: int, max_length: int) -> dict:
    """Return one row's columns, cut to max_length tokens."""
    kept_mask = mask[:max_length]
    return {"input_ids": ids[:max_length].tolist(), "assistant_masks": kept_mask.tolist(),
            "n_tokens": min(len(ids), max_length), "n_supervised": int(kept_mask.sum()),
            "truncated": len(ids) > max_length,
            # the model learns to stop only if the final supervised turn keeps its end-of-turn token
            "last_eot_supervised": 0 <= last_token < max_length}


def format_split(con: duckdb.DuckDBPyConnection, split: str, encoder: ChatEncoder, cfg: ChatConfig
                 ) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Return the tokenized rows of one split (prompt and reference answer kept for evaluation) and the
    (row_id, detail) of the rows dropped for length. Held-out prompts are checked to round-trip.

    The reference is the last supervised assistant turn; the prompt is everything before it.
    """
    selected = con.execute(ROWS_SQL, {"split": split}).fetchall()
    convos = [conversation(system, messages, cfg.keep_reasoning) for _, _, system, messages, _ in selected]
    weights = [assistant_weights(messages) for _, _, _, messages, _ in selected]
    enc = encode_all(encoder, convos, weights, check_prompts=split == "heldout", num_proc=cfg.num_proc)
    if enc.prompt_failures:
        i, why = enc.prompt_failures[0]
        raise DataValidationError(
            f"held-out row {selected[i][0]} (and {len(enc.prompt_failures) - 1} more): its prompt rendered with the "
            f"generation prompt does not tokenize as a prefix of its training tokens ({why}), so the model would be "
            "asked in another format than it was trained on; use another template (chat.template or "
            "chat.chat_template)")
    too_long = [len(ids) > cfg.max_length for ids in enc.ids]
    dropped = [(row[0], f"{len(ids)} tokens > chat.max_length={cfg.max_length}")
               for row, ids, long in zip(selected, enc.ids, too_long) if long and cfg.too_long == "drop"]
    kept = [k for k, long in enumerate(too_long) if not (long and cfg.too_long == "drop")]
    rows = [k for k in kept for _ in range(selected[k][4])]  # a source's weight repeats rows
    # the prompt (JSON) is what evaluate generates from: held-out rows only; every row keeps its reference answer
    prompts = {k: prompt_and_reference(convos[k], selected[k][3], split == "heldout") for k in kept}
    ids, masks = [enc.ids[k][:cfg.max_length] for k in rows], [enc.masks[k][:cfg.max_length] for k in rows]
    return pa.table({
        "row_id": [selected[k][0] for k in rows], "source": [selected[k][1] for k in rows],
        "input_ids": list_array(ids, pa.int32()), "assistant_masks": list_array(masks, pa.int8()),
        "n_tokens": [len(x) for x in ids], "n_supervised": [int(m.sum()) for m in masks],
        "truncated": [too_long[k] for k in rows],
        # the model learns to stop only if the final supervised turn keeps its end-of-turn token
        "last_eot_supervised": [0 <= enc.last_token[k] < cfg.max_length for k in rows],
        "prompt": [prompts[k][0] for k in rows], "reference": [prompts[k][1] for k in rows],
    }, schema=FORMATTED_SCHEMA), dropped


def prompt_and_reference(convo: list[dict], messages: list[dict], with_prompt: bool = True) -> tuple[str | None, str]:
    """Return the prompt (the turns before the last supervised answer, as JSON; None unless `with_prompt`) and that
    answer."""
    head = len(convo) - len(messages)  # the system turn, if any
    ref = head + max(i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight") != 0)
    return json.dumps(convo[:ref], ensure_ascii=False) if with_prompt else None, convo[ref]["content"]


def list_array(arrays: list[np.ndarray], type_: pa.DataType) -> pa.Array:
    """Return the numpy arrays as one Arrow list column, without a detour through Python lists."""
    offsets = np.zeros(len(arrays) + 1, dtype=np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    values = np.concatenate(arrays) if arrays else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values, type=type_))


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


def format_rows(clean_db: Path, model_dir: str, out_dir: Path, cfg: ChatConfig,
                out_quarantine: Path | None = None) -> dict:
    """Write train.parquet, heldout.parquet, chat_template.jinja and stats.json to `out_dir`; return the stats.

    Rows dropped for length are added to `out_quarantine` (the run's quarantine.parquet) when given.
    """
    tokenizer = load_tokenizer(model_dir)
    template = resolve_template(tokenizer, cfg)
    encoder = chat_encoder(tokenizer, template, cfg.mask)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats, dropped, formatted = {}, [], 0
    with duckdb.connect(str(clean_db), read_only=True) as con:
        for split in ("train", "heldout"):
            table, split_dropped = format_split(con, split, encoder, cfg)
            # dictionary-encoding the token lists only costs time (they hardly repeat): 1.5 s -> 1.1 s per 100k rows
            pq.write_table(table, out_dir / f"{split}.parquet", use_dictionary=["source"])
            stats[split] = length_stats(table, len(split_dropped))
            dropped += split_dropped
            formatted += len(set(table.column("row_id").to_pylist()))
        stats["accounting"] = accounting(con, formatted, len(dropped))
        if out_quarantine is not None:
            write_quarantine(con, dropped, out_quarantine)
    (out_dir / TEMPLATE_FILE).write_text(inference_template(template), encoding="utf-8")
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return stats


@stage_task("format")
def format_chats(clean_db: Path, model_dir: str, out_dir: Path, cfg: ChatConfig,
                 out_quarantine: Path | None = None) -> Path:
    """Tokenize the clean conversations with loss masks into `out_dir` and return it."""
    stage_logger().info("format: rendering %s with the chat template and tokenizing (max_length %d) -> %s",
                        clean_db, cfg.max_length, out_dir)
    stats = format_rows(clean_db, model_dir, out_dir, cfg, out_quarantine)
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
