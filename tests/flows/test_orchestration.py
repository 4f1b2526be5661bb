"""What a rerun redoes: cache keys over input files, config sections and code; --refresh and --refresh-from; the
data gate; per-step retries and run names; JSON results. Real Prefect API (the harness), DuckDB, GX, MLflow."""

import json
from pathlib import Path

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter, FlowRunFilterId

from flows.cli import main
from flows.sft_pipeline import sft_pipeline
from tasks.core.config import load_config
from tests.conftest import ROOT, registry_client

pytestmark = pytest.mark.slow  # whole pipeline runs, rerun with settings changed

TINY = ROOT / "configs" / "tiny.yaml"
UPSTREAM = ("ingest.duckdb", "clean.duckdb", "formatted/train.parquet", "validation/raw.json",
            "validation/clean.json", "validation/tokenized.json")
DOWNSTREAM = ("train/adapter/adapter_model.safetensors", "eval/report.json")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    overrides = [f"runs_dir={runs}", f"train.base_model={tiny_model_dir}", "train.max_steps=2",
                 "train.save_steps=2", "evaluate.max_samples=4", "register.min_stop_rate=0",
                 "register.gate_metric=eval_loss",
                 "orchestrate.retries={train: {retries: 3, delay_s: 2, jitter: 0.25}}"]
    summary = sft_pipeline(TINY, overrides, "r")
    LAST_REGISTERED[:] = overrides  # the config of the newest version: the one the data gate compares with
    return runs, overrides, summary


LAST_REGISTERED: list[str] = []


def mtimes(root: Path, names) -> dict[str, int]:
    return {n: (root / n).stat().st_mtime_ns for n in names}


def task_runs_of(flow_run_id):
    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def versions(overrides) -> list[int]:
    client = registry_client(load_config(TINY, overrides).tracking_uri())
    return sorted(int(v.version) for v in client.search_model_versions("name = 'sftflow-tiny'"))


def test_each_step_runs_under_a_name_that_says_what_ran_with_its_configured_retries(run_dir):
    _, _, summary = run_dir
    runs = {t.name: t for t in task_runs_of(summary["prefect_flow_run_id"])}
    assert {"train[qlora r=16, 2 steps]", "evaluate[4 prompts]", "ingest[1 source]", "validate-raw[raw rows]",
            "register[sftflow-tiny, gate eval_loss]", "format[model template, assistant mask, 256 max]"} <= set(runs)
    train = runs["train[qlora r=16, 2 steps]"].empirical_policy
    assert (train.retries, train.retry_delay, train.retry_jitter_factor) == (3, [2, 4, 8], 0.25)  # doubling
    ingest = runs["ingest[1 source]"].empirical_policy
    assert (ingest.retries, ingest.retry_delay, ingest.retry_jitter_factor) == (2, [5, 10], 0.5)  # the defaults
    assert runs["register[sftflow-tiny, gate eval_loss]"].empirical_policy.retries == 3


def test_cached_results_are_json_not_pickles(run_dir):
    _, _, summary = run_dir
    # each persisted step's state names its result file (storage key) and serializer
    records = [t.state.data for t in task_runs_of(summary["prefect_flow_run_id"]) if t.state.data is not None]
    assert len(records) >= 8  # every cached step: ingest … evaluate
    assert {r.serializer.type for r in records} == {"json"}
    stored = [json.loads(Path(r.storage_key).read_text()) for r in records]
    assert {r["metadata"]["serializer"]["type"] for r in stored} == {"json"}
    # readable as it is: format's result, the path of the formatted rows
    assert any('"pathlib.PosixPath"' in str(r["result"]) and '/r/formatted"' in str(r["result"]) for r in stored)


def test_an_unchanged_rerun_ends_completed_no_new_data_without_training(run_dir):
    runs, overrides, summary = run_dir
    before = versions(overrides)
    state = sft_pipeline(TINY, LAST_REGISTERED, "r2", return_state=True)
    assert state.is_completed() and state.name == "no new data"
    assert f"unchanged since sftflow-tiny v{versions(overrides)[-1]} (run r)" in state.message
    assert "--force" in state.message and state.result()["skipped"] == "no new data"
    assert not (runs / "r2" / "ingest.duckdb").exists() and not (runs / "r2" / "train").exists()
    assert json.loads((runs / "r2" / "summary.json").read_text())["reason"] == state.message
    assert versions(overrides) == before  # nothing registered
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
    assert flow_run.state.name == "no new data"
    gate = next(a for a in artifacts if a.key == "data-gate")
    assert "**no new data**" in gate.data and summary["run_id"] == "r"


def test_a_train_setting_change_reruns_only_train_evaluate_and_register(run_dir):
    runs, overrides, _ = run_dir
    before_up, before_down = mtimes(runs / "r", UPSTREAM), mtimes(runs / "r", DOWNSTREAM)
    known = versions(overrides)
    changed = [*overrides, "train.learning_rate=1e-3"]
    summary = sft_pipeline(TINY, changed, "r")  # unforced: the data gate sees the config change
    assert mtimes(runs / "r", UPSTREAM) == before_up  # nothing upstream of train was redone
    after = mtimes(runs / "r", DOWNSTREAM)
    assert all(after[n] > before_down[n] for n in DOWNSTREAM)
    assert summary["new_version"] and versions(overrides) == [*known, known[-1] + 1]
    LAST_REGISTERED[:] = changed


def test_refresh_from_a_step_reruns_it_and_every_later_one_only(run_dir):
    runs, overrides, _ = run_dir
    before = mtimes(runs / "r", UPSTREAM + DOWNSTREAM)
    assert main(["run", str(TINY), "--run-id", "r", "--force", "--refresh-from", "validate-tokens",
                 *[f"--set={o}" for o in overrides]]) == 0
    after = mtimes(runs / "r", UPSTREAM + DOWNSTREAM)
    assert {n for n in before if after[n] != before[n]} == {"validation/tokenized.json", *DOWNSTREAM}


def test_refresh_reruns_every_step_and_force_passes_the_gate(run_dir, capsys):
    runs, overrides, _ = run_dir
    assert main(["run", str(TINY), "--run-id", "r3", *[f"--set={o}" for o in LAST_REGISTERED]]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("no new data: the sources (fingerprint ")
    before = mtimes(runs / "r", UPSTREAM + DOWNSTREAM)
    assert main(["run", str(TINY), "--run-id", "r", "--refresh", "--force", *[f"--set={o}" for o in overrides]]) == 0
    after = mtimes(runs / "r", UPSTREAM + DOWNSTREAM)
    assert all(after[n] > before[n] for n in before)
    assert capsys.readouterr().out.splitlines()[-1].startswith("gate: ")


def test_a_refresh_from_that_names_no_step_is_refused(capsys):
    with pytest.raises(SystemExit):
        main(["run", str(TINY), "--refresh-from", "training"])
    assert "invalid choice: 'training'" in capsys.readouterr().err
