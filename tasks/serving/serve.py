"""Serve a registered version (`NAME@champion`, `NAME/3`) through the OpenAI chat-completions API.

    sftflow serve sftflow-orders@champion --port 8080
    curl -s http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "sftflow-orders@champion", "messages": [{"role": "user", "content": "..."}]}'

Any OpenAI client works against base_url http://127.0.0.1:8080/v1 (docs/serving.md has the protocol, the options and
the `openai` package example). The version is found in the MLflow registry and loaded as evaluate loads it; prompts are
rendered and cut by the chat encoder exactly as format cut the training rows (tasks/formatting/masks.py), with the
version's own tokenizer and chat template; an answer ends at the template's end of turn (the stop ids evaluate counts),
a `stop` string, or its token budget. Requests share batches on the model's one thread (tasks/serving/batcher.py,
tasks/serving/decode.py); FastAPI and uvicorn do the HTTP (tasks/serving/app.py). No authentication: keep --host on
loopback unless a proxy guards it.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from tasks.core.errors import ConfigError, SftflowError
from tasks.registry.registry import RegisteredVersion, find_version

GRACEFUL_SHUTDOWN_S = 5  # in-flight answers get this long to finish after Ctrl-C or SIGTERM


def serving_method(method: str, cuda: bool, as_trained: bool = False) -> str:
    """Return the method to load a version's base with for serving.

    On a CPU a 4-bit (qlora) or 8-bit (lora_8bit) base is served as plain weights instead: bitsandbytes' CPU kernels
    are much slower than dense matmuls, and plain weights let the adapter merge in (one matmul per layer, not three).
    The base is still the quantized one the adapter was trained and evaluated over, loaded quantized and dequantized
    before the merge (`load_serving_model`), as the MLflow model is: merged into the exact base instead, GSM8K's
    answers (configs/gsm8k.yaml) all differed from evaluate's within a few tokens. `as_trained` (--as-trained) keeps
    the base quantized. On CUDA the quantized base stays: it is what fits in memory.
    """
    if method in ("qlora", "lora_8bit") and not cuda and not as_trained:
        return "lora"
    return method


def serving_precision(version: RegisteredVersion, dtype: str, cuda: bool, merged: bool):
    """Return the precision `sftflow serve --dtype DTYPE` computes `version` in: fp32 or bf16 as forced; under auto,
    fp32 for an adapter merged on a CPU (the MLflow model's weights and dtype: in bf16 the merged weights round the
    adapter's small deltas away, and on GSM8K 22 of 64 long answers stayed evaluate's, against 43 in fp32), else the
    dtype evaluate computed the version in (tasks/model/modeling.py evaluation_precision)."""
    from tasks.model import modeling
    from tasks.model.precision import Precision, choose_precision

    if dtype != "auto":
        return choose_precision(dtype, cuda)
    if merged and not cuda:
        return Precision("fp32", "an adapter merged on a CPU is served in fp32, as the MLflow model holds it")
    return modeling.evaluation_precision(version.method, version.compute_dtype)


def load_serving_model(version: RegisteredVersion, as_trained: bool = False, dtype: str = "fp32") -> Any:
    """Return the version's model ready for inference: full weights, or its adapter over the base (merged into it,
    a quantized base dequantized first, see `serving_method`). On a CPU its full-precision weights then take `dtype`
    (`serving_precision`), so that it answers as it was evaluated and gated; a base kept quantized (`as_trained`)
    computes in its own dtype, and on CUDA the weights load as trained."""
    from pydantic import ValidationError

    from tasks.core.config import TrainConfig
    from tasks.model import modeling
    from tasks.serving.packed import pack_linears

    cuda = modeling.has_cuda()
    adapter = modeling.is_adapter_dir(version.trained_dir)
    # the base by its spec, resolved on this machine (a GGUF converted, a Hub id fetched), or its registered
    # directory where that is still here
    base = modeling.resolve_version_base(version.base_model, version.base_path) if adapter else ""
    try:
        cfg = TrainConfig(method=serving_method(version.method, cuda, as_trained))
    except ValidationError:
        raise ConfigError(f"{version.name}/{version.version}: unknown train_method tag {version.method!r}") from None
    if adapter and cfg.method == "lora":  # merged: into the base as trained (a quantized one dequantized), in fp32
        from tasks.registry.mlflow_model import load_full_model, merge_dtype

        model = load_full_model(base, version.trained_dir, merge_dtype(), version.method)
    else:
        model = modeling.load_trained_model(base, version.trained_dir, cfg)
    precision = serving_precision(version, dtype, cuda, merged=adapter and cfg.method == "lora")
    if not cuda and cfg.method not in ("qlora", "lora_8bit") and precision.name != "fp32":
        model = model.to(precision.torch_dtype)
    model = model.eval()
    if not cuda and cfg.method not in ("qlora", "lora_8bit"):
        pack_linears(model)  # a plain model's fp32 layers, laid out once for batched decoding (tasks/serving/packed.py)
    return model


def default_tracking_uri(runs_dir: Path) -> str:
    """Return the store `sftflow run` uses: MLFLOW_TRACKING_URI when set, else sqlite:///<runs_dir>/mlflow.db."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def find_served_version(args: argparse.Namespace) -> RegisteredVersion:
    """Return the version `args.model` names, downloaded, or raise ConfigError (one line) if there is none."""
    from tasks.core.config import absent_sqlite_store

    uri = args.tracking_uri or default_tracking_uri(args.runs_dir)
    if absent := absent_sqlite_store(uri):
        raise ConfigError(f"no MLflow store at {absent}: run `sftflow run` first, or point --runs-dir or "
                          "--tracking-uri at the store")
    version = find_version(uri, args.model, Path(args.runs_dir) / "served")
    if version is None:
        raise ConfigError(f"no registered version {args.model!r} with trained weights in {uri}: check the model "
                          "name, the alias (e.g. NAME@champion) or the version number (NAME/3)")
    return version


def serving_parts(version: RegisteredVersion, as_trained: bool = False, dtype: str = "auto"):
    """Return (model, tokenizer, prompt encoder, decoder) answering for `version` as `sftflow serve` does: the model
    loaded for serving (`load_serving_model`), its trained/ tokenizer and chat template, the prompt cut and tokenized
    as format cut the training rows, and the batched decoder stopping where evaluate's stop_rate counts a stop."""
    from transformers import AutoTokenizer

    from tasks.evaluate.evaluate import stop_ids
    from tasks.formatting.chat_format import chat_encoder
    from tasks.serving.decode import Decoder

    model = load_serving_model(version, as_trained, dtype)
    # with the chat template it was trained with; never the repository's own code
    tokenizer = AutoTokenizer.from_pretrained(version.trained_dir, trust_remote_code=False)
    if not tokenizer.chat_template:
        raise ConfigError(f"{version.name}/{version.version}: its trained/ tokenizer has no chat template to render "
                          "prompts with")
    stops = stop_ids(model, tokenizer)  # what evaluate's stop_rate counts: end-of-turn and EOS ids
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    # the prompt is cut and tokenized as format cut the training rows (tasks/formatting/masks.py): the same ids
    encoder = chat_encoder(tokenizer, tokenizer.chat_template, fast=False)
    # answering with the repetition penalty its held-out scores were measured with (evaluate.repetition_penalty)
    return model, tokenizer, encoder, Decoder(model, tokenizer, stops, pad, version.repetition_penalty)


def served_answers(version: RegisteredVersion, prompts: list[list[dict]], max_new_tokens: int,
                   batch_size: int) -> list[str]:
    """Return the greedy answers `sftflow serve` (its defaults) gives to chat `prompts`: the same loading, prompt
    ids and batched decoder, `batch_size` rows at a time, without the HTTP around them (which moves text, not
    tokens). The serving-parity check's `served` path (tasks/registry/parity.py)."""
    import torch

    from tasks.serving.decode import Event, Row, Sampling

    _, _, encoder, decoder = serving_parts(version)
    answers: list[list[str]] = [[] for _ in prompts]

    def collect(k: int):
        def emit(event: Event) -> None:
            if event.error:
                raise RuntimeError(event.error)
            answers[k].append(event.text)
        return emit

    waiting = [Row(encoder.encode_prompt(p), Sampling(max_new_tokens), collect(k)) for k, p in enumerate(prompts)]
    batch = None
    with torch.inference_mode():
        while waiting or batch is not None:
            room = batch_size - (len(batch.rows) if batch else 0)
            newcomers, waiting = waiting[:room], waiting[room:]
            batch = decoder.advance(batch, newcomers)
    return ["".join(parts).strip() for parts in answers]


def load_service(args: argparse.Namespace):
    """Return the Service (tasks/serving/app.py) answering for the version `args.model` names, its batcher not yet
    started; raise ConfigError (one line) if the version cannot be found or served within the limits asked."""
    from tasks.serving.app import Service
    from tasks.serving.batcher import Batcher

    version = find_served_version(args)
    model, _, encoder, decoder = serving_parts(version, args.as_trained, args.dtype)
    positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    if positions and args.max_input_tokens + args.max_new_tokens > positions:
        raise ConfigError(f"--max-input-tokens {args.max_input_tokens} + --max-new-tokens {args.max_new_tokens} is "
                          f"more than the {positions} positions {version.name}/{version.version} has; lower them")
    batcher = Batcher(decoder, args.max_batch, args.max_waiting, args.batch_window_ms / 1000)
    model_id = f"{version.name}/{version.version}"
    return Service(model_id, tuple(dict.fromkeys((model_id, args.model, version.name))), batcher,
                   encoder.encode_prompt, args.max_input_tokens, args.max_new_tokens, args.read_timeout, args.model,
                   str(next(model.parameters()).dtype).removeprefix("torch."))


def header_deadline(timeout_s: float) -> type:
    """Return uvicorn's h11 protocol with a deadline for each request's line and headers, from the connection's
    start or the previous answer's end. uvicorn times an idle keep-alive connection only until its first byte, so a
    client that sends headers a byte at a time would hold its connection forever."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        deadline = None

        def arm(self) -> None:
            self.disarm()
            self.deadline = self.loop.call_later(timeout_s, self.transport.close)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def data_received(self, data: bytes) -> None:
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # the headers are in: the app's own deadline times the body
                self.disarm()

        def on_response_complete(self) -> None:
            cycle = self.cycle
            super().on_response_complete()
            if self.cycle is cycle and not self.transport.is_closing():
                self.arm()

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

    return HeaderDeadline


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
                        help="default and largest max_tokens a request may ask for")
    parser.add_argument("--max-batch", type=int, default=8, help="most requests decoded together in one batch")
    parser.add_argument("--max-waiting", type=int, default=32,
                        help="most requests waiting behind a full batch; one more is answered 503 at once")
    parser.add_argument("--batch-window-ms", type=float, default=10,
                        help="how long an idle model waits for more requests to batch with the first")
    parser.add_argument("--read-timeout", type=float, default=30,
                        help="seconds a client has to send its request's headers, and again its body (408 after)")
    parser.add_argument("--keep-alive", type=int, default=5, help="seconds an idle keep-alive connection stays open")
    parser.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                        help="CPU weights and compute: auto (as evaluate computed the version here: bf16 for a "
                             "qlora version where the CPU has bf16 natively, else fp32), fp32, bf16")
    parser.add_argument("--as-trained", action="store_true",
                        help="load a qlora/lora_8bit base quantized as in training, also on a CPU (slower)")


def check_arguments(args: argparse.Namespace) -> None:
    """Raise ConfigError (one line) for a limit that cannot work."""
    for name in ("max_input_tokens", "max_new_tokens", "max_batch", "read_timeout", "keep_alive"):
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be above 0 (got {getattr(args, name)})")
    if args.max_waiting < 0 or args.batch_window_ms < 0:
        raise ConfigError("--max-waiting and --batch-window-ms must be 0 or more")


def log_to_stderr() -> None:
    """Send the server's own, uvicorn's and its access log lines to stderr (one format, INFO and up)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("sftflow.serve", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers, logger.propagate = [handler], False
        logger.setLevel(logging.INFO)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_command(args: argparse.Namespace) -> None:
    """Serve `args.model` until Ctrl-C or SIGTERM; raise ConfigError if it cannot be found, loaded or listened for."""
    import uvicorn

    from tasks.serving.app import build_app

    check_arguments(args)
    service = load_service(args)
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as e:
        raise ConfigError(f"cannot listen on {args.host}:{args.port}: {e.strerror}; pick another --port") from None
    log_to_stderr()
    # connections beyond what the batch and the line can use, plus room for /health and idle keep-alives, get 503
    limit = 2 * (args.max_batch + args.max_waiting) + 16
    config = uvicorn.Config(build_app(service), log_config=None, lifespan="off", ws="none",
                            http=header_deadline(args.read_timeout), timeout_keep_alive=args.keep_alive,
                            limit_concurrency=limit, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)
    host, port = sock.getsockname()[:2]
    service.batcher.start()
    print(f"serving {service.model_id} ({args.model}) on http://{host}:{port}/v1: POST /v1/chat/completions, "
          "GET /v1/models, GET /health; Ctrl-C stops", flush=True)

    # uvicorn catches SIGINT/SIGTERM while it runs and raises them again once it has shut down: these handlers turn
    # that into a clean return. SIGINT too: a process started by one that ignores SIGINT inherits that.
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live only there
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGTERM, signal.SIGINT)} if main_thread else {}
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        service.batcher.stop()
        service.encoder_pool.shutdown(wait=False)
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    print(f"stopped serving {service.model_id}", flush=True)


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
