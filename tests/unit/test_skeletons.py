"""Skeleton rendering (tasks/formatting/skeletons.py) and shape plans (tasks/formatting/masks.py): proved only for
templates that insert contents verbatim, equal to Jinja for every named template and mask mode, caught and undone at run
time when a template fools the proof; and masks are exactly the supervised pieces' tokens."""

import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from tasks.formatting.chat_format import chat_encoder
from tasks.formatting.encoding import ChatEncoder, encode_all
from tasks.formatting.masks import MASK_MODES
from tasks.formatting.skeletons import Marker, prove_skeleton
from tasks.formatting.templates import ChatRenderer
from tests.unit.test_templates_masks import FAMILIES, family

ROLES = ("system", "user", "assistant", "user", "assistant")


def jinja(body: str) -> ChatRenderer:
    """A renderer for a chatml-like template whose content expression is `body` (with `c` the content)."""
    return ChatRenderer("{% for m in messages %}{% set c = m['content'] %}<|im_start|>{{ m['role'] }}\n" + body
                        + "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
                        {})


@pytest.mark.parametrize("body", [
    "{{ c | trim }}", "{{ c.strip() }}", "{{ c | tojson }}", "{% if c | length > 9 %}{{ c }}{% endif %}",
    "{% if '</think>' in c %}{{ c.split('</think>')[-1] }}{% else %}{{ c }}{% endif %}", "{{ c[:50] }}",
    "{{ c | upper }}", "{{ '%-10s' | format(c) }}", "{{ c | indent(2) }}", "{{ c | replace('a', 'b') }}",
    "{% if c == 'x' %}x{% endif %}{{ c }}", "{{ (c ~ '') | trim }}", "{{ (c + '') | lower }}",
    "{% if (c ~ '') | length > 1000 %}long{% endif %}{{ c }}", "{{ c | e }}", "{{ c ~ c }}", "{{ c | first }}",
    "{% for ch in c %}{{ ch }}{% endfor %}", "{{ c | wordcount }}{{ c }}", "{{ c.format() }}",
])
def test_a_template_that_does_anything_but_insert_the_content_gets_no_skeleton(body):
    assert prove_skeleton(jinja(body).render, ("user", "assistant"), False) is None


@pytest.mark.parametrize("body", ["{{ c }}", "{{ '' + c + '' }}", "{{ c ~ '' }}", "{{ c | string }}",
                                  "{% if c %}{{ c }}{% endif %}", "{% if c is string %}{{ c }}{% endif %}"])
def test_a_template_that_inserts_the_content_verbatim_gets_a_skeleton(body):
    skeleton = prove_skeleton(jinja(body).render, ("user", "assistant"), False)
    assert skeleton is not None and skeleton.slots == (0, 1)
    assert skeleton.fill(["Hi", " there\n"]) == ("<|im_start|>user\nHi<|im_end|>\n"
                                                 "<|im_start|>assistant\n there\n<|im_end|>\n")


def test_a_marker_records_each_use_that_is_not_output_or_concatenation():
    uses = []
    m = Marker("abc", uses)
    assert type("x" + m) is str and type(m + "x") is str and f"{m}" == "abc" and bool(m)
    assert uses == []
    m.strip(), len(m), m == "x", "a" in m, m[0], hash(m), f"{m:>9}", m * 2, iter(m)
    assert uses == ["strip", "__len__", "__eq__", "__contains__", "__getitem__", "__hash__", "format '>9'", "__mul__",
                    "__iter__"]


def random_conversations(rng: random.Random, n: int) -> list[list[dict]]:
    """Conversations of several shapes with awkward contents: edge whitespace, newlines, unicode, braces."""
    pieces = ["Hello", " spaced ", "line\nbreak", "tabs\t", "émoji 🙂", "{{ not jinja }}", "<|im_end|>?", "#### 42",
              "  ", "x" * 300, "JSON {\"a\": [1, 2]}", "\\n literal"]
    out = []
    for _ in range(n):
        roles = rng.choice([ROLES, ROLES[:3], ROLES[1:], ROLES[1:3]])  # with and without a system turn
        out.append([{"role": r, "content": "".join(rng.choices(pieces, k=rng.randint(1, 4)))} for r in roles])
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_skeleton_rows_equal_jinja_rows_for_every_template_and_mask_mode(tiny_model_dir, name):
    tokenizer, template = family(tiny_model_dir, name)
    proved = chat_encoder(tokenizer, template)  # the fast tokenizer's proof, once per family
    for mode in MASK_MODES:
        convos = random_conversations(random.Random(f"{name}-{mode}"), 40)
        rng = random.Random(mode)
        weights = [[rng.choice([0.0, 1.0, 1.0]) for m in c if m["role"] == "assistant"] for c in convos]
        weights = [w if any(w) else [1.0] * len(w) for w in weights]
        encoder = ChatEncoder(proved.renderer, proved.backend, mode, proved.fast)
        assert all(encoder.plan(c, w) is not None for c, w in zip(convos, weights))  # all take the skeleton way
        fast, _, _ = encoder.render(convos, weights)
        slow, _, _ = encoder.without_skeletons().render(convos, weights)
        assert fast == slow
        a = encode_all(encoder, convos, weights)
        b = encode_all(encoder.without_skeletons().without_fast(), convos, weights)
        assert len(a.ids) == len(b.ids) == 40 and a.render_mismatches == [] and a.last_token == b.last_token
        assert all(np.array_equal(x, y) for x, y in zip(a.ids, b.ids))
        assert all(np.array_equal(x, y) for x, y in zip(a.masks, b.masks))
        assert a.prompt_tokens == b.prompt_tokens and a.row_of == b.row_of


def test_a_template_that_fools_the_proof_is_caught_on_a_checked_row_and_the_run_rendered_by_jinja(tiny_tokenizer,
                                                                                                  caplog):
    # the length test reads a copy the tracing cannot follow, at a length neither marker has
    body = "{% if (c ~ '') | length > 5000 %}[long]{% endif %}{{ c }}"
    template = jinja(body).template
    encoder = chat_encoder(tiny_tokenizer, template)
    convos = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "y" * (6000 if i == 3 else 5)}]
              for i in range(40)]
    assert encoder.plan(convos[0], [1.0]) is not None  # the proof is fooled
    out = encode_all(encoder, convos, [[1.0]] * 40)
    assert "shape plan's pieces differ from Jinja's on row 3" in caplog.text
    jinja_rows = encode_all(encoder.without_skeletons(), convos, [[1.0]] * 40)
    assert all(np.array_equal(x, y) for x, y in zip(out.ids, jinja_rows.ids))
    assert tiny_tokenizer.decode(out.ids[3]).count("[long]") == 1


def test_rows_that_skeletons_cannot_render_are_rendered_by_jinja_in_the_same_run(tiny_tokenizer):
    encoder = chat_encoder(tiny_tokenizer, tiny_tokenizer.chat_template)
    convos = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
              [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}],  # empty content
              [{"role": "user", "content": "q"}, {"role": "assistant", "content": "c", "reasoning": "r"}]]  # a trace
    assert [encoder.plan(c, [1.0]) is not None for c in convos] == [True, False, False]
    out = encode_all(encoder, convos, [[1.0]] * 3)
    ref = encode_all(encoder.without_skeletons(), convos, [[1.0]] * 3)
    assert all(np.array_equal(x, y) for x, y in zip(out.ids, ref.ids))


def test_masks_are_exactly_the_supervised_pieces_tokens_and_the_last_one_ends_the_final_answer(tiny_tokenizer):
    encoder = chat_encoder(tiny_tokenizer, tiny_tokenizer.chat_template, fast=False)
    convos = random_conversations(random.Random("pieces"), 30)
    weights = [[1.0] * sum(m["role"] == "assistant" for m in c) for c in convos]
    out = encoder.encode(convos, weights)
    parts, _, _ = encoder.render(convos, weights)
    for k, (part,) in enumerate(parts):
        lengths = [len(tiny_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in part.pieces]
        expected = np.repeat(np.array(part.supervised, dtype=np.int8), lengths)
        assert np.array_equal(out.masks[k], expected)
        assert out.last_token[k] == np.flatnonzero(expected)[-1]
        assert out.prompt_tokens[k] == sum(lengths[:part.prompt_pieces])


def test_the_model_template_of_smollm2_gets_skeletons_for_chats_with_and_without_system(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    renderer = ChatRenderer(tokenizer.chat_template, {})
    for roles in (("system", "user", "assistant"), ("user", "assistant"), ("user", "assistant", "user")):
        assert renderer.skeleton(roles, False) is not None and renderer.skeleton(roles[:-1], True) is not None
