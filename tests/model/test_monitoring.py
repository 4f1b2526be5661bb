"""Training monitoring on the tiny model with a real MLflow sqlite store: live metrics in the run while training,
the NaN/inf stop, the diagnoses, and register attaching the model to the run training created."""

import json

import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from prefect.states import Failed
from transformers import TrainerCallback

from tasks.core.config import RegisterConfig, TrainConfig
from tasks.core.errors import SftflowError, TrainingDiverged
from tasks.core.stage import retry_unless_user_error
from tasks.registry.register import register_run
from tasks.train.monitoring import Tracking, open_mlflow_run, open_training_run, report_training
from tasks.train.train import train_adapter, train_model
from tests.conftest import formatted_run, new_store


@pytest.fixture(scope="module")
def pipeline_run(tiny_model_dir, tmp_path_factory):
    """A run directory of configs/tiny.yaml up to the formatted rows, as the flow lays it out."""
    return formatted_run(tmp_path_factory.mktemp("runs"), tiny_model_dir)


def tracking_for(tmp_path, name="run-a") -> Tracking:
    return Tracking(new_store(tmp_path / "mlflow.db"), tmp_path / "mlartifacts", "sftflow-test", name)


def small_config(**kw) -> TrainConfig:
    return TrainConfig(**{"method": "lora", "learning_rate": 2e-2, "max_steps": 6, "batch_size": 4,
                          "gradient_accumulation_steps": 1, "logging_steps": 1, "eval_steps": 3, "eval_rows": 8,
                          "save_steps": 3, "lora_r": 4, "packing": False, **kw})


class PeekAtStep(TrainerCallback):
    """Read the MLflow run from outside, as the UI does, in the middle of training."""

    def __init__(self, tracking_uri, run_id, step):
        self.client, self.run_id, self.step, self.seen = MlflowClient(tracking_uri), run_id, step, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            self.seen = {key: [m.step for m in self.client.get_metric_history(self.run_id, key)]
                         for key in ("train/loss", "eval/loss")}


@pytest.mark.dtype_sensitive  # the curve must underfit in either dtype
def test_metrics_reach_the_mlflow_run_while_training_and_register_attaches_to_the_same_run(
        pipeline_run, tiny_model_dir, tmp_path):
    cfg, run = pipeline_run
    # A learning rate too small to move the weights in 6 steps: the curve is the random model's loss on each step's
    # batch (15.6, 16.1, 15.6, 15.6, 15.7, 16.0 in bf16 and fp32 alike: up 3%), nowhere near the 10% fall that would
    # clear `underfitting`. With 2e-2 it fell 9.8% in fp32 and 11.2% in bf16: on the threshold, a coin toss per dtype.
    tracking, train_cfg = tracking_for(tmp_path), small_config(learning_rate=1e-5)
    run_id = open_training_run(tracking, run.train, train_cfg)
    peek = PeekAtStep(tracking.tracking_uri, run_id, step=5)
    adapter = train_model(run.formatted, str(tiny_model_dir), run.train, train_cfg, callbacks=[peek])
    diagnoses = report_training(run.train, tracking, run_id, failed=False)
    assert [d["name"] for d in diagnoses] == ["underfitting"]

    assert peek.seen == {"train/loss": [1, 2, 3, 4], "eval/loss": [3]}  # logged as it happened, step by step
    client = MlflowClient(tracking.tracking_uri)
    logged = client.get_run(run_id)
    assert logged.info.run_name == "run-a" and logged.data.tags["sftflow_run_id"] == "run-a"
    assert logged.info.status == "FINISHED" and logged.data.tags["diagnoses"] == "underfitting"
    assert logged.data.params["train.learning_rate"] == "1e-05" and logged.data.params["train.method"] == "lora"
    for key in ("train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second",
                "train/peak_memory_mb", "train/mfu", "train/achieved_gflops"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2, 3, 4, 5, 6], key
    assert [m.step for m in client.get_metric_history(run_id, "eval/loss")] == [3, 6]
    assert all(m.value > 0 for m in client.get_metric_history(run_id, "train/tokens_per_second"))
    assert all(m.value > 50 for m in client.get_metric_history(run_id, "train/peak_memory_mb"))  # MiB of RSS
    assert all(0 < m.value < 1 for m in client.get_metric_history(run_id, "train/mfu"))  # a share of the peak
    ledger = json.loads((run.train / "ledger.json").read_text())  # the whole run's cost ledger, for the model card
    assert ledger["tokens"] > 0 and 0 < ledger["mfu"] < 1 and ledger["device_hours"] > 0 and ledger["cost"] is None
    assert ledger["params"] > ledger["trainable_params"] > 0 and "MFU" in ledger["line"]
    assert {f.path for f in client.list_artifacts(run_id, "train")} == {
        "train/diagnoses.json", "train/loss_curve.png", "train/log_history.json"}
    history = json.loads((run.train / "log_history.json").read_text())
    assert all("tokens_per_second" in r and "peak_memory_mb" in r for r in history if "loss" in r)

    assert open_mlflow_run(tracking, run.train) == run_id  # a retry or rerun of run-a reuses its MLflow run
    (run.eval).mkdir(parents=True, exist_ok=True)
    (run.eval / "report.json").write_text(json.dumps({  # evaluate's report.json (tests/model/test_evaluate.py)
        "heldout_rows": 1, "heldout_fingerprint": "f", "metrics": ["exact_match"], "generation": {"max_new_tokens": 12},
        "models": {"base": {"exact_match": 0.0, "eval_loss": 2.0, "stop_rate": 1.0},
                   "tuned": {"exact_match": 0.5, "eval_loss": 1.5, "stop_rate": 1.0}},
        "eval_loss": 1.5, "base_exact_match": 0.0, "tuned_exact_match": 0.5}))
    (run.eval / "samples.jsonl").write_text(json.dumps({"prompt": "p", "reference": "r", "tuned": "t"}) + "\n")
    registered = register_run(tracking.tracking_uri, tracking.artifact_root, run, str(tiny_model_dir), adapter,
                              run.eval, {}, RegisterConfig(model_name="monitoring-test", experiment="sftflow-test"),
                              "lora")
    assert registered["mlflow_run_id"] == run_id
    after = client.get_run(run_id)
    assert after.data.tags["model_version"] == "1" and after.data.metrics["tuned_exact_match"] == 0.5
    assert after.data.params["chat.max_length"] == str(cfg.chat.max_length)  # the rest of the config joined
    assert len(client.search_runs([logged.info.experiment_id])) == 1


def test_a_run_that_ends_before_its_first_log_still_counts_its_tokens_in_the_ledger(pipeline_run, tiny_model_dir,
                                                                                     tmp_path):
    _, run = pipeline_run
    out = tmp_path / "short" / "train"
    # no training log at all, and an evaluation at the last step: TRL's summary log then comes in eval mode
    cfg = small_config(max_steps=2, logging_steps=10, eval_steps=2, save_steps=10)
    train_model(run.formatted, str(tiny_model_dir), out, cfg)
    history = json.loads((out / "log_history.json").read_text())
    assert not any("loss" in r for r in history) and "eval_loss" in history[0]  # an evaluation, then the summary
    ledger = json.loads((out / "ledger.json").read_text())
    rows = [len(ids) for ids in pq.read_table(run.formatted / "train.parquet", columns=["input_ids"])
            .column("input_ids").to_pylist()]
    # 2 steps of 4 rows (padded batches: their attention masks count each row's own tokens)
    assert 8 * min(rows) <= ledger["tokens"] <= 8 * max(rows) and ledger["mfu"] > 0
    assert history[-1]["num_tokens"] == ledger["tokens"]


@pytest.mark.dtype_sensitive  # the overflow must happen in either dtype
def test_a_nan_loss_stops_training_at_once_naming_the_step_and_is_never_retried(pipeline_run, tiny_model_dir,
                                                                                tmp_path):
    _, run = pipeline_run
    train_dir = tmp_path / "diverging" / "train"
    tracking = tracking_for(tmp_path, "diverging")
    # a real overflow: the first AdamW step moves each LoRA weight by ~1e20, so B @ A is ~1e40, past float32's
    # 3e38: the next forward pass is inf and nan (1e6 is not enough: the LoRA branch saturates at uniform logits)
    cfg = small_config(learning_rate=1e20, warmup_ratio=0.0, max_steps=30, save_steps=30, eval_steps=None)
    with pytest.raises(TrainingDiverged) as err:
        train_adapter.fn(run.formatted, str(tiny_model_dir), train_dir, cfg, tracking)
    message = str(err.value)
    assert message.startswith("training diverged at step ") and "\n" not in message
    step = int(message.split("step ")[1].split(":")[0])
    assert 1 <= step < 30 and isinstance(err.value, SftflowError)
    assert retry_unless_user_error(None, None, Failed(data=err.value)) is False  # the task's retry rule says no

    history = json.loads((train_dir / "log_history.json").read_text())
    assert history[-1]["step"] == step and "nan" in history[-1]["diverged"]
    assert max(r["step"] for r in history) == step  # nothing ran after the step that diverged
    assert not (train_dir / "adapter").exists()
    diagnoses = json.loads((train_dir / "diagnoses.json").read_text())
    assert diagnoses[0]["name"] == "non_finite" and diagnoses[0]["step"] == step
    mlflow_run = MlflowClient(tracking.tracking_uri).get_run(json.loads((train_dir / "mlflow_run.json").read_text())
                                                             ["run_id"])
    assert mlflow_run.info.status == "FAILED" and mlflow_run.data.tags["diagnoses"].startswith("non_finite")
