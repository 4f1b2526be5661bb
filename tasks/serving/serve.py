"""Serve a registered version (`NAME@champion`, `NAME/3`) over HTTP: POST a prompt, get the model's answer.

    sftflow serve sftflow-orders@champion --port 8080
    curl -s http://127.0.0.1:8080/ -d '{"instruction": "Extract the order as JSON.", "input": "2 lamps to Oslo"}'
    curl -s http://127.0.0.1:8080/ -d '{"messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 32,
                                         "temperature": 0.7, "seed": 1}'
    curl -s http://127.0.0.1:8080/health

A request is a JSON object: `instruction` (+ optional `input`: one user turn "instruction\\n\\ninput", as the Alpaca
format trains it) or `messages` ([{role, content}, ...], the user's last); optional `max_new_tokens` (1 to
--max-new-tokens, its default), `temperature` (0, the default: greedy; above 0 samples) and `seed`. The prompt is
rendered with the chat template in the version's trained directory, the one it was trained with. The answer:
{"text", "model": "NAME/VERSION", "tokens": new tokens, "stopped": it ended with EOS/end-of-turn, not at
max_new_tokens}. Bad JSON, a missing, unknown or invalid field, or a prompt over --max-input-tokens gets a 4xx with
{"error": reason}. GET /health names the model. No authentication: keep --host on loopback unless a proxy guards it.

The server is the standard library's ThreadingHTTPServer: one model answers one request at a time (a lock), so an
async framework gains nothing; this keeps serving free of a dependency whose version only Prefect pins (fastapi and
uvicorn are installed as Prefect's), and Ctrl-C or SIGTERM shut it down cleanly.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tasks.core.errors import ConfigError, SftflowError
from tasks.data.formats import NO_INPUT
from tasks.registry.registry import RegisteredVersion, find_version

MAX_BODY_BYTES = 1 << 20
ROLES = ("system", "user", "assistant")
FIELDS = ("instruction", "input", "messages", "max_new_tokens", "temperature", "seed")
MAX_TEMPERATURE = 5.0


class RequestProblem(ValueError):
    """A request the server refuses: `status` is the 4xx it answers with, the message its reason."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class GenerateRequest:
    messages: list[dict]
    max_new_tokens: int
    temperature: float
    seed: int | None


def request_messages(body: dict) -> list[dict]:
    """Return the chat messages a request asks about: its `messages`, or one user turn from instruction + input."""
    if "messages" in body and "instruction" in body:
        raise RequestProblem("send 'instruction' or 'messages', not both")
    if "messages" not in body and "instruction" not in body:
        raise RequestProblem("missing field: send 'instruction' (with an optional 'input') or 'messages'")
    if "instruction" in body:
        instruction, extra = body["instruction"], body.get("input", "")
        if not isinstance(instruction, str) or not instruction.strip():
            raise RequestProblem("'instruction' must be a non-empty string")
        if not isinstance(extra, str):
            raise RequestProblem("'input' must be a string")
        text = f"{instruction}\n\n{extra}" if extra.strip().lower() not in NO_INPUT else instruction
        return [{"role": "user", "content": text}]
    if "input" in body:
        raise RequestProblem("'input' goes with 'instruction'; put it in the messages instead")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise RequestProblem("'messages' must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise RequestProblem(f"messages[{i}] must be an object with exactly 'role' and 'content'")
        if m["role"] not in ROLES or not isinstance(m["content"], str):
            raise RequestProblem(f"messages[{i}]: role must be one of {', '.join(ROLES)} and content a string")
    if messages[-1]["role"] != "user":
        raise RequestProblem(f"the last message must be the user's (got {messages[-1]['role']!r})")
    return messages


def bounded(body: dict, field: str, default, low, high, kind, note: str = ""):
    """Return `body[field]` (or `default` when absent) if it is a `kind` from `low` to `high`; else RequestProblem."""
    value = body.get(field, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high):
        what = "an integer" if kind is int else "a number"
        raise RequestProblem(f"'{field}' must be {what} from {low}{note} to {high} (got {value!r})")
    return value


def parse_request(raw: bytes, max_new_tokens: int) -> GenerateRequest:
    """Return the request in a POST body, or raise RequestProblem saying what is wrong with it."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestProblem(f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestProblem("the body must be a JSON object")
    if unknown := sorted(set(body) - set(FIELDS)):
        raise RequestProblem(f"unknown field {unknown[0]!r} (expected some of {', '.join(FIELDS)})")
    messages = request_messages(body)
    budget = bounded(body, "max_new_tokens", max_new_tokens, 1, max_new_tokens, int)
    temperature = bounded(body, "temperature", 0, 0, MAX_TEMPERATURE, int | float, " (0: greedy)")
    seed = bounded(body, "seed", None, 0, 2**32 - 1, int)
    return GenerateRequest(messages, budget, float(temperature), seed)


def serving_method(method: str, cuda: bool, as_trained: bool = False) -> str:
    """Return the method to load a version's base with for serving.

    On a CPU a 4-bit (qlora) or 8-bit (lora_8bit) base goes full precision instead: bitsandbytes' CPU kernels are
    much slower than fp32 matmuls, and a full-precision base lets the adapter merge into it (one matmul per layer,
    not three). The price: the adapter then sits over the exact base instead of the quantized one it was trained and
    evaluated over, so answers can differ slightly from evaluate's; `as_trained` (--as-trained) keeps the training
    precision. On CUDA the quantized base stays: it is what fits in memory.
    """
    if method in ("qlora", "lora_8bit") and not cuda and not as_trained:
        return "lora"
    return method


def load_serving_model(version: RegisteredVersion, as_trained: bool = False) -> Any:
    """Return the version's model ready for inference: full weights, or its adapter over the base (merged into a
    full-precision base, see `serving_method`)."""
    from pydantic import ValidationError

    from tasks.core.config import TrainConfig
    from tasks.model.modeling import has_cuda, is_adapter_dir, load_trained_model

    adapter = is_adapter_dir(version.trained_dir)
    if adapter and (not version.base_model or version.base_model.startswith((".", "/"))
                    and not Path(version.base_model).is_dir()):
        raise ConfigError(f"{version.name}/{version.version} is a LoRA adapter over base_model tag "
                          f"{version.base_model!r}, which is no directory on this machine")
    try:
        cfg = TrainConfig(method=serving_method(version.method, has_cuda(), as_trained))
    except ValidationError:
        raise ConfigError(f"{version.name}/{version.version}: unknown train_method tag {version.method!r}") from None
    model = load_trained_model(version.base_model, version.trained_dir, cfg)
    if adapter and cfg.method == "lora":
        model = model.merge_and_unload()
    return model.eval()


class Generator:
    """One model and its tokenizer, answering one request at a time."""

    def __init__(self, version: RegisteredVersion, model, tokenizer, max_input_tokens: int, max_new_tokens: int):
        self.version, self.model, self.tokenizer = version, model, tokenizer
        self.max_input_tokens, self.max_new_tokens = max_input_tokens, max_new_tokens
        self.model_id = f"{version.name}/{version.version}"
        from tasks.evaluate.evaluate import stop_ids

        self.stop_ids = stop_ids(model, tokenizer)  # what evaluate's stop_rate counts: end-of-turn and EOS ids
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.lock = threading.Lock()
        from tasks.formatting.chat_format import chat_encoder

        # the prompt is cut and tokenized as format cut the training rows (tasks/formatting/masks.py): the same ids
        self.encoder = chat_encoder(tokenizer, tokenizer.chat_template, fast=False)

    def encode(self, request: GenerateRequest) -> list[int]:
        """Return the prompt's token ids (chat template, generation prompt, cut as format cuts a training row), or
        raise RequestProblem if too long."""
        ids = self.encoder.encode_prompt(request.messages)
        if len(ids) > self.max_input_tokens:
            raise RequestProblem(f"the prompt is {len(ids)} tokens after the chat template; this server takes at most "
                                 f"{self.max_input_tokens} (--max-input-tokens)", status=413)
        return ids

    def generate(self, ids: list[int], request: GenerateRequest) -> dict:
        """Return the answer to an encoded prompt: text, model, new tokens and whether it stopped by itself."""
        import torch

        device = next(self.model.parameters()).device
        # do_sample=False always said: a generation_config.json may default to sampling (Qwen's does)
        sampling = {"do_sample": bool(request.temperature)} | ({"temperature": request.temperature}
                                                                if request.temperature else {})
        with self.lock, torch.no_grad():
            if request.seed is not None:
                torch.manual_seed(request.seed)
            out = self.model.generate(torch.tensor([ids], device=device), attention_mask=torch.ones(
                1, len(ids), dtype=torch.long, device=device), max_new_tokens=request.max_new_tokens,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id, **sampling)
        new = out[0, len(ids):].tolist()
        return {"text": self.tokenizer.decode(new, skip_special_tokens=True).strip(), "model": self.model_id,
                "tokens": len(new), "stopped": bool(new) and new[-1] in self.stop_ids}


class ModelServer(ThreadingHTTPServer):
    """The HTTP server around one Generator."""

    daemon_threads = True  # an open keep-alive connection never holds up shutdown

    def __init__(self, address: tuple[str, int], generator: Generator, ref: str):
        super().__init__(address, GenerateHandler)
        self.generator, self.ref = generator, ref


class GenerateHandler(BaseHTTPRequestHandler):
    server: ModelServer

    def reply(self, status: int, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path.split("?")[0] != "/health":
            return self.reply(404, {"error": f"no such path {self.path}: POST / to generate, GET /health"})
        self.reply(200, {"status": "ok", "model": self.server.generator.model_id, "ref": self.server.ref})

    def do_POST(self) -> None:
        if self.path.split("?")[0] not in ("/", "/generate"):
            return self.reply(404, {"error": f"no such path {self.path}: POST / (or /generate) to generate"})
        generator = self.server.generator
        try:
            request = parse_request(self.read_body(), generator.max_new_tokens)
            ids = generator.encode(request)
        except RequestProblem as e:
            return self.reply(e.status, {"error": str(e)})
        try:
            answer = generator.generate(ids, request)
        except Exception as e:  # noqa: BLE001 - answer 500 and keep serving; the traceback goes to the log
            self.log_error("generation failed:\n%s", traceback.format_exc())
            return self.reply(500, {"error": f"generation failed: {type(e).__name__}: {e}"})
        self.reply(200, answer)

    def read_body(self) -> bytes:
        length = self.headers.get("Content-Length", "")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            raise RequestProblem(f"send a body of at most {MAX_BODY_BYTES} bytes, with a Content-Length header", 413)
        return self.rfile.read(int(length))


def default_tracking_uri(runs_dir: Path) -> str:
    """Return the store `sftflow run` uses: MLFLOW_TRACKING_URI when set, else sqlite:///<runs_dir>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def load_generator(args: argparse.Namespace) -> Generator:
    """Return the Generator for the version `args.model` names, or raise ConfigError (one line) if there is none."""
    from transformers import AutoTokenizer

    from tasks.core.config import absent_sqlite_store

    uri = args.tracking_uri or default_tracking_uri(args.runs_dir)
    if absent := absent_sqlite_store(uri):
        raise ConfigError(f"no MLflow store at {absent}: run `sftflow run` first, or point --runs-dir or "
                          "--tracking-uri at the store")
    version = find_version(uri, args.model, Path(args.runs_dir) / "served")
    if version is None:
        raise ConfigError(f"no registered version {args.model!r} with trained weights in {uri}: check the model "
                          "name, the alias (e.g. NAME@champion) or the version number (NAME/3)")
    model = load_serving_model(version, args.as_trained)
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if positions and args.max_input_tokens + args.max_new_tokens > positions:
        raise ConfigError(f"--max-input-tokens {args.max_input_tokens} + --max-new-tokens {args.max_new_tokens} is "
                          f"more than the {positions} positions {version.name}/{version.version} has; lower them")
    # with the chat template it was trained with; never the repository's own code
    tokenizer = AutoTokenizer.from_pretrained(version.trained_dir, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise ConfigError(f"{version.name}/{version.version}: its trained/ tokenizer has no chat template to render "
                          "prompts with")
    return Generator(version, model, tokenizer, args.max_input_tokens, args.max_new_tokens)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `sftflow serve`'s arguments to `parser`."""
    parser.add_argument("model", help="registered version: NAME@alias (e.g. sftflow-orders@champion) or NAME/VERSION")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--port", type=int, default=8080, help="port (0: any free one; the startup line says which)")
    parser.add_argument("--tracking-uri", help="MLflow store (default MLFLOW_TRACKING_URI, else the runs_dir's)")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"),
                        help="runs_dir: its mlflow.db is the default store; downloads go to <runs_dir>/served")
    parser.add_argument("--max-input-tokens", type=int, default=1024, help="longest prompt, after the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=256,
                        help="default and largest max_new_tokens a request may ask for")
    parser.add_argument("--as-trained", action="store_true",
                        help="load a qlora/lora_8bit base quantized as in training, also on a CPU (slower)")


def serve_command(args: argparse.Namespace) -> None:
    """Serve `args.model` until Ctrl-C or SIGTERM; raise ConfigError if it cannot be found or loaded."""
    if min(args.max_input_tokens, args.max_new_tokens) < 1:
        raise ConfigError("--max-input-tokens and --max-new-tokens must be at least 1")
    generator = load_generator(args)
    try:
        server = ModelServer((args.host, args.port), generator, args.model)
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port") from None
    host, port = server.server_address[:2]
    print(f"serving {generator.model_id} ({args.model}) on http://{host}:{port}: POST / with JSON, GET /health; "
          "Ctrl-C stops", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live only there
    # SIGINT too: a process started by one that ignores SIGINT inherits that, and Python then never raises
    # KeyboardInterrupt, so Ctrl-C would not stop the server
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print(f"stopped serving {generator.model_id}", flush=True)
    finally:
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """Run `serve` on its own (python -m tasks.serving.serve MODEL ...); return the exit code."""
    from tasks.core.settings import apply_defaults

    parser = argparse.ArgumentParser(prog="sftflow serve", description=__doc__.split("\n")[0])
    add_serve_arguments(parser)
    args = parser.parse_args(argv)
    apply_defaults()
    try:
        serve_command(args)
    except SftflowError as e:
        print(f"sftflow: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
