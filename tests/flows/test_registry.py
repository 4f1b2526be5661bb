"""Register behind the promotion gate, with real MLflow (sqlite) and tiny LoRA adapters really trained: the champion
moves only on a win, byte-identical weights register nothing new, a model that does not stop is refused, the logged
model reloads with the tuned model's logits, and the model card and merged export are logged."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tasks.core.config import RegisterConfig, RunPaths
from tasks.core.errors import ConfigError, QualityGateError
from tasks.model.modeling import load_trained_model
from tasks.registry.register import register_run
from tasks.registry.registry import GateDecision, decide_promotion, directory_digest, find_version
from tasks.train.diagnose import write_diagnoses
from tasks.train.train import train_model
from tests.conftest import formatted_run, new_store, registry_client
from tests.flows.conftest import lora_config, scores, write_report

NAME = "gate-test"


@pytest.fixture(scope="module")
def trained_runs(tiny_model_dir, tmp_path_factory):
    """Three runs of configs/tiny.yaml sharing formatted rows, each with a LoRA adapter trained with its own seed."""
    runs = tmp_path_factory.mktemp("runs")
    _, first = formatted_run(runs, tiny_model_dir)
    out = {}
    for seed, name in enumerate(("run-a", "run-b", "run-c")):
        run = RunPaths(runs, name)
        if name != "run-a":
            shutil.copytree(first.root, run.root, ignore=shutil.ignore_patterns("train", "eval"))
        adapter = train_model(run.formatted, str(tiny_model_dir), run.train, lora_config(seed))
        write_diagnoses(run.train)
        out[name] = (run, adapter)
    return runs, out


def register(store, run, adapter, base_dir, cfg: RegisterConfig, eval_dir=None, tracking_uri=None):
    """register_run as the flow calls it, into the sqlite store in `store` (or `tracking_uri`)."""
    uri = tracking_uri or new_store(store / "mlflow.db")
    return register_run(uri, store / "mlartifacts", run, str(base_dir), adapter, eval_dir or run.eval,
                        {"dataset_fingerprint": "d"}, cfg, "lora")


@pytest.fixture(scope="module")
def gate_history(trained_runs, tiny_model_dir):
    """A: beats the base -> v1 champion. B: worse than A -> v2 challenger. A again, byte-identical -> nothing new.
    C: beats A by more than the margin -> v3 champion."""
    runs, trained = trained_runs
    cfg = RegisterConfig(model_name=NAME, experiment="gate", gate_metric="exact_match", gate_margin=0.05)
    (run_a, a), (run_b, b), (run_c, c) = trained["run-a"], trained["run-b"], trained["run-c"]
    write_report(run_a.eval, scores(0.1, 3.0), scores(0.5, 2.0))
    results = {"a": register(runs, run_a, a, tiny_model_dir, cfg)}
    write_report(run_b.eval, scores(0.1, 3.0), scores(0.4, 2.1), {**scores(0.5, 2.0), "version": "1"})
    results["b"] = register(runs, run_b, b, tiny_model_dir, cfg)
    results["a_again"] = register(runs, run_a, a, tiny_model_dir, cfg)
    write_report(run_c.eval, scores(0.1, 3.0), scores(0.6, 1.9), {**scores(0.5, 2.0), "version": "1"})
    results["c"] = register(runs, run_c, c, tiny_model_dir, cfg)
    return runs, results, registry_client(f"sqlite:///{runs / 'mlflow.db'}")


def test_the_first_version_beating_the_base_takes_champion_and_reloads_with_the_tuned_models_logits(
        gate_history, trained_runs, tiny_model_dir, tmp_path):
    import mlflow

    runs, results, client = gate_history
    assert (results["a"]["model_version"], results["a"]["alias"], results["a"]["new_version"]) == (1, "champion", True)
    v1 = client.get_model_version(NAME, "1")
    assert v1.tags["gate.against"] == "base" and v1.tags["gate.promoted"] == "true"
    assert v1.tags["trained_sha256"] == directory_digest(trained_runs[1]["run-a"][1])
    assert (v1.tags["base_model"], v1.tags["train_method"]) == (str(tiny_model_dir), "lora")
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    logged = mlflow.transformers.load_model(f"models:/{NAME}/1", return_type="components")
    tuned = load_trained_model(str(tiny_model_dir), trained_runs[1]["run-a"][1], lora_config(0)).eval()
    ids = torch.tensor([[1, 22, 333, 4444, 555, 66]])
    with torch.no_grad():
        expected, got = tuned(input_ids=ids).logits, logged["model"].eval()(input_ids=ids).logits
        with tuned.disable_adapter():
            base = tuned(input_ids=ids).logits
    # the logged model is the adapter merged into the base (tasks/registry/mlflow_model.py): fp32 rounding of the
    # merge apart
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.allclose(expected, base, atol=1e-3)  # training moved them: the adapter is in what reloads
    assert "{% " in logged["tokenizer"].chat_template  # the template it was trained with travels with it
    found = find_version(f"sqlite:///{runs / 'mlflow.db'}", f"{NAME}/1", tmp_path)  # what evaluate and serve load
    assert (found.version, found.base_model, found.method) == ("1", str(tiny_model_dir), "lora")
    assert directory_digest(found.trained_dir) == v1.tags["trained_sha256"]


def test_a_worse_challenger_leaves_champion_unchanged_and_records_the_comparison(gate_history):
    _, results, client = gate_history
    assert (results["b"]["model_version"], results["b"]["alias"]) == (2, "challenger")
    v2 = client.get_model_version(NAME, "2")
    decision = GateDecision.from_tags(v2.tags)
    assert (decision.metric, decision.tuned, decision.against, decision.against_score, decision.margin,
            decision.promoted) == ("exact_match", 0.4, "champion v1", 0.5, 0.05, False)
    assert "does not beat champion v1's 0.5" in decision.reason and decision.reason in v2.description
    assert results["b"]["decision"].startswith("v2 stays @challenger: exact_match 0.4 does not beat")


def test_a_better_challenger_takes_champion_and_keeps_the_previous_one_for_rollback(gate_history):
    _, results, client = gate_history
    assert (results["c"]["model_version"], results["c"]["alias"]) == (3, "champion")
    model = client.get_registered_model(NAME)
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "3", "challenger": "3"}
    assert json.loads(model.tags["champion_history"]) == ["1", "3"]
    v3 = client.get_model_version(NAME, "3")
    assert v3.tags["gate.reason"] == ("exact_match 0.6 beats champion v1's 0.5 by 0.1 > margin 0.05; 0.95 "
                                      "paired-bootstrap lower bound 0.1 over 8 items")
    assert json.loads(v3.tags["items.exact_match"]) == [0.6] * 8  # what a later gate pairs with its own items
    moves = [json.loads(model.tags[f"champion.move.{k:06d}"]) for k in (1, 2)]
    assert [(m["version"], m["previous"], m["how"]) for m in moves] == [("1", None, "gate"), ("3", "1", "gate")]
    assert v3.tags["promotion"] == "gate"


def test_byte_identical_weights_register_nothing_new_and_report_the_existing_version(gate_history):
    _, results, client = gate_history
    again = results["a_again"]
    assert (again["model_version"], again["alias"], again["new_version"]) == (1, "champion", False)
    assert again["decision"].startswith(f"nothing new registered: the trained weights are byte-identical to {NAME} v1")
    assert sorted(int(v.version) for v in client.search_model_versions(f"name = '{NAME}'")) == [1, 2, 3]
    assert again["mlflow_run_id"] == results["a"]["mlflow_run_id"]  # the same run of the same sftflow run


def test_the_model_card_is_the_description_and_a_readme_logged_with_the_model(gate_history, tmp_path):
    import mlflow

    runs, results, client = gate_history
    card = client.get_model_version(NAME, "2").description
    for part in ("## Intended use", "| synthetic_orders |", "## Cleaning", "| duplicate |", "## Hyperparameters",
                 "| learning_rate | 0.02 |", "## Evaluation", "| exact_match | 0.1 | 0.4 | 0.5 |", "## Stop check",
                 "## Curve diagnoses", "underfitting", "## Promotion gate", "Not promoted: exact_match 0.4",
                 "## Known limitations"):
        assert part in card, part
    mlflow.set_tracking_uri(f"sqlite:///{runs / 'mlflow.db'}")
    local = mlflow.artifacts.download_artifacts(f"models:/{NAME}/2", dst_path=str(tmp_path))
    assert (Path(local) / "README.md").read_text(encoding="utf-8") == card
    run = client.get_run(results["b"]["mlflow_run_id"])
    assert run.data.tags["git_sha"] not in ("", "unknown") and run.data.tags["dataset_fingerprint"] == "d"
    assert run.data.metrics["tuned_exact_match"] == 0.4 and run.data.tags["model_version"] == "2"
    assert {f.path for f in client.list_artifacts(run.info.run_id, "trained")} >= {
        "trained/adapter_config.json", "trained/adapter_model.safetensors"}


def test_a_model_that_does_not_stop_is_refused_and_no_version_is_created(trained_runs, tiny_model_dir, tmp_path):
    run, adapter = trained_runs[1]["run-b"]
    report = write_report(tmp_path / "eval", scores(0.1, 3.0), scores(0.9, 1.0, stop_rate=0.5))
    with pytest.raises(QualityGateError, match="registration refused: the model does not learn to stop: 50% of the "
                                               "tuned model's held-out answers ended"):
        register(tmp_path, run, adapter, tiny_model_dir, RegisterConfig(model_name="never-stops"), report)
    client = registry_client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.search_registered_models() == []
    (logged,) = client.search_runs([client.get_experiment_by_name("sftflow").experiment_id])
    assert logged.data.tags["registration_refused"].startswith("registration refused: the model does not learn")


def test_a_gate_metric_evaluate_did_not_score_is_a_config_error_naming_the_scores(trained_runs, tiny_model_dir,
                                                                                  tmp_path):
    run, adapter = trained_runs[1]["run-b"]
    report = write_report(tmp_path / "eval", scores(0.1, 3.0), scores(0.9, 1.0))
    with pytest.raises(ConfigError, match="register.gate_metric='bleu' is not a score evaluate wrote .*exact_match"):
        register(tmp_path, run, adapter, tiny_model_dir, RegisterConfig(gate_metric="bleu"), report)


@pytest.fixture(scope="module")
def merged_first(trained_runs, tiny_model_dir, tmp_path_factory):
    """Run A into a fresh store with register.merged_export, scoring no better than the base."""
    store = tmp_path_factory.mktemp("merged-store")
    run, adapter = trained_runs[1]["run-a"]
    report = write_report(store / "eval", scores(0.5, 2.0), scores(0.5, 1.5))
    cfg = RegisterConfig(model_name="merged-test", gate_metric="token_f1", merged_export=True)
    return store, register(store, run, adapter, tiny_model_dir, cfg, report), adapter


def test_a_first_version_that_does_not_beat_the_base_is_only_a_challenger(merged_first):
    store, result, _ = merged_first
    assert (result["model_version"], result["alias"]) == (1, "challenger")
    model = registry_client(f"sqlite:///{store / 'mlflow.db'}").get_registered_model("merged-test")
    assert {k: str(v) for k, v in model.aliases.items()} == {"challenger": "1"}
    assert result["gate"]["reason"] == ("token_f1 0.5 does not beat base's 0.5 by more than margin 0 "
                                        "(difference +0)")


def test_the_merged_export_is_safetensors_with_the_tuned_models_logits(merged_first, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    store, result, adapter = merged_first
    client = registry_client(f"sqlite:///{store / 'mlflow.db'}")
    local = client.download_artifacts(result["mlflow_run_id"], "merged", str(tmp_path))
    assert (tmp_path / "merged" / "model.safetensors").is_file() and not (tmp_path / "merged" /
                                                                          "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(local, dtype=torch.float32).eval()
    tuned = load_trained_model(str(tiny_model_dir), adapter, lora_config(0)).eval()
    ids = torch.tensor([[1, 22, 333, 4444, 555, 66]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, tuned(input_ids=ids).logits, atol=1e-4)


def test_lower_is_better_for_eval_loss_and_a_stale_champion_score_never_promotes():
    report = {"heldout_fingerprint": "set-2", "models": {
        "base": scores(0.1, 3.0), "tuned": scores(0.2, 1.0), "champion": {**scores(0.3, 1.2), "version": "4"}}}
    by_loss = decide_promotion(report, "eval_loss", 0.1, ("4", {}))
    assert by_loss.promoted and by_loss.against_score == 1.2 and "(lower is better)" in by_loss.reason
    assert not decide_promotion(report, "eval_loss", 0.3, ("4", {})).promoted  # 0.2 better, not by more than 0.3
    # the champion changed after evaluate scored v4: its recorded score counts only on the same held-out set
    stale = decide_promotion(report, "exact_match", 0.0, ("5", {"heldout_fingerprint": "set-1",
                                                                "score.exact_match": "0.1"}))
    assert not stale.promoted and stale.against_score is None and "champion v5 has no exact_match" in stale.reason
    same_set = decide_promotion(report, "exact_match", 0.0, ("5", {"heldout_fingerprint": "set-2",
                                                                   "score.exact_match": "0.1"}))
    assert same_set.promoted and same_set.against_score == 0.1


# ---- the champion cache: verified against trained_sha256, written atomically ----

def log_version(client, uri: str, name: str, trained: Path, experiment: str) -> str:
    """Log `trained` as a run's trained/ artifacts and register it as a new version of `name` (as register does)."""
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(trained), "trained")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{run.info.run_id}/trained", run.info.run_id,
                                          tags={"trained_sha256": directory_digest(trained), "base_model": "b"})
    return str(version.version)


def fresh_store(runs: Path, db: str = "mlflow.db") -> tuple[str, MlflowClient, str]:
    uri = new_store(runs / db)
    client = MlflowClient(uri, registry_uri=uri)
    return uri, client, client.create_experiment("cache", artifact_location=(runs / "mlartifacts").as_uri())


def test_a_store_reset_under_the_same_runs_dir_never_serves_the_old_stores_weights(trained_runs, tmp_path):
    (_, a), (_, b) = trained_runs[1]["run-a"], trained_runs[1]["run-b"]
    runs, cache = tmp_path / "runs", tmp_path / "runs" / "champions"
    runs.mkdir()
    uri, client, experiment = fresh_store(runs)
    log_version(client, uri, "cached", a, experiment)
    assert directory_digest(find_version(uri, "cached/1", cache).trained_dir) == directory_digest(a)
    (runs / "mlflow.db").unlink()  # the store is reset; runs_dir and its champions cache stay
    shutil.rmtree(runs / "mlartifacts")
    # a new store (another file name only because this process's MLflow keeps its engine on the old path)
    uri, client, experiment = fresh_store(runs, "mlflow-new.db")
    log_version(client, uri, "cached", b, experiment)  # another v1
    found = find_version(uri, "cached/1", cache)
    assert directory_digest(found.trained_dir) == directory_digest(b) != directory_digest(a)


def test_a_damaged_or_partial_cached_copy_is_downloaded_again_and_a_store_that_lies_is_an_error(trained_runs,
                                                                                                 tmp_path):
    from tasks.registry.registry import RegistryError

    _, a = trained_runs[1]["run-a"]
    runs, cache = tmp_path / "runs", tmp_path / "runs" / "champions"
    runs.mkdir()
    uri, client, experiment = fresh_store(runs)
    log_version(client, uri, "cached", a, experiment)
    first = find_version(uri, "cached/1", cache).trained_dir
    weights = first / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short, or a file changed by hand
    again = find_version(uri, "cached/1", cache).trained_dir
    assert again == first and directory_digest(again) == directory_digest(a)
    assert [p.name for p in cache.iterdir()] == [first.parent.name]  # no temporary or old copy left behind
    stored = next((runs / "mlartifacts").rglob("adapter_model.safetensors"))
    stored.write_bytes(b"not the registered weights")  # the store itself changed under the version
    shutil.rmtree(first.parent)
    with pytest.raises(RegistryError, match="cached v1: the trained weights in the store .* are not the ones "
                                            "registered"):
        find_version(uri, "cached/1", cache)
    assert not first.parent.exists() and list(cache.iterdir()) == []  # nothing unverified kept


# ---- retries decide again: a stored decision is never applied against a newer champion ----

@pytest.fixture(scope="module")
def retried_after_newer_promotion(trained_runs, tiny_model_dir, tmp_path_factory):
    """v1 (A) champion. B registers as v2 beating v1, but its register crashes before applying the decision. C then
    registers as v3, beating v1 by more: champion. B's register is retried."""
    import tasks.registry.register as register_module

    runs, trained = tmp_path_factory.mktemp("retry-store"), trained_runs[1]
    cfg = RegisterConfig(model_name="retry-test", gate_metric="exact_match")
    (run_a, a), (run_b, b), (run_c, c) = trained["run-a"], trained["run-b"], trained["run-c"]
    reports = {name: runs / f"eval-{name}" for name in "abc"}
    write_report(reports["a"], scores(0.1, 3.0), scores(0.5, 2.0))
    write_report(reports["b"], scores(0.1, 3.0), scores(0.7, 1.8), {**scores(0.5, 2.0), "version": "1"})
    write_report(reports["c"], scores(0.1, 3.0), scores(0.8, 1.7), {**scores(0.5, 2.0), "version": "1"})
    register(runs, run_a, a, tiny_model_dir, cfg, reports["a"])

    def crash(*args, **kwargs):
        raise ConnectionError("the store went away after the version was created")

    original, register_module.apply_gate = register_module.apply_gate, crash
    try:
        with pytest.raises(ConnectionError):
            register(runs, run_b, b, tiny_model_dir, cfg, reports["b"])
    finally:
        register_module.apply_gate = original
    client = registry_client(f"sqlite:///{runs / 'mlflow.db'}")
    stored = GateDecision.from_tags(client.get_model_version("retry-test", "2").tags)
    register(runs, run_c, c, tiny_model_dir, cfg, reports["c"])
    retried = register(runs, run_b, b, tiny_model_dir, cfg, reports["b"])
    return client, stored, retried


def test_a_retry_after_a_newer_promotion_decides_again_and_does_not_demote_the_new_champion(
        retried_after_newer_promotion):
    client, stored, retried = retried_after_newer_promotion
    assert stored.promoted and stored.against == "champion v1"  # what the crashed attempt had decided
    model = client.get_registered_model("retry-test")
    assert {k: str(v) for k, v in model.aliases.items()} == {"champion": "3", "challenger": "3"}
    assert (retried["model_version"], retried["new_version"], retried["alias"]) == (2, False, "none")
    v2 = client.get_model_version("retry-test", "2").tags
    assert (v2["gate.applied"], v2["gate.promoted"], v2["gate.against"]) == ("true", "false", "champion v3")
    assert v2["gate.reason"].startswith("exact_match 0.7 does not beat champion v3's 0.8")  # v3's recorded score
    assert json.loads(model.tags["champion_history"]) == ["1", "3"]


def test_an_eval_loss_gate_against_a_champion_scored_without_loss_registers_with_a_clear_reason(
        trained_runs, tiny_model_dir, tmp_path):
    (run_a, a), (run_b, b) = trained_runs[1]["run-a"], trained_runs[1]["run-b"]
    cfg = RegisterConfig(model_name="loss-gate", gate_metric="eval_loss")
    write_report(tmp_path / "eval-a", scores(0.1, 3.0), scores(0.5, 2.0))
    register(tmp_path, run_a, a, tiny_model_dir, cfg, tmp_path / "eval-a")
    other_vocabulary = {**scores(0.5, 2.0), "eval_loss": None, "perplexity": None, "version": "1"}
    write_report(tmp_path / "eval-b", scores(0.1, 3.0), scores(0.6, 1.0), other_vocabulary)
    result = register(tmp_path, run_b, b, tiny_model_dir, cfg, tmp_path / "eval-b")
    assert (result["model_version"], result["alias"]) == (2, "challenger")
    assert result["gate"]["against_score"] is None and result["gate"]["tuned"] == 1.0
    assert result["decision"].startswith("v2 stays @challenger: champion v1 was scored without eval_loss in this "
                                         "evaluate (its tokenizer's vocabulary differs")
