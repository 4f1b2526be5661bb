"""Every chat template that ships in TRL's installed package, in two tokenizer families (SmolLM2's byte-level GPT-2
BPE, and a BPE whose pre-tokenizer is a `Split` regex as Llama 3's and Qwen's are): the supervised tokens are each
answer (its trace in thinking mode) plus the template's own end-of-turn text, no user or system text is supervised,
every answer is supervised once, and each answer's inference prompt is exactly the ids before it
(tasks/formatting/masks.py)."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import trl
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from tasks.formatting.chat_format import chat_encoder

TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
INFERENCE_TEMPLATES = sorted(p.name for p in TRL_TEMPLATES.glob("*.jinja") if not p.stem.endswith("_training"))
# Llama 3's pre-tokenizer regex (Qwen2's differs only in digits): "\n\n" before an answer is one piece with it
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# the control strings a template writes: its model's tokenizer has each as one added token
SPECIAL = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜]{1,40}｜>|</?[a-z_]{2,30}>|<\|[a-z_]{2,20}>|<[a-z_]{2,20}\|>"
                     r"|\[/?INST\]|<<SYS>>|<</SYS>>")
NO_SYSTEM_TURN = {"gemma.jinja"}  # refuse a system turn themselves (raise_exception): one line, tested below

SYSTEM = {"role": "system", "content": "SYSTEMS0 Be brief."}


def user(k: int) -> dict:
    return {"role": "user", "content": f"USERQ{k} what is {k} plus {k}?"}


def answer(k: int, trace: bool = False) -> dict:
    return {"role": "assistant", "content": f"ANSWERA{k} It is {2 * k}.",
            **({"reasoning": f"REASONR{k} because {k}+{k}"} if trace else {})}


CONVERSATIONS = {
    "system, two turns": [SYSTEM, user(1), answer(1), user(2), answer(2)],
    "one turn": [user(1), answer(1)],
    "three turns": [user(1), answer(1), user(2), answer(2), user(3), answer(3)],
    "trace on the last": [user(1), answer(1), user(2), answer(2, trace=True)],
    "traces on both": [user(1), answer(1, trace=True), user(2), answer(2, trace=True)],
}


@pytest.fixture(scope="module")
def families(tiny_model_dir) -> dict[str, PreTrainedTokenizerFast]:
    """The two tokenizer families, before a template's special tokens are added."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    split = Tokenizer(models.BPE())
    split.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    split.decoder = decoders.ByteLevel()
    corpus = [p.read_text(encoding="utf-8") for p in TRL_TEMPLATES.glob("*.jinja")]
    corpus += ["What is two plus two? It is four.\n\nAnswer:\n\n The quick brown fox jumps over the lazy dog.\n"] * 50
    split.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=2000, show_progress=False,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return {"gpt2-bpe": AutoTokenizer.from_pretrained(tiny_model_dir),
            "split-regex-bpe": PreTrainedTokenizerFast(tokenizer_object=split)}


def tokenizer_for(families: dict, family: str, template: str):
    """The family's tokenizer with the template's control strings as special tokens, as its model's would have."""
    tokenizer = copy.deepcopy(families[family])
    tokenizer.add_special_tokens({"bos_token": "<|bos|>", "eos_token": "<|eos|>",
                                  "additional_special_tokens": sorted(set(SPECIAL.findall(template)))})
    return tokenizer


def supervised_runs(mask: list[int]) -> list[tuple[int, int]]:
    runs, start = [], None
    for j, m in enumerate([*mask, 0]):
        if m and start is None:
            start = j
        elif not m and start is not None:
            runs.append((start, j))
            start = None
    return runs


def problems(tokenizer, template: str, convo: list[dict]) -> list[str]:
    """Return what is wrong with the training rows of `convo` (every assistant turn supervised)."""
    encoder = chat_encoder(tokenizer, template, fast=False)
    answers = [i for i, m in enumerate(convo) if m["role"] == "assistant"]
    out = encoder.encode([convo], [[1.0] * len(answers)])
    thinking = any(m.get("reasoning") for m in convo)
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    found, seen = [], dict.fromkeys(answers, 0)
    for ids, mask in zip(out.ids, out.masks):
        ids = ids.tolist()
        for a, b in supervised_runs(mask.tolist()):
            text = tokenizer.decode(ids[a:b], skip_special_tokens=False)
            hit = [i for i in answers if convo[i]["content"] in text]
            if len(hit) != 1:
                found.append(f"a supervised run holds answers {hit}: {text!r}")
                continue
            i = hit[0]
            seen[i] += 1
            if any(m["content"] in text for m in convo if m["role"] in ("user", "system")):
                found.append(f"user or system text supervised: {text!r}")
            rest = text.replace(convo[i]["content"], " ", 1).replace(convo[i].get("reasoning") or "\0", " ", 1)
            for token in specials:
                rest = rest.replace(token, " ")
            # around the answer only what the template itself writes (or the documented inline <think> fallback)
            strays = [w for w in rest.replace("=", " ").split() if w not in template and w not in ("<think>",
                                                                                                    "</think>")]
            if strays:
                found.append(f"{strays} supervised around answer {i}: {text!r}")
            prompt = encoder.encode_prompt(convo[:i], thinking=thinking)
            if ids[:len(prompt)] != prompt or len(prompt) != a:
                found.append(f"answer {i}'s prompt ({len(prompt)} ids) is not the {a} ids before it")
    found += [f"answer {i} supervised {n} times" for i, n in seen.items() if n != 1]
    return found


@pytest.mark.parametrize("family", ["gpt2-bpe", "split-regex-bpe"])
@pytest.mark.parametrize("name", INFERENCE_TEMPLATES)
def test_every_trl_template_supervises_exactly_the_answers_after_their_own_prompts(families, family, name):
    template = (TRL_TEMPLATES / name).read_text(encoding="utf-8")
    tokenizer = tokenizer_for(families, family, template)
    for what, convo in CONVERSATIONS.items():
        if name in NO_SYSTEM_TURN and convo[0]["role"] == "system":
            continue
        assert problems(tokenizer, template, convo) == [], what


def test_the_templates_under_test_are_every_one_trl_ships_with_the_ones_named_in_issue_17():
    assert len(INFERENCE_TEMPLATES) >= 40
    assert {"llama3_1.jinja", "llama3_2.jinja", "phi3.jinja", "deepseekv3.jinja", "qwen3.jinja",
            "gptoss.jinja"} <= set(INFERENCE_TEMPLATES)


def test_a_template_that_refuses_a_system_turn_stops_with_its_own_reason_in_one_line(families):
    from tasks.core.errors import ConfigError

    template = (TRL_TEMPLATES / "gemma.jinja").read_text(encoding="utf-8")
    encoder = chat_encoder(tokenizer_for(families, "gpt2-bpe", template), template, fast=False)
    with pytest.raises(ConfigError, match=r"^the chat template cannot render this conversation \(TemplateError: "
                                          r"System role not supported\)") as e:
        encoder.encode([CONVERSATIONS["system, two turns"]], [[1.0, 1.0]])
    assert "\n" not in str(e.value)
