"""Safe defaults and bad input: servers on loopback, no model code run unless trusted, safetensors only, the Hub token
from the environment or a Prefect Secret block (and nowhere else), and each bad input one line with a non-zero exit.
(A planted token searched in every output of a whole run, and a full disk at the artifact root: test_faults.py.)"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from flows.cli import main, parse_args
from tasks.core.errors import ConfigError
from tests.conftest import ROOT, free_port, listening_hosts, seed_prefect_database, wait_for_http

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.mark.slow  # two real servers started through make
@pytest.mark.parametrize("target, health", [("ui-mlflow", "/health"), ("ui-prefect", "/api/health")])
def test_the_ui_servers_listen_on_loopback_only(target, health, tmp_path, tmp_path_factory):
    """`make ui-mlflow` and `make ui-prefect` started for real (on a free port, a throwaway home): bound to 127.0.0.1.
    (`sftflow serve`: tests/server/test_openai_serve.py; `make prefect-up`: tests/server/test_deployment.py.)"""
    port = free_port()
    env = {**os.environ, "SFTFLOW_HOME": str(tmp_path / "home")}
    env.pop("PREFECT_API_URL", None)
    if target == "ui-prefect":  # the bind is the subject, not Prefect's migrations
        seed_prefect_database(tmp_path / "home" / "prefect", tmp_path_factory)
    server = subprocess.Popen(["make", "-s", target, f"PREFECT_PORT={port}", f"MLFLOW_PORT={port}",
                               f"RUNS={tmp_path}"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}{health}", server)
        assert listening_hosts(port) == {"127.0.0.1"}
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
    assert parse_args(["serve", "sftflow-orders@champion"]).host == "127.0.0.1"  # and the serve default


def model_with_own_code(tiny_model_dir: Path, out: Path, marker: Path) -> Path:
    """Return a copy of the tiny model whose config names a class in its own Python file; importing that file
    writes `marker`."""
    shutil.copytree(tiny_model_dir, out)
    (out / "custom_llama.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
                                         "from transformers import LlamaForCausalLM as CustomLlama\n")
    config = json.loads((out / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "custom_llama.CustomLlama"}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_a_model_shipping_its_own_code_is_refused_unless_trusted_and_its_code_never_runs(tiny_model_dir, tmp_path):
    from tasks.model.base_model import resolve_base_model
    from tasks.model.modeling import load_base_model

    marker = tmp_path / "code-ran"
    model = model_with_own_code(tiny_model_dir, tmp_path / "custom", marker)
    with pytest.raises(ConfigError) as refused:
        resolve_base_model(str(model))
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"train.base_model={model}: the model at {model} runs its own "
                                                      "Python code (config.json: custom_llama.CustomLlama")
    assert "train.trust_remote_code=true" in message
    assert resolve_base_model(str(model), trust_remote_code=True) == str(model.resolve())
    load_base_model(str(model), False)  # the loaders pass trust_remote_code=False: transformers' own llama loads
    assert not marker.exists()


def test_an_adapter_saved_as_a_pickle_is_refused_before_anything_loads(tmp_path):
    from tasks.core.config import TrainConfig
    from tasks.model.modeling import load_trained_model

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (adapter / "adapter_model.bin").write_bytes(b"not even a pickle")
    with pytest.raises(ConfigError) as refused:
        load_trained_model("/no/base/needed", adapter, TrainConfig(method="lora"))
    assert str(refused.value) == (f"{adapter}: no adapter_model.safetensors (only adapter_model.bin); sftflow loads "
                                  "safetensors only, never pickle weights: re-save the adapter with PEFT's "
                                  "save_pretrained, which writes safetensors")


@pytest.fixture
def recording_hub(monkeypatch):
    """A loopback 'Hub' that answers every model look-up with Repository Not Found and records each request's
    Authorization header; huggingface_hub pointed at it and allowed online."""
    from huggingface_hub import constants

    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append(self.headers.get("Authorization", ""))
            body = b'{"error": "Repository not found"}'
            self.send_response(401)
            for k, v in {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json",
                         "Content-Length": str(len(body))}.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    yield seen
    server.shutdown()
    server.server_close()


def test_the_hub_token_comes_from_a_prefect_secret_block_or_hf_token_and_is_never_logged(recording_hub, tmp_path,
                                                                                         monkeypatch):
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter
    from prefect.logging.handlers import APILogHandler

    from tasks.core.secrets import HF_TOKEN_BLOCK
    from tasks.model.prepare import prepare_base_model

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    block_token, env_token = f"hf_{secrets.token_hex(12)}", f"hf_{secrets.token_hex(12)}"
    Secret(value=block_token).save(HF_TOKEN_BLOCK, overwrite=True)
    try:
        state = prepare_base_model.with_options(retries=0)("org/private-model", return_state=True)
        monkeypatch.setenv("HF_TOKEN", env_token)  # the environment wins over the block
        with pytest.raises(ConfigError):
            prepare_base_model.with_options(retries=0)("org/private-model")
    finally:
        Secret.delete(HF_TOKEN_BLOCK)
    assert recording_hub == [f"Bearer {block_token}", f"Bearer {env_token}"]
    message = str(state.result(raise_on_failure=False))
    assert message.startswith("train.base_model=org/private-model: no model 'org/private-model' on the Hugging Face "
                              "Hub") and block_token not in message
    APILogHandler().flush()  # logs reach the API in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(task_run_id={"any_": [str(state.state_details.task_run_id)]}))
    assert logs and not [log.message for log in logs if block_token in log.message or env_token in log.message]


def one_error_line(capsys) -> str:
    """Return the CLI's stderr, checked to be exactly one `sftflow: error:` line."""
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sftflow: error: "), err
    return err.removeprefix("sftflow: error: ")


def test_a_config_that_cannot_be_read_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2  # a directory where the config file should be
    assert one_error_line(capsys) == f"{tmp_path}: cannot read the config: Is a directory"
    binary = tmp_path / "model.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")  # not text (chmod 000 cannot stop root, who runs CI here)
    assert main(["run", str(binary)]) == 2
    assert one_error_line(capsys) == f"{binary}: cannot read the config: not UTF-8 text"


def test_a_missing_data_file_is_one_line_naming_it_and_exit_2(tmp_path, tiny_model_dir, capsys):
    missing = tmp_path / "support_chats.jsonl"
    assert main(["run", str(TINY), "--set", f"runs_dir={tmp_path}/runs", "--set", f"train.base_model={tiny_model_dir}",
                 "--set", f"data.sources=[{{path: {missing}}}]"]) == 2
    assert str(missing) in one_error_line(capsys)


def test_a_model_path_that_does_not_exist_is_one_line_naming_it_and_exit_2(tmp_path, capsys):
    assert main(["run", str(TINY), "--set", f"runs_dir={tmp_path}/runs",
                 "--set", f"train.base_model={tmp_path}/no-such-model"]) == 2
    assert one_error_line(capsys).startswith(f"train.base_model={tmp_path}/no-such-model: no such directory "
                                             f"{tmp_path}/no-such-model")


def test_a_run_id_that_does_not_exist_is_one_line_and_exit_2(tmp_path, capsys):
    assert main(["task", "train", "--run", "nope", "--runs-dir", str(tmp_path)]) == 2
    assert one_error_line(capsys) == (f"{tmp_path}/nope/config.yaml: no such run (expected the config saved by "
                                      "`sftflow run`)")
    assert main(["diagnose", "--run", "nope", "--runs-dir", str(tmp_path)]) == 2
    assert "nope" in one_error_line(capsys)
