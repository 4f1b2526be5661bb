"""The promotion gate: a pure decision over report.json (evaluate's scores on one held-out set) and the champion's
recorded tags, returning a frozen GateDecision with its reason and numbers. No I/O here: register reads the store and
applies the decision (tasks/registry/ledger.py moves @champion by compare-and-set, re-deciding against the champion
current at that moment).

Scores compare only under an equal held-out fingerprint (prompts, references, token ids, generation settings,
extractor, metrics and the metric code: tasks/evaluate/evaluate.py `heldout_fingerprint`). With
`register.gate_confidence` a paired bootstrap over the held-out items must put the gain above the margin at that
confidence, so a difference inside the noise does not promote: with 64 items and nothing lost, one item won is
noise (37% of resamples show no gain), three are enough at 0.95 (5%).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

LOWER_IS_BETTER = ("eval_loss", "perplexity")
LOSS_METRICS = ("eval_loss", "perplexity")  # aggregated over tokens (report item_tokens), not a mean over items
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 0  # the same report and champion, the same decision: a retry decides as the first attempt did
ITEMS_TAG = "items."  # version tag prefix: the version's per-item scores on its held-out set, by metric


@dataclass(frozen=True)
class GateDecision:
    """What the promotion gate decided for a new version, and why (recorded as its `gate.*` tags)."""

    metric: str
    tuned: float | None
    against: str  # "champion vN" or "base"
    against_score: float | None  # None: no comparable score of the champion (or base) on this held-out set
    margin: float
    promoted: bool
    reason: str
    confidence: float | None = None  # the paired bootstrap's level, when the gate ran one
    lower_bound: float | None = None  # the bootstrap's lower bound of the gain at that level

    def tags(self) -> dict[str, str]:
        """Return the decision as model-version tags."""
        tags = {"gate.metric": self.metric, "gate.tuned": "" if self.tuned is None else repr(self.tuned),
                "gate.against": self.against,
                "gate.against_score": "" if self.against_score is None else repr(self.against_score),
                "gate.margin": repr(self.margin), "gate.promoted": str(self.promoted).lower(),
                "gate.reason": self.reason}
        if self.confidence is not None:
            tags["gate.confidence"] = repr(self.confidence)
            tags["gate.lower_bound"] = "" if self.lower_bound is None else repr(self.lower_bound)
        return tags

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> GateDecision | None:
        """Return the decision recorded in a version's tags, or None when it has none (e.g. an older version)."""
        if "gate.metric" not in tags:
            return None

        def number(key: str) -> float | None:
            return float(tags[key]) if tags.get(key) else None

        return cls(tags["gate.metric"], number("gate.tuned"), tags.get("gate.against", ""),
                   number("gate.against_score"), float(tags.get("gate.margin") or 0),
                   tags.get("gate.promoted") == "true", tags.get("gate.reason", ""), number("gate.confidence"),
                   number("gate.lower_bound"))


def improvement(metric: str, new, old):
    """Return how much `new` beats `old` on `metric` (positive is better; eval_loss and perplexity fall); works on
    floats and numpy arrays alike."""
    return old - new if metric in LOWER_IS_BETTER else new - old


@dataclass(frozen=True)
class Side:
    """One side of the comparison: its name in reasons, its score, its per-item scores (None: not recorded), and
    why it has no score when it has none."""

    label: str
    score: float | None
    items: tuple[float, ...] | None = None
    missing: str = ""


def report_side(report: dict, name: str, metric: str, label: str) -> Side:
    """Return model `name`'s score and items as this report holds them."""
    summary = report.get("models", {}).get(name, {})
    items = report.get("items", {}).get(name, {}).get("eval_loss" if metric == "perplexity" else metric)
    score = summary.get(metric)
    missing = "" if score is not None else (
        f"{label} was scored without {metric} in this evaluate (its tokenizer's vocabulary differs from this run's, "
        f"so token-level loss does not compare): gate on a generation metric (register.gate_metric, one of "
        "evaluate.metrics) or promote by hand (sftflow promote)" if metric in LOSS_METRICS and metric in summary else
        f"{label} has no {metric} in this report")
    return Side(label, None if score is None else float(score), tuple(items) if items is not None else None, missing)


def champion_side(report: dict, metric: str, version: str, tags: dict[str, str]) -> Side:
    """Return the champion's `metric` on this report's held-out set: scored in this evaluate, or recorded at its own
    registration under an equal heldout_fingerprint (same rows, settings, extractor and metric code); no score when
    neither holds."""
    label = f"champion v{version}"
    scored = report.get("models", {}).get("champion")
    if scored and str(scored.get("version")) == str(version):
        return report_side(report, "champion", metric, label)
    fingerprint = report.get("heldout_fingerprint")
    if fingerprint and tags.get("heldout_fingerprint") == fingerprint and tags.get(f"score.{metric}"):
        items = tags.get(f"{ITEMS_TAG}{'eval_loss' if metric == 'perplexity' else metric}")
        return Side(label, float(tags[f"score.{metric}"]), tuple(json.loads(items)) if items else None)
    was = f" (evaluate scored champion v{scored.get('version')}: the champion changed after evaluate ran)" \
        if scored else " (evaluate did not score it: evaluate.compare_champion is false, or there was none then)"
    return Side(label, None, None, f"{label} has no {metric} on this held-out set under the same fingerprint (held-out "
                                   f"rows, generation settings, extractor, metric code){was}; rerun evaluate to "
                                   "compare")


def aggregate(metric: str, items, weights):
    """Return `metric` over resampled items (rows of an index matrix): a mean, or for eval_loss and perplexity the
    token-weighted mean loss (and its exp), as evaluate computes them."""
    import numpy as np

    if metric not in LOSS_METRICS:
        return items.mean(axis=-1)
    loss = (items * weights).sum(axis=-1) / np.maximum(weights.sum(axis=-1), 1e-12)
    return np.exp(np.minimum(loss, 700)) if metric == "perplexity" else loss


def bootstrap_lower_bound(metric: str, new: tuple[float, ...], old: tuple[float, ...], weights: list[float] | None,
                          confidence: float) -> float:
    """Return the `confidence` lower bound of the gain of `new` over `old` under a paired bootstrap over items (the
    same resampled items for both sides, a fixed seed)."""
    import numpy as np

    a, b = np.asarray(new, dtype=float), np.asarray(old, dtype=float)
    w = np.asarray(weights if weights is not None else [1.0] * len(a), dtype=float)
    index = np.random.default_rng(BOOTSTRAP_SEED).integers(0, len(a), size=(BOOTSTRAP_RESAMPLES, len(a)))
    gains = improvement(metric, aggregate(metric, a[index], w[index]), aggregate(metric, b[index], w[index]))
    return float(np.quantile(gains, 1 - confidence))


def noise_check(report: dict, metric: str, tuned: Side, other: Side, margin: float,
                confidence: float) -> tuple[float | None, str]:
    """Return (the bootstrap lower bound, "") or (None, why the bootstrap cannot run)."""
    weights = report.get("item_tokens") if metric in LOSS_METRICS else None
    for side in (tuned, other):
        if side.items is None:
            return None, (f"no per-item {metric} of {side.label} on this held-out set (written by an older evaluate "
                          "or register); rerun evaluate, or set register.gate_confidence=null to compare means only")
    if len(tuned.items) != len(other.items) or (weights is not None and len(weights) != len(tuned.items)):
        return None, f"the per-item {metric} of {tuned.label} and {other.label} do not pair up; rerun evaluate"
    if metric in LOSS_METRICS and weights is None:
        return None, f"no item_tokens in report.json to weigh per-item {metric}; rerun evaluate"
    return bootstrap_lower_bound(metric, tuned.items, other.items, weights, confidence), ""


def decide_promotion(report: dict, metric: str, margin: float, champion: tuple[str, dict] | None,
                     confidence: float | None = None) -> GateDecision:
    """Return the gate's decision: promote when the tuned model beats the champion (version, tags), or the base
    model when there is no champion, on `metric` by more than `margin`, and, with `confidence`, when the paired
    bootstrap's lower bound of the gain is above the margin too. A missing score is a refusal with its reason."""
    tuned = report_side(report, "tuned", metric, "the tuned model")
    other = report_side(report, "base", metric, "base") if champion is None else champion_side(report, metric,
                                                                                               *champion)
    against = other.label

    def refuse(reason: str, lower: float | None = None) -> GateDecision:
        return GateDecision(metric, tuned.score, against, other.score, margin, False, reason, confidence, lower)

    if tuned.score is None or other.score is None:
        return refuse(tuned.missing or other.missing)
    gain = improvement(metric, tuned.score, other.score)
    direction = " (lower is better)" if metric in LOWER_IS_BETTER else ""
    if not (math.isfinite(gain) and gain > margin):
        return refuse(f"{metric} {tuned.score:.4g} does not beat {against}'s {other.score:.4g} by more than margin "
                      f"{margin:g} (difference {gain:+.4g}){direction}")
    why = f"{metric} {tuned.score:.4g} beats {against}'s {other.score:.4g} by {gain:.4g} > margin {margin:g}{direction}"
    if confidence is None:
        return GateDecision(metric, tuned.score, against, other.score, margin, True, why)
    lower, cannot = noise_check(report, metric, tuned, other, margin, confidence)
    if lower is None:
        return refuse(f"{why}, but the noise check cannot run: {cannot}")
    n = len(tuned.items or ())
    if lower <= margin:
        return refuse(f"{why}, but inside the noise: the {confidence:g} paired-bootstrap lower bound of the gain "
                      f"over {n} items is {lower:+.4g}, not above the margin (register.gate_confidence)", lower)
    return GateDecision(metric, tuned.score, against, other.score, margin, True,
                        f"{why}; {confidence:g} paired-bootstrap lower bound {lower:.4g} over {n} items", confidence,
                        lower)


def item_tags(report: dict) -> dict[str, str]:
    """Return the tuned model's per-item scores as version tags (`items.<metric>`), so a later gate can pair them
    with its own under an equal fingerprint after this version took @champion."""
    items = report.get("items", {}).get("tuned", {})
    return {f"{ITEMS_TAG}{metric}": json.dumps([round(float(v), 6) for v in values], separators=(",", ":"))
            for metric, values in items.items() if values is not None}
