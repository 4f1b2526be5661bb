"""Task extractors and metrics for evaluate: what part of an answer is scored, and how.

An extractor turns an answer (and its reference, the same way) into the value that is scored:
- `none`: the whole answer, stripped;
- `gsm8k`: the number after `#### ` (commas and a leading `$` dropped, `12.50` -> `12.5`), else None;
- `json`: the first JSON object in the text (a dict), else None;
- `regex`: the first group of `evaluate.pattern` (or the whole match when it has no group), else None;
- `label`: the first of `evaluate.labels` the text names (earliest in the text, whole words, any case), else None.
A reference the extractor finds nothing in is scored as its whole stripped text (a label task's reference is often
the bare label; a GSM8K reference may lack `#### `).

Each metric gives one score per item in [0, 1] and a corpus score (the mean of the items; BLEU: sacrebleu's corpus
BLEU). Text metrics see an extracted dict as its canonical JSON (sorted keys) and None as "".
- `exact_match`: equal after lower-casing and collapsing whitespace (two JSON objects: equal as objects);
- `token_f1`: SQuAD's token-overlap F1 (lower case, punctuation and articles dropped); both empty scores 1;
- `rouge_l`: ROUGE-L F-measure (rouge-score, its default tokenizer); an empty side scores 0;
- `bleu`: BLEU / 100 (sacrebleu; per item: sentence BLEU with effective order); an empty side scores 0;
- `accuracy`: the extracted value equals the reference's (labels and numbers: the canonical form); None scores 0;
- `field_match`: the share of the reference object's fields whose values the prediction's object has exactly
  (`2` is not `"2"`); a prediction with no JSON object scores 0. Needs `extractor: json` and object references;
- `json_valid`: 1 when the whole answer (stripped) parses as a JSON object, else 0 (trailing text fails it);
- `extracted`: 1 when the extractor finds what it scores in the answer (gsm8k: a `#### N` line; json: an object;
  regex: a match; label: a label; none: any text), else 0: the format rate, right or wrong. It means something where
  accuracy does not yet (a small model that learnt the answer format but not the arithmetic).
"""

from __future__ import annotations

import collections
import json
import re
import string
from dataclasses import dataclass
from typing import Any

from tasks.core.errors import ConfigError

TEXT_METRICS = ("exact_match", "token_f1", "rouge_l", "bleu")
GSM8K_ANSWER = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
ARTICLES = re.compile(r"\b(a|an|the)\b")
PUNCTUATION = frozenset(string.punctuation)


@dataclass(frozen=True)
class Extractor:
    """How answers are reduced to what is scored (`EvaluateConfig.extractor`, `.pattern`, `.labels`)."""

    kind: str = "none"
    pattern: str | None = None
    labels: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, cfg) -> Extractor:
        """Return the extractor an EvaluateConfig names; a pattern that does not compile is a ConfigError."""
        if cfg.extractor == "regex":
            try:
                re.compile(cfg.pattern)
            except re.error as e:
                raise ConfigError(f"evaluate.pattern {cfg.pattern!r} is not a valid regular expression: {e}") from e
        return cls(cfg.extractor, cfg.pattern, tuple(cfg.labels or ()))

    def __call__(self, text: str) -> Any:
        """Return the scored value of `text`: a string, a dict (json), or None when there is nothing to score."""
        return EXTRACTORS[self.kind](self, text or "")

    def reference(self, text: str) -> Any:
        """Return the scored value of a reference: extracted, else the whole stripped text (canonical number/label)."""
        value = self(text)
        if value is not None:
            return value
        text = (text or "").strip()
        return canonical_number(text) if self.kind == "gsm8k" else text


def canonical_number(text: str) -> str:
    """Return a number's canonical text: no commas, no `$`, no trailing zeros after the point (`1,250.50` -> 1250.5)."""
    text = text.replace(",", "").lstrip("$").strip()
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text or "0"


def extract_gsm8k(_: Extractor, text: str) -> str | None:
    """Return the number after `#### `, canonical, or None."""
    found = GSM8K_ANSWER.search(text)
    return canonical_number(found.group(1)) if found else None


def first_json_object(text: str) -> dict | None:
    """Return the first JSON object in `text` (parsed from the first `{` at which one decodes), or None."""
    decoder = json.JSONDecoder()
    for start in (i for i, c in enumerate(text) if c == "{"):
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict):
            return value
    return None


def extract_regex(extractor: Extractor, text: str) -> str | None:
    """Return the pattern's first group (or its whole match when it has none), stripped, or None."""
    found = re.search(extractor.pattern or "", text)
    if not found:
        return None
    return ((found.group(1) if found.re.groups else found.group(0)) or "").strip()


def extract_label(extractor: Extractor, text: str) -> str | None:
    """Return the label (as the config spells it) named earliest in `text`, as a whole word in any case; a longer
    label wins a tie (`very positive` over `positive`)."""
    hits = []
    for label in extractor.labels:
        found = re.search(rf"(?<!\w){re.escape(label)}(?!\w)", text, flags=re.IGNORECASE)
        if found:
            hits.append((found.start(), -len(label), label))
    return min(hits)[2] if hits else None


EXTRACTORS = {"none": lambda _, text: text.strip(), "gsm8k": extract_gsm8k,
              "json": lambda _, text: first_json_object(text), "regex": extract_regex, "label": extract_label}


def as_text(value: Any) -> str:
    """Return the text a text metric sees: a dict as canonical JSON, None as ''."""
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False)
    return str(value)


def normalise(text: str) -> str:
    """Return `text` lower-cased with whitespace collapsed."""
    return " ".join(text.lower().split())


def squad_tokens(text: str) -> list[str]:
    """Return SQuAD's answer tokens: lower case, punctuation and articles removed, split on whitespace."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return ARTICLES.sub(" ", text).split()


def exact_match_item(pred: Any, ref: Any) -> float:
    """Return 1.0 when the values match: objects as objects, anything else as normalised text."""
    if isinstance(ref, dict) or isinstance(pred, dict):
        return float(pred == ref)
    return float(normalise(as_text(pred)) == normalise(as_text(ref)))


def token_f1_item(pred: Any, ref: Any) -> float:
    """Return SQuAD's token F1 of a prediction against a reference."""
    p, r = squad_tokens(as_text(pred)), squad_tokens(as_text(ref))
    if not p or not r:
        return float(p == r)
    common = sum((collections.Counter(p) & collections.Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l_items(preds: list[Any], refs: list[Any]) -> list[float]:
    """Return the ROUGE-L F-measure of each prediction against its reference (rouge-score)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    return [scorer.score(as_text(r), as_text(p))["rougeL"].fmeasure for p, r in zip(preds, refs)]


def bleu_items(preds: list[Any], refs: list[Any]) -> list[float]:
    """Return each prediction's sentence BLEU / 100 (sacrebleu, effective order)."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)
    return [min(1.0, bleu.sentence_score(as_text(p), [as_text(r)]).score / 100) for p, r in zip(preds, refs)]


def corpus_bleu(preds: list[Any], refs: list[Any]) -> float:
    """Return sacrebleu's corpus BLEU / 100."""
    from sacrebleu.metrics import BLEU

    return min(1.0, BLEU().corpus_score([as_text(p) for p in preds], [[as_text(r) for r in refs]]).score / 100)


def accuracy_item(pred: Any, ref: Any) -> float:
    """Return 1.0 when a value was extracted and equals the reference's (labels case-insensitively)."""
    if pred is None:
        return 0.0
    if isinstance(pred, str) and isinstance(ref, str):
        return float(pred.strip().lower() == ref.strip().lower())
    return float(pred == ref)


def field_match_item(pred: Any, ref: Any) -> float:
    """Return the share of the reference object's fields the predicted object has with exactly equal values."""
    if not isinstance(pred, dict):
        return 0.0
    if not ref:
        return 1.0
    return sum(k in pred and pred[k] == v for k, v in ref.items()) / len(ref)


def json_valid_item(answer: str) -> float:
    """Return 1.0 when the whole stripped answer parses as a JSON object."""
    try:
        return float(isinstance(json.loads(answer.strip()), dict))
    except (json.JSONDecodeError, ValueError):
        return 0.0


def extracted_item(value: Any) -> float:
    """Return 1.0 when the extractor found something to score (None and empty text are nothing)."""
    return float(value is not None and value != "")


PAIR_METRICS = {"exact_match": exact_match_item, "token_f1": token_f1_item, "accuracy": accuracy_item,
                "field_match": field_match_item}


def check_metrics(metrics: list[str], extractor: Extractor, references: list[str]) -> None:
    """Raise ConfigError when a metric cannot score these references with this extractor (before any generation)."""
    if "field_match" not in metrics:
        return
    if extractor.kind != "json":
        raise ConfigError(f"evaluate.metrics has field_match, which compares JSON objects, but evaluate.extractor is "
                          f"{extractor.kind!r}; set evaluate.extractor=json")
    for i, ref in enumerate(references):
        if not isinstance(extractor.reference(ref), dict):
            raise ConfigError(f"evaluate.metrics has field_match but held-out reference {i} is not a JSON object "
                              f"({ref[:60]!r}); drop field_match for this data")


def score_items(metric: str, answers: list[str], references: list[str], extractor: Extractor) -> list[float]:
    """Return `metric`'s score for each answer against its reference, after extraction."""
    if metric == "json_valid":
        return [json_valid_item(a) for a in answers]
    if metric == "extracted":
        return [extracted_item(extractor(a)) for a in answers]
    preds, refs = [extractor(a) for a in answers], [extractor.reference(r) for r in references]
    if metric == "rouge_l":
        return rouge_l_items(preds, refs)
    if metric == "bleu":
        return bleu_items(preds, refs)
    return [PAIR_METRICS[metric](p, r) for p, r in zip(preds, refs)]


def score(metrics: list[str], answers: list[str], references: list[str],
          extractor: Extractor) -> dict[str, tuple[float, list[float]]]:
    """Return {metric: (corpus score, per-item scores)} for each metric, in order."""
    out = {}
    for metric in metrics:
        items = score_items(metric, answers, references, extractor)
        if metric == "bleu":
            corpus = corpus_bleu([extractor(a) for a in answers], [extractor.reference(r) for r in references])
        else:
            corpus = sum(items) / len(items) if items else 0.0
        out[metric] = (corpus, items)
    return out
