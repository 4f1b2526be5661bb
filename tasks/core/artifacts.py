"""What the stages share to build their Prefect artifacts: markdown tables with short one-line cells, links into the
MLflow UI, and publishing that happens only inside a Prefect run (a plain `task.fn()` call has no run to attach to).

Prefect renders markdown artifacts with GitHub-flavoured tables; a cell must stay on one line and must not hold a
bare `|`, so every cell goes through `cell()`. Every artifact is redacted (tasks/core/redact.py) on its way out: the
Prefect database keeps no credentials.
"""

from __future__ import annotations

import json

from tasks.core.common import in_prefect_run
from tasks.core.redact import redact, redact_value

CELL_CHARS = 120  # a quarantined record or a generation cut to this many characters still shows what it was


def truncate(text: str, limit: int = CELL_CHARS) -> str:
    """Return `text` cut to `limit` characters, with an ellipsis and the full length when it was longer."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} chars)"


def shorten(text: str, limit: int = CELL_CHARS) -> str:
    """Return `text` cut to about `limit` characters keeping both ends (the end often tells rows apart), with the
    full length when it was longer."""
    if len(text) <= limit:
        return text
    head = limit * 3 // 5
    return f"{text[:head]} … {text[len(text) - (limit - head):]} ({len(text)} chars)"


def cell(value, limit: int = CELL_CHARS) -> str:
    """Return a value as one markdown table cell: floats to 4 significant digits, lists and dicts as JSON, line ends
    shown as ⏎, cut to `limit` characters; `|`, backticks and `<` escaped, so a model's answer (code fences, special
    tokens such as <|im_end|>) shows as written."""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, (list, dict)) else str(value)
    text = truncate(text.replace("\r\n", "\n").replace("\n", " ⏎ "), limit)
    return text.replace("|", "\\|").replace("`", "\\`").replace("<", "&lt;")


def markdown_table(header: list[str], rows: list[list], limit: int = CELL_CHARS) -> list[str]:
    """Return the lines of a markdown table (every cell through `cell`)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v, limit) for v in row) + " |" for row in rows]


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """Create the markdown artifact `key` on the current Prefect run (nothing outside one)."""
    if in_prefect_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=redact(markdown), key=key, description=redact(description))


def publish_table(key: str, table: list[dict], description: str) -> None:
    """Create the table artifact `key` on the current Prefect run (nothing outside one)."""
    if in_prefect_run():
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=redact_value(table), key=key, description=redact(description))


def publish_link(key: str, link: str, link_text: str, description: str) -> None:
    """Create the link artifact `key` on the current Prefect run (nothing outside one)."""
    if in_prefect_run():
        from prefect.artifacts import create_link_artifact

        create_link_artifact(link=redact(link), link_text=redact(link_text), key=key,
                             description=redact(description))
