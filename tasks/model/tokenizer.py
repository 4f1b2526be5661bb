"""The tokenizer of a model, with the chat template its rows were formatted with: what training, evaluation and
serving all load (a light module: no DuckDB, no Arrow, no formatting machinery)."""

from __future__ import annotations

from pathlib import Path

TEMPLATE_FILE = "chat_template.jinja"  # the inference template saved next to the formatted rows


def load_tokenizer(model_dir: str, formatted_dir: Path | None = None, trust_remote_code: bool = False):
    """Return the tokenizer of a local model directory or Hub id; given the format step's output directory, with
    the (inference form of the) chat template the rows were formatted with, so training and prompting agree. A
    tokenizer's own Python code runs only when `trust_remote_code` (train.trust_remote_code)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if formatted_dir is not None and (Path(formatted_dir) / TEMPLATE_FILE).is_file():
        tokenizer.chat_template = (Path(formatted_dir) / TEMPLATE_FILE).read_text(encoding="utf-8")
    return tokenizer
