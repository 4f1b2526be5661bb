"""Summarise a finished run: summary.json in the run directory, Prefect artifacts for the UI, and the model card
register logs with each version."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from tasks.artifacts import cell, markdown_table, publish_markdown
from tasks.common import in_prefect_run, stage_logger, stage_task
from tasks.config import RUN_LAYOUT, RunPaths

# what a run stopped early (--until) lists of its directory, in pipeline order, when it is there
STOPPED_OUTPUTS = ("ingest_db", "clean_db", "clean_report", "quarantine", "validation", "formatted", "train", "eval")


def read_json(path: Path, default=None):
    """Return a JSON file's content, or `default` when the file does not exist."""
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else default


def numbers(report: dict) -> dict[str, float]:
    """Return the top-level numbers of report.json (its flat copies: eval_loss, tuned_field_match, …)."""
    return {k: v for k, v in report.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def data_accounting(clean_report: Path, format_stats: Path) -> dict:
    """Return the run's rows so far: raw -> clean (the clean report) -> formatted (the accounting block of format's
    stats.json), the rows quarantined by either step (rows_dropped_format: by format, for length) and each rule's
    count; formatted and the format rules only once format ran, {} before clean did."""
    clean = read_json(clean_report)
    if clean is None:
        return {}
    counts = {k: clean[k] for k in ("rows_raw", "rows_clean", "rows_quarantined", "dropped_by_rule")}
    formatted = (read_json(format_stats) or {}).get("accounting")
    if formatted is None:
        return counts
    rules = dict(counts["dropped_by_rule"])
    for rule, rows in formatted["dropped_by_rule"].items():
        rules[rule] = rules.get(rule, 0) + rows
    return {**counts, "rows_raw": formatted["rows_raw"], "rows_formatted": formatted["rows_formatted"],
            "rows_dropped_format": sum(formatted["dropped_by_rule"].values()),
            "rows_quarantined": formatted["rows_quarantined"], "dropped_by_rule": rules}


def rows_line(s: dict) -> str:
    """Return the row accounting in words: `rows raw 936 -> clean 800 -> formatted 790 (+146 quarantined)`."""
    formatted = f" -> formatted {s['rows_formatted']}" if "rows_formatted" in s else ""
    return f"rows raw {s['rows_raw']} -> clean {s['rows_clean']}{formatted} (+{s['rows_quarantined']} quarantined)"


def build_summary(run_id: str, clean_report: Path, eval_dir: Path, registered: dict, flow_run_id: str | None,
                  started_at: float, format_stats: Path | None = None) -> dict:
    """Return the run summary: data accounting (format's drops included; `format_stats` defaults to the run's
    formatted/stats.json beside `clean_report`), eval scores (headline metric first), the gate's decision, registry
    coordinates and wall time."""
    stats = format_stats or clean_report.parent / RUN_LAYOUT["formatted"] / "stats.json"
    evaluation = json.loads((eval_dir / "report.json").read_text(encoding="utf-8"))
    champion = evaluation.get("models", {}).get("champion")
    return {"run_id": run_id, "headline_metric": evaluation["metrics"][0], "heldout_rows": evaluation["heldout_rows"],
            **numbers(evaluation), **({"champion_version": str(champion["version"])} if champion else {}),
            **data_accounting(clean_report, stats), **registered,
            "prefect_flow_run_id": str(flow_run_id) if flow_run_id else None,
            "wall_seconds": round(time.time() - started_at, 1)}


def human_summary(s: dict) -> str:
    """Return a short human-readable summary of a run; its last line says what the promotion gate decided and why."""
    m = s["headline_metric"]
    champion = (f", champion v{s['champion_version']} {s[f'champion_{m}']:.3f}"
                if f"champion_{m}" in s and "champion_version" in s else "")
    stops = f", stop rate {s['tuned_stop_rate']:.0%}" if "tuned_stop_rate" in s else ""
    return (f"run {s['run_id']}: {rows_line(s)}; {m} base {s[f'base_{m}']:.3f} -> tuned {s[f'tuned_{m}']:.3f}"
            f"{champion}, eval loss {s['eval_loss']:.3f}{stops}; {s['registered_model']} v{s['model_version']} "
            f"@{s['alias']}; {s['wall_seconds']:.0f}s\ngate: {s['decision']}")


def stopped_summary(run: RunPaths, until: str, resume: str, flow_run_id: str | None, started_at: float) -> dict:
    """Return the summary of a run stopped after step `until` (`sftflow run --until`): its rows so far, what it
    wrote, and the command that goes on from there."""
    written = [f"{RUN_LAYOUT[k]}{'/' * getattr(run, k).is_dir()}" for k in STOPPED_OUTPUTS if getattr(run, k).exists()]
    return {"run_id": run.run_id, "stopped_after": until, **data_accounting(run.clean_report,
                                                                            run.formatted / "stats.json"),
            "outputs": str(run.root), "written": written, "resume": resume,
            "prefect_flow_run_id": str(flow_run_id) if flow_run_id else None,
            "wall_seconds": round(time.time() - started_at, 1)}


def human_stopped(s: dict) -> str:
    """Return the lines of a stopped run: its rows so far, then where its outputs are and how to go on."""
    rows = f"{rows_line(s)}; " if "rows_raw" in s else ""
    return (f"run {s['run_id']}: {rows}stopped after {s['stopped_after']} (--until); {s['wall_seconds']:.0f}s\n"
            f"outputs in {s['outputs']} ({', '.join(s['written']) or 'none yet'}); go on with: {s['resume']}")


def table(header: list[str], rows: list[list]) -> list[str]:
    """Return a markdown table's lines."""
    cell = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in r) + " |" for r in rows]


def quarantine_example(quarantine: Path, rule: str) -> str:
    """Return where the first row `rule` quarantined came from and why (`file:line (detail)`), or "" when none."""
    import pyarrow.parquet as pq

    if not quarantine.is_file():
        return ""
    rows = pq.read_table(quarantine, columns=["row_id", "source_file", "line_number", "detail"],
                         filters=[("rule", "=", rule)]).sort_by("row_id").slice(0, 1).to_pylist()
    return "".join(f"{r['source_file']}:{r['line_number']} ({r['detail']})" for r in rows)


def card_data(run: RunPaths) -> list[str]:
    """Return the model card's data part: rows by source and split, and the rows cleaning and formatting dropped
    (rules and counts)."""
    stats, clean = read_json(run.formatted / "stats.json", {}), read_json(run.clean_report, {})
    train, held = stats.get("train", {}).get("rows_by_source", {}), stats.get("heldout", {}).get("rows_by_source", {})
    by_source = [[s, train.get(s, 0), held.get(s, 0)] for s in sorted(set(train) | set(held))]
    rules = ([[r["rule"], r["rows"], r.get("example", "")] for r in clean.get("rules", [])]
             or [[rule, n, ""] for rule, n in clean.get("dropped_by_rule", {}).items()])
    rules += [[rule, n, quarantine_example(run.quarantine, rule)]
              for rule, n in stats.get("accounting", {}).get("dropped_by_rule", {}).items()]  # format's: too long
    counts = data_accounting(run.clean_report, run.formatted / "stats.json")
    accounting = (f"Rows: {rows_line(counts).removeprefix('rows ')}; each quarantined row is kept with its rule."
                  if counts else "Rows: no clean report.")
    edits = [f"{k}: {v} rows edited" for k, v in clean.get("edited_by_rule", {}).items() if v]
    warnings = [f"**Warning:** {w['message']}" for w in clean.get("source_warnings", [])]
    return ["## Data", "", *table(["source", "training rows", "held-out rows"], by_source), "",
            "## Cleaning and formatting", "", accounting, "", *table(["rule", "rows dropped", "example"], rules),
            *edits, *warnings]


def card_evaluation(report: dict) -> list[str]:
    """Return the model card's evaluation part: every score of base, tuned and champion, and the settings."""
    models = report.get("models", {})
    names = [n for n in ("base", "tuned", "champion") if n in models]
    keys = [k for k in ("eval_loss", "perplexity", *report.get("metrics", []), "stop_rate", "runaway_rate")
            if any(k in models[n] for n in names)]
    header = ["metric", *[f"champion v{models['champion'].get('version')}" if n == "champion" else n for n in names]]
    generation = ", ".join(f"{k}={v}" for k, v in report.get("generation", {}).items())
    intro = (f"{report.get('heldout_rows', '?')} held-out rows (fingerprint "
             f"`{str(report.get('heldout_fingerprint', '?'))[:16]}`), every model on the same prompts with the same "
             f"settings ({generation}). The first metric, {report.get('metrics', ['?'])[0]}, is the headline.")
    return ["## Evaluation", "", intro, "", *table(header, [[k, *[models[n].get(k, "-") for n in names]] for k in keys])]


def card_limitations(report: dict, diagnoses: list[dict], method: str) -> list[str]:
    """Return the known limitations the run's own numbers show, plus the standing ones."""
    tuned = report.get("models", {}).get("tuned", {})
    scope = (f"- Scored on {report.get('heldout_rows', '?')} held-out rows drawn from the same sources as the "
             "training rows: the scores say nothing about other kinds of input.")
    lines = [scope]
    if tuned.get("stop_rate", 1) < 1:
        lines.append(f"- {1 - tuned['stop_rate']:.0%} of its held-out answers did not end within "
                     f"{report.get('generation', {}).get('max_new_tokens', '?')} new tokens.")
    if tuned.get("runaway_rate"):
        lines.append(f"- {tuned['runaway_rate']:.0%} of its answers ran on into a new turn.")
    lines += [f"- Training curve: {d['name']} ({d['message']})." for d in diagnoses]
    if method in ("qlora", "lora_8bit"):
        lines.append(f"- Trained over a {'4' if method == 'qlora' else '8'}-bit quantized base; the logged model "
                     "puts the adapter on the full-precision base, so its outputs differ slightly from evaluate's.")
    return [*lines, "- Greedy answers reflect the training data's style and mistakes; check the samples table."]


def model_card(run: RunPaths, report: dict, decision: str, about: dict) -> str:
    """Return the model card (README.md): model, data and cleaning, hyperparameters, evaluation against base and
    champion, stop check, curve diagnoses, the gate's decision, limitations and intended use.

    `about` holds name, base_model (as configured), base_dir, method, trained_sha256 and min_stop_rate.
    """
    config = yaml.safe_load(run.config.read_text(encoding="utf-8")) if run.config.is_file() else {}
    hyper = read_json(run.train / "job.json", {}).get("cfg") or config.get("train", {})  # what training ran with
    diagnoses = read_json(run.train / "diagnoses.json", [])
    tuned = report.get("models", {}).get("tuned", {})
    model = (f"{about['method']} fine-tune of `{about['base_model']}` (loaded from `{about['base_dir']}`); trained "
             f"weights sha256 `{about['trained_sha256']}`.")
    use = ("Answering prompts of the kind in its training data, in the chat template it was trained with (logged "
           "with it). Built by an automated pipeline: read the evaluation and the samples before serving it.")
    stops = (f"Tuned answers that end with end-of-turn/EOS within the token budget: {tuned.get('stop_rate', 0):.0%} "
             f"(registration needs {about['min_stop_rate']:.0%}); answers running on into a new turn: "
             f"{tuned.get('runaway_rate', 0):.0%}.")
    hyper_rows = [[k, json.dumps(v) if isinstance(v, (list, dict)) else v] for k, v in sorted(hyper.items())]
    curve = [f"- {d['name']} (step {d['step']}): {d['message']}" for d in diagnoses] or ["None."]
    sections = [[f"# {about['name']}: sftflow run {run.run_id}", "", model], ["## Intended use", "", use],
                card_data(run), ["## Hyperparameters", "", *table(["train", "value"], hyper_rows)],
                card_evaluation(report), ["## Stop check", "", stops], ["## Curve diagnoses", "", *curve],
                ["## Promotion gate", "", decision],
                ["## Known limitations", "", *card_limitations(report, diagnoses, about["method"])]]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"


def cleaning_markdown(report: dict) -> str:
    """Return the cleaning report as markdown: the accounting, each source warning, the rows dropped per rule, then
    a few quarantined rows of each rule (where, why, the row cut short)."""
    head = (f"# Cleaning: {report['rows_raw']} raw rows -> {report['rows_clean']} clean + "
            f"{report['rows_quarantined']} quarantined")
    lines = [head, ""]
    lines += [f"**Warning:** {w['message']}\n" for w in report.get("source_warnings", [])]
    lines += markdown_table(["rule", "rows", "example", "detail"], [
        [r["rule"], r["rows"], Path(str(r["example"])).name, r["example_detail"]] for r in report["rules"]]
        or [["-", 0, "", ""]])
    edits = ", ".join(f"{k} {v}" for k, v in report.get("edited_by_rule", {}).items())
    split = ", ".join(f"{k} {v}" for k, v in report.get("split", {}).items())
    lines += ["", f"Kept but edited: {edits or 'none'}. Split of the clean rows: {split or '-'}."]
    for rule, examples in report.get("examples", {}).items():
        total = report.get("dropped_by_rule", {}).get(rule, len(examples))
        lines += ["", f"## {rule}: {total} row{'s' if total != 1 else ''} (first {len(examples)})", ""]
        lines += [f"- **{cell(e['where'])}** ({cell(e['detail'])}): {cell(e['preview'], 400)}" for e in examples]
    if report.get("quarantine_file"):
        lines += ["", (f"Every quarantined row, with its rule and raw record: `{report['quarantine_file']}` "
                       "(and table `quarantine` of the clean DuckDB file).")]
    return "\n".join(lines) + "\n"


def publish_cleaning_report(clean_report: Path) -> None:
    """Show the cleaning report as the Prefect markdown artifact `cleaning-report`."""
    report = json.loads(clean_report.read_text(encoding="utf-8"))
    rules = ", ".join(f"{r['rule']} {r['rows']}" for r in report["rules"]) or "no rule dropped a row"
    publish_markdown("cleaning-report", cleaning_markdown(report),
                     f"Cleaning: {report['rows_raw']} raw rows -> {report['rows_clean']} clean + "
                     f"{report['rows_quarantined']} quarantined ({rules}); examples of each rule inside")


def publish_artifacts(summary: dict, text: str) -> None:
    """Create the Prefect artifact of the run summary: the run's last lines (`text`), then every field of
    summary.json."""
    headline = text.splitlines()
    publish_markdown("run-summary", "\n".join([f"# Run {summary['run_id']}", "", headline[0], "", f"**{headline[-1]}**",
                                               "", *markdown_table(["field", "value"], list(summary.items()), 200)]),
                     headline[0])


@stage_task("save-config", cache=False)
def save_config(config_yaml: str, out_file: Path) -> Path:
    """Write the resolved config of a run (what `sftflow task` and MLflow params read back) and return its path."""
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(config_yaml, encoding="utf-8")
    return out_file


@stage_task("summarize", cache=False)
def write_summary(run_id: str, clean_report: Path, eval_dir: Path, registered: dict, flow_run_id: str | None,
                  started_at: float, out_file: Path) -> dict:
    """Write summary.json, publish the run's artifacts, and return the summary."""
    summary = build_summary(run_id, clean_report, eval_dir, registered, flow_run_id, started_at)
    out_file.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if in_prefect_run():
        publish_artifacts(summary, human_summary(summary))
    stage_logger().info(human_summary(summary))
    return summary


@stage_task("summarize", cache=False)
def write_stopped_summary(run: RunPaths, until: str, resume: str, flow_run_id: str | None, started_at: float) -> dict:
    """Write summary.json of a run stopped after step `until`, publish it as the `run-summary` artifact, and return
    it."""
    summary = stopped_summary(run, until, resume, flow_run_id, started_at)
    run.summary.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    if in_prefect_run():
        publish_artifacts(summary, human_stopped(summary))
    stage_logger().info(human_stopped(summary))
    return summary
