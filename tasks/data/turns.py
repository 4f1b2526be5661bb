"""Turn contents: text or typed parts (text, reasoning, tool_call), tool calls, tool definitions and loss weights,
read into the canonical turn of tasks/data/formats.py; a part or field that cannot be read is a RecordProblem naming its
field. Media is an `unsupported_part`: sftflow trains text-only models.

Tool calls take the OpenAI/HF shape `{"type": "function", "function": {"name", "arguments": {...}}}`, arguments
parsed to an object, and are kept as one JSON array per turn; tool definitions as one JSON array per row."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

TEXT_PARTS = frozenset({"text", "input_text", "output_text"})  # typed content parts that hold text
MEDIA_PARTS = frozenset({"image", "image_url", "input_image", "audio", "input_audio", "audio_url", "video",
                         "video_url", "input_video", "file", "input_file"})
MULTIMODAL = "this is multimodal data, and sftflow trains text-only models"


class RecordProblem(Exception):
    """A record that cannot become a conversation; `rule` names the quarantine rule."""

    def __init__(self, rule: str, field: str, message: str):
        super().__init__(message)
        self.rule, self.field = rule, field


def malformed(field: str, what: str) -> RecordProblem:
    """Return the problem of a field of the wrong shape, worded `field 'x': what`."""
    return RecordProblem("malformed", field, f"field '{field}': {what}")


def content_of(value: Any, field: str) -> tuple[str | None, str | None, list[dict]]:
    """Return (text, reasoning, tool calls) of a turn's content: a string, or a list of typed parts."""
    if value is None or isinstance(value, str):
        return value, None, []
    if not isinstance(value, list):
        raise malformed(field, f"expected text, got {type(value).__name__}")
    texts, reasoning, calls = [], [], []
    for part in value:
        kind, payload = read_part(part, field)
        {"text": texts, "reasoning": reasoning, "tool_call": calls}[kind].append(payload)
    return "".join(texts), "".join(reasoning) or None, calls


def text_of(value: Any, field: str) -> str | None:
    """Return a field's text: a string, or the text parts of a typed content list; None when absent."""
    text, reasoning, calls = content_of(value, field)
    if reasoning is not None or calls:
        raise malformed(field, "reasoning and tool_call parts belong in a chat turn")
    return text


def read_part(part: Any, field: str) -> tuple[str, Any]:
    """Return (kind, payload) of one typed content part: text, reasoning (a string) or tool_call (a normalised
    call); raise for media (unsupported_part) and for a part of the wrong shape."""
    if isinstance(part, str):
        return "text", part
    if not isinstance(part, dict):
        raise malformed(field, f"expected content parts as objects, got {type(part).__name__}")
    kind = part.get("type") or "text"
    payload = part.get("text", part.get("value"))
    if kind == "tool_call":
        return "tool_call", tool_call(payload if payload is not None else part, field)
    if kind not in TEXT_PARTS | {"reasoning"}:
        why = f"; {MULTIMODAL}" if kind in MEDIA_PARTS else ""
        raise RecordProblem("unsupported_part", field, f"field '{field}': unsupported content part of type {kind!r}"
                            f"{why} (only text, reasoning and tool_call parts are read)")
    if not isinstance(payload, str):
        raise malformed(field, f"a {kind} part needs a string 'text' or 'value'")
    return ("reasoning" if kind == "reasoning" else "text"), payload


def parsed_json(value: Any, field: str, what: str) -> Any:
    """Return `value`, parsed first when it is a JSON string (tool calls and tools often are)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value) if value.strip() else None
    except json.JSONDecodeError as e:
        raise malformed(field, f"{what} is not valid JSON: {e.msg} (column {e.colno})") from None


def tool_call(value: Any, field: str) -> dict:
    """Return one tool call as {"type": "function", "function": {"name", "arguments": object}} from the OpenAI/HF
    shape or a bare {name, arguments} (ShareGPT function_call, LLaMA-Factory tool_call parts), JSON text or not."""
    call = parsed_json(value, field, "a tool call")
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]  # OpenAI / HF: {"type": "function", "function": {...}}
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise malformed(field, 'a tool call needs a "name" and "arguments", e.g. {"name": "f", "arguments": {}}')
    arguments = parsed_json(call.get("arguments"), field, f"the arguments of tool call {call['name']!r}")
    if not isinstance(arguments, dict | None):
        raise malformed(field, f"the arguments of tool call {call['name']!r} must be a JSON object")
    return {"type": "function", "function": {"name": call["name"], "arguments": arguments or {}}}


def tool_calls_of(value: Any, field: str) -> list[dict]:
    """Return the tool calls of a message's `tool_calls` (a list, or JSON text of one) or of a function_call value."""
    calls = parsed_json(value, field, "tool_calls")
    if calls is None:
        return []
    return [tool_call(c, field) for c in (calls if isinstance(calls, list) else [calls])]


def tools_json(value: Any) -> str | None:
    """Return a row's tool definitions as a JSON array, each in the OpenAI/HF shape {"type": "function",
    "function": {...}}, from a list or JSON text of one (LLaMA-Factory); None when there are none."""
    tools = parsed_json(value, "tools", "tools")
    tools = [tools] if isinstance(tools, dict) else tools
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise malformed("tools", "expected a list of function definitions (or JSON text of one)")
    tools = [t if "type" in t else {"type": "function", "function": t} for t in tools]
    if any(t["type"] == "function" and not (isinstance(t.get("function"), dict)
                                             and isinstance(t["function"].get("name"), str)) for t in tools):
        raise malformed("tools", "every function definition needs a name")
    return json.dumps(tools, ensure_ascii=False)


def turn_weight(turn: dict, field: str) -> float | None:
    """Return a turn's loss weight, 0 or 1, from `loss_weight` (LLaMA-Factory, axolotl) or OpenAI fine-tuning's
    `weight`; None when it has none. 0 = not supervised."""
    key = "loss_weight" if turn.get("loss_weight") is not None else "weight"
    value = turn.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value not in (0, 1):
        raise malformed(field, f"a turn's {key} must be 0 or 1, got {value!r}")
    return float(value)


def make_turn(role: str, content: Any, field: str, message: dict | None = None, calls: Sequence[dict] = (),
              parts_field: str | None = None) -> dict:
    """Return a canonical turn from its role, content (text or typed parts, named `parts_field`) and the message's
    own reasoning, weight and tool calls. A turn that calls tools may have no text: its content is ''."""
    message = message or {}
    if role == "tool" and isinstance(content, dict):
        content = json.dumps(content, ensure_ascii=False)  # a tool's output given as an object
    text, reasoning, part_calls = content_of(content, parts_field or field)
    calls = [*part_calls, *calls]
    for key in ("tool_calls", "function_call"):  # OpenAI's, and its legacy single call
        if message.get(key) is not None:
            calls += tool_calls_of(message[key], key)
    if calls and role != "assistant":
        raise malformed(field, f"a {role} turn has tool calls; only assistant turns call tools")
    own = message.get("reasoning_content")
    own = message.get("reasoning") if own is None else own
    return {"role": role, "content": "" if text is None and calls else text,
            "reasoning": text_of(own, "reasoning") if own is not None else reasoning,
            "weight": turn_weight(message, field),
            "tool_calls": json.dumps(calls, ensure_ascii=False) if calls else None}
