"""Which held-out rows evaluate scores, and the fingerprint that says when two evaluations compare.

Rows are chosen by hash: of all held-out rows with a prompt (plain-text rows, and the earlier parts of a split row,
have none), the `evaluate.max_samples` whose content hash is lowest, so every source is represented in proportion
and the same conversation is chosen in every run that holds it (the first rows in source order would let the first
source decide). The chosen rows keep their held-out order.

The fingerprint covers everything a score depends on besides the model: the rows (prompt, reference and the token
ids and masks eval loss reads), the generation settings, the extractor with its pattern or labels, the metrics and
the source of tasks/evaluate/metrics.py. The gate compares a recorded score only under an equal fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tasks.core.config import EvaluateConfig

FINGERPRINT_VERSION = 2  # bump when what the fingerprint covers changes: older fingerprints then never match
GENERATION_KEYS = ("max_new_tokens", "do_sample", "temperature", "top_p", "seed", "batch_size")


def row_key(row: dict) -> str:
    """Return the hash that orders a held-out row for sampling: its prompt and reference (not its position)."""
    return hashlib.sha256(json.dumps([row["prompt"], row["reference"]], ensure_ascii=False).encode()).hexdigest()


def select_rows(rows: list[dict], max_samples: int) -> list[dict]:
    """Return the rows evaluate scores: the `max_samples` rows with a prompt whose row_key is lowest, across every
    source, in their held-out order."""
    candidates = [(row_key(r), i) for i, r in enumerate(rows) if r["prompt"] is not None]
    chosen = sorted(i for _, i in sorted(candidates)[:max_samples])
    return [rows[i] for i in chosen]


def metrics_code_version() -> str:
    """Return the sha256 of tasks/evaluate/metrics.py: a changed metric or extractor changes every fingerprint."""
    from tasks.evaluate import metrics

    return hashlib.sha256(Path(metrics.__file__).read_bytes()).hexdigest()


def generation_settings(cfg: EvaluateConfig) -> dict:
    """Return evaluate's decoding settings as its report records them; the repetition penalty only when it is on,
    so a run without one keeps the fingerprint (and the champion comparison) it had before the setting existed."""
    penalty = {"repetition_penalty": cfg.repetition_penalty} if cfg.repetition_penalty != 1.0 else {}
    return {k: getattr(cfg, k) for k in GENERATION_KEYS} | penalty


def scoring_settings(cfg: EvaluateConfig) -> dict:
    """Return what scores depend on besides the rows and the model: generation, extractor, metrics, metric code."""
    return {"generation": generation_settings(cfg),
            "extractor": {"name": cfg.extractor, "pattern": cfg.pattern, "labels": cfg.labels},
            "metrics": list(cfg.metrics), "metrics_code": metrics_code_version()}


def heldout_fingerprint(rows: list[dict], cfg: EvaluateConfig) -> str:
    """Return the sha256 over the scored rows (prompt, reference, token ids and masks, in order) and the scoring
    settings: equal fingerprints mean comparable scores."""
    digest = hashlib.sha256(json.dumps({"version": FINGERPRINT_VERSION, **scoring_settings(cfg)},
                                       sort_keys=True).encode() + b"\n")
    for r in rows:
        tokens = hashlib.sha256(json.dumps([list(r.get("input_ids") or []),
                                            list(r.get("assistant_masks") or [])]).encode()).hexdigest()
        digest.update(json.dumps([r["prompt"], r["reference"], tokens], ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()
