"""Evaluate on the tiny model: the report's contract keys, batched loss, stop and runaway checks, the champion, seeded
sampling, the Prefect artifacts inside a run; the rows chosen by hash across sources, the fingerprint that says when
scores compare, and the per-item scores the gate's bootstrap pairs."""

import json
import shutil

import pyarrow.parquet as pq
import pytest
import torch

from tasks.core.config import EvaluateConfig
from tasks.evaluate.evaluate import (
    decode_generation,
    evaluate_adapter,
    evaluate_model,
    generate,
    heldout_fingerprint,
    stop_ids,
    supervised_loss,
    supervised_row_losses,
    turn_markers,
)
from tasks.evaluate.heldout import select_rows
from tasks.model.modeling import load_base_model, load_trained_model
from tasks.registry.registry import Champion
from tasks.train.train import train_model
from tests.conftest import compute_dtype, tolerance
from tests.model.conftest import ANSWER, tiny_train_config

JSON_EVAL = {"extractor": "json", "metrics": ["field_match", "exact_match", "json_valid"], "max_new_tokens": 40,
             "batch_size": 4, "loss_batch_size": 3}
MODEL_KEYS = {"eval_loss", "perplexity", "field_match", "exact_match", "json_valid", "stop_rate", "runaway_rate"}


def lora_config(**kw):
    return tiny_train_config(**{"method": "lora", "save_steps": 100, **kw})


@pytest.fixture(scope="module")
def can_stop_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with a random embedding row for <|im_end|>, so that it can learn to stop.

    In the fixture the pad token is EOS, so the embedding's padding row (tied to the LM head) is all zeros: its
    logit is 0 whatever the hidden state, and the random model can never learn to emit it.
    """
    out = tmp_path_factory.mktemp("tiny-can-stop")
    shutil.copytree(tiny_model_dir, out, dirs_exist_ok=True)
    model = load_base_model(str(tiny_model_dir), False)
    weight = model.get_input_embeddings().weight
    with torch.no_grad():
        weight[model.config.eos_token_id] = torch.randn(weight.shape[1],
                                                        generator=torch.Generator().manual_seed(0)) * 0.4
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def adapters(formatted, can_stop_dir, tmp_path_factory):
    """A tuned LoRA adapter that learned the answer and to stop, and a weaker one (4 steps) to stand as champion."""
    tmp = tmp_path_factory.mktemp("eval-adapters")
    tuned = train_model(formatted, can_stop_dir, tmp / "tuned", lora_config())
    weak = train_model(formatted, can_stop_dir, tmp / "champion", lora_config(max_steps=4, seed=7))
    return tuned, weak


@pytest.fixture(scope="module")
def report(formatted, can_stop_dir, adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval-out")
    champion = Champion("sftflow-tiny", "3", adapters[1], can_stop_dir, "lora")
    result = evaluate_model(formatted, can_stop_dir, adapters[0], out, EvaluateConfig(**JSON_EVAL), lora_config(),
                            champion)
    return result, out


def test_the_report_has_every_contract_key_for_base_tuned_and_champion(report, formatted):
    result, out = report
    cfg = EvaluateConfig(**JSON_EVAL)
    rows = select_rows(pq.read_table(formatted / "heldout.parquet").to_pylist(), cfg.max_samples)
    assert result["heldout_rows"] == len(rows) > 0
    assert result["heldout_fingerprint"] == heldout_fingerprint(rows, cfg)
    assert result["scoring"]["extractor"] == {"name": "json", "pattern": None, "labels": None}
    assert len(result["scoring"]["metrics_code"]) == 64
    assert result["metrics"] == ["field_match", "exact_match", "json_valid"]
    assert result["generation"] == {"max_new_tokens": 40, "do_sample": False, "temperature": 1.0, "top_p": 1.0,
                                    "seed": 0, "batch_size": 4}
    assert list(result["models"]) == ["base", "tuned", "champion"]
    for name, summary in result["models"].items():
        assert set(summary) == MODEL_KEYS | ({"version"} if name == "champion" else set())
        for key in MODEL_KEYS:
            assert result[f"{name}_{key}"] == summary[key]
    assert result["models"]["champion"]["version"] == "3"
    assert result["eval_loss"] == result["models"]["tuned"]["eval_loss"]
    assert result["base_eval_loss"] == result["models"]["base"]["eval_loss"]
    assert result["base_exact_match"] == result["models"]["base"]["exact_match"]  # flat keys report.py reads
    assert json.loads((out / "report.json").read_text()) == result


def test_the_tuned_model_answers_stops_and_beats_base_and_the_weaker_champion(report):
    models = report[0]["models"]
    tuned, base, champion = models["tuned"], models["base"], models["champion"]
    assert tuned["field_match"] == tuned["exact_match"] == tuned["json_valid"] == 1.0
    assert tuned["stop_rate"] == 1.0 and tuned["runaway_rate"] == 0.0
    assert tuned["eval_loss"] < champion["eval_loss"] < base["eval_loss"]
    assert tuned["perplexity"] == pytest.approx(torch.tensor(tuned["eval_loss"]).exp().item(), rel=1e-6)
    assert base["field_match"] < 1.0


def test_samples_hold_each_models_answer_headline_score_and_stop_flag(report, formatted):
    result, out = report
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    rows = select_rows(pq.read_table(formatted / "heldout.parquet").to_pylist(), EvaluateConfig().max_samples)
    assert [s["row_id"] for s in samples] == [r["row_id"] for r in rows]
    for sample, row in zip(samples, rows):
        assert sample["prompt"] == json.loads(row["prompt"])[-1]["content"] and sample["reference"] == ANSWER
        assert sample["tuned"] == ANSWER and sample["tuned_score"] == sample["tuned_field_match"] == 1.0
        assert sample["tuned_stopped"] is True
        for name in ("base", "champion"):
            assert isinstance(sample[name], str) and 0 <= sample[f"{name}_score"] <= 1
            assert isinstance(sample[f"{name}_stopped"], bool)
    assert sum(s["base_score"] for s in samples) / len(samples) == pytest.approx(result["base_field_match"])


def test_the_champion_is_scored_loaded_over_its_own_base_with_its_own_method(report, formatted, can_stop_dir,
                                                                            adapters):
    rows = pq.read_table(formatted / "heldout.parquet").to_pylist()
    champion = load_trained_model(can_stop_dir, adapters[1], lora_config()).eval()
    rtol, _ = tolerance(compute_dtype())  # the report batched the rows by 3, supervised_loss by 16
    assert report[0]["champion_eval_loss"] == pytest.approx(supervised_loss(champion, rows), rel=rtol)


def test_the_batched_eval_loss_equals_one_row_at_a_time(formatted, can_stop_dir, adapters):
    model = load_trained_model(can_stop_dir, adapters[0], lora_config()).eval()
    rows = [*pq.read_table(formatted / "heldout.parquet").to_pylist(),
            *pq.read_table(formatted / "train.parquet").to_pylist()[:6]]
    assert len({len(r["input_ids"]) for r in rows}) > 1  # rows of different lengths: padding is exercised
    total = count = 0.0
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        labels = torch.where(torch.tensor(row["assistant_masks"]).bool(), ids[0], -100)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum").item()
        count += int((labels[1:] != -100).sum())
    rtol, _ = tolerance(compute_dtype())
    assert supervised_loss(model, rows, batch_size=4) == pytest.approx(total / count, rel=rtol)


def test_the_report_holds_per_item_scores_paired_by_position_that_average_to_the_summary(report):
    result, out = report
    items, tokens = result["items"], result["item_tokens"]
    assert set(items) == {"base", "tuned", "champion"} and len(tokens) == result["heldout_rows"]
    for name, summary in result["models"].items():
        assert set(items[name]) == {"field_match", "exact_match", "json_valid", "eval_loss"}
        assert sum(items[name]["exact_match"]) / len(tokens) == pytest.approx(summary["exact_match"])
        weighted = sum(x * n for x, n in zip(items[name]["eval_loss"], tokens)) / sum(tokens)
        assert weighted == pytest.approx(summary["eval_loss"], rel=1e-6)  # the token-weighted mean the gate resamples


def test_row_losses_sum_to_the_batched_mean(formatted, can_stop_dir, adapters):
    model = load_trained_model(can_stop_dir, adapters[0], lora_config()).eval()
    rows = pq.read_table(formatted / "heldout.parquet").to_pylist()
    sums, counts = supervised_row_losses(model, rows, batch_size=3)
    assert len(sums) == len(rows) and all(n > 0 for n in counts)
    assert counts == [sum(r["assistant_masks"][1:]) for r in rows]  # in the rows' order, not the batches'
    rtol, _ = tolerance(compute_dtype())
    assert sum(sums) / sum(counts) == pytest.approx(supervised_loss(model, rows, batch_size=16), rel=rtol)


def heldout_rows(source: str, n: int) -> list[dict]:
    return [{"row_id": i, "source": source, "prompt": json.dumps([{"role": "user", "content": f"{source} {i}"}]),
             "reference": f"answer {source} {i}", "input_ids": [1, 2, i], "assistant_masks": [0, 1, 1]}
            for i in range(n)]


def test_samples_are_chosen_by_hash_across_every_source_not_the_first_rows():
    first, second = heldout_rows("orders", 60), heldout_rows("chats", 60)
    text_rows = [{**r, "prompt": None} for r in heldout_rows("text", 30)]  # no prompt: never chosen
    rows = first + text_rows + second
    chosen = select_rows(rows, 16)
    assert len(chosen) == 16 and {r["source"] for r in chosen} == {"orders", "chats"}  # not 16 of the first source
    assert 3 <= sum(r["source"] == "chats" for r in chosen) <= 13
    assert [r for r in rows if r in chosen] == chosen  # in held-out order
    reordered = select_rows(second + first, 16)  # the same rows whatever their order
    assert sorted(r["reference"] for r in reordered) == sorted(r["reference"] for r in chosen)
    assert len(select_rows(rows, 1000)) == 120


def test_the_fingerprint_covers_generation_settings_extractor_metrics_tokens_and_metric_code(monkeypatch):
    rows = heldout_rows("orders", 4)
    cfg = EvaluateConfig()
    base = heldout_fingerprint(rows, cfg)
    assert heldout_fingerprint(rows, cfg) == base
    for change in ({"max_new_tokens": 65}, {"do_sample": True}, {"temperature": 0.7}, {"top_p": 0.9}, {"seed": 1},
                   {"batch_size": 8}, {"extractor": "gsm8k"}, {"extractor": "regex", "pattern": "(\\d+)"},
                   {"metrics": ["token_f1", "exact_match"]}, {"repetition_penalty": 1.1}):
        assert heldout_fingerprint(rows, cfg.model_copy(update=change)) != base, change
    assert heldout_fingerprint(rows, cfg.model_copy(update={"loss_batch_size": 3})) == base  # the same loss
    assert heldout_fingerprint([{**rows[0], "input_ids": [1, 2, 9]}, *rows[1:]], cfg) != base  # other tokens
    assert heldout_fingerprint(rows[::-1], cfg) != base
    import tasks.evaluate.heldout as heldout

    monkeypatch.setattr(heldout, "metrics_code_version", lambda: "other metric code")
    assert heldout_fingerprint(rows, cfg) != base


def test_batched_greedy_answers_equal_one_prompt_at_a_time(formatted, tiny_model_dir, tiny_tokenizer):
    model = load_base_model(str(tiny_model_dir), False).eval()
    prompts = [[{"role": "user", "content": text}] for text in ("Hi", "Extract the order of a lamp for Ada in Oslo.",
                                                                  "Two words", "What is 2 + 2? Answer briefly.")]
    batched = generate(model, tiny_tokenizer, prompts, EvaluateConfig(max_new_tokens=8, batch_size=4))
    single = generate(model, tiny_tokenizer, prompts, EvaluateConfig(max_new_tokens=8, batch_size=1))
    assert [g.text for g in batched] == [g.text for g in single]


def test_a_repetition_penalty_answers_batched_as_alone_and_as_transformers_penalty_on_one_prompt(tiny_model_dir,
                                                                                                  tiny_tokenizer):
    """evaluate.repetition_penalty: the padding of a batch is not penalised (a row answers as it would alone), the
    penalty is transformers' own over the prompt and the answer, and it changes greedy answers. The random tiny llama
    never repeats a token by itself, so the penalty is one below 1, which favours the tokens seen (the padding, the
    end-of-turn id, would be favoured too if it counted) and shows that it acts; 1.1 (configs/gsm8k.yaml's) runs."""
    import copy

    model = load_base_model(str(tiny_model_dir), False).eval()
    tiny_tokenizer = copy.deepcopy(tiny_tokenizer)
    tiny_tokenizer.pad_token = tiny_tokenizer.convert_ids_to_tokens(1000)  # a pad id no prompt holds (Llama 3's kind)
    prompts = [[{"role": "user", "content": text}] for text in ("Hi", "Extract the order of a lamp for Ada in Oslo.",
                                                                  "a a a a a a", "What is 2 + 2? Answer briefly.")]
    penalised = EvaluateConfig(max_new_tokens=16, batch_size=4, repetition_penalty=0.3)
    batched = [g.text for g in generate(model, tiny_tokenizer, prompts, penalised)]
    single = [g.text for g in generate(model, tiny_tokenizer, prompts, penalised.model_copy(update={"batch_size": 1}))]
    assert batched == single
    plain = [g.text for g in generate(model, tiny_tokenizer, prompts, EvaluateConfig(max_new_tokens=16, batch_size=4))]
    assert plain != batched  # the penalty was on
    ids = tiny_tokenizer.apply_chat_template(prompts[2], add_generation_prompt=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, repetition_penalty=0.3,
                             eos_token_id=stop_ids(model, tiny_tokenizer), pad_token_id=tiny_tokenizer.eos_token_id)
    expected = tiny_tokenizer.decode(out[0, len(ids):], skip_special_tokens=True).strip()
    assert batched[2] == expected and expected
    assert all(g.text for g in generate(model, tiny_tokenizer, prompts, penalised.model_copy(
        update={"repetition_penalty": 1.1})))


def test_the_same_seed_samples_the_same_answers_and_another_seed_others(tiny_model_dir, tiny_tokenizer):
    model = load_base_model(str(tiny_model_dir), False).eval()
    prompts = [[{"role": "user", "content": f"Tell me about item {i}."}] for i in range(3)]

    def sample(seed):
        cfg = EvaluateConfig(do_sample=True, seed=seed, temperature=1.0, top_p=0.95, max_new_tokens=8, batch_size=3)
        return [g.text for g in generate(model, tiny_tokenizer, prompts, cfg)]

    first = sample(1)
    assert sample(1) == first and sample(2) != first
    greedy = [g.text for g in generate(model, tiny_tokenizer, prompts, EvaluateConfig(max_new_tokens=8))]
    assert greedy != first  # sampling was on


def test_a_model_that_never_emits_eos_has_stop_rate_zero_and_is_flagged(formatted, can_stop_dir, tmp_path):
    never_stops = tmp_path / "never-stops"  # full weights whose generation config suppresses the stop token
    shutil.copytree(can_stop_dir, never_stops)
    model = load_base_model(str(never_stops), False)
    model.generation_config.suppress_tokens = [model.config.eos_token_id]
    model.save_pretrained(never_stops)
    cfg = EvaluateConfig(max_new_tokens=6, batch_size=4)
    result = evaluate_model(formatted, can_stop_dir, never_stops, tmp_path / "eval", cfg,
                            tiny_train_config(method="full"))
    assert result["tuned_stop_rate"] == 0.0 and result["models"]["tuned"]["stop_rate"] == 0.0
    assert any(w.startswith("tuned: 0/") and "does not learn to stop" in w for w in result["warnings"])
    samples = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert samples and not any(s["tuned_stopped"] for s in samples)


def test_answers_are_cut_at_the_end_of_turn_and_a_new_user_turn_is_flagged(tiny_tokenizer):
    stops, headers = turn_markers(tiny_tokenizer)
    assert stops == {tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")} and headers[0] == "<|im_start|>user"

    def ids(text):
        return tiny_tokenizer(text, add_special_tokens=False)["input_ids"]

    stopped = decode_generation(tiny_tokenizer, ids("Paris<|im_end|>\n<|im_start|>user\nmore"), stops, headers)
    assert (stopped.text, stopped.stopped, stopped.runaway) == ("Paris", True, False)
    runaway = decode_generation(tiny_tokenizer, ids("Paris\n<|im_start|>user\nAnd Rome?"), stops, headers)
    assert runaway.stopped is False and runaway.runaway is True and "<|im_start|>" not in runaway.text
    cut = decode_generation(tiny_tokenizer, ids("Paris is"), stops, headers)
    assert (cut.text, cut.stopped, cut.runaway) == ("Paris is", False, False)


def test_turn_markers_follow_the_template(tiny_model_dir):
    from tasks.formatting.templates import TEMPLATES
    from tasks.model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model_dir))
    tokenizer.chat_template = (TEMPLATES / "alpaca.jinja").read_text(encoding="utf-8")
    stops, headers = turn_markers(tokenizer)
    assert headers[0] == "### Instruction:" and tokenizer.eos_token_id in stops


@pytest.mark.slow  # evaluate again, inside a Prefect flow run (the pipeline tests read these artifacts too)
def test_inside_a_prefect_run_evaluate_publishes_the_samples_table_and_the_comparison(
        prefect_backend, formatted, can_stop_dir, adapters, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client

    champion = Champion("sftflow-tiny", "3", adapters[1], can_stop_dir, "lora")
    cfg = EvaluateConfig(**{**JSON_EVAL, "max_new_tokens": 4})

    @flow
    def evaluate_only():
        return evaluate_adapter(formatted, can_stop_dir, adapters[0], tmp_path / "eval", cfg, lora_config(), champion)

    assert evaluate_only() == tmp_path / "eval"
    with get_client(sync_client=True) as client:
        artifacts = {a.key: a for a in client.read_latest_artifacts(limit=50)}
    table = json.loads(artifacts["eval-samples"].data)
    heldout = pq.read_table(formatted / "heldout.parquet").num_rows
    assert len(table) == heldout and {"prompt", "reference", "base", "tuned", "champion", "scores"} <= set(table[0])
    assert table[0]["scores"].startswith("base ") and "champion " in table[0]["scores"]
    markdown = artifacts["evaluation"].data
    assert "| metric | base | tuned | champion v3 |" in markdown and "| field_match |" in markdown
    assert "| stop_rate |" in markdown
