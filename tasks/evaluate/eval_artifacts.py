"""The evaluation's Prefect artifacts: the `evaluation` markdown (base / tuned / champion per metric, the held-out set
and settings, the first samples) and the `eval-samples` table of every held-out generation."""

from __future__ import annotations

import json
from pathlib import Path

SAMPLES_SHOWN = 5  # held-out samples shown in the `evaluation` artifact


def comparison_markdown(report: dict) -> str:
    """Return the Prefect markdown artifact: base / tuned / champion per metric, with the held-out set and settings."""
    models = report["models"]
    names = [f"champion v{m['version']}" if n == "champion" else n for n, m in models.items()]
    lines = [f"# Evaluation on {report['heldout_rows']} held-out rows (`{report['heldout_fingerprint'][:12]}`)", "",
             f"Generation: {json.dumps(report['generation'])}; headline metric `{report['metrics'][0]}`.", "",
             "| metric | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for key in (*report["metrics"], "eval_loss", "perplexity", "stop_rate", "runaway_rate"):
        cells = [f"{m[key]:.4f}" if m.get(key) is not None else "n/a" for m in models.values()]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- {w}" for w in report["warnings"]]
    return "\n".join(lines) + "\n"


def samples_markdown(samples: list[dict], names: list[str], headline: str, shown: int = SAMPLES_SHOWN) -> list[str]:
    """Return the first `shown` held-out samples as a markdown list: the prompt, then the reference and each model's
    answer with its headline score (a list, since Prefect's tables do not wrap; the `eval-samples` table holds all)."""
    from tasks.core.artifacts import cell

    lines = [f"## Samples: {min(shown, len(samples))} of {len(samples)} (all in the `eval-samples` table)", ""]
    for i, s in enumerate(samples[:shown], 1):
        lines += [f"{i}. {cell(s['prompt'], 300)}", f"   - reference: {cell(s['reference'], 300)}"]
        lines += [f"   - {n} ({headline} {s[f'{n}_score']:.2f}): {cell(s[n], 300)}" for n in names]
    return lines


def comparison_headline(report: dict) -> str:
    """Return one line: the headline metric and eval loss of base -> tuned (and the champion's)."""
    models, metric = report["models"], report["metrics"][0]

    def show(key: str) -> str:
        label = {n: f"champion v{m.get('version')}" if n == "champion" else n for n, m in models.items()}
        return " -> ".join(f"{label[n]} {m[key]:.3f}" for n, m in models.items() if m.get(key) is not None)

    return f"{report['heldout_rows']} held-out prompts: {metric} {show(metric)}; eval_loss {show('eval_loss')}"


def publish_artifacts(out_dir: Path, report: dict) -> None:
    """Create the Prefect table artifact `eval-samples` and the markdown artifact `evaluation` (the comparison and
    the first samples) for this run."""
    from tasks.core.artifacts import publish_markdown, publish_table

    samples = [json.loads(line) for line in (out_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    names = list(report["models"])
    # answers first, the long prompt last: Prefect's table does not wrap, so the first columns are what shows
    table = [{"row_id": s["row_id"], "scores": " | ".join(f"{n} {s[f'{n}_score']:.2f}" for n in names),
              "reference": s["reference"], **{n: s[n] for n in names}, "prompt": s["prompt"]} for s in samples]
    publish_table("eval-samples", table, f"Held-out generations of {', '.join(names)}, scored by "
                                         f"{report['metrics'][0]}")
    markdown = comparison_markdown(report) + "\n" + "\n".join(samples_markdown(samples, names, report["metrics"][0]))
    publish_markdown("evaluation", markdown + "\n", comparison_headline(report))
