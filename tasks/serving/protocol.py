"""The OpenAI chat-completions protocol as `sftflow serve` speaks it: requests checked, answers and errors shaped.

Fields: `messages` (system/developer/user/assistant turns, the user's last; content a string or text parts), `model`
(optional; when given it must name the served version), `max_tokens` or `max_completion_tokens`, `temperature` (0, the
default, is greedy: the decoding evaluate scored the version with), `top_p`, `seed`, `stop` (a string or up to 4),
`repetition_penalty` (vLLM's extension, sent by the openai client as `extra_body`; by default the one evaluate scored
the version with, transformers' penalty over the prompt's and the answer's tokens; 1.0 is off), `n` (1 only), `stream`
and `stream_options.include_usage`. Accepted and ignored: `user`, `metadata`, `store`, `service_tier`,
`parallel_tool_calls`, `prompt_cache_key`, `safety_identifier`. Fields for features this server does not have (frequency
and presence penalties, logprobs, tools, response formats, ...) are accepted at their neutral value only and refused
otherwise. Any other field is refused with OpenAI's own "Unrecognized request argument supplied", so a typo
(`max_token`) fails instead of being silently ignored.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.serving.decode import Sampling

IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier")
NEUTRAL = {"frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logit_bias": ({},), "logprobs": (False,),
           "top_logprobs": (0,), "tools": ([],), "tool_choice": ("none", "auto"), "functions": ([],),
           "function_call": ("none", "auto"), "response_format": ({"type": "text"},), "modalities": (["text"],),
           "audio": (), "prediction": (), "web_search_options": (), "reasoning_effort": (), "verbosity": ()}
MAX_STOPS = 4
SEED_RANGE = (-(2**63), 2**64)


class ApiError(Exception):
    """A request the server refuses: the HTTP status, and the OpenAI error object's message, type, code and param."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 kind: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param, self.headers = status, message, code, param, headers or {}
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        """Return the OpenAI error object: {"error": {message, type, param, code}}."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None  # accepted, not rendered: the chat templates sftflow trains with have no speaker names


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields of POST /v1/chat/completions this server reads (see the module docstring for the rest)."""

    model_config = ConfigDict(extra="allow", strict=True)
    messages: list[Message] = Field(min_length=1)
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int | None = Field(None, ge=SEED_RANGE[0], lt=SEED_RANGE[1])
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(None, gt=0, le=2)  # vLLM's extension; None: the served version's own
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None


@dataclass(frozen=True)
class Chat:
    """A checked request: the conversation for the chat encoder, its decoding settings, streaming and usage."""

    messages: list[dict]
    sampling: Sampling
    stream: bool
    include_usage: bool


def parse_json(raw: bytes) -> object:
    """Return the decoded body, or raise ApiError 400 for bad JSON, bad UTF-8 or nesting too deep to decode."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply to decode; send a flat chat-completions object",
                       "invalid_json") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer over Python's digit limit
        raise ApiError(400, f"the body is not valid JSON: {e}", "invalid_json") from None


def field_path(loc: tuple) -> str:
    """Return pydantic's error location as the field path a user wrote: messages[0].content."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in ("str", "list[TextPart]") and not str(part).startswith(("function-", "literal[")):
            out += f".{part}" if out else str(part)
    return out


def check_extras(request: ChatRequest) -> None:
    """Raise ApiError unless every field beyond the read ones is ignorable or at its neutral value."""
    for name, value in (request.model_extra or {}).items():
        if name in IGNORED or value is None:
            continue
        if name not in NEUTRAL:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", "unknown_parameter", name)
        if value not in NEUTRAL[name]:
            raise ApiError(400, f"'{name}' is not supported by this server (got {json.dumps(value)[:80]}); leave it "
                                "out", "unsupported_parameter", name)


def parse_chat(raw: bytes, max_new_tokens: int, model_names: tuple[str, ...]) -> Chat:
    """Return the checked request in a POST body, or raise ApiError naming the field at fault and the fix."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object with 'messages'", "invalid_json")
    try:
        request = ChatRequest.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = field_path(first["loc"])
        raise ApiError(400, f"{where}: {first['msg']}" if where else first["msg"], "invalid_value",
                       where or None) from None
    check_extras(request)
    if request.model is not None and request.model not in model_names:
        raise ApiError(404, f"The model '{request.model}' does not exist: this server serves {model_names[0]} "
                            f"(also called {' or '.join(model_names[1:])})", "model_not_found", "model")
    if request.n != 1:
        raise ApiError(400, f"n={request.n}: this server returns one choice per request; send n=1 (or leave n out) "
                            "and repeat the request for more", "unsupported_value", "n")
    return Chat(conversation(request.messages), sampling(request, max_new_tokens), request.stream,
                bool(request.stream and request.stream_options and request.stream_options.include_usage))


def conversation(messages: list[Message]) -> list[dict]:
    """Return the messages as the chat encoder's turns: developer as system, text parts joined by newlines."""
    if messages[-1].role != "user":
        raise ApiError(400, f"the last message must be the user's (got {messages[-1].role!r}): the model answers "
                            "the user's turn", "invalid_value", "messages")
    return [{"role": "system" if m.role == "developer" else m.role,
             "content": m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)}
            for m in messages]


def sampling(request: ChatRequest, max_new_tokens: int) -> Sampling:
    """Return the decoding settings of a request; the budget defaults to, and may not exceed, the server's."""
    given = {k: v for k in ("max_tokens", "max_completion_tokens") if (v := getattr(request, k)) is not None}
    if len(set(given.values())) > 1:
        raise ApiError(400, f"max_tokens={given['max_tokens']} and max_completion_tokens="
                            f"{given['max_completion_tokens']} disagree; send one", "invalid_value", "max_tokens")
    budget = next(iter(given.values()), max_new_tokens)
    if budget > max_new_tokens:
        field = next(iter(given))
        raise ApiError(400, f"{field}={budget} is more than this server gives one answer: from 1 to {max_new_tokens} "
                            "(its --max-new-tokens)", "invalid_value", field)
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    if len(stops) > MAX_STOPS or "" in stops:
        raise ApiError(400, f"stop: send up to {MAX_STOPS} non-empty strings (got {len(stops)})", "invalid_value",
                       "stop")
    return Sampling(budget, request.temperature, request.top_p, request.seed, tuple(stops), request.repetition_penalty)


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def completion(cid: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int) -> dict:
    """Return a chat.completion object: one choice with the assistant's message, and the token usage."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": usage(prompt_tokens, completion_tokens)}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chunk(cid: str, model: str, created: int, delta: dict | None = None, finish: str | None = None,
          usage_: dict | None = None) -> str:
    """Return one server-sent event of a chat.completion.chunk: a delta, or the finish reason, or (with
    include_usage) the last chunk, whose choices are empty and which carries the usage."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [] if usage_ else [{"index": 0, "delta": delta or {}, "logprobs": None,
                                           "finish_reason": finish}]}
    if usage_:
        body["usage"] = usage_
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
