"""Evaluate on the held-out split: eval loss and perplexity on supervised tokens, and the configured metrics of
generations (tasks/evaluate/metrics.py) for the base model, the tuned model and the registry's @champion, all on the
same frozen held-out prompts with the same settings; with the share of answers that stop, and of those that run on into
a new turn, and a table of sample generations."""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from tasks.core.common import in_prefect_run, stage_logger
from tasks.core.config import EvaluateConfig, TrainConfig
from tasks.core.errors import DataValidationError
from tasks.core.stage import stage_task
from tasks.evaluate.eval_artifacts import publish_artifacts
from tasks.evaluate.heldout import heldout_fingerprint, scoring_settings, select_rows
from tasks.evaluate.metrics import Extractor, check_metrics, score
from tasks.model.modeling import is_adapter_dir, load_base_model, load_trained_model, resolve_version_base
from tasks.model.tokenizer import load_tokenizer
from tasks.registry.registry import Champion

STOP_WARNING = 0.95  # below this stop rate a model is flagged (register refuses below register.min_stop_rate)
PROBE = ("sftflowprobeuser", "sftflowprobeanswer", "sftflowprobenext")  # contents to find a template's turn markers


@dataclass(frozen=True)
class Generation:
    """One generated answer: its text (special tokens stripped), whether it stopped, whether it ran into a new turn."""

    text: str
    stopped: bool  # ended with EOS or the template's end-of-turn token within max_new_tokens
    runaway: bool  # went on into a new turn: the template's next user header (e.g. `<|im_start|>user`) appears


def supervised_loss(model, rows: list[dict], batch_size: int = 16) -> float:
    """Return the mean cross-entropy over supervised (assistant) tokens of the given tokenized rows."""
    sums, counts = supervised_row_losses(model, rows, batch_size)
    return sum(sums) / max(sum(counts), 1)


def supervised_row_losses(model, rows: list[dict], batch_size: int = 16) -> tuple[list[float], list[int]]:
    """Return each row's summed cross-entropy over its supervised (assistant) tokens and its count of them, in the
    rows' order (the gate's paired bootstrap resamples rows, weighing each by its tokens).

    Rows go in right-padded batches of similar length: under causal attention a real token never sees the padding
    after it, and padding carries no label, so the per-token sum is the one-row-at-a-time sum (a test checks it).
    """
    import torch

    sums, counts = [0.0] * len(rows), [0] * len(rows)
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda k: len(rows[k]["input_ids"]))  # less padding
    for i in range(0, len(order), batch_size):
        chunk = [rows[k] for k in order[i:i + batch_size]]
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
            logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
        shifted = labels[:, 1:].to(device)
        keep = shifted != -100  # only supervised positions go through the softmax
        losses = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), shifted[keep], reduction="none")
        per_row = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(
            0, keep.nonzero()[:, 0], losses.double())
        for j, k in enumerate(order[i:i + batch_size]):
            sums[k], counts[k] = per_row[j].item(), int(keep[j].sum())
    return sums, counts


def turn_markers(tokenizer) -> tuple[set[int], list[str]]:
    """Return the chat template's end-of-turn special token ids (with the tokenizer's EOS) and the text that opens
    the next user turn (e.g. `<|im_start|>user`, `### Instruction:`), found by rendering a probe conversation."""
    user, answer, nxt = PROBE
    one = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    short = tokenizer.apply_chat_template(one, tokenize=False)
    longer = tokenizer.apply_chat_template(one + [{"role": "user", "content": nxt}], tokenize=False)
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    after = short.split(answer, 1)[1]
    stops = {t for t in tokenizer(after, add_special_tokens=False)["input_ids"] if t in special}
    stops |= {tokenizer.eos_token_id} - {None}
    headers = ["<|im_start|>user"]
    if longer.startswith(short) and (header := longer[len(short):].split(nxt, 1)[0].strip()):
        headers.insert(0, header)
    return stops, list(dict.fromkeys(headers))


def stop_ids(model, tokenizer) -> list[int]:
    """Return the ids that end an answer: the template's end of turn, the tokenizer's and the model's EOS."""
    eos = model.generation_config.eos_token_id
    return sorted(turn_markers(tokenizer)[0] | set(eos if isinstance(eos, list) else [eos] if eos is not None else []))


def decode_generation(tokenizer, tokens: list[int], stops: set[int] | list[int], headers: list[str]) -> Generation:
    """Return the answer in generated `tokens`: cut at the first stop id, special tokens stripped for scoring."""
    stops = set(stops)
    cut = next((k for k, t in enumerate(tokens) if t in stops), None)
    body = tokens if cut is None else tokens[:cut]
    raw = tokenizer.decode(body, skip_special_tokens=False)
    return Generation(tokenizer.decode(body, skip_special_tokens=True).strip(), cut is not None,
                      any(h in raw for h in headers))


def generation_kwargs(cfg: EvaluateConfig, stops: list[int], pad_id: int, attention_mask=None) -> dict:
    """Return `generate`'s settings: greedy, or seeded sampling with exactly the configured temperature and top_p;
    with `evaluate.repetition_penalty` on, transformers' own penalty over each row's prompt and answer tokens, its
    left padding (the zeros of `attention_mask`) left out, so a row answers as it would alone."""
    kw = {"max_new_tokens": cfg.max_new_tokens, "do_sample": cfg.do_sample, "use_cache": True,
          "eos_token_id": stops, "pad_token_id": pad_id,
          "repetition_penalty": 1.0}  # exactly evaluate's settings, not a penalty the model's generation_config sets
    if cfg.do_sample:  # top_k=0: no hidden top-50 cut (transformers' default) on top of top_p
        kw.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
    if cfg.repetition_penalty != 1.0:
        from transformers import LogitsProcessorList, RepetitionPenaltyLogitsProcessor

        pads = None if attention_mask is None else (attention_mask == 0).sum(dim=1)
        kw["logits_processor"] = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(
            cfg.repetition_penalty, prompt_ignore_length=pads)])
    return kw


def left_padded(batch: list[list[int]], pad_id: int, device) -> dict:
    """Return input_ids and attention_mask tensors of token id lists, padded on the left to the longest."""
    import torch

    width = max(map(len, batch))
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for j, row in enumerate(batch):
        ids[j, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention[j, width - len(row):] = 1
    return {"input_ids": ids.to(device), "attention_mask": attention.to(device)}


def generate(model, tokenizer, prompts: list[list[dict]], cfg: EvaluateConfig, label: str = "",
             prompt_ids: list[list[int]] | None = None) -> list[Generation]:
    """Return the generations for chat prompts, in batches of similar length with left padding and a KV cache;
    sampling is seeded with `cfg.seed` (the same seed, the same answers); log progress if labelled. `prompt_ids`,
    where given, are the prompts' tokens as format made them (held-out rows' first prompt_tokens ids, the prefix of
    their training ids by construction); otherwise the tokenizer's template renders and tokenizes `prompts`."""
    import torch
    from transformers import set_seed

    device = next(model.parameters()).device
    stops, headers = stop_ids(model, tokenizer), turn_markers(tokenizer)[1]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    if prompt_ids is None:
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        prompt_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    # longest first: the largest batch fails first
    order = sorted(range(len(prompt_ids)), key=lambda k: -len(prompt_ids[k]))
    results: list[Generation | None] = [None] * len(prompt_ids)
    start = time.perf_counter()
    if cfg.do_sample:
        set_seed(cfg.seed)
    for i in range(0, len(order), cfg.batch_size):
        batch = order[i:i + cfg.batch_size]
        enc = left_padded([prompt_ids[k] for k in batch], pad_id, device)
        what = f"evaluate: generating ({label}), prompts {i + 1}-{i + len(batch)} of {len(prompt_ids)}"
        progress = [token_progress(what, cfg.max_new_tokens, start)] if label else None
        if label:
            stage_logger().info("%s: reading the prompts", what)
        with torch.no_grad():
            out = model.generate(**enc, **generation_kwargs(cfg, stops, pad_id, enc["attention_mask"]),
                                 stopping_criteria=progress)
        for k, tokens in zip(batch, out[:, enc["input_ids"].shape[1]:].tolist()):
            results[k] = decode_generation(tokenizer, tokens, stops, headers)
    return results  # type: ignore[return-value]


def generate_answers(model, tokenizer, prompts: list[list[dict]], cfg: EvaluateConfig, label: str = "") -> list[str]:
    """Return the answer texts of `generate` (special tokens stripped)."""
    return [g.text for g in generate(model, tokenizer, prompts, cfg, label)]


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


@dataclass
class Scored:
    """One model's results on the held-out rows: its summary M (report.json) and per-item scores."""

    summary: dict
    generations: list[Generation]
    items: dict[str, list[float]]  # per item: each metric, and eval_loss (the row's mean) when scored with loss
    tokens: list[int] | None = None  # per item: supervised tokens (eval_loss's weight), when scored with loss


def run_model(name: str, model, tokenizer, rows: list[dict], prompts: list[list[dict]], cfg: EvaluateConfig,
              extractor: Extractor, with_loss: bool = True) -> Scored:
    """Generate for and score one model; return its summary (eval loss, perplexity, metrics, stop and runaway)."""
    start = time.perf_counter()
    own = [r["input_ids"][:r["prompt_tokens"]] for r in rows] if with_loss and "prompt_tokens" in rows[0] else None
    gens = generate(model, tokenizer, prompts, cfg, label=name, prompt_ids=own)
    seconds = time.perf_counter() - start
    sums, counts = supervised_row_losses(model, rows, cfg.loss_batch_size) if with_loss else (None, None)
    loss = sum(sums) / max(sum(counts), 1) if with_loss else None
    scores = score(cfg.metrics, [g.text for g in gens], [r["reference"] for r in rows], extractor)
    summary = {"eval_loss": loss, "perplexity": math.exp(min(loss, 700)) if loss is not None else None,
               **{m: s[0] for m, s in scores.items()},
               "stop_rate": sum(g.stopped for g in gens) / len(gens),
               "runaway_rate": sum(g.runaway for g in gens) / len(gens)}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in summary.items() if v is not None)
    stage_logger().info("evaluate: %s: %s; %.2f prompts/s", name, shown, len(gens) / max(seconds, 1e-9))
    items = {m: s[1] for m, s in scores.items()}
    if with_loss:
        items["eval_loss"] = [t / n if n else 0.0 for t, n in zip(sums, counts)]
    return Scored(summary, gens, items, counts)


def free_memory() -> None:
    """Collect the model a scoring function just dropped, before the next loads: one model in memory at a time."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def score_trained(model_dir: str, trained_dir: Path, train_cfg: TrainConfig, *args) -> dict[str, Scored]:
    """Score the tuned model, and for an adapter the base too (the same weights with the adapter disabled)."""
    model = load_trained_model(model_dir, trained_dir, train_cfg, generating=True).eval()
    results = {"tuned": run_model("tuned", model, *args)}
    if is_adapter_dir(trained_dir):
        with model.disable_adapter():
            results["base"] = run_model("base", model, *args)
    return results


def score_base(model_dir: str, train_cfg: TrainConfig, *args) -> Scored:
    """Score the base model loaded on its own (full-weights runs), in full precision as the full methods train it."""
    model = load_base_model(model_dir, False, train_cfg.compute_dtype,
                            trust_remote_code=train_cfg.trust_remote_code).eval()
    return run_model("base", model, *args)


def score_champion(champion: Champion, model_dir: str, tokenizer, rows, prompts, cfg: EvaluateConfig,
                   train_cfg: TrainConfig, extractor: Extractor) -> Scored:
    """Load the champion over its own base with its own method and score it like the others.

    Its prompts render with this run's template when its vocabulary is this tokenizer's (the usual case: the same
    base); otherwise with its own tokenizer and template, and without eval loss (token ids would not match). Its base
    is its spec resolved on this machine (the local directory it was registered with only when that is still here:
    `resolve_version_base`); a version registered without a `base_model` tag goes over this run's base (`model_dir`),
    with a warning.
    """
    trust = train_cfg.trust_remote_code
    own_tokenizer = (champion.trained_dir / "tokenizer_config.json").is_file()
    needs_base = is_adapter_dir(champion.trained_dir) or not own_tokenizer  # full weights with a tokenizer do not
    base = resolve_version_base(champion.base_model, champion.base_path, trust) \
        if needs_base and (champion.base_model or champion.base_path) else ""
    if needs_base and not base:
        base = model_dir
        stage_logger().warning("evaluate: champion v%s has no base_model tag; loading it over this run's base %s",
                               champion.version, model_dir)
    own = load_tokenizer(str(champion.trained_dir) if own_tokenizer else base, trust_remote_code=trust)
    same = own.get_vocab() == tokenizer.get_vocab()
    method_cfg = train_cfg.model_copy(update={"method": champion.method})
    model = load_trained_model(base, champion.trained_dir, method_cfg, generating=True).eval()
    scored = run_model("champion", model, tokenizer if same else own, rows, prompts, cfg, extractor, with_loss=same)
    scored.summary["version"] = champion.version
    return scored


def stop_warnings(results: dict[str, Scored], cfg: EvaluateConfig) -> list[str]:
    """Return one line per model that seldom stops or runs on into a new turn."""
    lines = []
    for name, s in results.items():
        n = len(s.generations)
        if s.summary["stop_rate"] < STOP_WARNING:
            why = "the base model does not stop by itself" if name == "base" else "the model does not learn to stop"
            lines.append(f"{name}: {sum(g.stopped for g in s.generations)}/{n} answers stopped within "
                         f"max_new_tokens={cfg.max_new_tokens} (stop_rate {s.summary['stop_rate']:.2f} < "
                         f"{STOP_WARNING}): {why}")
        if s.summary["runaway_rate"] > 0:
            lines.append(f"{name}: {sum(g.runaway for g in s.generations)}/{n} answers run on into a new turn")
    return lines


def build_report(rows: list[dict], cfg: EvaluateConfig, results: dict[str, Scored]) -> dict:
    """Return report.json: the held-out set, the settings, each model's summary, warnings, and flat numeric copies."""
    models = {name: results[name].summary for name in ("base", "tuned", "champion") if name in results}
    settings = scoring_settings(cfg)
    report = {"heldout_rows": len(rows), "heldout_fingerprint": heldout_fingerprint(rows, cfg), "metrics": cfg.metrics,
              "generation": settings["generation"], "scoring": {k: settings[k] for k in ("extractor", "metrics_code")},
              "models": models, "warnings": stop_warnings(results, cfg),
              "eval_loss": models["tuned"]["eval_loss"], "base_eval_loss": models["base"]["eval_loss"],
              # per-item scores, paired by position (the gate's bootstrap), and each item's supervised tokens
              "items": {name: results[name].items for name in models}, "item_tokens": results["tuned"].tokens}
    for name, summary in models.items():
        report.update({f"{name}_{k}": v for k, v in summary.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return report


def sample_rows(rows: list[dict], prompts: list[list[dict]], cfg: EvaluateConfig,
                results: dict[str, Scored]) -> list[dict]:
    """Return samples.jsonl's rows: prompt, reference, each model's answer, headline score, all scores, stop flags."""
    headline, out = cfg.metrics[0], []
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        sample = {"row_id": row["row_id"], "prompt": prompt[-1]["content"], "reference": row["reference"]}
        for name, s in results.items():
            sample[name] = s.generations[i].text
            sample[f"{name}_score"] = s.items[headline][i]
            sample[f"{name}_stopped"] = s.generations[i].stopped
            sample[f"{name}_runaway"] = s.generations[i].runaway
            sample.update({f"{name}_{m}": s.items[m][i] for m in cfg.metrics})
        out.append(sample)
    return out


def evaluate_model(formatted_dir: Path, model_dir: str, trained_dir: Path, out_dir: Path, cfg: EvaluateConfig,
                   train_cfg: TrainConfig, champion: Champion | None = None) -> dict:
    """Score base, tuned and (given) the champion on the held-out rows; write report.json and samples.jsonl; return
    the report.

    `trained_dir` holds a LoRA adapter (its base is the same model with the adapter disabled) or full weights (the
    base loads separately, after them: one model in memory at a time).
    """
    # chosen by hash across every source; a row's last part holds its prompt, plain text rows have none
    rows = select_rows(pq.read_table(Path(formatted_dir) / "heldout.parquet").to_pylist(), cfg.max_samples)
    if not rows:
        raise DataValidationError(f"{formatted_dir}/heldout.parquet has no conversations to evaluate on (plain text "
                                  "rows have no prompt); raise clean.heldout_fraction or add chat rows")
    extractor = Extractor.from_config(cfg)
    check_metrics(cfg.metrics, extractor, [r["reference"] for r in rows])  # before any model loads
    # the template the rows were formatted with
    tokenizer = load_tokenizer(str(trained_dir), formatted_dir, train_cfg.trust_remote_code)
    prompts = [json.loads(r["prompt"]) for r in rows]
    stage_logger().info("evaluate: %d held-out prompts, base, tuned%s, %d new tokens at most", len(rows),
                        f" and champion v{champion.version}" if champion else "", cfg.max_new_tokens)
    scoring = (tokenizer, rows, prompts, cfg, extractor)
    results = score_trained(model_dir, trained_dir, train_cfg, *scoring)
    free_memory()
    if "base" not in results:  # full weights: the base is a second model, loaded after the tuned one is gone
        results["base"] = score_base(model_dir, train_cfg, *scoring)
        free_memory()
    if champion is not None:
        results["champion"] = score_champion(champion, model_dir, tokenizer, rows, prompts, cfg, train_cfg,
                                             extractor)
        free_memory()
    results = {name: results[name] for name in ("base", "tuned", "champion") if name in results}
    report = build_report(rows, cfg, results)
    for line in report["warnings"]:
        stage_logger().warning("evaluate: %s", line)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    with (out_dir / "samples.jsonl").open("w", encoding="utf-8") as f:
        for sample in sample_rows(rows, prompts, cfg, results):
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    return report


@stage_task("evaluate")
def evaluate_adapter(formatted_dir: Path, model_dir: str, trained_dir: Path, out_dir: Path, cfg: EvaluateConfig,
                     train_cfg: TrainConfig, champion: Champion | None = None) -> Path:
    """Evaluate base vs tuned (an adapter or full weights) and the champion if given, on the held-out split; return
    the directory holding report.json and samples.jsonl."""
    report = evaluate_model(formatted_dir, model_dir, trained_dir, out_dir, cfg, train_cfg, champion)
    stage_logger().info("evaluate: %s -> %s", json.dumps({k: v for k, v in report.items()
                                                           if k not in ("models", "items", "item_tokens")}),
                        out_dir)
    if in_prefect_run():
        publish_artifacts(out_dir, report)
    return out_dir
