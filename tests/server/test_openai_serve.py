"""`sftflow serve` through the official `openai` client: real server processes started with the real CLI on free
loopback ports, serving versions of a real sqlite MLflow store (tests/conftest.py `served_store`).

The champion (a LoRA adapter over the tiny llama) answers as transformers generates; version 3 never stops before its
budget, so the batching, queue-limit and disconnect tests hold requests in flight as long as they need.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tasks.core.errors import ConfigError
from tasks.serving.serve import add_serve_arguments, serve_command, serving_method, serving_precision
from tests.conftest import ROOT, SERVED, listening_hosts

pytestmark = pytest.mark.slow  # sftflow serve as real server processes

ORDER = ('Extract the order as JSON with keys "customer", "item", "quantity", "city".\n\n'
         "Hi, this is Maria Lopez from Denver. Please send 3 x desk lamp.")
# fp32: the answers are compared with transformers' in fp32 (the endless server forces bf16, the others take --dtype
# auto, which serves a lora or full version in fp32 on a CPU, as evaluate computes it)
CHAMPION_LIMITS = ["--max-input-tokens", "96", "--max-new-tokens", "16", "--read-timeout", "2", "--dtype", "fp32"]


def start_server(ref: str, uri: str, runs: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start `sftflow serve REF` (stderr to runs/server.log); return it and its URL once its first line says it
    serves."""
    cli = Path(sys.executable).parent / "sftflow"
    runs.mkdir(parents=True, exist_ok=True)
    with (runs / "server.log").open("w") as stderr:
        proc = subprocess.Popen([str(cli), "serve", ref, "--tracking-uri", uri, "--runs-dir", str(runs), "--port",
                                 "0", *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
    try:
        first = lines.get(timeout=240)
    except queue.Empty:
        first = None
    if first is None or not (match := re.search(r" on (http://127\.0\.0\.1:\d+)/v1: ", first)):
        proc.kill()
        raise AssertionError(f"the server did not start ({first!r}):\n{(runs / 'server.log').read_text()}")
    proc.lines = lines
    return proc, match.group(1)


def stop_server(proc: subprocess.Popen, sig: int = signal.SIGINT) -> tuple[int, str]:
    """Stop the server with `sig`; return its exit code and its last stdout line."""
    proc.send_signal(sig)
    rc = proc.wait(timeout=60)
    return rc, proc.lines.get(timeout=5)


@pytest.fixture(scope="module")
def champion(served_store, tmp_path_factory):
    """The URL of `sftflow serve SERVED@champion` (16 new tokens at most, 2 s to send a request)."""
    runs = tmp_path_factory.mktemp("champion")
    proc, url = start_server(f"{SERVED}@champion", served_store, runs, *CHAMPION_LIMITS)
    yield url, runs
    stop_server(proc)


@pytest.fixture(scope="module")
def endless(served_store, tmp_path_factory):
    """The URL of `sftflow serve SERVED/3`, which answers until its budget: 2 rows a batch, 2 more may wait."""
    runs = tmp_path_factory.mktemp("endless")
    proc, url = start_server(f"{SERVED}/3", served_store, runs, "--max-batch", "2", "--max-waiting", "2",
                             "--max-input-tokens", "64", "--max-new-tokens", "6000", "--dtype", "bf16")
    yield url, runs
    rc, last = stop_server(proc, signal.SIGTERM)  # as a process manager stops it
    assert (rc, last) == (0, f"stopped serving {SERVED}/3\n")


def client(url: str, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **kw)


def ask(url: str, content: str = ORDER, **kw):
    return client(url).chat.completions.create(model=kw.pop("model", f"{SERVED}@champion"),
                                               messages=[{"role": "user", "content": content}], **kw)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=30).json()


def wait_for(url: str, condition, what: str, timeout_s: float = 60) -> dict:
    """Poll /health until `condition(health)` holds; return that health."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition(state := health(url)):
            return state
        time.sleep(0.02)
    raise AssertionError(f"{what}: never happened; last /health {state}")


def expected_answer(store: str, base: str, content: str, max_tokens: int, adapter: bool = True
                    ) -> tuple[str, int, list[int]]:
    """Return (text, prompt tokens, generated ids) transformers' generate() gives for `content` on the champion
    (or on its bare base), its prompt encoded as the server encodes it."""
    from contextlib import nullcontext

    import torch
    from transformers import AutoTokenizer

    from tasks.core.config import TrainConfig
    from tasks.evaluate.evaluate import stop_ids
    from tasks.formatting.chat_format import chat_encoder
    from tasks.model.modeling import load_trained_model

    trained = Path(store.removeprefix("sqlite:///")).parent / "adapter"  # what served_store registered as v1
    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = load_trained_model(base, trained, TrainConfig(method="lora")).eval()
    ids = chat_encoder(tokenizer, tokenizer.chat_template, fast=False).encode_prompt([{"role": "user",
                                                                                       "content": content}])
    stops = stop_ids(model, tokenizer)
    with torch.no_grad(), nullcontext() if adapter else model.disable_adapter():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_tokens, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    new = out[0, len(ids):].tolist()
    body = new[:-1] if new and new[-1] in stops else new
    return tokenizer.decode(body, skip_special_tokens=True, clean_up_tokenization_spaces=False), len(ids), new


def test_serving_loads_quantized_lora_bases_full_precision_on_a_cpu_unless_asked_to_load_as_trained():
    assert serving_method("qlora", cuda=False) == "lora"
    assert serving_method("lora_8bit", cuda=False) == "lora"
    assert serving_method("qlora", cuda=False, as_trained=True) == "qlora"
    assert serving_method("qlora", cuda=True) == "qlora"
    assert serving_method("full", cuda=False) == "full"


def test_an_adapter_merged_on_a_cpu_is_served_in_fp32_under_auto_and_in_a_forced_dtype_otherwise():
    """--dtype auto: a qlora version merged on a CPU computes in fp32 (the MLflow model's dtype), not its
    train.compute_dtype; kept quantized (--as-trained) it computes in that; fp32 and bf16 are forced."""
    from tasks.registry.registry import RegisteredVersion

    version = RegisteredVersion("m", "1", Path("."), "base", "qlora", compute_dtype="bf16")
    assert serving_precision(version, "auto", cuda=False, merged=True).name == "fp32"
    assert serving_precision(version, "auto", cuda=False, merged=False).name == "bf16"
    assert serving_precision(version, "bf16", cuda=False, merged=True).name == "bf16"
    assert serving_precision(version, "fp32", cuda=False, merged=False).name == "fp32"


def test_the_champion_answers_an_openai_chat_as_transformers_generates_it_with_openai_fields(
        champion, served_store, tiny_model_dir):
    url, _ = champion
    answer = ask(url, max_tokens=12)
    text, prompt_tokens, new = expected_answer(served_store, str(tiny_model_dir), ORDER, 12)
    assert answer.choices[0].message.content == text and text
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].index == 0
    assert answer.choices[0].finish_reason == ("stop" if len(new) < 12 else "length")
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        prompt_tokens, len(new), prompt_tokens + len(new))
    assert answer.model == f"{SERVED}/1" and answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert abs(answer.created - time.time()) < 120
    bare = expected_answer(served_store, str(tiny_model_dir), ORDER, 12, adapter=False)[0]
    assert text != bare  # the adapter is what answers, not the bare base


def test_a_streamed_answer_joins_to_the_plain_one_and_ends_with_usage_and_done(champion):
    url, _ = champion
    plain = ask(url)
    chunks = list(ask(url, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump() | {
        "completion_tokens_details": None, "prompt_tokens_details": None}
    assert {c.id for c in chunks} == {chunks[0].id} and {c.object for c in chunks} == {"chat.completion.chunk"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": ORDER}],
                                                                  "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream") and events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events) and not any('"usage"' in e for e in events)


def test_models_and_health_name_the_served_version(champion):
    url, _ = champion
    assert [m.id for m in client(url).models.list()] == [f"{SERVED}/1"]
    assert client(url).models.retrieve(f"{SERVED}/1").owned_by == "sftflow"
    state = health(url)
    assert (state["status"], state["model"], state["ref"], state["max_batch"], state["dtype"]) == (
        "ok", f"{SERVED}/1", f"{SERVED}@champion", 8, "float32")
    assert listening_hosts(int(url.rsplit(":", 1)[1])) == {"127.0.0.1"}  # the default bind: loopback only


def test_stop_strings_seeds_and_sampling_behave_as_openai_documents_them(champion):
    url, _ = champion
    full = ask(url, max_tokens=16).choices[0].message.content
    stop = full[6:9]
    cut = ask(url, max_tokens=16, stop=[stop, "nowhere"])
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(url, max_tokens=16, stop=stop, stream=True))
    assert cut.choices[0].message.content == full[:full.find(stop)] == streamed
    assert cut.choices[0].finish_reason == "stop"
    sampled = [ask(url, max_tokens=16, temperature=1.5, top_p=0.95, seed=s).choices[0].message.content
               for s in (11, 11, 12)]
    assert sampled[0] == sampled[1] != sampled[2] and sampled[0] != full
    # vLLM's repetition_penalty through the client's extra_body: 1.0 is the version's own (off) and answers as without;
    # one below 1 favours the tokens seen, which the random tiny llama never repeats by itself
    assert ask(url, max_tokens=16, extra_body={"repetition_penalty": 1.0}).choices[0].message.content == full
    assert ask(url, max_tokens=16, extra_body={"repetition_penalty": 0.3}).choices[0].message.content != full
    documented = ask(url, max_tokens=16, extra_body={"repetition_penalty": 1.1})  # docs/serving.md's example
    assert documented.choices[0].message.content and documented.usage.completion_tokens <= 16


def refusal(response: httpx.Response) -> tuple[int, str | None, str]:
    """Return (status, code, message) of an OpenAI error answer, checking its shape."""
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str), error
    assert error["type"] == ("invalid_request_error" if response.status_code < 500 else "server_error")
    return response.status_code, error["code"], error["message"]


def test_every_refusal_is_an_openai_error_object_with_its_status(champion):
    url, _ = champion
    msgs = [{"role": "user", "content": "Hi"}]
    with httpx.Client(base_url=url, timeout=60) as raw:
        post = lambda content, **h: raw.post("/v1/chat/completions", content=content, headers=h)  # noqa: E731
        got = {
            "bad json": refusal(post(b'{"messages": [')),
            "deep json": refusal(post(b"[" * 200_000 + b"]" * 200_000)),
            "not an object": refusal(post(b'["Hi"]')),
            "bad utf-8": refusal(post(b'{"messages": "\xff"}')),
            "no messages": refusal(post(b"{}")),
            "assistant last": refusal(post(json.dumps({"messages": msgs + [{"role": "assistant", "content": "x"}]}))),
            "old protocol": refusal(raw.post("/", json={"instruction": "Hi"})),
            "wrong method": refusal(raw.get("/v1/chat/completions")),
            "unknown model path": refusal(raw.get("/v1/models/gpt-4o")),
        }
    sdk = client(url).chat.completions
    calls = {
        "n=2": lambda: sdk.create(model=f"{SERVED}/1", messages=msgs, n=2),
        "unknown model": lambda: sdk.create(model="gpt-4o", messages=msgs),
        "max_tokens too high": lambda: sdk.create(model=SERVED, messages=msgs, max_tokens=17),
        "max_tokens zero": lambda: sdk.create(model=SERVED, messages=msgs, max_tokens=0),
        "too long prompt": lambda: sdk.create(model=SERVED, messages=[{"role": "user", "content": "lamp " * 200}]),
        "typo": lambda: sdk.create(model=SERVED, messages=msgs, extra_body={"max_token": 5}),
        "tools": lambda: sdk.create(model=SERVED, messages=msgs, tools=[{"type": "function", "function": {
            "name": "f"}}]),
    }
    for name, call in calls.items():
        with pytest.raises(openai.APIStatusError) as refused:
            call()
        got[name] = refusal(refused.value.response)
    assert {k: v[:2] for k, v in got.items()} == {
        "bad json": (400, "invalid_json"), "deep json": (400, "invalid_json"), "not an object": (400, "invalid_json"),
        "bad utf-8": (400, "invalid_json"), "no messages": (400, "invalid_value"),
        "assistant last": (400, "invalid_value"), "old protocol": (404, "not_found"),
        "wrong method": (405, "method_not_allowed"), "unknown model path": (404, "model_not_found"),
        "n=2": (400, "unsupported_value"), "unknown model": (404, "model_not_found"),
        "max_tokens too high": (400, "invalid_value"), "max_tokens zero": (400, "invalid_value"),
        "too long prompt": (400, "context_length_exceeded"), "typo": (400, "unknown_parameter"),
        "tools": (400, "unsupported_parameter")}
    port = int(url.rsplit(":", 1)[1])  # an oversized body by its header, then one sent in chunks, over raw sockets:
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"  # 413 comes before the rest is read, so a client
    declared = exchange(port, head + b"Content-Length: 2000000\r\n\r\n{")  # still writing it would see a reset
    chunk = b" " * 65536
    chunked = exchange(port, head + b"Transfer-Encoding: chunked\r\n\r\n"
                       + b"%x\r\n%s\r\n" % (len(chunk), chunk) * 17 + b"0\r\n\r\n")
    for raw_reply in (declared, chunked):
        status, _, body = raw_reply.partition("\r\n\r\n")
        assert status.startswith("HTTP/1.1 413 ") and "connection: close" in status.lower()
        assert json.loads(body)["error"] == {"message": "send a body of at most 1048576 bytes",
                                             "type": "invalid_request_error", "param": None, "code": "body_too_large"}
    assert got["deep json"][2] == "the body is nested too deeply to decode; send a flat chat-completions object"
    assert got["n=2"][2].startswith("n=2: this server returns one choice per request")
    assert re.fullmatch(r"the prompt is \d+ tokens after the chat template; this server takes at most 96 "
                        r"\(--max-input-tokens\): shorten the messages", got["too long prompt"][2])
    assert got["unknown model"][2] == (f"The model 'gpt-4o' does not exist: this server serves {SERVED}/1 (also "
                                       f"called {SERVED}@champion or {SERVED})")
    assert "POST /v1/chat/completions" in got["old protocol"][2]
    assert health(url)["status"] == "ok"  # none of it hurt the server


def exchange(port: int, request: bytes) -> str:
    """Send raw bytes to the server and return everything it answers until it closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while part := sock.recv(65536):
            data += part
    return data.decode()


def test_a_client_that_stalls_mid_body_or_mid_headers_is_timed_out_while_others_are_answered(champion):
    url, _ = champion
    port = int(url.rsplit(":", 1)[1])
    stalled_body, stalled_headers = (socket.create_connection(("127.0.0.1", port)) for _ in range(2))
    start = time.monotonic()
    stalled_body.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 200\r\n\r\n{\"messages\": [")
    stalled_headers.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    meanwhile = ask(url, max_tokens=4)  # answered while both hang
    replies = []
    for sock in (stalled_body, stalled_headers):
        sock.settimeout(30)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        replies.append(data.decode())
        sock.close()
    waited = time.monotonic() - start
    assert meanwhile.choices[0].finish_reason in ("stop", "length")
    assert replies[0].startswith("HTTP/1.1 408 ") and "request_timeout" in replies[0]
    assert "the request body did not arrive within 2 s (--read-timeout)" in replies[0]
    assert replies[1] == ""  # closed without an answer: nothing was asked
    assert 2 <= waited < 20
    assert health(url)["status"] == "ok"


def test_answers_to_concurrent_requests_are_the_ones_each_gets_alone(champion):
    url, _ = champion
    prompts = [ORDER, "Ship 4 yoga mats to Lagos for Chen Wei.", "Hi", ORDER.replace("Maria Lopez", "Noah Silva")]
    alone = [ask(url, p).choices[0].message.content for p in prompts]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: ask(url, p).choices[0].message.content, prompts))
    assert together == alone


def test_concurrent_requests_are_decoded_in_shared_batches(endless):
    url, runs = endless
    before = health(url)["stats"]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda k: ask(url, f"order {k}", model=f"{SERVED}/3", max_tokens=300), range(4)))
    after = health(url)
    assert after["dtype"] == "bfloat16"  # --dtype bf16, forced on any CPU
    assert [(a.choices[0].finish_reason, a.usage.completion_tokens) for a in answers] == [("length", 300)] * 4
    steps = after["stats"]["steps"] - before.get("steps", 0)
    assert after["largest_batch"] == 2 and steps < 0.75 * 4 * 299  # alone, each answer is 299 steps after prefill
    assert re.search(r"batch: \d joined, 2 running", (runs / "server.log").read_text())


def test_a_request_over_the_queue_limit_gets_503_at_once_and_the_line_drains_when_clients_leave(endless):
    url, _ = endless
    sdk = client(url).chat.completions
    kw = {"model": f"{SERVED}/3", "messages": [{"role": "user", "content": "go"}], "max_tokens": 6000,
          "stream": True}
    before = health(url)["stats"].get("cancelled", 0)
    streams = []
    for k, (running, waiting) in enumerate([(1, 0), (2, 0), (2, 1), (2, 2)]):
        streams.append(sdk.create(**kw))
        next(iter(streams[-1]))  # the role chunk: the request was admitted
        wait_for(url, lambda h, r=running, w=waiting: (h["running"], h["waiting"]) == (r, w), f"request {k} placed")
    start = time.monotonic()
    with pytest.raises(openai.InternalServerError) as refused:
        sdk.create(**{**kw, "stream": False})
    assert time.monotonic() - start < 5
    assert refusal(refused.value.response)[:2] == (503, "server_overloaded")
    assert refused.value.response.headers["retry-after"] == "1"
    for stream in streams:
        stream.close()
    state = wait_for(url, lambda h: (h["running"], h["waiting"]) == (0, 0), "the line drained")
    assert state["stats"]["cancelled"] - before == 4 and state["stats"]["rejected"] >= 1


def test_a_client_that_disconnects_cancels_its_generation(endless):
    url, _ = endless
    before = health(url)["stats"]
    stream = ask(url, "go", model=f"{SERVED}/3", max_tokens=6000, stream=True)
    next(iter(stream))
    wait_for(url, lambda h: h["running"] == 1, "the streamed request running")
    stream.close()
    wait_for(url, lambda h: h["running"] == 0 and h["stats"]["cancelled"] == before.get("cancelled", 0) + 1,
             "the streamed request cancelled", timeout_s=10)
    with pytest.raises(openai.APITimeoutError):  # a plain request whose client gives up after 1 s
        client(url, timeout=1.0).chat.completions.create(model=f"{SERVED}/3", max_tokens=6000,
                                                         messages=[{"role": "user", "content": "go"}])
    state = wait_for(url, lambda h: h["running"] == 0 and h["stats"]["cancelled"] == before.get("cancelled", 0) + 2,
                     "the plain request cancelled", timeout_s=10)
    assert state["stats"].get("completed", 0) == before.get("completed", 0)  # neither ran to its 6000 tokens


def test_a_version_by_number_stops_by_itself_and_ctrl_c_stops_the_server(served_store, tmp_path):
    proc, url = start_server(f"{SERVED}/2", served_store, tmp_path / "runs", "--max-input-tokens", "64",
                             "--max-new-tokens", "8")
    try:
        answer = ask(url, "Hi", model=f"{SERVED}/2")
        dtype = health(url)["dtype"]
    finally:
        rc, last = stop_server(proc)
    assert (answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage.completion_tokens) == (
        "", "stop", 1)
    assert rc == 0 and last.startswith(f"stopped serving {SERVED}/2")
    assert dtype == "float32"  # --dtype auto: a full version is served as evaluate computes it on a CPU, in fp32
    with pytest.raises(httpx.ConnectError):
        health(url)


def test_an_unknown_version_fails_the_command_with_one_line(served_store, tmp_path):
    cli = Path(sys.executable).parent / "sftflow"
    result = subprocess.run([str(cli), "serve", f"{SERVED}@nope", "--tracking-uri", served_store, "--runs-dir",
                             str(tmp_path)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"sftflow: error: no registered version '{SERVED}@nope' with trained weights in {served_store}: check the "
        "model name, the alias (e.g. NAME@champion) or the version number (NAME/3)"]
    for ref in (f"{SERVED}/99", "no-such-model@champion"):
        with pytest.raises(ConfigError, match=f"no registered version '{re.escape(ref)}'"):
            serve_command(serve_args(served_store, ref, tmp_path))
    with pytest.raises(ConfigError, match="no MLflow store at .*mlflow.db: run `sftflow run` first"):
        serve_command(serve_args(f"sqlite:///{tmp_path / 'mlflow.db'}", f"{SERVED}@champion", tmp_path))
    assert not (tmp_path / "mlflow.db").exists()  # looking created no empty store
    with pytest.raises(ConfigError, match=r"--max-batch must be above 0 \(got 0\)"):
        serve_command(serve_args(served_store, f"{SERVED}@champion", tmp_path, "--max-batch", "0"))


def serve_args(uri: str, ref: str, runs: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args([ref, "--tracking-uri", uri, "--runs-dir", str(runs), "--port", "0", *extra])
