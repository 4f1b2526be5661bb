"""Evaluate on the held-out split: eval loss on supervised tokens, and exact match of greedy generations for the
base model and the tuned model on the same prompts, with a table of sample generations."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from tasks.chat_format import load_tokenizer
from tasks.common import stage_logger, stage_task
from tasks.config import EvaluateConfig
from tasks.modeling import load_base_model


def supervised_loss(model, rows: list[dict]) -> float:
    """Return the mean cross-entropy over supervised (assistant) tokens of the given tokenized rows."""
    import torch

    total, count = 0.0, 0
    device = next(model.parameters()).device
    for row in rows:  # one at a time: no padding, an exact per-token sum
        ids = torch.tensor([row["input_ids"]], device=device)
        labels = torch.tensor([[t if m else -100 for t, m in zip(row["input_ids"], row["assistant_masks"])]],
                              device=device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits.float()
        total += torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                   reduction="sum").item()
        count += int((labels[0, 1:] != -100).sum())
    return total / max(count, 1)


def generate_answers(model, tokenizer, prompts: list[list[dict]], cfg: EvaluateConfig, label: str = "") -> list[str]:
    """Return greedy completions for chat prompts, batched with left padding; log progress per batch if labelled."""
    import torch

    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    answers, start = [], time.perf_counter()
    for i in range(0, len(prompts), cfg.batch_size):
        if label and i:
            log_progress(f"evaluate: generating ({label})", i, len(prompts), start)
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                 for p in prompts[i:i + cfg.batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers += [tokenizer.decode(o[enc["input_ids"].shape[1]:], skip_special_tokens=True).strip() for o in out]
    if label:
        log_progress(f"evaluate: generating ({label})", len(prompts), len(prompts), start)
    return answers


def log_progress(what: str, done: int, total: int, start: float) -> None:
    """Log `what done/total prompts, elapsed, ETA`."""
    elapsed = time.perf_counter() - start
    eta = elapsed / max(done, 1) * (total - done)
    stage_logger().info("%s %d/%d prompts  elapsed %.0f s  ETA %.0f s", what, done, total, elapsed, eta)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Return the share of predictions equal to their reference after stripping surrounding whitespace."""
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1)


def evaluate_model(formatted_dir: Path, model_dir: str, adapter_dir: Path, out_dir: Path, cfg: EvaluateConfig,
                   load_in_4bit: bool, compute_dtype: str = "auto") -> dict:
    """Score base and tuned model on the held-out rows; write report.json and samples.jsonl; return the report."""
    from peft import PeftModel

    rows = pq.read_table(formatted_dir / "heldout.parquet").to_pylist()[: cfg.max_samples]
    tokenizer = load_tokenizer(str(adapter_dir))
    model = PeftModel.from_pretrained(load_base_model(model_dir, load_in_4bit, compute_dtype), str(adapter_dir)).eval()
    prompts, references = [json.loads(r["prompt"]) for r in rows], [r["reference"] for r in rows]
    stage_logger().info("evaluate: %d held-out prompts, base and tuned, %d new tokens at most", len(rows),
                        cfg.max_new_tokens)
    tuned = generate_answers(model, tokenizer, prompts, cfg, label="tuned")
    with model.disable_adapter():  # the same weights without LoRA: the base model, on the same prompts
        base = generate_answers(model, tokenizer, prompts, cfg, label="base")
        base_loss = supervised_loss(model, rows)
    report = {"heldout_rows": len(rows), "eval_loss": supervised_loss(model, rows),
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
def evaluate_adapter(formatted_dir: Path, model_dir: str, adapter_dir: Path, out_dir: Path, cfg: EvaluateConfig,
                     load_in_4bit: bool, compute_dtype: str = "auto") -> Path:
    """Evaluate base vs tuned on the held-out split; return the directory holding report.json and samples.jsonl."""
    report = evaluate_model(formatted_dir, model_dir, adapter_dir, out_dir, cfg, load_in_4bit, compute_dtype)
    stage_logger().info("evaluate: %s -> %s", json.dumps(report), out_dir)
    return out_dir
