"""Format: render each clean conversation with the model's chat template and tokenize it with loss masks.

Masks come from the template's `{% generation %}` markers via transformers' `return_assistant_tokens_mask`, the
same mechanism TRL's `assistant_only_loss` uses: only assistant tokens and their end-of-turn token are supervised,
and of those only turns whose loss weight is not 0 (each assistant turn is one marked span, in order).
A template without markers is swapped for a training variant (TRL's registry, or sftflow's own in templates/).
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from prefect.artifacts import create_table_artifact
from tqdm.auto import tqdm

from tasks.common import in_prefect_run, stage_logger, stage_task
from tasks.config import ChatConfig
from tasks.errors import ConfigError, DataValidationError

TEMPLATES = Path(__file__).parent / "templates"
# Inference template -> training variant with generation markers, for templates TRL does not patch.
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


def load_tokenizer(model_dir: str):
    """Return the tokenizer of a local model directory or Hub id."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def training_template(tokenizer, override: Path | None = None) -> str:
    """Return a chat template with `{% generation %}` markers that renders exactly like the tokenizer's own."""
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


def supervised_spans(mask: list[int]) -> list[tuple[int, int]]:
    """Return the (start, end) of each run of supervised positions in a mask."""
    spans, start = [], None
    for i, supervised in enumerate([*mask, 0]):
        if supervised and start is None:
            start = i
        elif not supervised and start is not None:
            spans.append((start, i))
            start = None
    return spans


def weigh_spans(mask: list[int], weights: list[float]) -> list[int]:
    """Return the mask with the span of every weight-0 assistant turn unsupervised (one span per turn, in order)."""
    spans = supervised_spans(mask)
    if len(spans) != len(weights):
        raise ConfigError(f"the chat template's generation markers give {len(spans)} supervised spans for "
                          f"{len(weights)} assistant turns, so per-turn loss weights cannot be applied; use a "
                          "template that marks every assistant turn (chat.chat_template)")
    mask = list(mask)
    for (start, end), weight in zip(spans, weights):
        if not weight:
            mask[start:end] = [0] * (end - start)
    return mask


def tokenize_conversation(tokenizer, template: str, messages: list[dict], max_length: int,
                          weights: list[float] | None = None) -> dict:
    """Return input_ids and assistant_masks (1 = supervised) for one conversation, truncated to max_length.

    `weights` holds each assistant turn's loss weight: a weight-0 turn is rendered but not supervised.
    """
    out = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    mask = list(out["assistant_masks"])
    if weights is not None and not all(weights):  # weighed before truncation, which can only cut trailing spans
        mask = weigh_spans(mask, weights)
    ids, mask = list(out["input_ids"])[:max_length], mask[:max_length]
    supervised = [t for t, m in zip(ids, mask) if m]
    return {"input_ids": ids, "assistant_masks": mask, "n_tokens": len(ids), "n_supervised": len(supervised),
            "truncated": len(out["input_ids"]) > max_length,
            # the model learns to stop only if the final supervised turn's end-of-turn token carries a label
            "last_eot_supervised": bool(supervised) and supervised[-1] == tokenizer.eos_token_id}


def format_split(con: duckdb.DuckDBPyConnection, split: str, tokenizer, template: str, cfg: ChatConfig) -> pa.Table:
    """Return the tokenized rows of one split, with the prompt and reference answer kept for evaluation.

    The reference is the last supervised assistant turn; the prompt is everything before it.
    """
    rows = []
    selected = con.execute(ROWS_SQL, {"split": split}).fetchall()
    for row_id, source, system, messages, copies in tqdm(selected, desc=f"format {split}", unit=" rows", disable=None,
                                                         leave=False):
        convo = conversation(system, messages, cfg.keep_reasoning)
        head = len(convo) - len(messages)  # the system turn, if any
        last = head + max(i for i, m in enumerate(messages) if m["role"] == "assistant" and m.get("weight") != 0)
        encoded = tokenize_conversation(tokenizer, template, convo, cfg.max_length, assistant_weights(messages))
        row = {"row_id": row_id, "source": source, **encoded,
               "prompt": json.dumps(convo[:last], ensure_ascii=False), "reference": convo[last]["content"]}
        rows.extend([row] * copies)
    return pa.Table.from_pylist(rows, schema=FORMATTED_SCHEMA)


def length_stats(table: pa.Table) -> dict:
    """Return token length statistics of a formatted split."""
    import numpy as np

    n = np.array(table.column("n_tokens").to_pylist() or [0])
    sup = np.array(table.column("n_supervised").to_pylist() or [0])
    sources = table.column("source").to_pylist()
    return {"rows": table.num_rows, "rows_by_source": {k: sources.count(k) for k in sorted(set(sources))},
            "tokens_mean": float(n.mean()), "tokens_p50": float(np.percentile(n, 50)),
            "tokens_p95": float(np.percentile(n, 95)), "tokens_max": int(n.max()),
            "supervised_share": float(sup.sum() / max(n.sum(), 1)), "min_supervised": int(sup.min()),
            "truncation_rate": float(np.mean(table.column("truncated").to_pylist() or [0]))}


def format_rows(clean_db: Path, model_dir: str, out_dir: Path, cfg: ChatConfig) -> dict:
    """Write train.parquet, heldout.parquet and stats.json to `out_dir`; return the stats."""
    tokenizer = load_tokenizer(model_dir)
    template = training_template(tokenizer, cfg.chat_template)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {}
    with duckdb.connect(str(clean_db), read_only=True) as con:
        for split in ("train", "heldout"):
            table = format_split(con, split, tokenizer, template, cfg)
            pq.write_table(table, out_dir / f"{split}.parquet")
            stats[split] = length_stats(table)
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=1), encoding="utf-8")
    return stats


@stage_task("format")
def format_chats(clean_db: Path, model_dir: str, out_dir: Path, cfg: ChatConfig) -> Path:
    """Tokenize the clean conversations with loss masks into `out_dir` and return it."""
    stats = format_rows(clean_db, model_dir, out_dir, cfg)
    empty = [split for split, s in stats.items() if s["rows"] == 0]
    if empty:
        raise DataValidationError(f"{clean_db}: the {' and '.join(empty)} split is empty; add rows or change "
                                  "clean.heldout_fraction")
    if in_prefect_run():
        rows = [{"split": split, **{k: v for k, v in st.items() if k != "rows_by_source"}}
                for split, st in stats.items()]
        create_table_artifact(key="token-length-stats", table=rows, description="Token lengths of the formatted splits")
    stage_logger().info("format: %s -> %s", json.dumps(stats), out_dir)
    return out_dir
