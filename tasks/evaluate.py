"""Evaluate on the held-out split: eval loss on supervised tokens, and exact match of greedy generations for the
base model and the tuned model on the same prompts, with a table of sample generations."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from tasks.chat_format import load_tokenizer
from tasks.common import stage_logger, stage_task
from tasks.config import EvaluateConfig, TrainConfig
from tasks.modeling import is_adapter_dir, load_base_model, load_trained_model

LOSS_BATCH = 16  # rows per forward pass: logits are rows x tokens x vocabulary floats (49k for SmolLM2)


def supervised_loss(model, rows: list[dict], batch_size: int = LOSS_BATCH) -> float:
    """Return the mean cross-entropy over supervised (assistant) tokens of the given tokenized rows.

    Rows go in right-padded batches: under causal attention a real token never sees the padding after it, and
    padding carries no label, so the per-token sum is the one-row-at-a-time sum (a test checks it).
    """
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, row in enumerate(chunk):
            n = len(row["input_ids"])
            ids[j, :n] = torch.tensor(row["input_ids"])
            labels[j, :n] = torch.where(torch.tensor(row["assistant_masks"]).bool(), ids[j, :n], -100)
            attention[j, :n] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        total += torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                                                   ignore_index=-100, reduction="sum").item()
        count += int((shifted != -100).sum())
    return total / max(count, 1)


def generate_answers(model, tokenizer, prompts: list[list[dict]], cfg: EvaluateConfig, label: str = "") -> list[str]:
    """Return greedy completions for chat prompts, batched with left padding; log progress if labelled."""
    import torch

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers, start = [], time.perf_counter()
    for i in range(0, len(prompts), cfg.batch_size):
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + cfg.batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        what = f"evaluate: generating ({label}), prompts {i + 1}-{i + len(texts)} of {len(prompts)}"
        progress = [token_progress(what, cfg.max_new_tokens, start)] if label else None
        if label:
            stage_logger().info("%s: reading the prompts", what)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, stopping_criteria=progress)
        answers += [tokenizer.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
    return answers


def token_progress(what: str, max_new_tokens: int, start: float, every: int = 8):
    """Return a stopping criterion that never stops: it logs `what, token n/max, elapsed` every `every` tokens."""
    import torch
    from transformers import StoppingCriteria

    class LogTokens(StoppingCriteria):
        tokens = 0

        def __call__(self, input_ids, scores, **kwargs):
            self.tokens += 1
            if self.tokens % every == 0:
                stage_logger().info("%s: token %d/%d  elapsed %.0f s", what, self.tokens, max_new_tokens,
                                    time.perf_counter() - start)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return LogTokens()


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Return the share of predictions equal to their reference after stripping surrounding whitespace."""
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)


def evaluate_model(formatted_dir: Path, model_dir: str, trained_dir: Path, out_dir: Path, cfg: EvaluateConfig,
                   train_cfg: TrainConfig) -> dict:
    """Score base and tuned model on the held-out rows; write report.json and samples.jsonl; return the report.

    `trained_dir` holds a LoRA adapter (loaded over the base as in training) or full weights (full, hft).
    """
    rows = pq.read_table(formatted_dir / "heldout.parquet").to_pylist()[: cfg.max_samples]
    tokenizer = load_tokenizer(str(trained_dir), formatted_dir)  # the template the rows were formatted with
    prompts, references = [json.loads(r["prompt"]) for r in rows], [r["reference"] for r in rows]
    stage_logger().info("evaluate: %d held-out prompts, base and tuned, %d new tokens at most", len(rows),
                        cfg.max_new_tokens)
    model = load_trained_model(model_dir, trained_dir, train_cfg).eval()
    tuned = generate_answers(model, tokenizer, prompts, cfg, label="tuned")
    stage_logger().info("evaluate: eval loss of tuned and base on %d rows", len(rows))
    tuned_loss = supervised_loss(model, rows)
    if is_adapter_dir(trained_dir):
        with model.disable_adapter():  # the same weights without LoRA: the base model, on the same prompts
            base = generate_answers(model, tokenizer, prompts, cfg, label="base")
            base_loss = supervised_loss(model, rows)
    else:
        del model  # full weights: the base is a second model; one at a time in memory
        model = load_base_model(model_dir, False, train_cfg.compute_dtype).eval()
        base = generate_answers(model, tokenizer, prompts, cfg, label="base")
        base_loss = supervised_loss(model, rows)
    report = {"heldout_rows": len(rows), "eval_loss": tuned_loss,
              "base_eval_loss": base_loss, "base_exact_match": exact_match(base, references),
              "tuned_exact_match": exact_match(tuned, references)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for r, p, b, t in zip(rows, prompts, base, tuned):
            f.write(json.dumps({"row_id": r["row_id"], "prompt": p[-1]["content"], "reference": r["reference"],
                                "base": b, "tuned": t, "base_match": b.strip() == r["reference"].strip(),
                                "tuned_match": t.strip() == r["reference"].strip()}, ensure_ascii=False) + "\n")
    return report


@stage_task("evaluate")
def evaluate_adapter(formatted_dir: Path, model_dir: str, trained_dir: Path, out_dir: Path, cfg: EvaluateConfig,
                     train_cfg: TrainConfig) -> Path:
    """Evaluate base vs tuned (an adapter or full weights) on the held-out split; return the directory holding
    report.json and samples.jsonl."""
    report = evaluate_model(formatted_dir, model_dir, trained_dir, out_dir, cfg, train_cfg)
    stage_logger().info("evaluate: %s -> %s", json.dumps(report), out_dir)
    return out_dir
