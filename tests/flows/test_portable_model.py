"""A registered version works on another machine: registered by a pipeline run in one directory (its base a GGUF
file, converted into that directory's cache as the packaged SmolLM2 is: the tiny llama as a GGUF, so it takes seconds),
then, from another directory with another runs_dir, an empty
SFTFLOW_CACHE and an empty Hugging Face cache, and the first cache gone, the champion loads and answers through
mlflow.pyfunc, `mlflow models serve` answers /invocations, and the next pipeline run scores the champion over its
base resolved again from its spec (the GGUF converted again). LoRA in fp32 over the tiny llama, so the answers the
MLflow model gives (the adapter merged into the fp32 base) are evaluate's, and the parity check is enforced."""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from flows.sft_pipeline import sft_pipeline
from tests.conftest import ROOT, free_port, wait_for_http

TINY = ROOT / "configs" / "tiny.yaml"
NAME = "sftflow-tiny"
# the GGUF base, LoRA computing in fp32 (the merged MLflow model's precision), and the parity check enforced as by
# default (tiny.yaml relaxes it for QLoRA over the random tiny llama, whose near-tied logits flip under 4-bit);
# evaluate with a repetition penalty, which the MLflow model, the merged export and the served decoder must answer with
# (one below 1, favouring the tokens seen: the tiny model never repeats by itself, and a path without it then differs)
SETTINGS = ["train.method=lora", "train.compute_dtype=fp32", "register.parity_min_identical=0.9",
            "evaluate.repetition_penalty=0.5"]
pytestmark = pytest.mark.slow  # two pipeline runs, a model server and three loads on another "machine"


def overrides(runs: Path, base: Path) -> list[str]:
    return [f"runs_dir={runs}", f"train.base_model={base}", *SETTINGS]


def other_machine(monkeypatch, home: Path, store: str) -> None:
    """Point this process at `home` as another machine would be: its own empty sftflow and Hugging Face caches, and
    the shared registry `store`."""
    from huggingface_hub import constants

    for name, path in (("SFTFLOW_CACHE", home / "cache"), ("HF_HOME", home / "hf"), ("HF_HUB_CACHE", home / "hf/hub")):
        monkeypatch.setenv(name, str(path))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hf" / "hub"))  # read at import
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, tiny_gguf):
    """Register v1 of NAME from machine A's directory (the tiny GGUF base, tiny.yaml's schedule), then remove
    A's converted base: the version's local base path no longer exists anywhere."""
    first = tmp_path_factory.mktemp("machine-a")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SFTFLOW_CACHE", str(first / "cache"))
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        summary = sft_pipeline(TINY, overrides(first / "runs", tiny_gguf), "run-a")
    assert (summary["model_version"], summary["alias"]) == (1, "champion"), summary["decision"]
    converted = next((first / "cache" / "models").iterdir())
    shutil.rmtree(first / "cache")
    return {"runs": first / "runs", "store": f"sqlite:///{first / 'runs' / 'mlflow.db'}", "summary": summary,
            "converted": converted, "second": tmp_path_factory.mktemp("machine-b"), "base": tiny_gguf}


def first_prompt(runs: Path) -> tuple[list[dict], str]:
    """Return the first evaluated held-out prompt of run-a and evaluate's tuned answer to it."""
    sample = json.loads((runs / "run-a" / "eval" / "samples.jsonl").read_text(encoding="utf-8").splitlines()[0])
    rows = pq.read_table(runs / "run-a" / "formatted" / "heldout.parquet", columns=["row_id", "prompt"]).to_pylist()
    prompt = next(r["prompt"] for r in rows if r["row_id"] == sample["row_id"] and r["prompt"])
    return json.loads(prompt), sample["tuned"]


def test_the_version_names_its_base_by_spec_with_the_local_directory_as_a_hint_only(registered):
    from mlflow import MlflowClient

    tags = MlflowClient(registered["store"], registry_uri=registered["store"]).get_model_version(NAME, "1").tags
    assert tags["base_model"] == tags["base_model_spec"] == str(registered["base"])
    assert tags["base_model_path"] == str(registered["converted"]) and not registered["converted"].exists()
    assert tags["parity.ok"] == "true", tags["parity.reason"]  # pyfunc, merged and served, all with the penalty
    assert tags["generation_repetition_penalty"] == "0.5"


def test_pyfunc_on_another_machine_answers_chat_messages_in_the_versions_chat_template(registered, monkeypatch):
    import mlflow

    second = registered["second"]
    other_machine(monkeypatch, second, registered["store"])
    mlflow.set_tracking_uri(registered["store"])
    messages, evaluated = first_prompt(registered["runs"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    out = model.predict({"messages": messages, "max_tokens": 12})
    answer = out[0]["choices"][0]["message"]
    assert answer["role"] == "assistant" and answer["content"].strip() == evaluated.strip()  # greedy, as evaluated
    pipe = mlflow.transformers.load_model(f"models:/{NAME}@champion", return_type="components")
    template = (registered["runs"] / "run-a" / "formatted" / "chat_template.jinja").read_text(encoding="utf-8")
    assert pipe["tokenizer"].chat_template == template  # the rows' template travels with the model
    tokenizer = pipe["tokenizer"]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>") and rendered.endswith("<|im_start|>assistant\n")
    # the prompt went in rendered in the template, not as the raw text
    assert out[0]["usage"]["prompt_tokens"] == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert not (second / "cache").exists()  # self-contained: no base model needed, none converted


def test_mlflow_models_serve_answers_invocations_on_another_machine(registered, tmp_path):
    second, port = registered["second"], free_port()
    venv_bin = str(Path(sys.executable).parent)  # mlflow starts `uvicorn` from PATH, as in an activated venv
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["store"], "SFTFLOW_CACHE": str(second / "cache"),
           "HF_HOME": str(second / "hf"), "HF_HUB_CACHE": str(second / "hf" / "hub"),
           "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([str(Path(venv_bin) / "mlflow"), "models", "serve", "-m",
                             f"models:/{NAME}@champion", "--env-manager", "local", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1"], cwd=second, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=300)
        messages, evaluated = first_prompt(registered["runs"])
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", method="POST",
                                         data=json.dumps({"messages": messages, "max_tokens": 12}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            body = json.loads(response.read())
    finally:
        with contextlib.suppress(ProcessLookupError):  # its own session: mlflow and the uvicorn it started
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    answer = (body["predictions"] if isinstance(body, dict) and "predictions" in body else body)[0]
    assert answer["choices"][0]["message"]["content"].strip() == evaluated.strip(), (tmp_path / "serve.log")
    assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] >= 1
    assert answer["model"] == f"{NAME} (sftflow run run-a)"  # not the registering machine's base path


def test_the_next_pipeline_run_there_scores_the_champion_over_its_base_converted_again(registered, monkeypatch):
    from mlflow import MlflowClient

    second = registered["second"]
    other_machine(monkeypatch, second, registered["store"])
    summary = sft_pipeline(TINY, overrides(second / "runs", registered["base"]), "run-b", force=True)
    report = json.loads((second / "runs" / "run-b" / "eval" / "report.json").read_text(encoding="utf-8"))
    champion = report["models"]["champion"]
    assert champion["version"] == "1" and champion["eval_loss"] is not None  # scored, with loss (same vocabulary)
    reconverted = second / "cache" / "models" / registered["converted"].name
    assert (reconverted / "model.safetensors").is_file()  # the spec resolved again: the GGUF converted here
    v1 = MlflowClient(registered["store"], registry_uri=registered["store"]).get_model_version(NAME, "1").tags
    # the same adapter over the same base, re-converted: evaluate's loss of it as run-a measured it
    assert champion["eval_loss"] == pytest.approx(float(v1["score.eval_loss"]), rel=1e-3)
    assert summary["model_version"] == 2
