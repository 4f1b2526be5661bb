"""Chat templates: the model's own, a named one (templates/<name>.jinja) or a custom file, and how to render them.

Rendering goes through the same compiled Jinja environment as transformers' `apply_chat_template` (sandboxed,
`trim_blocks`, `lstrip_blocks`, the `{% generation %}` tag), with the tokenizer's special tokens as variables, so a
string rendered here is the string `apply_chat_template(..., tokenize=False)` gives.

Templates differ in what they can say, so each one's abilities are probed once (`TemplateFeatures`), by rendering
small probe conversations: which message key carries a thinking trace, whether it reads a thinking switch
(`enable_thinking`), tool definitions, an assistant's `tool_calls`, `tool` turns, and whether it wants contents as
typed parts (vision-language templates). `ChatRenderer.messages_for` turns a canonical row into the messages and
keyword arguments for this template, with a documented fallback where a template lacks an ability (README "Chat
templates and loss masks").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path

from tasks.core.config import ChatConfig
from tasks.core.errors import ConfigError
from tasks.formatting.skeletons import Skeleton, prove_skeleton

TEMPLATES = Path(__file__).parent / "chat_templates"  # sftflow's named templates (.jinja)
NAMED_TEMPLATES = ("chatml", "llama2", "llama3", "gemma", "mistral", "alpaca")
GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")
THINKING_SWITCHES = ("enable_thinking", "thinking")  # the variable a template reads to think or not
REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")  # message keys templates read a trace from
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOLS_PREAMBLE = "You can call these functions (JSON definitions):\n"


def named_template(name: str) -> str:
    """Return the Jinja source of one of sftflow's named templates."""
    if name not in NAMED_TEMPLATES:
        raise ConfigError(f"chat.template={name!r} is not a known template; use model or one of "
                          f"{', '.join(NAMED_TEMPLATES)}")
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def resolve_template(tokenizer, cfg: ChatConfig) -> str:
    """Return the chat template to format with: chat.chat_template's file, else chat.template, else the model's."""
    if cfg.chat_template is not None:
        if not Path(cfg.chat_template).is_file():
            raise ConfigError(f"chat.chat_template={cfg.chat_template}: no such file")
        return Path(cfg.chat_template).read_text(encoding="utf-8")
    if cfg.template != "model":
        return named_template(cfg.template)
    if not tokenizer.chat_template:
        raise ConfigError(f"the model has no chat template; set chat.template to one of {', '.join(NAMED_TEMPLATES)}"
                          " or chat.chat_template=<path to a Jinja file>")
    return tokenizer.chat_template


def inference_template(template: str) -> str:
    """Return the template without `{% generation %}` markers: it renders the same text, for inference."""
    return GENERATION_TAG.sub("", template)


def special_tokens(tokenizer) -> dict[str, str]:
    """Return the variables apply_chat_template passes to a template besides the messages (bos_token, …)."""
    return dict(tokenizer.special_tokens_map)


@dataclass(frozen=True)
class TemplateFeatures:
    """What a chat template can render, found by rendering probe conversations (`probe_features`): frozen, as one is
    shared by every renderer of its template."""

    thinking_switch: str | None  # the variable that turns thinking on and off (enable_thinking), if it reads one
    reasoning_key: str | None  # the message key it renders a thinking trace from; None: traces go inline
    tools: bool  # it renders the tool definitions passed as `tools`
    tool_calls: bool  # it renders an assistant message's `tool_calls`
    tool_role: bool  # it renders the content of a `tool` message
    content_parts: bool  # it reads contents as typed parts ([{"type": "text", "text": …}]), not strings
    opens_thinking: bool  # its generation prompt (thinking switch off, if it has one) opens a <think> block


PROBE_USER, PROBE_ANSWER, PROBE_TRACE = "probe-question-q7", "probe-answer-a7", "probe-trace-r7"
PROBE_FN, PROBE_DESC, PROBE_RESULT = "probe_fn_f7", "probe-description-d7", "probe-result-t7"


def probe_tools() -> list[dict]:
    """Return the tool definitions the tools probe renders."""
    return [{"type": "function", "function": {"name": PROBE_FN, "description": PROBE_DESC, "parameters": {
        "type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]


def probe_call() -> list[dict]:
    """Return an assistant's tool calls for the probes."""
    return [{"type": "function", "function": {"name": PROBE_FN, "arguments": {"x": 1}}}]


class ChatRenderer:
    """Render conversations with one template, compiled once (picklable: it compiles again after unpickling).

    With `skeletons`, `skeleton` gives the once-per-shape rendering of tasks/formatting/skeletons.py where it is proved.
    `added_tokens` are the tokenizer's added tokens' texts: a cut never falls inside one (tasks/formatting/masks.py)."""

    def __init__(self, template: str, variables: dict[str, str], skeletons: bool = True,
                 added_tokens: tuple[str, ...] = ()):
        self.template, self.variables, self.skeletons = template, variables, skeletons
        self.added_tokens = tuple(sorted(set(added_tokens), key=len, reverse=True))
        self._compiled, self._skeletons = None, {}

    def __getstate__(self) -> dict:
        state = {**self.__dict__, "_compiled": None, "_skeletons": {}}
        state.pop("features", None)
        return state

    def without_skeletons(self) -> ChatRenderer:
        """Return a renderer that renders every conversation with Jinja."""
        return ChatRenderer(self.template, self.variables, skeletons=False, added_tokens=self.added_tokens)

    def skeleton(self, roles: tuple[str, ...], add_generation_prompt: bool) -> Skeleton | None:
        """Return the proved skeleton of conversations with these roles, or None (render them one by one)."""
        key = (roles, add_generation_prompt)
        if key not in self._skeletons:
            self._skeletons[key] = prove_skeleton(self.render, roles, add_generation_prompt) if self.skeletons else None
        return self._skeletons[key]

    @property
    def compiled(self):
        """The template compiled by transformers' own environment: the exact rendering apply_chat_template uses."""
        if self._compiled is None:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(self.template)
        return self._compiled

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list[dict] | None = None,
               **kwargs) -> str:
        """Return the text of `messages`, ending with the assistant header if `add_generation_prompt`; `kwargs`
        are further template variables (enable_thinking, …), as apply_chat_template passes them."""
        return self.compiled.render(messages=messages, tools=tools, documents=None,
                                    add_generation_prompt=add_generation_prompt, **{**self.variables, **kwargs})

    def shows(self, needle: str, messages: list[dict], **kwargs) -> bool:
        """Return whether rendering `messages` succeeds and contains `needle`."""
        try:
            return needle in self.render(messages, **kwargs)
        except Exception:  # noqa: BLE001 -- a template that refuses the probe lacks the ability
            return False

    @cached_property
    def features(self) -> TemplateFeatures:
        """Return what this template can render (`probe_features`)."""
        return probe_features(self.template, json.dumps(self.variables, sort_keys=True))

    def messages_for(self, convo: list[dict], tools: list[dict] | None = None, thinking: bool | None = None
                     ) -> tuple[list[dict], dict, list[str]]:
        """Return the messages and keyword arguments that render canonical turns `convo` (role, content and
        optionally reasoning and tool_calls) with this template, and the fallbacks taken (for one log line each):
        a trace goes under the template's own key, else inline as <think>…</think> before the answer; tool calls
        and tool results the template cannot show become JSON text in the answer and a user turn; tool
        definitions it cannot show go into the system turn as JSON. A template with a thinking switch gets it on
        exactly when the row has a trace (thinking mode), off otherwise, unless `thinking` says."""
        f, fallbacks, out = self.features, [], []
        thinking = any(m.get("reasoning") for m in convo) if thinking is None else thinking
        for m in convo:
            msg = {"role": m["role"], "content": m["content"]}
            if m.get("reasoning"):
                msg["_reasoning"], msg["_answer"] = m["reasoning"], m["content"]  # for masks.Conversation.completion
                if f.reasoning_key:
                    msg[f.reasoning_key] = m["reasoning"]
                else:
                    msg["content"] = f"{THINK_OPEN}\n{m['reasoning']}\n{THINK_CLOSE}\n\n{m['content']}"
                    fallbacks.append("inline-reasoning")
            if m.get("tool_calls"):
                if f.tool_calls:
                    msg["tool_calls"] = m["tool_calls"]
                else:
                    text = "\n".join(json.dumps({"name": c["function"]["name"], "arguments": c["function"].get(
                        "arguments")}, ensure_ascii=False) for c in m["tool_calls"])
                    msg["content"] = f"{msg['content']}\n{text}" if msg["content"] else text
                    fallbacks.append("tool-calls-as-text")
            if m["role"] == "tool" and not f.tool_role:
                msg["role"] = "user"
                fallbacks.append("tool-results-as-user")
            out.append(msg)
        kwargs = {self.features.thinking_switch: thinking} if f.thinking_switch else {}
        if tools:
            if f.tools:
                kwargs["tools"] = tools
            else:
                note = TOOLS_PREAMBLE + json.dumps(tools, ensure_ascii=False, indent=1)
                if out and out[0]["role"] == "system":
                    out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{note}"}
                else:
                    out.insert(0, {"role": "system", "content": note})
                fallbacks.append("tools-in-system")
        if f.content_parts:
            out = [{**m, "content": [{"type": "text", "text": m["content"]}],
                    **({"_answer": [{"type": "text", "text": m["_answer"]}]} if "_answer" in m else {})} for m in out]
        return out, kwargs, fallbacks


@lru_cache(maxsize=256)
def probe_features(template: str, variables: str) -> TemplateFeatures:
    """Return what `template` can render with `variables` (the tokenizer's special tokens, as JSON), found by
    rendering the probe conversations: once per template in a process, however many encoders the format, evaluate
    and serve stages (and the tests) build for it."""
    from jinja2 import meta

    renderer = ChatRenderer(template, json.loads(variables), skeletons=False)
    undeclared = meta.find_undeclared_variables(renderer.compiled.environment.parse(template))  # read, never set
    parts = not renderer.shows(PROBE_ANSWER, [{"role": "user", "content": PROBE_USER},
                                              {"role": "assistant", "content": PROBE_ANSWER}])
    text = (lambda s: [{"type": "text", "text": s}]) if parts else (lambda s: s)
    user = {"role": "user", "content": text(PROBE_USER)}
    switch = next((name for name in THINKING_SWITCHES if name in undeclared), None)
    on = {switch: True} if switch else {}
    key = next((k for k in REASONING_KEYS if renderer.shows(
        PROBE_TRACE, [user, {"role": "assistant", "content": text(PROBE_ANSWER), k: PROBE_TRACE}], **on)), None)
    call = {"role": "assistant", "content": text(""), "tool_calls": probe_call()}
    calls = renderer.shows(PROBE_FN, [user, call])
    result = {"role": "tool", "content": text(PROBE_RESULT), "name": PROBE_FN}
    answer = {"role": "assistant", "content": text(PROBE_ANSWER)}
    tool_role = renderer.shows(PROBE_RESULT, [user, call if calls else answer, result, answer])
    tools = renderer.shows(PROBE_FN, [user, answer], tools=probe_tools())
    try:
        prompt = renderer.render([user], add_generation_prompt=True, **({switch: False} if switch else {}))
    except Exception:  # noqa: BLE001 -- a template that cannot prompt fails later, with the row named
        prompt = ""
    opens = prompt.rstrip().endswith(THINK_OPEN)
    return TemplateFeatures(switch, key, tools, calls, tool_role, parts, opens)
