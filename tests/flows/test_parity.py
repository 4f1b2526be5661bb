"""The serving-parity check before @champion, with real MLflow (sqlite), a LoRA adapter really trained on the tiny
llama and really evaluated: the logged MLflow model answers the held-out prompts as evaluate's model did, and a
logged model with one damaged tensor is refused @champion with the prompt and token where it diverges."""

import json
import re
from pathlib import Path

import pytest
from mlflow import MlflowClient

import tasks.registry.mlflow_model as mlflow_model
from tasks.core.config import RegisterConfig, TrainConfig
from tasks.evaluate.evaluate import evaluate_model
from tasks.registry.parity import Divergence, Parity, compare_answers, decide_parity, paired_prompts
from tasks.registry.register import register_run
from tasks.serving.serve import served_answers
from tasks.train.train import train_model
from tests.conftest import formatted_run, new_store, registry_client

LORA = TrainConfig(method="lora", learning_rate=2e-2, max_steps=4, batch_size=4, gradient_accumulation_steps=1,
                   logging_steps=1, save_steps=4, lora_r=4, packing=False, seed=0)


@pytest.fixture(scope="module")
def evaluated_run(tiny_model_dir, tmp_path_factory):
    """A run of configs/tiny.yaml on the tiny llama: a LoRA adapter (fp32, as the MLflow model is) trained and
    evaluated (8 held-out prompts, 12 new tokens, greedy)."""
    runs = tmp_path_factory.mktemp("parity-runs")
    cfg, run = formatted_run(runs, tiny_model_dir)
    adapter = train_model(run.formatted, str(tiny_model_dir), run.train, LORA)
    evaluate_model(run.formatted, str(tiny_model_dir), adapter, run.eval, cfg.evaluate, LORA)
    return run, adapter


def register_into(store: Path, run, adapter, base_dir: Path, answer_paths: dict | None = None, **options) -> dict:
    cfg = RegisterConfig(model_name="parity-test", experiment="parity", gate_metric="eval_loss", min_stop_rate=0,
                         **options)
    return register_run(new_store(store / "mlflow.db"), store / "mlartifacts", run, str(base_dir), adapter,
                        run.eval, {}, cfg, "lora", answer_paths)


@pytest.mark.slow  # a run trained, evaluated, registered and served
def test_the_logged_model_and_the_merged_export_answer_as_evaluated_and_the_version_takes_champion(
        evaluated_run, tiny_model_dir, tmp_path):
    run, adapter = evaluated_run
    result = register_into(tmp_path, run, adapter, tiny_model_dir, merged_export=True,
                           answer_paths={"served": served_answers})  # as flows/steps.py hands it to register
    assert (result["model_version"], result["alias"]) == (1, "champion")
    tags = registry_client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version("parity-test", "1").tags
    assert (tags["parity.ok"], tags["parity.pyfunc"], tags["parity.merged"], tags["parity.served"]) == (
        "true", "8/8", "8/8", "8/8")
    assert tags["parity.reason"].startswith(
        "serving parity holds: pyfunc 8/8 identical, merged 8/8 identical, served 8/8 identical")
    logged_model_batches_rows(f"sqlite:///{tmp_path / 'mlflow.db'}", run)


def logged_model_batches_rows(store: str, run) -> None:
    """The logged MLflow model generates a request's rows evaluate's batch size at a time by default, a loader's on
    request (`model_config` at load), with the same greedy answers as evaluate's: the batches that reach the model's
    forward are counted (its first call per batch, with the whole prompts)."""
    import mlflow

    mlflow.set_tracking_uri(store)
    uri = "models:/parity-test/1"
    evaluated_batch = json.loads((run.eval / "report.json").read_text(encoding="utf-8"))["generation"]["batch_size"]
    assert mlflow.models.get_model_info(uri).flavors["python_function"]["config"]["batch_size"] == evaluated_batch
    _, prompts, evaluated = paired_prompts(run.eval / "samples.jsonl", run.formatted / "heldout.parquet")
    model = mlflow.pyfunc.load_model(uri, model_config={"batch_size": 3})
    prefills = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] > 1:
            prefills.append(ids.shape[0])

    hook = model._model_impl.pipeline.model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        out = model.predict([{"messages": messages, "max_tokens": 12} for messages in prompts])
    finally:
        hook.remove()
    assert prefills == [3, 3, 2]  # 8 rows, 3 at a time
    assert [o["choices"][0]["message"]["content"].strip() for o in out] == [a.strip() for a in evaluated]


def corrupt_logged_weights(monkeypatch, tensor: str, factor: float) -> list[Path]:
    """Make log_chat_model scale one tensor of the safetensors it just logged (in the store) by `factor`; return the
    list the damaged files are appended to."""
    import torch
    from safetensors.torch import load_file, save_file

    damaged, original = [], mlflow_model.log_chat_model

    def log_then_damage(*args, **kwargs):
        info = original(*args, **kwargs)
        stored = Path(MlflowClient().get_logged_model(info.model_id).artifact_location.removeprefix("file://"))
        weights = next(stored.rglob("model.safetensors"))
        state = load_file(weights)
        with torch.no_grad():
            state[tensor] = state[tensor] * factor
        save_file(state, weights, metadata={"format": "pt"})
        damaged.append(weights)
        return info

    monkeypatch.setattr(mlflow_model, "log_chat_model", log_then_damage)
    return damaged


@pytest.mark.slow  # a run trained, evaluated, registered and served
def test_a_logged_model_with_one_damaged_tensor_is_refused_champion_naming_the_prompt_and_token(
        evaluated_run, tiny_model_dir, tmp_path, monkeypatch):
    run, adapter = evaluated_run
    damaged = corrupt_logged_weights(monkeypatch, "model.layers.0.self_attn.o_proj.weight", 0.0)
    result = register_into(tmp_path, run, adapter, tiny_model_dir)
    assert len(damaged) == 1
    assert (result["model_version"], result["alias"]) == (1, "challenger")
    reason = result["gate"]["reason"]
    # the gate alone would have promoted it (its scores are evaluate's, of the undamaged model)
    assert reason.startswith("eval_loss ") and " beats base's " in reason
    assert "; but serving parity fails: pyfunc " in reason and "below register.parity_min_identical=0.9" in reason
    where = re.search(r"pyfunc first diverges from the evaluated answers at prompt (\d+) \(row (\S+): '(.*)'\) at "
                      r"answer token (\d+): evaluated '(.*)', got '(.*)'$", reason)
    assert where, reason
    samples = [json.loads(line) for line in (run.eval / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    first = samples[int(where[1]) - 1]  # the first prompt whose answer differs: its row, its text, its tokens
    assert where[2] == str(first["row_id"]) and first["prompt"].startswith(where[3].rstrip("…"))
    assert where[5] != where[6] and int(where[4]) <= 12
    tags = registry_client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_model_version("parity-test", "1").tags
    assert tags["parity.ok"] == "false" and tags["gate.promoted"] == "false" and tags["gate.reason"] == reason


def test_parity_names_the_first_prompt_and_token_where_answers_diverge_and_holds_within_tolerance():
    tokens = {"a": 1, "b": 2, "c": 3, "x": 9}

    def tokenize(text):
        return [tokens[t] for t in text.split()]

    def decode(token):
        return {v: k for k, v in tokens.items()}[token]

    same = compare_answers("pyfunc", ["a b", "b c"], ["a b ", "b c"], ["p1", "p2"], ["r1", "r2"], tokenize, decode)
    assert (same.identical, same.compared, same.first) == (2, 2, None)
    off = compare_answers("merged", ["a b", "a b c", "c"], ["a b", "a x c", "c"], ["p1", "p2", "p3"],
                          ["r1", "r2", "r3"], tokenize, decode)
    assert off.first == Divergence(1, "r2", "p2", 1, "b", "x") and off.share == pytest.approx(2 / 3)
    short = compare_answers("pyfunc", ["a b c"], ["a b"], ["p"], ["r"], tokenize, decode)
    assert (short.first.token, short.first.expected, short.first.got) == (2, "c", "<end>")
    within = decide_parity([same, off], 0.6)
    assert within.ok and within.reason == (
        "serving parity holds within register.parity_min_identical=0.6: pyfunc 2/2 identical, merged 2/3 identical; "
        "merged first diverges from the evaluated answers at prompt 2 (row r2: 'p2') at answer token 1: evaluated "
        "'b', got 'x'")
    assert decide_parity([same], 0.9).reason == "serving parity holds: pyfunc 2/2 identical"
    refused = decide_parity([same, off], 0.9)
    assert not refused.ok and refused.reason == (
        "serving parity fails: pyfunc 2/2 identical, merged 2/3 identical, below register.parity_min_identical=0.9; "
        "merged first diverges from the evaluated answers at prompt 2 (row r2: 'p2') at answer token 1: evaluated "
        "'b', got 'x'")
    recorded = decide_parity([off], 0.0)  # 0 records without blocking
    assert recorded.ok and recorded.reason.startswith("serving parity not enforced (register.parity_min_identical=0)")
    assert recorded.tags() == {"parity.ok": "true", "parity.reason": recorded.reason, "parity.min_identical": "0.0",
                               "parity.merged": "2/3"}
    assert Parity.from_tags(refused.tags()) == Parity(False, refused.reason)
