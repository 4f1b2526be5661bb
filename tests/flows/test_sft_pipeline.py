"""The whole flow on configs/tiny.yaml with a tiny random llama: real DuckDB, GX, Prefect API and MLflow (sqlite)."""

import json
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL

from flows.sft_pipeline import sft_pipeline
from tasks.core.config import load_config
from tasks.data.ingest import fingerprint_data
from tasks.reporting.report import human_summary
from tests.conftest import ROOT, registry_client, write_jsonl

pytestmark = pytest.mark.slow  # a whole pipeline run, and the CLI in subprocesses

TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    # a random tiny model never learns to stop in 12 tokens, and scores 0 on exact match: gate on the held-out loss
    overrides = [f"runs_dir={runs}", f"train.base_model={tiny_model_dir}", "register.min_stop_rate=0",
                 "register.gate_metric=eval_loss"]
    summary = sft_pipeline(TINY, overrides, "run-1")
    return runs, overrides, summary


def test_the_flow_writes_a_summary_with_every_promised_field(finished_run):
    runs, _, summary = finished_run
    on_disk = json.loads((runs / "run-1" / "summary.json").read_text())
    assert on_disk == summary
    for field in ("headline_metric", "base_exact_match", "tuned_exact_match", "eval_loss", "tuned_stop_rate",
                  "rows_raw", "rows_clean", "rows_formatted", "rows_dropped_format", "rows_quarantined",
                  "registered_model", "model_version", "alias", "gate",
                  "decision", "mlflow_run_id", "mlflow_run_url", "model_version_url", "prefect_flow_run_id",
                  "wall_seconds"):
        assert field in summary, field
    assert summary["headline_metric"] == "exact_match"  # the first of evaluate.metrics
    assert summary["rows_raw"] == summary["rows_formatted"] + summary["rows_quarantined"]  # format's drops included
    assert summary["rows_clean"] == summary["rows_formatted"] + summary["rows_dropped_format"]
    assert summary["rows_quarantined"] > 0 and summary["eval_loss"] > 0
    assert (summary["registered_model"], summary["model_version"], summary["alias"]) == ("sftflow-tiny", 1, "champion")
    assert summary["gate"]["against"] == "base" and summary["eval_loss"] < summary["base_eval_loss"]
    assert summary["decision"].startswith("v1 takes @champion: eval_loss ")
    assert human_summary(summary).splitlines()[-1] == f"gate: {summary['decision']}"


def test_every_dropped_row_is_in_the_quarantine_with_its_rule(finished_run):
    runs, _, summary = finished_run
    with duckdb.connect(str(runs / "run-1" / "clean.duckdb"), read_only=True) as con:
        rules = dict(con.execute("SELECT rule, count(*) FROM quarantine GROUP BY rule").fetchall())
    assert sum(rules.values()) == summary["rows_quarantined"] - summary["rows_dropped_format"]  # clean's rules
    assert {"duplicate", "empty_turn", "missing_field", "too_long"} <= set(rules)


def test_the_prefect_api_holds_the_flow_run_with_every_task_completed(finished_run):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    _, _, summary = finished_run
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(summary["prefect_flow_run_id"])
        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    assert flow_run.state.is_completed()
    # the steps' run names say what ran (`train[qlora r=16, 6 steps]`); the helper tasks keep Prefect's names
    names = {t.name.split("[")[0] if "[" in t.name else t.name.rsplit("-", 1)[0] for t in task_runs}
    assert {"ingest", "validate-raw", "clean", "validate", "format", "validate-tokens", "train", "evaluate",
            "register", "summarize", "data-gate"} <= names
    assert "train[qlora r=16, 6 steps]" in {t.name for t in task_runs}
    assert all(t.state.is_completed() for t in task_runs)


def test_the_registered_model_reloads_from_mlflow_and_generates(finished_run):
    import mlflow

    _, overrides, summary = finished_run
    mlflow.set_tracking_uri(load_config(TINY, overrides).tracking_uri())
    pipe = mlflow.transformers.load_model(f"models:/{summary['registered_model']}@champion")
    out = pipe([{"role": "user", "content": "Extract the order."}], max_new_tokens=5, do_sample=False)
    assert isinstance(out[0]["generated_text"], list) and out[0]["generated_text"][-1]["role"] == "assistant"
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.params["train.lora_r"] == "16" and "train_loss" in run.data.metrics
    assert run.data.metrics["tuned_exact_match"] == summary["tuned_exact_match"]
    version = mlflow.MlflowClient().get_model_version(summary["registered_model"], str(summary["model_version"]))
    assert "| synthetic_orders |" in version.description  # the source mix reaches the model card
    assert version.tags["train_method"] == "qlora" and version.tags["gate.metric"] == "eval_loss"
    assert run.data.tags["dataset_fingerprint"] == fingerprint_data(load_config(TINY, overrides).data)
    assert run.data.tags["git_sha"] not in ("", "unknown")
    assert run.data.tags["prefect_flow_run_url"].endswith(f"/runs/flow-run/{summary['prefect_flow_run_id']}")


def test_the_prefect_run_links_to_the_mlflow_run_and_the_model_version(finished_run):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, _, summary = finished_run
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[summary["prefect_flow_run_id"]])))
    links = {a.key: a.data for a in artifacts if a.type == "markdown" and a.key in ("mlflow-run", "model-version")}
    assert summary["mlflow_run_url"] in links["mlflow-run"]
    assert summary["mlflow_run_url"].startswith("http://127.0.0.1:5000/#/experiments/")  # `make ui-mlflow`
    assert f"{summary['model_version_url']}" in links["model-version"]
    assert summary["model_version_url"] == "http://127.0.0.1:5000/#/models/sftflow-tiny/versions/1"


def run_artifacts(flow_run_id: str) -> dict:
    """Return the flow run's artifacts read back through the Prefect API, by key (the latest of each)."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a for a in sorted(artifacts, key=lambda a: a.created)}


def markdown_section(markdown: str, heading: str) -> str:
    """Return the text of the markdown section whose heading starts with `heading`, up to the next heading."""
    start = markdown.index(f"\n{heading}")
    end = markdown.find("\n#", start + 1)
    return markdown[start:end if end != -1 else None]


def test_the_prefect_run_shows_quarantined_examples_for_every_rule_that_dropped_rows(finished_run):
    runs, _, summary = finished_run
    cleaning = run_artifacts(summary["prefect_flow_run_id"])["cleaning-report"]
    assert cleaning.description.startswith(f"Cleaning: {summary['rows_raw']} raw rows -> {summary['rows_clean']} "
                                           f"clean + {summary['rows_raw'] - summary['rows_clean']} quarantined")
    with duckdb.connect(str(runs / "run-1" / "clean.duckdb"), read_only=True) as con:
        first = con.execute("SELECT rule, count(*), arg_min(source_file, row_id), arg_min(line_number, row_id), "
                            "arg_min(detail, row_id) FROM quarantine GROUP BY rule").fetchall()
    assert len(first) >= 4
    for rule, rows, source_file, line_number, detail in first:
        section = markdown_section(cleaning.data, f"## {rule}: {rows} row")
        assert f"- **{Path(source_file).name}:{line_number}** ({detail}): " in section  # where and why of its first row
        assert min(rows, 3) == sum(row.startswith("- **") for row in section.splitlines())


def test_the_prefect_run_shows_each_data_suite_with_a_link_to_the_runs_data_docs(finished_run):
    import re
    from urllib.parse import unquote, urlparse

    runs, _, summary = finished_run
    artifacts = run_artifacts(summary["prefect_flow_run_id"])
    for stage in ("raw", "clean", "tokenized"):
        gx = artifacts[f"gx-{stage}-rows"]
        results = json.loads((runs / "run-1" / "validation" / f"{stage}.json").read_text())["results"]
        assert gx.data.startswith(f"# Great Expectations on {stage} rows: {len(results)} of {len(results)} "
                                  "expectations passed")
        assert all(f"| passed | {r['expectation'].removeprefix('expect_')} |" in gx.data for r in results)
        (url,) = re.findall(r"\[Data Docs of this run\]\(([^)]+)\)", gx.data)
        index = Path(unquote(urlparse(url).path))
        assert index == runs / "run-1" / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"
        assert index.is_file()


def test_the_prefect_run_shows_the_loss_curve_image_linked_to_the_same_png_in_mlflow(finished_run):
    import base64
    import re
    from urllib.parse import parse_qs, urlparse


    runs, overrides, summary = finished_run
    diagnoses = run_artifacts(summary["prefect_flow_run_id"])["train-diagnoses"]
    png = (runs / "run-1" / "train" / "loss_curve.png").read_bytes()
    (embedded,) = re.findall(r"!\[loss curve\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", diagnoses.data)
    assert base64.b64decode(embedded) == png
    (link,) = re.findall(r"\[train/loss_curve.png\]\(([^)]+)\)", diagnoses.data)
    query = parse_qs(urlparse(link).query)
    assert link.startswith("http://127.0.0.1:5000/get-artifact?")
    assert query == {"path": ["train/loss_curve.png"], "run_uuid": [summary["mlflow_run_id"]]}
    client = registry_client(load_config(TINY, overrides).tracking_uri())
    assert "train/loss_curve.png" in {f.path for f in client.list_artifacts(summary["mlflow_run_id"], "train")}
    assert diagnoses.description.startswith("Loss curve; diagnoses: ")


def test_the_prefect_run_shows_base_and_tuned_scores_with_samples_and_the_gate_decision(finished_run):
    runs, _, summary = finished_run
    artifacts = run_artifacts(summary["prefect_flow_run_id"])
    evaluation = artifacts["evaluation"].data
    assert "| metric | base | tuned |" in evaluation
    assert f"| eval_loss | {summary['base_eval_loss']:.4f} | {summary['eval_loss']:.4f} |" in evaluation
    samples = [json.loads(line) for line in (runs / "run-1" / "eval" / "samples.jsonl").read_text().splitlines()]
    shown = markdown_section(evaluation, "## Samples")
    assert f"\n1. {samples[0]['prompt']}\n   - reference: " in shown
    assert f"\n   - tuned (exact_match {samples[0]['tuned_score']:.2f}): " in shown and "\n5. " in shown
    table = json.loads(artifacts["eval-samples"].data)
    assert [row["tuned"] for row in table] == [s["tuned"] for s in samples] and "base" in table[0]
    promotion = artifacts["promotion"]
    assert promotion.description == summary["decision"]
    assert promotion.data.splitlines()[2] == summary["decision"]
    assert f"({summary['mlflow_run_url']})" in promotion.data and f"({summary['model_version_url']})" in promotion.data
    (aliases,) = [line for line in promotion.data.splitlines() if line.startswith("Aliases of sftflow-tiny now: ")]
    assert "@champion -> v1" in aliases and "@challenger -> v1" in aliases
    stats = json.loads((runs / "run-1" / "formatted" / "stats.json").read_text())
    tokens = {row["split"]: row for row in json.loads(artifacts["token-length-stats"].data)}
    assert tokens["train"]["rows"] == stats["train"]["rows"] and tokens["heldout"]["rows"] == stats["heldout"]["rows"]
    assert tokens["train"]["tokens_max"] <= 256  # chat.max_length of configs/tiny.yaml


def test_the_prefect_run_logs_the_progress_of_cleaning_training_and_evaluation(finished_run):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    _, _, summary = finished_run
    messages, offset = [], 0
    with get_client(sync_client=True) as client:
        while batch := client.read_logs(
                LogFilter(flow_run_id=LogFilterFlowRunId(any_=[summary["prefect_flow_run_id"]])),
                limit=200, offset=offset):
            messages += [log.message for log in batch]
            offset += len(batch)
    for rule, rows in summary["dropped_by_rule"].items():
        assert f"clean: rule {rule} quarantined {rows} rows" in messages
    assert sum(m.startswith("train step ") for m in messages) == 6  # every logging step of the 6
    assert any(m.startswith("evaluate: generating (tuned), prompts 1-8 of 8") for m in messages)


def test_a_cached_rerun_of_the_same_run_id_registers_nothing_new(finished_run):

    runs, overrides, first = finished_run
    adapter = runs / "run-1" / "train" / "adapter" / "adapter_model.safetensors"
    report = runs / "run-1" / "eval" / "report.json"
    before, report_before = adapter.stat().st_mtime_ns, report.stat().st_mtime_ns
    summary = sft_pipeline(TINY, overrides, "run-1", force=True)  # unforced, the data gate would end it first
    assert adapter.stat().st_mtime_ns == before  # train was a cache hit, not a retrain
    assert report.stat().st_mtime_ns == report_before  # so was evaluate: the champion is this very adapter
    assert (summary["model_version"], summary["alias"], summary["new_version"]) == (1, "champion", False)
    assert summary["decision"].startswith("nothing new registered: the trained weights are byte-identical to "
                                          "sftflow-tiny v1 (@champion")
    client = registry_client(load_config(TINY, overrides).tracking_uri())
    assert [int(v.version) for v in client.search_model_versions("name = 'sftflow-tiny'")] == [1]
    assert summary["mlflow_run_id"] == first["mlflow_run_id"]


def run_cli(*args, cwd=ROOT):
    env = {"PATH": str(Path(sys.executable).parent), "PREFECT_API_URL": PREFECT_API_URL.value(),
           "HOME": str(Path.home()), "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600, check=False)


def test_a_malformed_input_file_stops_the_cli_with_one_line_naming_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a", "output": "b"}, '{"instruction": oops}'])
    result = run_cli("run", str(TINY), "--set", f"runs_dir={tmp_path}",
                     "--set", f"data.sources=[{{path: {bad}}}]")
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("sftflow: error:")]
    assert errors == [(f"sftflow: error: {bad}:2: invalid JSON: Expecting value (column 17) "
                       "(set data.on_bad_rows=quarantine to keep going)")]
    assert "Traceback" not in result.stderr + result.stdout
    assert "leaked" not in result.stderr  # no DuckDB binding noise at exit (the failed step's frames are freed)


def test_an_invalid_config_stops_the_cli_before_any_work_with_the_key_named(tmp_path):
    result = run_cli("run", str(TINY), "--set", "train.lora_rank=8", "--set", f"runs_dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"sftflow: error: {TINY}: invalid config: unknown key `train.lora_rank`"
    assert list(tmp_path.iterdir()) == []
