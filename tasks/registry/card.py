"""The model card register logs with each version (README.md, also the version's description): the model, its data
and what cleaning and formatting dropped, hyperparameters, evaluation against base and champion, the stop check, curve
diagnoses, the gate's decision and known limitations; and the row accounting the run summary shares with it."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tasks.core.config import RunPaths


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


def table(header: list[str], rows: list[list]) -> list[str]:
    """Return a markdown table's lines."""
    def cell(v) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "/")

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
    return ["## Evaluation", "", intro, "",
            *table(header, [[k, *[models[n].get(k, "-") for n in names]] for k in keys])]


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
                     "and `sftflow serve` merge the adapter into that base dequantized, in fp32, so long greedy "
                     "answers can leave evaluate's late (the version's parity tags count them).")
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
    ledger = read_json(run.train / "ledger.json", {}).get("line")  # tasks/train/utilisation.py
    cost = [f"Training: {ledger}." if ledger else "Training: no cost ledger (trained before it was kept)."]
    sections = [[f"# {about['name']}: sftflow run {run.run_id}", "", model], ["## Intended use", "", use],
                card_data(run), ["## Hyperparameters", "", *table(["train", "value"], hyper_rows), "", *cost],
                card_evaluation(report), ["## Stop check", "", stops], ["## Curve diagnoses", "", *curve],
                ["## Promotion gate", "", decision],
                ["## Known limitations", "", *card_limitations(report, diagnoses, about["method"])]]
    return "\n\n".join("\n".join(lines) for lines in sections) + "\n"
