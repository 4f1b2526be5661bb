"""`sftflow serve`: a registered version from a real MLflow sqlite store, answered over real HTTP.

Version 1 (@champion) is a LoRA adapter over the tiny llama; version 2 is full weights whose final norm is zero, so
every logit ties and greedy decoding picks token 0, an end-of-sequence id of its generation config: it stops at once.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tasks.core.errors import ConfigError
from tasks.serving.serve import ModelServer, add_serve_arguments, load_generator, serve_command, serving_method

ROOT = Path(__file__).resolve().parents[2]
NAME = "serve-test"
LIMITS = ["--max-input-tokens", "64", "--max-new-tokens", "16"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir) -> str:
    """Return the tracking URI of a store with NAME/1 (a LoRA adapter, @champion) and NAME/2 (full weights)."""
    import torch
    from mlflow import MlflowClient
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("serve-store")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)  # init_lora_weights=False: a random B too, so the adapter changes what the model says
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(root / "adapter")
    full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        full.model.norm.weight.zero_()
    full.generation_config.eos_token_id = [tokenizer.eos_token_id, 0]
    full.save_pretrained(root / "full")
    for trained in (root / "adapter", root / "full"):
        tokenizer.save_pretrained(trained)

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("serve", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model(NAME)
    for trained, method in ((root / "adapter", "lora"), (root / "full", "full")):
        run_id = client.create_run(experiment).info.run_id
        client.log_artifacts(run_id, str(trained), "trained")
        client.set_terminated(run_id)
        client.create_model_version(NAME, f"runs:/{run_id}/trained", run_id=run_id,
                                    tags={"base_model": str(tiny_model_dir), "train_method": method})
    client.set_registered_model_alias(NAME, "champion", "1")
    return uri


def serve_args(uri: str, ref: str, tmp_path: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args([ref, "--tracking-uri", uri, "--runs-dir", str(tmp_path), "--port", "0", *LIMITS, *extra])


def post(url: str, body: bytes | dict) -> tuple[int, dict]:
    """POST `body` (a dict goes as JSON) and return the status and the JSON answer, 4xx included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method="POST"), timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def greedy_text(model, tokenizer, messages: list[dict], max_new_tokens: int) -> str:
    """Return what `model` answers greedily, generated here with transformers directly."""
    import torch

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def start_server(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    """Start `main(args)` in its own process (stderr to `log`); return it and its URL once it says it serves."""
    # SIGINT ignored, as in a child of a process that ignores it (seen in the full suite): Ctrl-C must still stop it
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); from tasks.serving.serve import main; "
            "sys.exit(main(sys.argv[1:]))")
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr,
                                text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=lambda: [*map(lines.put, proc.stdout), lines.put(None)], daemon=True).start()
    try:
        first = lines.get(timeout=180)
    except queue.Empty:
        first = None
    if first is None:
        proc.kill()
        raise AssertionError(f"the server did not start:\n{log.read_text()}")
    match = re.search(r"on (http://127\.0\.0\.1:\d+)", first)
    assert match, first
    proc.lines = lines  # what it prints after the first line
    return proc, match.group(1)


def test_serving_loads_quantized_lora_bases_full_precision_on_a_cpu_unless_asked_to_load_as_trained():
    assert serving_method("qlora", cuda=False) == "lora"
    assert serving_method("lora_8bit", cuda=False) == "lora"
    assert serving_method("qlora", cuda=False, as_trained=True) == "qlora"
    assert serving_method("qlora", cuda=True) == "qlora"
    assert serving_method("full", cuda=False) == "full"


def test_served_champion_answers_both_request_shapes_as_the_model_does_refuses_bad_input_and_stops_on_ctrl_c(
        store, tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from tasks.core.config import TrainConfig
    from tasks.model.modeling import load_trained_model

    proc, url = start_server([f"{NAME}@champion", "--tracking-uri", store, "--runs-dir", str(tmp_path),
                              "--port", "0", *LIMITS], tmp_path / "server.log")
    try:
        assert get(f"{url}/health") == (200, {"status": "ok", "model": f"{NAME}/1", "ref": f"{NAME}@champion"})
        alpaca = post(url, {"instruction": "Extract the order.", "input": "2 lamps to Oslo", "max_new_tokens": 8})
        chat = post(f"{url}/generate", {"messages": [{"role": "user", "content": "Extract the order.\n\n2 lamps to "
                                                                                 "Oslo"}], "max_new_tokens": 8})
        bad_json = post(url, b'{"instruction": "Hi",')
        missing = post(url, {"input": "2 lamps", "max_new_tokens": 8})
        too_long = post(url, {"instruction": "lamp " * 100})
        sampled = [post(url, {"instruction": "Hi", "temperature": 0.9, "seed": 3, "max_new_tokens": 16})
                   for _ in range(2)]
        still_up = get(f"{url}/health")[0]
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)

    trained = tmp_path / "served" / f"{NAME}-v1" / "trained"  # what the server downloaded from the store
    tokenizer = AutoTokenizer.from_pretrained(trained)
    model = load_trained_model(str(tiny_model_dir), trained, TrainConfig(method="lora")).eval()
    messages = [{"role": "user", "content": "Extract the order.\n\n2 lamps to Oslo"}]
    expected = greedy_text(model, tokenizer, messages, 8)
    with model.disable_adapter():
        base = greedy_text(model, tokenizer, messages, 8)
    assert alpaca == (200, {"text": expected, "model": f"{NAME}/1", "tokens": 8, "stopped": False})
    assert chat == alpaca
    assert expected != base  # the adapter is what answers, not the bare base
    assert bad_json[0] == 400 and bad_json[1]["error"].startswith("the body is not JSON")
    assert missing == (400, {"error": "missing field: send 'instruction' (with an optional 'input') or 'messages'"})
    assert too_long[0] == 413 and re.fullmatch(r"the prompt is \d+ tokens after the chat template; this server takes "
                                               r"at most 64 \(--max-input-tokens\)", too_long[1]["error"])
    assert sampled[0] == sampled[1] and sampled[0][0] == 200  # a seed makes sampling repeatable
    assert still_up == 200
    assert rc == 0 and proc.lines.get(timeout=5).startswith(f"stopped serving {NAME}/1")
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    with pytest.raises(urllib.error.URLError):
        get(f"{url}/health")


def test_an_unknown_model_ref_fails_the_command_with_one_line(store, tmp_path):
    # SIGINT ignored, as in a child of a process that ignores it (seen in the full suite): Ctrl-C must still stop it
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); from tasks.serving.serve import main; "
            "sys.exit(main(sys.argv[1:]))")
    result = subprocess.run([sys.executable, "-c", code, f"{NAME}@nope", "--tracking-uri", store, "--runs-dir",
                             str(tmp_path)], check=False, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert result.returncode == 2
    expected = (f"sftflow: error: no registered version '{NAME}@nope' with trained weights in {store}: check the "
                "model name, the alias (e.g. NAME@champion) or the version number (NAME/3)")
    assert result.stderr.splitlines() == [expected]
    for ref in (f"{NAME}/99", "no-such-model@champion"):
        with pytest.raises(ConfigError, match=f"no registered version '{re.escape(ref)}'"):
            serve_command(serve_args(store, ref, tmp_path))
    with pytest.raises(ConfigError, match="no MLflow store at .*mlflow.db: run `sftflow run` first"):
        serve_command(serve_args(f"sqlite:///{tmp_path / 'mlflow.db'}", f"{NAME}@champion", tmp_path))
    assert not (tmp_path / "mlflow.db").exists()  # looking created no empty store


def test_server_serves_a_version_by_number_says_when_it_stopped_by_itself_and_names_each_bad_field(store, tmp_path):
    generator = load_generator(serve_args(store, f"{NAME}/2", tmp_path))
    server = ModelServer(("127.0.0.1", 0), generator, f"{NAME}/2")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    hi = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    try:
        answers = {
            "greedy": post(url, {"messages": hi}),
            "budget": post(url, {"instruction": "Hi", "max_new_tokens": 17}),
            "unknown": post(url, {"instruction": "Hi", "temprature": 0.5}),
            "last turn": post(url, {"messages": [*hi, {"role": "assistant", "content": "Hello"}]}),
            "role": post(url, {"messages": [{"role": "robot", "content": "Hi"}]}),
            "temperature": post(url, {"instruction": "Hi", "temperature": -1}),
            "both": post(url, {"instruction": "Hi", "messages": hi}),
            "not an object": post(url, b'["Hi"]'),
            "path": post(f"{url}/nope", {"instruction": "Hi"}),
        }
    finally:
        server.shutdown()
        server.server_close()
    assert answers["greedy"] == (200, {"text": "", "model": f"{NAME}/2", "tokens": 1, "stopped": True})
    errors = {k: v for k, v in answers.items() if k != "greedy"}
    assert {k: status for k, (status, _) in errors.items()} == {**dict.fromkeys(errors, 400), "path": 404}
    assert errors["budget"][1]["error"] == "'max_new_tokens' must be an integer from 1 to 16 (got 17)"
    assert errors["unknown"][1]["error"].startswith("unknown field 'temprature'")
    assert errors["last turn"][1]["error"] == "the last message must be the user's (got 'assistant')"
    assert errors["role"][1]["error"].startswith("messages[0]: role must be one of system, user, assistant")
    assert errors["temperature"][1]["error"] == "'temperature' must be a number from 0 (0: greedy) to 5.0 (got -1)"
    assert errors["both"][1]["error"] == "send 'instruction' or 'messages', not both"
    assert errors["not an object"][1]["error"] == "the body must be a JSON object"
