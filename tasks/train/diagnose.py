"""Diagnose a training curve from the trainer's saved history (train/log_history.json), and show it.

Each diagnosis is {name, step, message}; a healthy curve gives none. The thresholds below are deliberately loose
(a diagnosis should mean something is worth a look) and are in natural-log token cross-entropy (nats), the unit of
the trainer's loss:

- non_finite: a logged loss, eval loss or gradient norm is nan/inf, or training was stopped for it (the step named).
- overfitting: with at least 3 evaluations, the last eval loss is more than OVERFIT_MIN_RISE (10%) above the best
  one, and the train loss went down between the best evaluation and the last.
- underfitting: with at least MIN_TRAIN_POINTS (4) logged train losses, the mean of the last fifth is less than
  UNDERFIT_MIN_DROP (10%) below the mean of the first fifth (and the loss did not start near zero).
- memorisation: the final train loss (mean of the last fifth) is below NEAR_ZERO_LOSS (0.02 nats, the right token at
  ~98% probability) while no held-out loss shows the same (none logged, or one above 0.02 and MEMORISE_RATIO (3x)
  the train loss); or the final eval loss is more than 3x the train loss and MEMORISE_MIN_GAP (0.5 nats) above it.
- spikes: a train loss more than SPIKE_FACTOR (2x) the median of the SPIKE_WINDOW (5) losses before it and at least
  SPIKE_MIN_RISE (0.1 nats) above that median (tiny losses wobble by large factors); needs 3 earlier points.
"""

from __future__ import annotations

import base64
import json
import math
import statistics
from pathlib import Path

OVERFIT_MIN_RISE = 0.10
MIN_EVALS = 3
MIN_TRAIN_POINTS = 4
UNDERFIT_MIN_DROP = 0.10
NEAR_ZERO_LOSS = 0.02
MEMORISE_RATIO = 3.0
MEMORISE_MIN_GAP = 0.5
SPIKE_FACTOR = 2.0
SPIKE_MIN_RISE = 0.1
SPIKE_WINDOW = 5


def curve(history: list[dict], key: str) -> list[tuple[int, float]]:
    """Return the (step, value) points of one logged key (loss: training steps; eval_loss: evaluations)."""
    return [(int(r.get("step", 0)), float(r[key])) for r in history if isinstance(r.get(key), (int, float))]


def diagnosis(name: str, step: int | None, message: str) -> dict:
    """Return one diagnosis record."""
    return {"name": name, "step": step, "message": message}


def ends(values: list[float]) -> tuple[float, float]:
    """Return the means of the first and the last fifth of `values` (at least one point each)."""
    k = max(1, len(values) // 5)
    return statistics.fmean(values[:k]), statistics.fmean(values[-k:])


def loss_at(points: list[tuple[int, float]], step: int) -> float:
    """Return the last train loss logged at or before `step` (the first one if none is)."""
    before = [v for s, v in points if s <= step]
    return before[-1] if before else points[0][1]


def find_non_finite(history: list[dict]) -> list[dict]:
    """Diagnose a nan/inf loss, eval loss or gradient norm, or a stop for one, at the first step it happened."""
    for record in history:
        if "diverged" in record:
            return [diagnosis("non_finite", record.get("step"), f"training stopped: {record['diverged']}")]
        bad = [k for k in ("loss", "eval_loss", "grad_norm")
               if isinstance(record.get(k), float) and not math.isfinite(record[k])]
        if bad:
            return [diagnosis("non_finite", record.get("step"), ", ".join(f"{k} is {record[k]}" for k in bad))]
    return []


def find_overfitting(train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> list[dict]:
    """Diagnose an eval loss that rose from its best while the train loss kept falling."""
    if len(evals) < MIN_EVALS or not train:
        return []
    best_step, best = min(evals, key=lambda p: p[1])
    last_step, last = evals[-1]
    rise = (last - best) / best if best > 0 else math.inf
    if last_step == best_step or rise <= OVERFIT_MIN_RISE or loss_at(train, last_step) >= loss_at(train, best_step):
        return []
    return [diagnosis("overfitting", best_step, (
        f"eval loss rose {best:.4f} -> {last:.4f} (+{rise:.0%}) from step {best_step} to {last_step} while train "
        f"loss fell {loss_at(train, best_step):.4f} -> {loss_at(train, last_step):.4f}; stop earlier "
        "(train.early_stopping_patience), add data or lower the learning rate"))]


def find_underfitting(train: list[tuple[int, float]]) -> list[dict]:
    """Diagnose a train loss that did not drop significantly."""
    if len(train) < MIN_TRAIN_POINTS:
        return []
    first, last = ends([v for _, v in train])
    if first < NEAR_ZERO_LOSS or (first - last) >= UNDERFIT_MIN_DROP * first:
        return []
    return [diagnosis("underfitting", train[-1][0], (
        f"train loss went {first:.4f} -> {last:.4f} ({(last - first) / first:+.1%}, less than "
        f"{UNDERFIT_MIN_DROP:.0%} down); train longer or raise the learning rate"))]


def find_memorisation(train: list[tuple[int, float]], evals: list[tuple[int, float]]) -> list[dict]:
    """Diagnose a train loss near zero that held-out rows do not share, or far below the eval loss."""
    if not train:
        return []
    _, final = ends([v for _, v in train])
    step = train[-1][0]
    held = evals[-1][1] if evals else None
    if final < NEAR_ZERO_LOSS and (held is None or (held > NEAR_ZERO_LOSS and held > MEMORISE_RATIO * final)):
        against = "no held-out loss to compare" if held is None else f"eval loss {held:.4f}"
        return [diagnosis("memorisation", step, f"train loss {final:.4f} is near zero ({against}); the model may be "
                                                "reciting its training rows: check held-out results, add data")]
    if held is not None and held > MEMORISE_RATIO * final and held - final > MEMORISE_MIN_GAP:
        return [diagnosis("memorisation", evals[-1][0], f"train loss {final:.4f} is far below eval loss {held:.4f}; "
                                                        "the model learns its training rows, not the task")]
    return []


def find_spikes(train: list[tuple[int, float]]) -> list[dict]:
    """Diagnose train losses that jump well above the recent median."""
    steps = []
    for i in range(3, len(train)):
        median = statistics.median(v for _, v in train[max(0, i - SPIKE_WINDOW):i])
        step, value = train[i]
        if value > SPIKE_FACTOR * median and value - median > SPIKE_MIN_RISE:
            steps.append((step, value, median))
    if not steps:
        return []
    listed = ", ".join(f"step {s} ({v:.4f} vs median {m:.4f})" for s, v, m in steps[:5])
    return [diagnosis("spikes", steps[0][0], f"loss spikes at {listed}{' …' if len(steps) > 5 else ''}; lower the "
                                             "learning rate or train.max_grad_norm, or look for odd rows")]


def diagnose_history(history: list[dict]) -> list[dict]:
    """Return every diagnosis of a log history (empty for a healthy curve)."""
    train, evals = curve(history, "loss"), curve(history, "eval_loss")
    train_finite = [(s, v) for s, v in train if math.isfinite(v)]
    evals_finite = [(s, v) for s, v in evals if math.isfinite(v)]
    return (find_non_finite(history) + find_overfitting(train_finite, evals_finite)
            + find_underfitting(train_finite) + find_memorisation(train_finite, evals_finite)
            + find_spikes(train_finite))


def plot_curve(history: list[dict], diagnoses: list[dict], path: Path) -> Path:
    """Draw train and eval loss against the step, marking each diagnosis' step, into a PNG (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=90)
    ax = fig.subplots()
    for key, label, style in (("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")):
        points = curve(history, key)
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label)
    for d in diagnoses:
        if d["step"] is not None:
            ax.axvline(d["step"], color="tab:red", linestyle=":", linewidth=1)
            ax.annotate(d["name"], (d["step"], 0.03), xycoords=("data", "axes fraction"), rotation=90, va="bottom",
                        ha="right", fontsize=8, color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def diagnosis_markdown(run_name: str, diagnoses: list[dict], image: Path, image_url: str | None = None) -> str:
    """Return the diagnoses as markdown with the loss curve embedded as a data URI (no file server needed), and the
    link to the same PNG in the MLflow run when given."""
    lines = [f"# Training curve of run {run_name}", ""]
    if diagnoses:
        lines += ["| diagnosis | step | detail |", "|---|---|---|"]
        lines += [f"| {d['name']} | {d['step'] if d['step'] is not None else '-'} | {d['message']} |"
                  for d in diagnoses]
    else:
        lines.append("No diagnosis: no overfitting, underfitting, memorisation, spike or nan/inf in the curve.")
    data = base64.b64encode(image.read_bytes()).decode("ascii")
    lines += ["", f"![loss curve](data:image/png;base64,{data})"]
    if image_url:
        lines += ["", f"The same curve in the MLflow run: [train/loss_curve.png]({image_url})"]
    return "\n".join(lines)


def write_diagnoses(train_dir: Path) -> tuple[list[dict], Path, Path]:
    """Diagnose train_dir/log_history.json; write diagnoses.json and loss_curve.png; return both and the diagnoses."""
    history = json.loads((train_dir / "log_history.json").read_text(encoding="utf-8"))
    diagnoses = diagnose_history(history)
    out = train_dir / "diagnoses.json"
    out.write_text(json.dumps(diagnoses, indent=1), encoding="utf-8")
    return diagnoses, out, plot_curve(history, diagnoses, train_dir / "loss_curve.png")


def diagnosis_tags(diagnoses: list[dict]) -> dict[str, str]:
    """Return MLflow tags: `diagnoses` (names, comma-separated, or none) and diagnosis.<name> with its message."""
    tags = {"diagnoses": ",".join(d["name"] for d in diagnoses) or "none"}
    tags.update({f"diagnosis.{d['name']}": d["message"][:5000] for d in diagnoses})
    return tags


def publish_diagnoses(run_name: str, diagnoses: list[dict], image: Path, image_url: str | None = None) -> None:
    """Show the diagnoses and the loss curve as the Prefect markdown artifact `train-diagnoses` (inside a Prefect run
    only); its description names the diagnoses."""
    from tasks.core.artifacts import publish_markdown

    names = ", ".join(f"{d['name']} (step {d['step']})" if d["step"] is not None else d["name"] for d in diagnoses)
    publish_markdown("train-diagnoses", diagnosis_markdown(run_name, diagnoses, image, image_url),
                     f"Loss curve; diagnoses: {names or 'none'}")


def diagnose_run(runs_dir: Path, run_id: str) -> str:
    """Diagnose an earlier run's saved history (`sftflow diagnose`), rewrite its diagnoses and curve; return a
    report."""
    from tasks.core.config import RunPaths
    from tasks.core.errors import ConfigError

    train_dir = RunPaths(runs_dir, run_id).train
    if not (train_dir / "log_history.json").is_file():
        raise ConfigError(f"{train_dir / 'log_history.json'}: no training history (has run {run_id} trained?)")
    diagnoses, json_path, image = write_diagnoses(train_dir)
    lines = [f"{d['name']} (step {d['step'] if d['step'] is not None else '-'}): {d['message']}" for d in diagnoses]
    return "\n".join([f"run {run_id}: " + (f"{len(diagnoses)} diagnos{'is' if len(diagnoses) == 1 else 'es'}"
                                           if diagnoses else "no diagnosis"), *lines,
                      f"written: {json_path}, {image}"])
