"""prepare-base-model against a Hub that answers: a fake Hub on loopback (model info, tree, file HEAD/GET).

Each refusal stops after the one model look-up, with one line; a server error is left to Prefect's retries.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tasks.core.errors import ConfigError, SftflowError
from tasks.model.base_model import TransientHubError, hub_failure, resolve_base_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def online(monkeypatch):
    """Let huggingface_hub make requests (the conftest sets HF_HUB_OFFLINE=1); each test points it at loopback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


def fails_with(call, bound_s: float = 3.0) -> str:
    """Return the one-line ConfigError message `call()` raises, checking it came within `bound_s` seconds."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        call()
    assert time.monotonic() - started < bound_s
    assert "\n" not in str(info.value)
    return str(info.value)


def fake_hub_answers(model_dir: Path) -> dict[str, tuple[int, dict, bytes]]:
    """Return the fake Hub's answers by path: model look-ups, and a full repo org/good with pickle and ONNX extras."""
    def info(repo_id: str, *names: str, gated: str | bool = False) -> tuple[int, dict, bytes]:
        siblings = [{"rfilename": n} for n in names]
        return 200, {}, json.dumps({"id": repo_id, "sha": SHA, "gated": gated, "siblings": siblings}).encode()

    files = {f.name: f.read_bytes() for f in model_dir.iterdir() if f.is_file()}
    files |= {"pytorch_model.bin": b"pickle", "onnx/model.onnx": b"onnx", "model.gguf": b"gguf"}
    tree = [{"type": "file", "path": n, "size": len(b), "oid": f"{i:040x}"} for i, (n, b) in enumerate(files.items())]
    answers = {
        "/api/models/org/missing": (401, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'),
        "/api/models/org/gated": info("org/gated", "config.json", "model.safetensors", gated="manual"),
        "/api/models/org/binonly": info("org/binonly", "config.json", "pytorch_model.bin"),
        "/api/models/org/flaky": (503, {}, b'{"error": "Service Unavailable"}'),
        "/api/models/org/good": info("org/good", *files),
        f"/api/models/org/good/tree/{SHA}": (200, {}, json.dumps(tree).encode()),
    }
    for i, (name, body) in enumerate(files.items()):
        answers[f"/org/good/resolve/{SHA}/{name}"] = (200, {"X-Repo-Commit": SHA, "ETag": f'"{i:040x}"'}, body)
    return answers


@pytest.fixture(scope="module")
def fake_hub(tiny_model_dir):
    """A loopback server answering like the Hub (model info, tree, file HEAD/GET); yields (url, request log)."""
    answers, seen = fake_hub_answers(tiny_model_dir), []

    class Handler(BaseHTTPRequestHandler):
        def answer(self, with_body: bool) -> None:
            seen.append(f"{self.command} {self.path.split('?')[0]}")
            status, headers, body = answers.get(self.path.split("?")[0], (404, {}, b'{"error": "not found"}'))
            self.send_response(status)
            for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}.items():
                self.send_header(k, v)
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self):
            self.answer(with_body=True)

        def do_HEAD(self):
            self.answer(with_body=False)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    server.shutdown()
    server.server_close()


def test_a_hub_id_that_does_not_exist_stops_after_one_request(online, fake_hub, tmp_path):
    url, seen = fake_hub
    seen.clear()
    message = fails_with(lambda: resolve_base_model("org/missing", endpoint=url, cache_dir=tmp_path), bound_s=3)
    assert seen == ["GET /api/models/org/missing"]
    assert message == (
        f"train.base_model=org/missing: no model 'org/missing' on the Hugging Face Hub at {url} (or it is private "
        "and no valid HF_TOKEN is set), and no local directory of that name; check the id, set HF_TOKEN for a "
        "private model, or give a local model directory or .gguf file")


def test_a_gated_hub_model_without_a_token_stops_before_downloading(online, fake_hub, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    url, seen = fake_hub
    seen.clear()
    message = fails_with(lambda: resolve_base_model("org/gated", endpoint=url, cache_dir=tmp_path), bound_s=3)
    assert seen == ["GET /api/models/org/gated"]
    assert message == (
        f"train.base_model=org/gated: org/gated is a gated model and no Hugging Face token is set; accept its "
        f"license at {url}/org/gated and set HF_TOKEN (or run `hf auth login`), or give a local model directory or "
        ".gguf file")


def test_a_hub_repo_with_only_bin_weights_is_refused_before_downloading(online, fake_hub, tmp_path):
    url, seen = fake_hub
    seen.clear()
    message = fails_with(lambda: resolve_base_model("org/binonly", endpoint=url, cache_dir=tmp_path), bound_s=3)
    assert seen == ["GET /api/models/org/binonly"]
    assert message.startswith("train.base_model=org/binonly: the Hub repo has no *.safetensors weights (only "
                              "pytorch_model.bin); sftflow downloads safetensors only, never pickle weights")


def test_a_hub_id_is_downloaded_safetensors_only_and_resolves_to_its_snapshot(online, fake_hub, tmp_path,
                                                                              monkeypatch):
    from huggingface_hub import constants

    url, seen = fake_hub
    seen.clear()
    path = Path(resolve_base_model("org/good", endpoint=url, cache_dir=tmp_path))
    assert path == (tmp_path / "models--org--good" / "snapshots" / SHA).resolve()
    assert sorted(p.name for p in path.iterdir()) == ["chat_template.jinja", "config.json", "generation_config.json",
                                                      "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert not [r for r in seen if r.endswith((".bin", ".onnx", ".gguf"))]
    seen.clear()  # a second resolution is served from the cache after one look-up
    assert resolve_base_model("org/good", endpoint=url, cache_dir=tmp_path) == str(path)
    assert seen == ["GET /api/models/org/good"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # and a later offline run finds it (refs/main)
    assert resolve_base_model("org/good", cache_dir=tmp_path) == str(path)


def test_a_hub_server_error_is_transient_so_prefect_retries_it(online, fake_hub, tmp_path):
    url, _ = fake_hub
    with pytest.raises(TransientHubError) as info:
        resolve_base_model("org/flaky", endpoint=url, cache_dir=tmp_path)
    assert not isinstance(info.value, SftflowError)
    assert str(info.value).startswith(f"train.base_model=org/flaky: the Hugging Face Hub at {url} failed "
                                      f"(HfHubHTTPError: Server error '503 Service Unavailable' for url "
                                      f"'{url}/api/models/org/flaky'); this may pass on a retry")


def test_a_gated_refusal_with_a_token_names_the_license_and_a_lost_connection_while_downloading_is_transient():
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    url = "https://huggingface.co/org/gated/resolve/main/model.safetensors"
    gated = GatedRepoError("403", response=httpx2.Response(403, request=httpx2.Request("GET", url)))
    error = hub_failure("org/gated", gated, "https://huggingface.co", Path("/c"), answered=True)
    assert isinstance(error, ConfigError)
    assert str(error) == (
        "train.base_model=org/gated: the Hub refused access to gated model org/gated for the token in use (HF_TOKEN "
        "or `hf auth login`); accept its license at https://huggingface.co/org/gated with that account, or give a "
        "local model directory or .gguf file")
    lost = hub_failure("org/m", httpx2.ConnectError("reset"), "https://huggingface.co", Path("/c"), answered=True)
    assert isinstance(lost, TransientHubError)




def test_an_incomplete_cached_snapshot_is_named_when_offline(online, fake_hub, tmp_path, monkeypatch):
    from huggingface_hub import constants

    url, _ = fake_hub
    path = Path(resolve_base_model("org/good", endpoint=url, cache_dir=tmp_path))
    (path / "model.safetensors").unlink()  # an interrupted download: the cached tree listing still names it
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    message = fails_with(lambda: resolve_base_model("org/good", cache_dir=tmp_path))
    assert message.startswith(f"train.base_model=org/good: not in the local Hugging Face cache {tmp_path}, and "
                              "HF_HUB_OFFLINE=1 forbids downloading it; ")
    assert message.endswith(f"or give a local model directory or .gguf file (the cached snapshot {path} is "
                            "incomplete)")
