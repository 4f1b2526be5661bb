"""Chat templates: the model's own, a named one (templates/<name>.jinja) or a custom file, and how to render them.

Rendering goes through the same compiled Jinja environment as transformers' `apply_chat_template` (sandboxed,
`trim_blocks`, `lstrip_blocks`, the `{% generation %}` tag), with the tokenizer's special tokens as variables, so a
string rendered here is the string `apply_chat_template(..., tokenize=False)` gives.
"""

from __future__ import annotations

import re
from pathlib import Path

from tasks.config import ChatConfig
from tasks.errors import ConfigError
from tasks.skeletons import Skeleton, prove_skeleton

TEMPLATES = Path(__file__).parent / "templates"
NAMED_TEMPLATES = ("chatml", "llama2", "llama3", "gemma", "mistral", "alpaca")
TEMPLATE_FILE = "chat_template.jinja"  # the inference template saved next to the formatted rows
GENERATION_TAG = re.compile(r"\{%-?\s*(end)?generation\s*-?%\}")


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


class ChatRenderer:
    """Render conversations with one template, compiled once (picklable: it compiles again after unpickling).

    With `skeletons`, `skeleton` gives the once-per-shape rendering of tasks/skeletons.py where it is proved."""

    def __init__(self, template: str, variables: dict[str, str], skeletons: bool = True):
        self.template, self.variables, self.skeletons = template, variables, skeletons
        self._compiled, self._skeletons = None, {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_compiled": None, "_skeletons": {}}

    def without_skeletons(self) -> ChatRenderer:
        """Return a renderer that renders every conversation with Jinja."""
        return ChatRenderer(self.template, self.variables, skeletons=False)

    def skeleton(self, roles: tuple[str, ...], add_generation_prompt: bool) -> Skeleton | None:
        """Return the proved skeleton of conversations with these roles, or None (render them one by one)."""
        key = (roles, add_generation_prompt)
        if key not in self._skeletons:
            self._skeletons[key] = prove_skeleton(self.render, roles, add_generation_prompt) if self.skeletons else None
        return self._skeletons[key]

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """Return the text of `messages`, ending with the assistant header if `add_generation_prompt`."""
        if self._compiled is None:
            # transformers' own compiled environment: the exact rendering apply_chat_template uses
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(self.template)
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self.variables)
