"""Placement's rules without a server: which steps become child runs and with what parameters, what the parent
retries, and which error a failed child ends the parent with."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from prefect.states import Failed

from flows.placement import (
    PlacedRunCrashed,
    PlacedStepFailed,
    child_error,
    record_failure,
    retry_if_crashed,
    run_placed,
)
from flows.sft_pipeline import step_tasks
from flows.steps import STEPS, RunContext
from tasks.core.config import RunPaths, load_config
from tasks.core.errors import ConfigError, TrainingDiverged
from tests.conftest import ROOT

pytestmark = pytest.mark.scale_out

TINY = ROOT / "configs" / "tiny.yaml"
PLACED = ["orchestrate.placement={train: gpu, evaluate: gpu}"]


def test_placed_steps_become_child_runs_handed_only_the_runs_address_and_their_results_are_read_from_its_layout(
        tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:TOKEN123@mlflow:5000")
    cfg = load_config(TINY, [f"runs_dir={tmp_path}", *PLACED])
    tasks = step_tasks(cfg, False, "evaluate")
    assert [n for n, t in tasks.items() if t.fn is run_placed.fn] == ["train", "evaluate"]
    assert tasks["train"].task_run_name == "train[qlora r=16, 6 steps]" and tasks["evaluate"].refresh_cache
    assert tasks["train"].retries == cfg.orchestrate.retry("train").retries  # the step's own retry settings

    run = RunPaths(tmp_path, "r1")
    context = RunContext(cfg, run, "parent-id", {"fingerprint": "f1", "formatted": tmp_path / "elsewhere"})
    step, pool, parameters = context.step_args("train")
    assert (step, pool) == ("train", "gpu")
    assert parameters == {"step": "train", "runs_dir": str(tmp_path.resolve()), "run_id": "r1",
                          "tracking_uri": "http://***@mlflow:5000", "pipeline_flow_run_id": "parent-id",
                          "fingerprint": "f1"}  # the credentials stay on each machine, in its environment
    context.hand_over("train", None)
    assert context["adapter"] == run.train / "adapter"  # what the child wrote, from the run's layout
    context.hand_over("format", tmp_path / "formatted")
    assert context["formatted"] == tmp_path / "formatted" and STEPS["format"].returns == "formatted"


def test_only_a_crashed_child_is_retried_by_the_parent():
    assert retry_if_crashed(None, None, Failed(data=PlacedRunCrashed("lost"))) is True
    assert retry_if_crashed(None, None, Failed(data=PlacedStepFailed("failed after its own retries"))) is False
    assert retry_if_crashed(None, None, Failed(data=ConnectionError("api"))) is False  # the child may still run


def test_a_failed_child_ends_the_parent_with_its_own_user_error_or_one_line_naming_the_pool_and_run(tmp_path):
    run = RunPaths(tmp_path, "r1")
    child = SimpleNamespace(id="c1", name="r1: train", state=SimpleNamespace(name="Failed", message="boom"))
    record_failure(run, "train", TrainingDiverged("loss became nan at step 3"), "c1")
    error = child_error(run, "train", "gpu", child)
    assert type(error) is TrainingDiverged and str(error) == "loss became nan at step 3"  # never retried, one line

    record_failure(run, "train", RuntimeError("CUDA error:\n  device-side assert"), "c1")
    assert str(child_error(run, "train", "gpu", child)) == (
        "train on work pool 'gpu' (flow run r1: train) failed: RuntimeError: CUDA error: device-side assert")
    cancelled = SimpleNamespace(id="c2", name="r1: train", state=SimpleNamespace(name="Cancelled", message=None))
    assert str(child_error(run, "train", "gpu", cancelled)) == (  # an older run's record is not this child's
        "train on work pool 'gpu' (flow run r1: train) ended Cancelled: no message")


def test_placement_names_steps_only():
    with pytest.raises(ConfigError, match=r"orchestrate.placement: unknown step trian; use one of prepare-base-model"):
        load_config(TINY, ["orchestrate.placement={trian: gpu}"])


def test_a_child_uses_the_parents_mlflow_store_with_this_machines_credentials_and_the_configs_digest_unchanged(
        tmp_path, monkeypatch):
    import os

    from flows.placement import use_tracking_uri
    from tasks.data.data_gate import config_digest

    cfg = load_config(TINY, [f"runs_dir={tmp_path}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:TOKEN123@mlflow:5000")  # this worker's own
    use_tracking_uri(cfg, "http://***@mlflow:5000")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://user:TOKEN123@mlflow:5000" == cfg.tracking_uri()
    use_tracking_uri(cfg, "http://mlflow.internal:5000")  # the parent's store wins over this machine's default
    assert cfg.tracking_uri() == "http://mlflow.internal:5000"
    assert config_digest(cfg) == config_digest(load_config(TINY, [f"runs_dir={tmp_path}"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    with pytest.raises(ConfigError, match=r"store is http://\*\*\*@other:5000: set MLFLOW_TRACKING_URI on this worker"):
        use_tracking_uri(cfg, "http://***@other:5000")
