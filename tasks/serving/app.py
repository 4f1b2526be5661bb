"""The HTTP side of `sftflow serve`: FastAPI routes over the Batcher, run by uvicorn.

POST /v1/chat/completions (a JSON answer, or server-sent events with `stream: true`), GET /v1/models (and
/v1/models/{id}), GET /health. Every refusal is an OpenAI error object, {"error": {message, type, param, code}}: 400 for
a bad body or field, 404 for an unknown path or model, 405 for a wrong method, 408 for a body that does not arrive
within --read-timeout, 413 for a body over 1 MiB, 503 when the waiting line is full, 500 when generation fails.
The old protocol (POST / with instruction/input) is gone: POST / is a 404 that says where to go.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from tasks.serving.batcher import Batcher, Overloaded
from tasks.serving.decode import Event, Row, Sampling
from tasks.serving.protocol import ApiError, Chat, chunk, completion, completion_id, parse_chat, usage

MAX_BODY_BYTES = 1 << 20
CLOSE = {"Connection": "close"}  # the rest of an unread body cannot be skipped: the connection ends with the answer


@dataclass
class Service:
    """What the routes serve: the model's names, its batcher, the prompt encoder and the limits."""

    model_id: str  # NAME/VERSION: what /v1/models lists and every answer names
    names: tuple[str, ...]  # what a request's `model` may say: the id, the ref served (NAME@alias), the name
    batcher: Batcher
    encode: Callable[[list[dict]], list[int]]
    max_input_tokens: int
    max_new_tokens: int
    read_timeout_s: float
    ref: str = ""  # what the command line asked for (NAME@alias or NAME/VERSION)
    dtype: str = "float32"  # of the model's weights, for /health
    created: int = field(default_factory=lambda: int(time.time()))
    # one thread: the encoder's caches are not shared across threads, and the event loop stays free for a long prompt
    encoder_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, "sftflow-encode"))


async def read_body(request: Request, timeout_s: float) -> bytes:
    """Return the request body, or raise ApiError: 413 over MAX_BODY_BYTES, 408 when it takes over `timeout_s`."""
    length = request.headers.get("content-length")
    too_big = ApiError(413, f"send a body of at most {MAX_BODY_BYTES} bytes", "body_too_large", headers=CLOSE)
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise too_big
    parts, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):  # a deadline for the whole body: a trickle cannot renew it
            async for part in request.stream():
                size += len(part)
                if size > MAX_BODY_BYTES:
                    raise too_big
                parts.append(part)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s (--read-timeout)",
                       "request_timeout", headers=CLOSE) from None
    except ClientDisconnect:
        raise ApiError(400, "the client left before sending its whole body", "client_disconnected") from None
    return b"".join(parts)


async def encode(service: Service, chat: Chat) -> list[int]:
    """Return the prompt ids of a request, cut as format cuts a training row; ApiError 400 if over the limit."""
    from jinja2 import TemplateError

    from tasks.core.errors import SftflowError

    loop = asyncio.get_running_loop()
    try:
        ids = await loop.run_in_executor(service.encoder_pool, service.encode, chat.messages)
    except (TemplateError, SftflowError, ValueError) as e:
        raise ApiError(400, f"the version's chat template cannot render these messages: {e}", "invalid_value",
                       "messages") from None
    if len(ids) > service.max_input_tokens:
        raise ApiError(400, f"the prompt is {len(ids)} tokens after the chat template; this server takes at most "
                            f"{service.max_input_tokens} (--max-input-tokens): shorten the messages",
                       "context_length_exceeded", "messages")
    return ids


def submit(service: Service, ids: list[int], sampling: Sampling) -> tuple[Row, asyncio.Queue]:
    """Queue a request for the model; return its row and the queue its events arrive on. ApiError 503 when full."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def emit(event: Event) -> None:  # called on the model's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody listens
            row.cancelled = True

    row = Row(ids, sampling, emit)
    try:
        service.batcher.submit(row)
    except Overloaded as e:
        raise ApiError(503, f"the server is busy: {e}", "server_overloaded", headers={"Retry-After": "1"}) from None
    return row, events


async def wait_disconnect(request: Request) -> None:
    """Return when the client closes its connection (the body is read: the next message can only be the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer(request: Request, service: Service, row: Row, events: asyncio.Queue, prompt_tokens: int) -> Response:
    """Return the whole chat.completion once the row is done; a client that leaves first cancels the row."""
    gone, parts, getter = asyncio.ensure_future(wait_disconnect(request)), [], None
    try:
        while True:
            getter = asyncio.ensure_future(events.get())
            await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                return Response(status_code=499)  # nobody reads it: nginx's "client closed request"
            event = getter.result()
            if event.error:
                raise ApiError(500, event.error, "generation_failed")
            parts.append(event.text)
            if event.finish:
                return JSONResponse(completion(completion_id(), service.model_id, "".join(parts), event.finish,
                                               prompt_tokens, event.completion_tokens))
    finally:
        cancel(row)
        gone.cancel()
        if getter is not None:
            getter.cancel()


async def stream(service: Service, row: Row, events: asyncio.Queue, prompt_tokens: int,
                 include_usage: bool) -> AsyncIterator[str]:
    """Yield the answer as chat.completion.chunk events, then `data: [DONE]`; if the client leaves, Starlette cancels
    this generator and the row is cancelled with it."""
    cid, created, model = completion_id(), int(time.time()), service.model_id
    try:
        yield chunk(cid, model, created, {"role": "assistant", "content": ""})
        while True:
            event = await events.get()
            if event.error:  # the status line is sent already: the error goes as an event, as OpenAI streams it
                yield f"data: {json.dumps(ApiError(500, event.error, 'generation_failed').body())}\n\n"
                return
            if event.text:
                yield chunk(cid, model, created, {"content": event.text})
            if event.finish:
                yield chunk(cid, model, created, {}, event.finish)
                if include_usage:
                    yield chunk(cid, model, created, usage_=usage(prompt_tokens, event.completion_tokens))
                yield "data: [DONE]\n\n"
                return
    finally:
        cancel(row)


def cancel(row: Row) -> None:
    """Tell the model to drop `row` before its next step (a no-op once the row is done)."""
    row.cancelled = True


async def refused(request: Request, e: ApiError) -> JSONResponse:
    """Answer a refusal as an OpenAI error object."""
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


async def no_route(request: Request, e: HTTPException) -> JSONResponse:
    """Answer an unknown path (404) or method (405) as an OpenAI error object that names the paths there are."""
    hint = ("this server answers POST /v1/chat/completions, GET /v1/models and GET /health (the old POST / protocol "
            "is gone: see docs/serving.md)")
    what, code = ("no such path", "not_found") if e.status_code == 404 else ("method not allowed", "method_not_allowed")
    error = ApiError(e.status_code, f"{what}: {request.method} {request.url.path}; {hint}", code)
    return JSONResponse(error.body(), status_code=e.status_code)


async def health(request: Request) -> dict:
    """Return the served model, its dtype, what runs and waits, and the batcher's counters."""
    service: Service = request.app.state.service
    b = service.batcher
    return {"status": "ok", "model": service.model_id, "ref": service.ref, "dtype": service.dtype,
            "running": b.running, "waiting": len(b.waiting), "max_batch": b.max_batch, "max_waiting": b.max_waiting,
            "largest_batch": b.largest_batch, "stats": dict(b.stats),
            "model_seconds": {k: round(v, 3) for k, v in b.decoder.seconds.items()},
            "prefix_cache": {"tokens": len(b.decoder.prefix.ids), "reused_tokens": b.decoder.prefix.reused}}


def model_card(service: Service) -> dict:
    return {"id": service.model_id, "object": "model", "created": service.created, "owned_by": "sftflow"}


async def models(request: Request) -> dict:
    """Return the model list: the one version served."""
    return {"object": "list", "data": [model_card(request.app.state.service)]}


async def one_model(request: Request, model: str) -> dict:
    """Return the served version's model object if `model` names it, else a 404."""
    service: Service = request.app.state.service
    if model not in service.names:
        raise ApiError(404, f"The model '{model}' does not exist: this server serves {service.model_id}",
                       "model_not_found", "model")
    return model_card(service)


async def chat_completions(request: Request) -> Response:
    """Answer a chat completion: checked, encoded, queued for the model, then answered whole or streamed."""
    service: Service = request.app.state.service
    chat = parse_chat(await read_body(request, service.read_timeout_s), service.max_new_tokens, service.names)
    ids = await encode(service, chat)
    row, events = submit(service, ids, chat.sampling)
    if chat.stream:
        # the background task runs even if the client left before the stream began (so its finally never ran)
        return StreamingResponse(stream(service, row, events, len(ids), chat.include_usage),
                                 media_type="text/event-stream", background=BackgroundTask(cancel, row),
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await answer(request, service, row, events, len(ids))


def build_app(service: Service) -> FastAPI:
    """Return the FastAPI app answering the OpenAI chat-completions API for `service`."""
    app = FastAPI(title="sftflow serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_exception_handler(ApiError, refused)
    app.add_exception_handler(HTTPException, no_route)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{model:path}", one_model, methods=["GET"])
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    return app
