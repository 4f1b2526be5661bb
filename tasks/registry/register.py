"""Register: log the run to its MLflow run (params, curve, eval scores, reports, samples), log the trained model (it
reloads and generates) with its model card, and register a version: always @challenger, @champion only when the
promotion gate says it beats the champion (or, first, the base). Trained weights byte-identical to a registered
version register nothing new; a model that does not learn to stop is refused."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from tasks.core.artifacts import markdown_table, publish_link, publish_markdown
from tasks.core.common import stage_logger
from tasks.core.config import RegisterConfig, RunPaths, flatten
from tasks.core.errors import ConfigError, QualityGateError, disk_full
from tasks.core.links import run_url, version_url
from tasks.core.mlflow_store import seed_sqlite_store
from tasks.core.redact import install_log_redaction, redact, redact_value, redacted_errors, remember
from tasks.core.stage import stage_task
from tasks.registry.card import model_card, numbers
from tasks.registry.gate import item_tags
from tasks.registry.parity import (
    Parity,
    check_parity,
    example_request,
    generation_batch,
    generation_budget,
    guard_decision,
    repetition_penalty,
)
from tasks.registry.registry import (
    CHALLENGER,
    CHAMPION,
    TRAINED_ARTIFACT,
    GateDecision,
    RegisteredVersion,
    aliases,
    apply_gate,
    current_champion,
    current_user,
    decide_promotion,
    directory_digest,
    find_by_digest,
)
from tasks.train.monitoring import Tracking, mlflow_metrics, new_params, open_mlflow_run, param_values

MERGED_ARTIFACT = "merged"  # the adapter merged into its base, as safetensors (register.merged_export)
DEFAULT_MAX_NEW_TOKENS = 256  # the logged model's answer budget when report.json records none
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PREFECT_UI = "http://127.0.0.1:4200"  # `make ui-prefect` serves the project's Prefect database here


def git_sha() -> str:
    """Return the project's current git commit, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def pipeline_tags(dataset_fingerprint: str, flow_run_id, config_file: Path, config_digest: str = "") -> dict[str, str]:
    """Return the MLflow run tags the flow passes to register: data fingerprint, config (file and digest: the data
    gate compares both with the next run's), Prefect flow run and URL."""
    from prefect.utilities.urls import url_for

    tags = {"dataset_fingerprint": dataset_fingerprint, "config": str(config_file), "config_digest": config_digest}
    if flow_run_id:
        url = url_for("flow-run", obj_id=str(flow_run_id), default_base_url=PREFECT_UI)
        tags |= {"prefect_flow_run_id": str(flow_run_id), "prefect_flow_run_url": url or ""}
    return tags


def read_report(eval_dir: Path, cfg: RegisterConfig) -> dict:
    """Return eval_dir/report.json, checked to hold what the gate compares."""
    report = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
    if "tuned" not in report.get("models", {}):
        raise ConfigError(f"{eval_dir / 'report.json'}: no per-model scores (`models`), written by an older "
                          "evaluate; rerun it: sftflow task evaluate --run <run-id>")
    if cfg.gate_metric not in report["models"]["tuned"]:
        scored = sorted(k for k, v in report["models"]["tuned"].items() if isinstance(v, (int, float)))
        raise ConfigError(f"register.gate_metric={cfg.gate_metric!r} is not a score evaluate wrote "
                          f"({', '.join(scored)}); set it to one of evaluate.metrics, eval_loss or perplexity")
    return report


def check_stops(report: dict, cfg: RegisterConfig) -> None:
    """Refuse registration when too few tuned answers end with end-of-turn/EOS within the token budget."""
    tuned = report["models"]["tuned"]
    rate = float(tuned.get("stop_rate", 0.0))
    if rate < cfg.min_stop_rate:
        budget = report.get("generation", {}).get("max_new_tokens", "?")
        raise QualityGateError(
            f"registration refused: the model does not learn to stop: {rate:.0%} of the tuned model's held-out "
            f"answers ended with end-of-turn/EOS within {budget} new tokens ({tuned.get('runaway_rate', 0):.0%} ran "
            f"on into a new turn), below register.min_stop_rate={cfg.min_stop_rate:g}; train longer, check the "
            "end-of-turn token is supervised (sftflow task format --inspect 3), or raise evaluate.max_new_tokens")


def log_history_curve(client, run_id: str, history_file: Path) -> None:
    """Log the training curve from the saved history, unless training already logged it live to this run."""
    if not history_file.is_file() or client.get_metric_history(run_id, "train/loss"):
        return
    from mlflow.entities import Metric

    metrics = [Metric(k, v, 0, int(r.get("step", 0))) for r in json.loads(history_file.read_text(encoding="utf-8"))
               for k, v in mlflow_metrics(r).items()]
    for start in range(0, len(metrics), 1000):  # MLflow's limit per batch
        client.log_batch(run_id, metrics=metrics[start:start + 1000])


def log_run_data(run: RunPaths, eval_dir: Path, report: dict) -> None:
    """Log to the active run what it lacks of the flattened config and the loss curve, then eval scores, report
    files and the sample table (once per run: a rerun's register attaches to the same run)."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    client, run_id = MlflowClient(), mlflow.active_run().info.run_id
    params = param_values(flatten(yaml.safe_load(run.config.read_text(encoding="utf-8"))))
    mlflow.log_params(new_params(client, run_id, params))
    log_history_curve(client, run_id, run.train / "log_history.json")
    mlflow.log_metrics(numbers(report))
    mlflow.log_artifact(str(eval_dir / "report.json"), artifact_path="eval")
    reports = (run.clean_report, run.formatted / "stats.json", run.quarantine, *sorted(run.validation.glob("*.json")))
    for path in (p for p in reports if p.is_file()):
        mlflow.log_artifact(str(path), artifact_path="reports")
    if run.data_docs.is_dir():
        mlflow.log_artifacts(str(run.data_docs), artifact_path="data_docs")
    if not any(f.path == "eval/samples.json" for f in client.list_artifacts(run_id, "eval")):  # log_table appends
        mlflow.log_table(pd.read_json(eval_dir / "samples.jsonl", lines=True), artifact_file="eval/samples.json")


def log_trained_model(model_dir: str, trained_dir: Path, merged: bool, trust_remote_code: bool = False,
                      example: dict | None = None, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, method: str = "lora",
                      source: str = "sftflow model", repetition_penalty: float = 1.0, batch_size: int = 1):
    """Log the trained weights (`trained/`, as they are) and the MLflow chat model (tasks/registry/mlflow_model.py:
    the adapter merged into its base as train.method `method` trained it, dequantized to full precision, or the full
    weights, with tokenizer, chat template, `llm/v1/chat` signature and input `example`); with `merged`, the same
    merged weights as plain safetensors too (`merged/`); return the model info. `source` names it in its answers;
    it answers with evaluate's `repetition_penalty`, `batch_size` requested rows at a time by default."""
    import mlflow

    from tasks.registry.mlflow_model import input_example, log_trained_chat_model

    mlflow.log_artifacts(str(trained_dir), artifact_path=TRAINED_ARTIFACT)
    example = example or input_example([{"role": "user", "content": "Hello"}], max_new_tokens)
    return log_trained_chat_model(model_dir, trained_dir, example, max_new_tokens, method, trust_remote_code,
                                  MERGED_ARTIFACT if merged else None, source, repetition_penalty, batch_size)


def log_checked_model(model_dir: str, trained_dir: Path, run: RunPaths, eval_dir: Path, report: dict,
                      cfg: RegisterConfig, method: str, trust_remote_code: bool = False, base_spec: str | None = None,
                      answer_paths: dict | None = None, compute_dtype: str = "auto"):
    """Log the trained model (`log_trained_model`, a held-out prompt as its input example) and check its serving
    parity against evaluate's answers (tasks/registry/parity.py), on `answer_paths` too; return (model info, parity
    verdict). `base_spec` is train.base_model (the base's spec; `model_dir` where it resolved here), `compute_dtype`
    train.compute_dtype (what the served path computes in unless it merges: serve.py serving_precision)."""
    from tasks.model.modeling import is_adapter_dir

    budget, penalty = generation_budget(report, DEFAULT_MAX_NEW_TOKENS), repetition_penalty(report)
    merged = cfg.merged_export and is_adapter_dir(trained_dir)
    info = log_trained_model(model_dir, trained_dir, merged, trust_remote_code,
                             example_request(run.formatted, eval_dir, budget), budget, method,
                             f"{cfg.model_name} (sftflow run {run.run_id})", penalty, generation_batch(report))
    candidate = RegisteredVersion(cfg.model_name, "candidate", Path(trained_dir), base_spec or model_dir, method,
                                  model_dir, compute_dtype, penalty)
    parity = check_parity(run.formatted, eval_dir, report, info, MERGED_ARTIFACT if merged else None, candidate,
                          cfg.parity_min_identical, answer_paths)
    return info, parity


def version_tags(report: dict, decision: GateDecision, digest: str, about: dict, run_tags: dict) -> dict[str, str]:
    """Return a new version's tags: where it came from, its held-out scores (means and per item) and set, and the
    gate's decision as first made (apply_gate rewrites it with the decision made at the move)."""
    tuned = {f"score.{k}": repr(v) for k, v in numbers(report["models"]["tuned"]).items()}
    tuned |= item_tags(report)
    # the base by its spec (train.base_model), resolved again wherever the version loads; the local directory it
    # resolved to here is only a hint (tasks/model/modeling.py resolve_version_base)
    return {"trained_sha256": digest, "base_model": about["base_model"], "base_model_spec": about["base_model"],
            "base_model_path": about["base_dir"], "train_method": about["method"],
            "train_compute_dtype": about["compute_dtype"], "sftflow_run_id": about["run_id"],
            "heldout_fingerprint": str(report.get("heldout_fingerprint", "")),
            "heldout_rows": str(report.get("heldout_rows", "")),
            "generation_repetition_penalty": repr(repetition_penalty(report)), **tuned, **decision.tags(),
            **{k: run_tags[k] for k in ("dataset_fingerprint", "config_digest", "git_sha") if run_tags.get(k)}}


def register_version(client, run: RunPaths, model_dir: str, trained_dir: Path, report: dict, run_tags: dict,
                     cfg: RegisterConfig, method: str, digest: str, eval_dir: Path | None = None,
                     answer_paths: dict | None = None) -> dict:
    """Log the model and its card, register a new version with the gate's decision (and the serving parity's:
    tasks/registry/parity.py), alias it; return the result."""
    import mlflow

    try:
        check_stops(report, cfg)
    except QualityGateError as refused:
        mlflow.set_tag("registration_refused", str(refused))  # the run shows why it has no model version
        publish_markdown("promotion", f"# Promotion gate: registration refused\n\n{refused}\n", str(refused))
        raise
    def decide(champion: tuple[str, dict] | None) -> GateDecision:
        return decide_promotion(report, cfg.gate_metric, cfg.gate_margin, champion, cfg.gate_confidence)

    decision = decide(current_champion(client, cfg.model_name))  # for the card; decided again at the move
    saved = yaml.safe_load(run.config.read_text(encoding="utf-8"))
    about = {"name": cfg.model_name, "base_model": saved["train"]["base_model"], "base_dir": model_dir,
             "method": method, "compute_dtype": str(saved["train"].get("compute_dtype", "auto")),
             "trained_sha256": digest, "min_stop_rate": cfg.min_stop_rate, "run_id": run.run_id}
    verdict = ("takes @champion" if decision.promoted else "stays @challenger") + f": {decision.reason}"
    card = redact(model_card(run, report, f"{'Promoted' if decision.promoted else 'Not promoted'}: {decision.reason}",
                             about))
    held = client.get_run(mlflow.active_run().info.run_id).data.tags.get("trained_sha256")
    # retrained in place (sftflow task train): the older version keeps its own trained/ in this run; a child run
    # holds the new one
    child = mlflow.start_run(nested=True, run_name=f"{run.run_id}-retrained") if held and held != digest else None
    with child or contextlib.nullcontext():
        info, parity = log_checked_model(model_dir, trained_dir, run, eval_dir or run.eval, report, cfg, method,
                                         bool(saved["train"].get("trust_remote_code", False)),
                                         saved["train"]["base_model"], answer_paths, about["compute_dtype"])
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
            client.log_model_artifact(info.model_id, str(Path(tmp) / "README.md"))
        mlflow.set_tag("trained_sha256", digest)
        registered = mlflow.register_model(info.model_uri, cfg.model_name,
                                           tags=version_tags(report, decision, digest, about, run_tags)
                                           | parity.tags())
    version = str(registered.version)
    client.update_model_version(cfg.model_name, version, description=card)
    # decided again against the champion current at the move (another run may have moved it meanwhile)
    final = apply_gate(client, cfg.model_name, version, guard_decision(decide, parity), current_user())
    if final.reason != decision.reason:
        decision = final
        verdict = ("takes @champion" if decision.promoted else "stays @challenger") + f": {decision.reason}"
        card = redact(model_card(run, report, f"{'Promoted' if decision.promoted else 'Not promoted'}: "
                                              f"{decision.reason}", about))
        client.update_model_version(cfg.model_name, version, description=card)
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "README.md").write_text(card, encoding="utf-8")
            client.log_model_artifact(info.model_id, str(Path(tmp) / "README.md"))
    return {"registered_model": cfg.model_name, "model_version": int(version),
            "alias": CHAMPION if decision.promoted else CHALLENGER, "new_version": True,
            "gate": asdict(decision), "decision": f"v{version} {verdict}"}


def reuse_version(client, name: str, existing, report: dict, cfg: RegisterConfig) -> dict:
    """Report the registered version holding byte-identical weights. A retry after a crash that left its decision
    unapplied decides again against the champion current now (a stored decision was made against the champion of
    its time: applying it could demote a newer champion)."""
    decision = GateDecision.from_tags(existing.tags)
    if decision is not None and existing.tags.get("gate.applied") != "true":
        decision = apply_gate(client, name, existing.version, guard_decision(lambda champion: decide_promotion(
            report, cfg.gate_metric, cfg.gate_margin, champion, cfg.gate_confidence), Parity.from_tags(existing.tags)),
            current_user())
    held = sorted(a for a, v in aliases(client, name).items() if v == str(existing.version))
    alias = CHAMPION if CHAMPION in held else CHALLENGER if CHALLENGER in held else "none"
    return {"registered_model": name, "model_version": int(existing.version), "alias": alias, "new_version": False,
            "gate": asdict(decision) if decision else None,
            "decision": (f"nothing new registered: the trained weights are byte-identical to {name} "
                         f"v{existing.version} (@{alias}, from run {existing.tags.get('sftflow_run_id', '?')})")}


def promotion_markdown(result: dict, held: dict[str, str]) -> str:
    """Return the promotion gate's decision as markdown: the decision line, the comparison behind it, the aliases
    the registered model holds now, and the links to the MLflow run and the model version."""
    gate, name = result.get("gate") or {}, result["registered_model"]
    lines = [f"# Promotion gate: {name} v{result['model_version']} @{result['alias']}", "", result["decision"], ""]
    if gate:
        rows = [["metric", gate["metric"]], [f"v{result['model_version']} (tuned)", gate["tuned"]],
                [gate["against"], "-" if gate["against_score"] is None else gate["against_score"]],
                ["margin", gate["margin"]], ["promoted", "yes" if gate["promoted"] else "no"]]
        lines += [*markdown_table(["gate", "value"], rows), ""]
    aliases_now = ", ".join(f"@{a} -> v{v}" for a, v in sorted(held.items())) or "none"
    lines += [f"Aliases of {name} now: {aliases_now}.", "",
              f"- [MLflow run {result['mlflow_run_id']}]({result['mlflow_run_url']})",
              f"- [{name} v{result['model_version']} in the MLflow registry]({result['model_version_url']})"]
    return "\n".join(lines) + "\n"


def publish_links(result: dict, held: dict[str, str] | None = None) -> None:
    """Give the Prefect run the promotion decision (markdown artifact `promotion`) and link artifacts to the MLflow
    run and to the model version (inside a Prefect run)."""
    publish_markdown("promotion", promotion_markdown(result, held or {}), result["decision"])
    publish_link("mlflow-run", result["mlflow_run_url"], f"MLflow run {result['mlflow_run_id']}",
                 "This pipeline run in MLflow: params, curve, scores, model")
    publish_link("model-version", result["model_version_url"],
                 f"{result['registered_model']} v{result['model_version']} @{result['alias']}", result["decision"])


def use_experiment(tracking_uri: str, artifact_root: Path, name: str) -> None:
    """Point MLflow at the store and select the experiment, creating it with artifacts under `artifact_root`."""
    import mlflow

    # mlflow also exports the URIs as MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI, which sftflow reads as the user's
    # choice of store: keep the user's values, or a second run in this process (another runs_dir) would write here
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    install_log_redaction()
    seed_sqlite_store(tracking_uri)
    mlflow.set_tracking_uri(remember(tracking_uri))
    mlflow.set_registry_uri(tracking_uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    if mlflow.get_experiment_by_name(name) is None:
        mlflow.create_experiment(name, artifact_location=artifact_root.resolve().as_uri())
    mlflow.set_experiment(name)


def register_run(tracking_uri: str, artifact_root: Path, run: RunPaths, model_dir: str, trained_dir: Path,
                 eval_dir: Path, tags: dict, cfg: RegisterConfig, method: str | None = None,
                 answer_paths: dict | None = None) -> dict:
    """Log everything about one run to its MLflow run (the one training opened, else found by tag or created) and
    register its model unless byte-identical weights already are; return the registry coordinates and decision.

    `method` is train.method (default: the run's saved config's). `answer_paths` are more ways the model is
    served, compared by the parity check (tasks/registry/parity.py `check_parity`).
    """
    import mlflow
    from mlflow import MlflowClient

    report = read_report(eval_dir, cfg)
    use_experiment(tracking_uri, artifact_root, cfg.experiment)
    client, digest = MlflowClient(), directory_digest(trained_dir)
    method = method or yaml.safe_load(run.config.read_text(encoding="utf-8"))["train"]["method"]
    run_id = open_mlflow_run(Tracking(tracking_uri, artifact_root, cfg.experiment, run.run_id), run.train)
    with mlflow.start_run(run_id=run_id) as active:  # the run training created and logged its curve to
        run_tags = redact_value({"sftflow_run_id": run.run_id, "git_sha": git_sha(), **tags})
        mlflow.set_tags(run_tags)
        log_run_data(run, eval_dir, report)
        existing = find_by_digest(client, cfg.model_name, digest)
        result = (reuse_version(client, cfg.model_name, existing, report, cfg) if existing is not None else
                  register_version(client, run, model_dir, trained_dir, report, run_tags, cfg, method, digest,
                                   eval_dir, answer_paths))
        mlflow.set_tags({"registered_model": cfg.model_name, "model_version": str(result["model_version"]),
                         "alias": result["alias"], "gate_decision": result["decision"][:5000]})
    result |= {"mlflow_run_id": active.info.run_id,
               "mlflow_run_url": run_url(tracking_uri, active.info.experiment_id, active.info.run_id),
               "model_version_url": version_url(tracking_uri, cfg.model_name, str(result["model_version"]))}
    publish_links(result, aliases(client, cfg.model_name))
    return result


@stage_task("register", retries=3, retry_delay_seconds=[10, 60, 300], cache=False)
def register_model(tracking_uri: str, artifact_root: Path, run: RunPaths, model_dir: str, adapter_dir: Path,
                   eval_dir: Path, tags: dict, cfg: RegisterConfig, method: str | None = None,
                   answer_paths: dict | None = None) -> dict:
    """Log the run and register the trained model in the MLflow registry behind the promotion gate; return name,
    version, alias, the gate's decision and the run id; `answer_paths` (name -> answers function) are compared by
    the serving-parity check too. A full disk is one line naming the artifact root (not retried: it stays full)."""
    try:
        with redacted_errors():  # a failed MLflow call's message quotes the store's URI
            result = register_run(tracking_uri, artifact_root, run, model_dir, adapter_dir, eval_dir, tags, cfg,
                                  method, answer_paths)
    except OSError as e:
        if (full := disk_full(e, artifact_root.resolve(), "register.artifact_root")) is None:
            raise
        raise full from None
    stage_logger().info("register: %s", result["decision"])
    return result
