"""The serving-parity check: before a version may take @champion, the answers it gives through the ways it will be
loaded must be the answers evaluate scored, on the same held-out prompts, greedily.

Paths compared with the model as evaluated (eval/samples.jsonl's tuned answers, paired by row_id with the run's
held-out prompts):
- `pyfunc`: the logged MLflow model through `mlflow.pyfunc.load_model(uri).predict({"messages": ...})`, downloaded
  from the store (what `mlflow models serve` answers with);
- `merged`: the merged export (`merged/`, register.merged_export) loaded with transformers and generating here;
- `served`: what `sftflow serve` answers with its defaults (its loader and dtype, its prompt ids, its batched decoder),
  tasks/serving/serve.py `served_answers`, handed in as one of `answer_paths`: the registry may not import serving
  (the layer rule), so flows/steps.py, which wires both, hands it to register.

Answers are compared as texts (stripped); where two differ, the first differing token of their tokenizations says
where. The tolerance is `register.parity_min_identical`: the share of held-out answers each path must give
identically. A QLoRA adapter is evaluated over the 4-bit NF4 base (computing in bf16 where the CPU has it) and
exported merged into that base dequantized to fp32 (tasks/registry/mlflow_model.py): the default run's 64 answers
were all identical; merged into the exact fp32 base, 2 differed late in the answer. A damaged or wrong export differs
on nearly every answer from the first tokens. Details: docs/evaluation-and-registry.md. Decisions are pure
(`compare_answers`, `decide_parity`, `guard_decision`); the I/O is `check_parity`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

SHOWN_CHARS = 60  # of a prompt, in a reason

@dataclass(frozen=True)
class Divergence:
    """Where one path's answer first leaves the evaluated answer: the prompt and the first differing token."""

    prompt_index: int  # position among the compared held-out prompts (0-based)
    row_id: str
    prompt: str  # the prompt's last turn, shortened
    token: int  # index of the first differing token of the two answers
    expected: str  # the evaluated answer's token there ("<end>" when it had ended)
    got: str  # this path's token there

    def describe(self) -> str:
        return (f"prompt {self.prompt_index + 1} (row {self.row_id}: {self.prompt!r}) at answer token "
                f"{self.token}: evaluated {self.expected!r}, got {self.got!r}")


@dataclass(frozen=True)
class PathParity:
    """One path's agreement with the evaluated answers."""

    path: str
    identical: int
    compared: int
    first: Divergence | None  # the first prompt where it differs, None when all are identical

    @property
    def share(self) -> float:
        return self.identical / self.compared if self.compared else 1.0


@dataclass(frozen=True)
class Parity:
    """The parity check's verdict and its reason, with each path compared and the tolerance."""

    ok: bool
    reason: str
    paths: tuple[PathParity, ...] = ()
    min_identical: float | None = None

    def tags(self) -> dict[str, str]:
        """Return the result as model-version tags (`parity.*`)."""
        tags = {"parity.ok": str(self.ok).lower(), "parity.reason": self.reason[:5000]}
        if self.min_identical is not None:
            tags["parity.min_identical"] = repr(self.min_identical)
        return tags | {f"parity.{p.path}": f"{p.identical}/{p.compared}" for p in self.paths}

    @classmethod
    def from_tags(cls, tags: dict[str, str]) -> Parity | None:
        """Return the parity recorded in a version's tags, or None when it has none."""
        if "parity.ok" not in tags:
            return None
        return cls(tags["parity.ok"] == "true", tags.get("parity.reason", ""))


def decide_parity(paths: list[PathParity], min_identical: float) -> Parity:
    """Return the verdict: every path gives at least `min_identical` of the evaluated answers identically. The reason
    names the paths' counts and where the worst path first diverges."""
    parts = ", ".join(f"{p.path} {p.identical}/{p.compared} identical" for p in paths)
    knob = f"register.parity_min_identical={min_identical:g}"
    worst = min(paths, key=lambda p: p.share)
    where = f"{worst.path} first diverges from the evaluated answers at {worst.first.describe()}" if worst.first else ""
    if worst.share < min_identical:
        return Parity(False, f"serving parity fails: {parts}, below {knob}; {where}", tuple(paths), min_identical)
    if not where:
        return Parity(True, f"serving parity holds: {parts}", tuple(paths), min_identical)
    verdict = f"not enforced ({knob})" if min_identical == 0 else f"holds within {knob}"
    return Parity(True, f"serving parity {verdict}: {parts}; {where}", tuple(paths), min_identical)


def not_checked(why: str) -> Parity:
    """Return the verdict when nothing could be compared: it does not block, and says why."""
    return Parity(True, f"serving parity not checked: {why}")


def first_difference(a: list[int], b: list[int]) -> int:
    """Return the index of the first position where token lists `a` and `b` differ (the shorter's length when one
    is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def compare_answers(path: str, expected: list[str], got: list[str], prompts: list[str], row_ids: list[str],
                    tokenize: Callable[[str], list[int]], decode: Callable[[int], str]) -> PathParity:
    """Return how many of `got` equal `expected` (stripped texts) and where the first differing one diverges."""
    assert len(expected) == len(got) == len(prompts) == len(row_ids)
    same = [e.strip() == g.strip() for e, g in zip(expected, got)]
    first = None
    if not all(same):
        k = same.index(False)
        a, b = tokenize(expected[k].strip()), tokenize(got[k].strip())
        at = first_difference(a, b)
        shown = prompts[k] if len(prompts[k]) <= SHOWN_CHARS else prompts[k][:SHOWN_CHARS - 1] + "…"
        first = Divergence(k, str(row_ids[k]), shown, at, decode(a[at]) if at < len(a) else "<end>",
                           decode(b[at]) if at < len(b) else "<end>")
    return PathParity(path, sum(same), len(same), first)


def guard_decision(decide: Callable, parity: Parity | None) -> Callable:
    """Return `decide` (the promotion gate's decision against a champion) refusing @champion when `parity` failed:
    the decision keeps its scores, and its reason says which prompt and token diverged."""
    def decide_with_parity(champion):
        decision = decide(champion)
        if parity is None or parity.ok or not decision.promoted:
            return decision
        return replace(decision, promoted=False, reason=f"{decision.reason}; but {parity.reason}")

    return decide_with_parity


# ---- I/O: the prompts, the answers of each path ----

def paired_prompts(samples_file: Path, heldout_file: Path) -> tuple[list[str], list[list[dict]], list[str]]:
    """Return (row ids, chat prompts, evaluated answers) of the samples whose row_id is a held-out row with a prompt
    in this run's formatted held-out set, in the samples' order."""
    import pyarrow.parquet as pq

    held = {str(r["row_id"]): r["prompt"] for r in pq.read_table(heldout_file, columns=["row_id", "prompt"])
            .to_pylist() if r["prompt"] is not None}
    ids, prompts, answers = [], [], []
    for line in samples_file.read_text(encoding="utf-8").splitlines():
        sample = json.loads(line)
        key = str(sample.get("row_id"))
        if key in held and isinstance(sample.get("tuned"), str):
            ids.append(key)
            prompts.append(json.loads(held[key]))
            answers.append(sample["tuned"])
    return ids, prompts, answers


def pyfunc_answers(model_uri: str, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Return the logged model's answers through mlflow.pyfunc (loaded from the store), in one predict call over
    all prompts, generated `batch_size` at a time (a decode step reads every weight: batching amortises that). The
    load-time `batch_size` reaches the pipeline because the model was logged with one in its model_config: MLflow
    drops (with a warning) any load-time key the logged config lacks."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri, model_config={"batch_size": batch_size})
    answers = model.predict([{"messages": messages, "max_tokens": max_new_tokens} for messages in prompts])
    return [answer["choices"][0]["message"]["content"] for answer in answers]


def local_answers(model_dir: Path, prompts: list[list[dict]], max_new_tokens: int, batch_size: int) -> list[str]:
    """Return greedy answers of the model saved in `model_dir` (full weights, tokenizer and template, a generation
    config stopping at end of turn), loaded with transformers, `batch_size` prompts at a time, left-padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True).eval()
    stops = model.generation_config.eos_token_id
    stops = set(stops if isinstance(stops, list) else [stops])
    texts = [tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        for tokens in generated[:, enc["input_ids"].shape[1]:].tolist():
            cut = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            out.append(tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip())
    return out


def generation_setting(report: dict, key: str, default):
    """Return evaluate's generation setting `key` as report.json records it, `default` where it records none."""
    return (report.get("generation") or {}).get(key) or default


def generation_budget(report: dict, default: int) -> int:
    """Return evaluate's max_new_tokens from report.json (`default` when it records none)."""
    return int(generation_setting(report, "max_new_tokens", default))


def generation_batch(report: dict, default: int = 8) -> int:
    """Return evaluate's generation batch size from report.json (`default` when it records none): it fit in memory
    there, so the logged model batches as many prompts by default and the parity check generates as many at once
    (transformers' `generate` leaves a row's left padding out of a repetition penalty, as evaluate does)."""
    return max(1, int(generation_setting(report, "batch_size", default)))


def repetition_penalty(report: dict) -> float:
    """Return evaluate's repetition penalty from report.json (1.0, off, when it records none)."""
    return float(generation_setting(report, "repetition_penalty", 1.0))


def example_request(run_formatted: Path, eval_dir: Path, budget: int) -> dict | None:
    """Return the logged model's input example: the first evaluated held-out prompt as a chat request, or None."""
    from tasks.registry.mlflow_model import input_example

    samples, heldout = Path(eval_dir) / "samples.jsonl", Path(run_formatted) / "heldout.parquet"
    if not samples.is_file() or not heldout.is_file():
        return None
    _, prompts, _ = paired_prompts(samples, heldout)
    return input_example(prompts[0], budget) if prompts else None


def what_to_compare(run_formatted: Path, eval_dir: Path, report: dict) -> Parity | tuple:
    """Return (row ids, chat prompts, evaluated answers, max_new_tokens) of the held-out prompts evaluate answered,
    or the not-blocking verdict saying why there is nothing to compare (evaluate sampled; no samples, held-out set
    or budget; samples naming no held-out row of this run, as a hand-written report does)."""
    generation = report.get("generation") or {}
    if generation.get("do_sample"):
        return not_checked("evaluate sampled its answers (evaluate.do_sample: true); parity compares greedy answers")
    samples, heldout = Path(eval_dir) / "samples.jsonl", Path(run_formatted) / "heldout.parquet"
    if not samples.is_file() or not heldout.is_file():
        return not_checked(f"no {samples if not samples.is_file() else heldout} to pair answers with prompts")
    row_ids, prompts, evaluated = paired_prompts(samples, heldout)
    budget = generation_budget(report, 0)
    if not row_ids or budget <= 0:
        return not_checked(f"no row of {samples} is a held-out prompt of {heldout}" if not row_ids else
                           f"{Path(eval_dir) / 'report.json'} records no generation.max_new_tokens")
    return row_ids, prompts, evaluated, budget


def check_parity(run_formatted: Path, eval_dir: Path, report: dict, model_info, merged_artifact: str | None,
                 version, min_identical: float, answer_paths: dict[str, Callable] | None = None) -> Parity:
    """Return the parity verdict of the logged model (`model_info`, loaded from the store through pyfunc), the
    merged export (artifact `merged_artifact` of the model's run, downloaded; None when there is none) and each of
    `answer_paths` (name -> answers(version, prompts, max_new_tokens, batch_size), `version` the RegisteredVersion
    being registered) against evaluate's tuned
    answers (eval_dir/samples.jsonl) on this run's held-out prompts (run_formatted/heldout.parquet), or a verdict
    that does not block when there is nothing to compare (`what_to_compare`). The tokenizer in the version's
    trained/ directory locates the first differing token."""
    import tempfile
    import time

    import mlflow
    from transformers import AutoTokenizer

    from tasks.core.common import stage_logger

    found, started = what_to_compare(run_formatted, eval_dir, report), time.monotonic()
    if isinstance(found, Parity):
        return found
    row_ids, prompts, evaluated, budget = found
    tokenizer = AutoTokenizer.from_pretrained(str(version.trained_dir))

    def compare(path: str, answers: list[str]) -> PathParity:
        return compare_answers(path, evaluated, answers, [p[-1]["content"] if p else "" for p in prompts], row_ids,
                               lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                               lambda token: tokenizer.decode([token]))

    batch = min(generation_batch(report), len(prompts))
    paths = [compare("pyfunc", pyfunc_answers(model_info.model_uri, prompts, budget, batch))]
    if merged_artifact is not None:
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(run_id=model_info.run_id, artifact_path=merged_artifact,
                                                        dst_path=tmp)
            paths.append(compare("merged", local_answers(Path(local), prompts, budget, batch)))
    for name, answers in (answer_paths or {}).items():
        paths.append(compare(name, answers(version, prompts, budget, batch)))
    verdict = decide_parity(paths, min_identical)
    stage_logger().info("register: %s (%d prompts, %.0f s)", verdict.reason, len(prompts),
                        time.monotonic() - started)
    return verdict
