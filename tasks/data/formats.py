"""Record formats: map one source record (chat messages, ShareGPT, prompt-completion, Alpaca, text, the chosen side
of a preference pair) to a canonical conversation: a system prompt, then role/content/reasoning/weight/tool_calls
turns, and the row's tool definitions.

A turn's content (text or typed parts), its tool calls and loss weight are read by tasks/data/turns.py. A record with
media (an `images` column and its <image> placeholders) is an `unsupported_part` problem: sftflow trains text-only
models. Plain text is one `text` turn (continued pre-training). Rows a KTO flag marks undesirable are told apart
(`desirable`); preference pairs stop the run in one line unless the source reads their chosen side (`format: chosen`).
"""

from __future__ import annotations

import re
from typing import Any

from tasks.core.config import SourceConfig
from tasks.core.errors import InputError
from tasks.data.turns import MULTIMODAL, RecordProblem, make_turn, malformed, text_of, tool_calls_of

# Required fields per format, in auto-detection priority order.
FORMAT_FIELDS = {
    "messages": ("messages",), "sharegpt": ("conversations",), "prompt_completion": ("prompt", "completion"),
    "alpaca": ("instruction", "output"), "text": ("text",),
}
PREFERENCE_PAIRS = (("chosen", "rejected"), ("chosen_messages", "rejected_messages"))  # TRL, LLaMA-Factory v1
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool"}
THINK = re.compile(r"\s*<think>(.*?)</think>\s*(.*)", re.DOTALL)
NO_INPUT = frozenset({"", "n/a", "none", "not applicable", "<noinput>", "no input"})  # Alpaca `input` placeholders
MEDIA_COLUMNS = ("images", "videos", "audios", "image", "video", "audio")  # LLaMA-Factory's, LLaVA's `image`
KTO_FLAGS = ("kto_tag", "label")  # LLaMA-Factory's and TRL's (KTO) desirable flag: false rows are not trained


def detect_format(record: dict, source: SourceConfig, where: str, previous: str | None = None) -> str:
    """Return a record's format from its (mapped) columns; else the file's format so far; else raise. Preference
    pairs stop the run in one line (`where` is file:line) unless the source says `format: chosen`."""
    if source.format != "auto":
        return source.format
    keys = set(record)
    if pair := next((p for p in PREFERENCE_PAIRS if keys.issuperset(p)), None):
        columns = preference_columns(record)
        raise InputError(f"{where}: this is preference data ({pair[0]}/{pair[1]} pairs, as for DPO), and sftflow "
                         f"trains SFT: to train on the preferred side, set format: chosen on this source (the prompt "
                         f"and the {pair[0]} answer become the conversation, {pair[1]} is ignored)"
                         + (f", or map the column yourself with {columns}" if columns else ""))
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
        f"{where}: cannot tell the record format from columns {sorted(keys)}: {hints}. "
        f"Map yours in the source config, e.g. columns: {{instruction: question, output: answer}}"
    )


def preference_columns(record: dict) -> str | None:
    """Return the `columns:` mapping that reads the chosen side of a preference record as SFT data, if one can."""
    if "chosen_messages" in record:
        return "columns: {messages: chosen_messages}"
    chosen = record.get("chosen")
    if isinstance(chosen, dict):
        return None  # a single ShareGPT message after `conversations` (LLaMA-Factory): only format: chosen reads it
    if isinstance(chosen, list) and chosen and isinstance(chosen[0], dict) and chosen[0].get("role") != "assistant":
        return "columns: {messages: chosen}"  # the chosen conversation holds its own prompt
    return "columns: {completion: chosen}" if "prompt" in record else "columns: {text: chosen}"


def chat_turns(value: Any, field: str, roles: dict[str, str] | None = None) -> list[dict]:
    """Return the turns of a chat list of {role, content} objects (none when absent); raise when it is not one."""
    if value is None:
        return []  # missing: marked missing_field by the caller
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise malformed(field, "expected a list of {role, content} objects")
    roles = roles or {}
    return [make_turn(roles.get(str(m.get("role")), str(m.get("role"))), m.get("content"), field, m,
                      parts_field="content") for m in value]


def split_system(system: str | None, turns: list[dict]) -> tuple[str | None, list[dict]]:
    """Move a leading system turn into the system prompt (it wins over a top-level `system`)."""
    if turns and turns[0]["role"] == "system":
        return turns[0]["content"], turns[1:]
    return system, turns


def sharegpt_turns(value: Any, roles: dict[str, str]) -> list[dict]:
    """Return the turns of a ShareGPT `conversations` list of {from, value} objects with roles mapped: a
    function_call turn is an assistant turn whose value is its tool call(s), an observation a tool turn."""
    if value is None:
        return []  # missing: marked missing_field by the caller
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise malformed("conversations", "expected a list of {from, value} objects")
    turns, known = [], SHAREGPT_ROLES | roles
    for m in value:
        tag = str(m.get("from"))
        if tag not in known:
            raise malformed("conversations", f"unknown role {m.get('from')!r} (expected {', '.join(known)}; map "
                            "others with data.sources[].roles)")
        if tag == "function_call" and tag not in roles:
            turns.append(make_turn("assistant", None, "conversations", m,
                                   tool_calls_of(m.get("value"), "conversations")))
        else:
            turns.append(make_turn(known[tag], m.get("value"), "conversations", m))
    return turns


def prompt_completion_turns(prompt: Any, completion: Any, roles: dict[str, str]) -> list[dict]:
    """Return user + assistant turns for string prompt/completion, or both chat lists concatenated."""
    if isinstance(prompt, list) or isinstance(completion, list):
        if not all(v is None or isinstance(v, list) for v in (prompt, completion)):
            raise RecordProblem("malformed", "completion" if isinstance(prompt, list) else "prompt",
                                "fields 'prompt' and 'completion': expected both strings or both chat lists")
        return [*chat_turns(prompt, "prompt", roles), *chat_turns(completion, "completion", roles)]
    return [make_turn("user", text_of(prompt, "prompt"), "prompt"),
            make_turn("assistant", text_of(completion, "completion"), "completion")]


def chosen_turns(record: dict, roles: dict[str, str]) -> list[dict]:
    """Return the conversation of a preference record's chosen side (format: chosen); `rejected` is ignored.

    `chosen_messages` is a whole conversation; a `chosen` chat list that starts with its own prompt (UltraFeedback)
    too; otherwise the prompt (`prompt`, or ShareGPT `conversations`) comes first, then the chosen answer (a string,
    a message, or a chat list). A chosen string without any prompt is plain text.
    """
    if record.get("chosen_messages") is not None:
        return chat_turns(record["chosen_messages"], "chosen_messages", roles)
    prompt, chosen = record.get("prompt"), record.get("chosen")
    if record.get("conversations") is not None:
        before = sharegpt_turns(record["conversations"], roles)
    else:
        before = chat_turns(prompt, "prompt", roles) if isinstance(prompt, list) else (
            [make_turn("user", text_of(prompt, "prompt"), "prompt")] if prompt is not None else [])
    chosen = [chosen] if isinstance(chosen, dict) else chosen
    if isinstance(chosen, list) and chosen and all(isinstance(m, dict) and ("role" in m or "from" in m)
                                                   for m in chosen):
        answer = sharegpt_turns(chosen, roles) if "from" in chosen[0] else chat_turns(chosen, "chosen", roles)
        before = before if answer[0]["role"] == "assistant" else []  # the chosen conversation holds its own prompt
    else:
        answer = [make_turn("assistant" if before else "text", text_of(chosen, "chosen"), "chosen")]
    return [*before, *answer]


def alpaca_turns(record: dict) -> list[dict]:
    """Return the `history` pairs as turns, then the instruction (+ a non-placeholder input) and the output."""
    history = record.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 for h in history):
        raise malformed("history", "expected a list of [instruction, response] pairs")
    turns = [make_turn(role, text_of(text, "history"), "history")
             for pair in history for role, text in zip(("user", "assistant"), pair)]
    prompt = text_of(record.get("instruction"), "instruction")
    extra = text_of(record.get("input"), "input")
    if prompt is not None and extra and extra.strip().lower() not in NO_INPUT:
        prompt = f"{prompt}\n\n{extra}"
    return [*turns, make_turn("user", prompt, "instruction"),
            make_turn("assistant", text_of(record.get("output"), "output"), "output")]


def format_turns(record: dict, fmt: str, roles: dict[str, str]) -> list[dict]:
    """Return the turns of a record of format `fmt`, a leading system turn included."""
    if fmt == "alpaca":
        return alpaca_turns(record)
    if fmt == "text":
        return [make_turn("text", text_of(record.get("text"), "text"), "text")]
    if fmt == "sharegpt":
        return sharegpt_turns(record.get("conversations"), roles)
    if fmt == "prompt_completion":
        return prompt_completion_turns(record.get("prompt"), record.get("completion"), roles)
    if fmt == "chosen":
        return chosen_turns(record, roles)
    return chat_turns(record.get("messages"), "messages", roles)


def to_conversation(record: dict, fmt: str, roles: dict[str, str] | None = None) -> tuple[str | None, list[dict]]:
    """Return (system, messages) for one record; a missing required field leaves its content None.

    Plain `text` becomes a single `text` turn: the whole text is supervised, with no chat template (continued
    pre-training); mixed with chat turns, or with a system prompt, it is malformed. `roles` renames the record's own
    role names (e.g. {bot: assistant}) before they are interpreted. A record with media is an unsupported_part.
    """
    for column in MEDIA_COLUMNS:
        if record.get(column) not in (None, "", []):
            raise RecordProblem("unsupported_part", column, f"field '{column}': {MULTIMODAL} (<{column.rstrip('s')}> "
                                f"placeholders with their files): the record is not read as text")
    system, turns = split_system(text_of(record.get("system"), "system"), format_turns(record, fmt, roles or {}))
    if any(t["role"] == "text" for t in turns) and (len(turns) > 1 or system):
        raise malformed(FORMAT_FIELDS.get(fmt, ("chosen",))[0], "a plain text turn (role text) cannot be mixed "
                        "with chat turns or a system prompt")
    return system, split_reasoning(turns, text_of(record.get("reasoning"), "reasoning"))


def split_reasoning(turns: list[dict], record_reasoning: str | None) -> list[dict]:
    """Move thinking traces (a leading <think>…</think> or a `reasoning` field) of assistant turns to `reasoning`."""
    for turn in turns:
        match = THINK.match(turn["content"] or "") if turn["role"] == "assistant" else None
        if match:
            turn["reasoning"], turn["content"] = match.group(1).strip(), match.group(2)
    last = next((t for t in reversed(turns) if t["role"] == "assistant"), None)
    if record_reasoning and last is not None and not last["reasoning"]:
        last["reasoning"] = record_reasoning  # a record-level trace belongs to the final answer
    return turns


def desirable(record: dict, fmt: str) -> tuple[bool, str]:
    """Return (whether the row is trained, the flag that says so): a KTO row (`kto_tag`, or TRL's boolean `label`)
    flagged false is undesirable. A `label` that is not a boolean is another column, except on prompt–completion
    rows, where it can only be TRL's flag."""
    for key in KTO_FLAGS:
        value = record.get(key)
        if isinstance(value, bool):
            return value, key
        if value is not None and (key == "kto_tag" or fmt == "prompt_completion"):
            raise malformed(key, f"expected true or false (the KTO desirable flag), got {value!r}")
    return True, ""


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
        return [malformed(key, "expected a list of objects to explode")]
    parent = {k: v for k, v in record.items() if k != key}
    return [{**parent, **item} for item in items]


def missing_fields(record: dict, fmt: str) -> list[str]:
    """Return the required fields of `fmt` that are absent or null in `record`."""
    if fmt == "chosen":
        return [] if record.get("chosen") is not None or record.get("chosen_messages") is not None else ["chosen"]
    return [f for f in FORMAT_FIELDS[fmt] if record.get(f) is None]
