"""Record formats: map one source record (chat messages, ShareGPT, prompt-completion, Alpaca, text) to a
canonical conversation (system prompt, then role/content/reasoning/weight turns).

Typed content parts are read for their text (`text` or `value`); a part of another type (an image) is an
`unsupported_part` problem, never an empty turn. A turn's `loss_weight` (or OpenAI's `weight`) of 0 keeps an
assistant turn in the prompt but out of the loss; only assistant turns are ever supervised, so it means nothing on
other turns."""

from __future__ import annotations

import re
from typing import Any

from tasks.config import SourceConfig
from tasks.errors import InputError

# Required fields per format, in auto-detection priority order.
FORMAT_FIELDS = {
    "messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"), "text": ("text",),
}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool"}
THINK = re.compile(r"\s*<think>(.*?)</think>\s*(.*)", re.DOTALL)
NO_INPUT = frozenset({"", "n/a", "none", "not applicable", "<noinput>", "no input"})  # Alpaca `input` placeholders
TEXT_PARTS = frozenset({"text", "input_text", "output_text"})  # typed content parts that hold text
# A turn's loss weight: `loss_weight` (LLaMA-Factory, axolotl) or OpenAI fine-tuning's `weight`; 0 = not supervised.
WEIGHT_KEYS = ("loss_weight", "weight")


class RecordProblem(Exception):
    """A record that cannot become a conversation; `rule` names the quarantine rule."""

    def __init__(self, rule: str, field: str, message: str):
        super().__init__(message)
        self.rule, self.field = rule, field


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
        return "".join(part_text(part, field) for part in value)
    raise RecordProblem("malformed", field, f"field '{field}': expected text, got {type(value).__name__}")


def part_text(part: Any, field: str) -> str:
    """Return the text of one typed content part (under `text` or `value`); raise for a part that is not text."""
    if isinstance(part, str):
        return part
    if not isinstance(part, dict):
        raise RecordProblem("malformed", field, f"field '{field}': expected content parts as objects, "
                            f"got {type(part).__name__}")
    kind = part.get("type") or "text"
    if kind not in TEXT_PARTS:
        raise RecordProblem("unsupported_part", field, f"field '{field}': unsupported content part of type "
                            f"{kind!r} (only text parts are read)")
    text = part.get("text", part.get("value"))
    if not isinstance(text, str):
        raise RecordProblem("malformed", field, f"field '{field}': a text part needs a string 'text' or 'value'")
    return text


def turn_weight(turn: dict, field: str) -> float | None:
    """Return a turn's loss weight, 0 or 1, from `loss_weight` or OpenAI's `weight`; None when it has none."""
    key = next((k for k in WEIGHT_KEYS if turn.get(k) is not None), None)
    if key is None:
        return None
    value = turn[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise RecordProblem("malformed", field, f"field '{field}': a turn's {key} must be 0 or 1, got {value!r}")
    return float(value)


def chat_turns(value: Any, field: str) -> list[dict]:
    """Return the turns of a chat list of {role, content} objects (none when absent); raise when it is not one."""
    if value is None:
        return []  # missing: marked missing_field by the caller
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RecordProblem("malformed", field, f"field '{field}': expected a list of {{role, content}} objects")
    return [{"role": str(m.get("role")), "content": text_of(m.get("content"), "content"),
             "reasoning": text_of(m.get("reasoning_content", m.get("reasoning")), "reasoning"),
             "weight": turn_weight(m, field)} for m in value]


def split_system(system: str | None, turns: list[dict]) -> tuple[str | None, list[dict]]:
    """Move a leading system turn into the system prompt (it wins over a top-level `system`)."""
    if turns and turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return system, turns


def sharegpt_turns(value: Any, roles: dict[str, str]) -> list[dict]:
    """Return the turns of a ShareGPT `conversations` list of {from, value} objects with roles mapped."""
    if value is None:
        return []  # missing: marked missing_field by the caller
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise RecordProblem("malformed", "conversations",
                            "field 'conversations': expected a list of {from, value} objects")
    turns = []
    for m in value:
        known = SHAREGPT_ROLES | roles
        role = known.get(str(m.get("from")))
        if role is None:
            raise RecordProblem("malformed", "conversations", f"field 'conversations': unknown role {m.get('from')!r} "
                                f"(expected {', '.join(known)}; map others with data.sources[].roles)")
        turns.append({"role": role, "content": text_of(m.get("value"), "conversations"),
                      "weight": turn_weight(m, "conversations")})
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


def to_conversation(record: dict, fmt: str, roles: dict[str, str] | None = None) -> tuple[str | None, list[dict]]:
    """Return (system, messages) for one record; a missing required field leaves its content None.

    Plain `text` becomes a single assistant turn, so the whole text is supervised (language modelling on it).
    `roles` renames the record's own role names (e.g. {bot: assistant}) before they are interpreted.
    """
    roles = roles or {}
    system = text_of(record.get("system"), "system")
    if fmt == "alpaca":
        turns = alpaca_turns(record)
    elif fmt == "text":
        turns = [{"role": "assistant", "content": text_of(record.get("text"), "text")}]
    elif fmt == "sharegpt":
        system, turns = split_system(system, sharegpt_turns(record.get("conversations"), roles))
    elif fmt == "prompt_completion":
        system, turns = split_system(system, prompt_completion_turns(record.get("prompt"), record.get("completion")))
    else:
        turns = [{**t, "role": roles.get(t["role"], t["role"])} for t in chat_turns(record.get("messages"), "messages")]
        system, turns = split_system(system, turns)
    return system, split_reasoning(turns, text_of(record.get("reasoning"), "reasoning"))


def split_reasoning(turns: list[dict], record_reasoning: str | None) -> list[dict]:
    """Move thinking traces (a leading <think>…</think> or a `reasoning` field) of assistant turns to `reasoning`."""
    for turn in turns:
        turn.setdefault("reasoning", None)
        turn.setdefault("weight", None)
        match = THINK.match(turn["content"] or "") if turn["role"] == "assistant" else None
        if match:
            turn["reasoning"], turn["content"] = match.group(1).strip(), match.group(2)
    last = next((t for t in reversed(turns) if t["role"] == "assistant"), None)
    if record_reasoning and last is not None and not last["reasoning"]:
        last["reasoning"] = record_reasoning  # a record-level trace belongs to the final answer
    return turns


def explode_record(record: Any, key: str | None) -> list[Any]:
    """Return the records one source record stands for: itself, or (data.sources[].explode) one per element of its
    list `key`, each element's fields merged over the parent's less the list. A missing or empty list, or one that
    is not a list of objects, becomes a RecordProblem in the list (missing_field, malformed), raised per row."""
    if key is None or not isinstance(record, dict):
        return [record]
    items = record.get(key)
    if items is None or items == []:
        state = "missing" if items is None else "an empty list"
        return [RecordProblem("missing_field", key, f"field '{key}' to explode is {state}")]
    if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
        return [RecordProblem("malformed", key, f"field '{key}': expected a list of objects to explode")]
    parent = {k: v for k, v in record.items() if k != key}
    return [{**parent, **item} for item in items]


def missing_fields(record: dict, fmt: str) -> list[str]:
    """Return the required fields of `fmt` that are absent or null in `record`."""
    return [f for f in FORMAT_FIELDS[fmt] if record.get(f) is None]
