"""The batched decode loop and the request checks of `sftflow serve`, in-process on the tiny llama: rows batched and
joining mid-way answer exactly what generate() answers alone, stop strings never leak, seeded sampling does not depend
on the neighbours, and the protocol refuses what it cannot honour."""

from __future__ import annotations

import json

import pytest

from tasks.serving.decode import Decoder, Event, Row, Sampling, held_back
from tasks.serving.prefix import MIN_SHARED, PrefixCache, common_prefix
from tasks.serving.protocol import ApiError, parse_chat


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), tokenizer


def prompt(tokenizer, text: str) -> list[int]:
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                         return_dict=True)["input_ids"]


def alone(model, ids: list[int], n: int, stops: list[int]) -> list[int]:
    """Return what generate() answers greedily for one prompt on its own."""
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=stops, pad_token_id=stops[0])
    return out[0, len(ids):].tolist()


def run(decoder: Decoder, arrivals: dict[int, list[Row]]) -> None:
    """Advance the decoder until every row is done, admitting arrivals[k] before step k."""
    import torch

    batch, step = None, 0
    with torch.inference_mode():
        while batch is not None or any(k >= step for k in arrivals):
            batch = decoder.advance(batch, arrivals.get(step, []))
            step += 1


def collector() -> tuple[list[Event], callable]:
    events: list[Event] = []
    return events, events.append


def test_rows_batched_with_their_own_budgets_and_a_late_joiner_answer_what_generate_answers_alone(tiny):
    model, tokenizer = tiny
    stops = [tokenizer.eos_token_id]
    texts = ["Hi", "Extract the order: 2 lamps to Oslo, for Maria Lopez", "a b c d e f g h i j", "Ship 3 mugs"]
    budgets = [12, 20, 7, 15]
    rows, logs = [], []
    for text, budget in zip(texts, budgets):
        events, emit = collector()
        rows.append(Row(prompt(tokenizer, text), Sampling(budget), emit))
        logs.append(events)
    decoder = Decoder(model, tokenizer, stops, stops[0])
    run(decoder, {0: rows[:2], 3: rows[2:3], 5: rows[3:]})
    assert decoder.prefix.reused > 0  # the late joiners' chat-template head came from the prefix cache
    for row, events, budget in zip(rows, logs, budgets):
        expected = alone(model, row.prompt, budget, stops)
        assert row.tokens == expected
        assert "".join(e.text for e in events) == tokenizer.decode(expected, skip_special_tokens=True)
        assert [e.finish for e in events if e.finish] == ["length"] and events[-1].completion_tokens == budget


def test_a_stop_string_ends_the_answer_before_it_and_no_delta_ever_holds_part_of_it(tiny):
    model, tokenizer = tiny
    stops = [tokenizer.eos_token_id]
    ids = prompt(tokenizer, "Extract the order: 2 lamps to Oslo")
    full = tokenizer.decode(alone(model, ids, 16, stops), skip_special_tokens=True)
    stop = full[5:9]  # text the model is about to write, spanning tokens
    events, emit = collector()
    row = Row(ids, Sampling(16, stop=(stop, "never written")), emit)
    run(Decoder(model, tokenizer, stops, stops[0]), {0: [row]})
    assert "".join(e.text for e in events) == full[:full.find(stop)]
    assert events[-1].finish == "stop" and all(stop[:2] not in e.text for e in events)
    assert held_back("the order is", ("is done",)) == 2 and held_back("ab\ufffd", ()) == 1


def test_seeded_sampling_answers_the_same_alone_or_batched_with_other_rows(tiny):
    model, tokenizer = tiny
    stops = [tokenizer.eos_token_id]
    ids = prompt(tokenizer, "Tell me about lamps")
    sampled = Sampling(12, temperature=0.9, top_p=0.9, seed=7)
    alone_row = Row(ids, sampled, lambda e: None)
    run(Decoder(model, tokenizer, stops, stops[0]), {0: [alone_row]})
    rows = [Row(prompt(tokenizer, "Hi"), Sampling(9), lambda e: None), Row(ids, sampled, lambda e: None),
            Row(ids, Sampling(12, temperature=0.9, seed=8), lambda e: None)]
    run(Decoder(model, tokenizer, stops, stops[0]), {0: rows[:1], 2: rows[1:]})
    assert rows[1].tokens == alone_row.tokens and len(alone_row.tokens) == 12
    assert rows[2].tokens != alone_row.tokens  # another seed, another draw
    assert rows[1].tokens != alone(model, ids, 12, stops)  # and it did sample


def test_a_repetition_penalty_answers_as_transformers_penalty_alone_by_default_or_per_request(tiny):
    """The decoder's default penalty (the served version's evaluate.repetition_penalty) and a request's own
    (`repetition_penalty`, vLLM's extension) answer what generate() answers alone with transformers' penalty, batched
    beside a row with another penalty; without one, the answer is the plain greedy one."""
    import torch

    model, tokenizer = tiny
    stops = [tokenizer.eos_token_id]
    ids = [prompt(tokenizer, t) for t in ("a a a a a a", "Extract the order: 2 lamps to Oslo", "Hi")]

    def penalised(k: int, penalty: float) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids[k]]), attention_mask=torch.ones(1, len(ids[k]), dtype=torch.long),
                                 max_new_tokens=14, do_sample=False, repetition_penalty=penalty, eos_token_id=stops,
                                 pad_token_id=stops[0])
        return out[0, len(ids[k]):].tolist()

    rows = [Row(ids[0], Sampling(14), lambda e: None),
            Row(ids[1], Sampling(14, repetition_penalty=1.0), lambda e: None),
            Row(ids[2], Sampling(14, repetition_penalty=1.8), lambda e: None)]
    # the random tiny llama never repeats a token by itself: a penalty below 1, which favours the tokens seen, shows
    # that the penalty acts
    run(Decoder(model, tokenizer, stops, stops[0], repetition_penalty=0.3), {0: rows[:2], 2: rows[2:]})
    assert rows[0].tokens == penalised(0, 0.3) != alone(model, ids[0], 14, stops)
    assert rows[1].tokens == alone(model, ids[1], 14, stops)  # 1.0: off for this request
    assert rows[2].tokens == penalised(2, 1.8)


def test_a_cancelled_row_leaves_the_batch_before_the_next_step_and_the_others_go_on(tiny):
    model, tokenizer = tiny
    stops = [tokenizer.eos_token_id]
    decoder = Decoder(model, tokenizer, stops, stops[0])
    keep, leave = (Row(prompt(tokenizer, t), Sampling(10), lambda e: None) for t in ("Hi", "Hello there"))
    import torch

    with torch.inference_mode():
        batch = decoder.advance(None, [keep, leave])
        leave.cancelled = True
        while batch is not None:
            batch = decoder.advance(batch, [])
            assert batch is None or batch.rows == [keep]
    assert len(leave.tokens) == 1 and keep.tokens == alone(model, keep.prompt, 10, stops)


def test_the_prefix_cache_keeps_a_head_while_it_serves_and_replaces_it_when_prompts_move_on(tiny):
    model, _ = tiny
    cache = PrefixCache(model)
    head, other = list(range(100, 140)), list(range(500, 540))
    assert common_prefix([head + [1, 2], head + [1, 3], head]) == 40
    assert cache.lookup([head + [1]]) == 0 and cache.ids == []  # nothing to share with yet
    assert cache.lookup([head + [2, 3], head + [4]]) == 40 and cache.ids == head
    assert cache.lookup([head[:30] + [7, 8]]) == 30 and cache.ids == head  # a shorter head: lent, not replaced
    assert cache.lookup([head[:MIN_SHARED - 1] + [9]]) == 0 and cache.ids == head  # too short to be worth it
    assert cache.lookup([other + [1]]) == 0 and cache.lookup([other + [2]]) == 40 and cache.ids == other
    assert cache.lookup([head + [5]]) == 0  # the head left the cache: prefilled whole
    assert len(cache.layers) == model.config.num_hidden_layers and cache.layers[0][0].shape[-2] == 40
    lent = cache.lend(3, 20)
    assert lent.layers[0].keys.shape[0] == 3 and lent.get_seq_length() == 20


def body(**fields) -> bytes:
    return json.dumps({"messages": [{"role": "user", "content": "Hi"}], **fields}).encode()


def test_the_request_checks_take_openai_clients_fields_and_refuse_typos_and_features_it_lacks():
    names = ("serve-test/1", "serve-test@champion", "serve-test")
    chat = parse_chat(body(model="serve-test@champion", max_completion_tokens=5, stop="}", seed=-3, user="u1",
                           stream=True, stream_options={"include_usage": True}, frequency_penalty=0,
                           messages=[{"role": "developer", "content": "Be brief."},
                                     {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                  {"type": "text", "text": "b"}]}]), 16, names)
    assert chat.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a\nb"}]
    assert (chat.sampling.max_tokens, chat.sampling.stop, chat.sampling.seed, chat.sampling.temperature) == (
        5, ("}",), -3, 0.0)
    assert chat.stream and chat.include_usage
    assert chat.sampling.repetition_penalty is None  # the served version's own
    assert parse_chat(body(repetition_penalty=1.2), 16, names).sampling.repetition_penalty == 1.2
    refusals = {
        "penalty": (body(repetition_penalty=0), 400, "invalid_value", None),
        "max_token": (body(max_token=5), 400, "unknown_parameter", "Unrecognized request argument supplied: "
                                                                   "max_token"),
        "logprobs": (body(logprobs=True), 400, "unsupported_parameter", "'logprobs' is not supported by this "
                                                                        "server (got true); leave it out"),
        "budget": (body(max_tokens=17), 400, "invalid_value", "max_tokens=17 is more than this server gives one "
                                                              "answer: from 1 to 16 (its --max-new-tokens)"),
        "string": (body(max_tokens="5"), 400, "invalid_value", "max_tokens: Input should be a valid integer"),
        "image": (body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), 400,
                  "invalid_value", None),
        "stops": (body(stop=["a", "b", "c", "d", "e"]), 400, "invalid_value", "stop: send up to 4 non-empty "
                                                                              "strings (got 5)"),
    }
    for name, (raw, status, code, message) in refusals.items():
        with pytest.raises(ApiError) as refused:
            parse_chat(raw, 16, names)
        assert (refused.value.status, refused.value.code) == (status, code), name
        assert message is None or refused.value.message == message, name


def test_packed_linear_layers_compute_the_plain_layers_logits_and_the_decoder_answers_the_same(tiny):
    """What `sftflow serve` does to an fp32 model on a CPU (tasks/serving/packed.py): every nn.Linear replaced, the
    logits of a padded prefill and of cached decode steps within fp32 rounding of the plain model's, and the batched
    decoder's greedy answers the same tokens."""
    import copy

    import torch

    from tasks.serving.packed import pack_linears
    from tests.conftest import assert_same_value

    model, tokenizer = tiny
    plain = copy.deepcopy(model).float()
    packed = copy.deepcopy(plain)
    linears = sum(type(m) is torch.nn.Linear for m in plain.modules())
    assert pack_linears(packed) == linears > 0
    assert not any(type(m) is torch.nn.Linear for m in packed.modules())

    texts = ["Hi", "Extract the order: 2 lamps to Oslo, for Maria Lopez", "Ship 3 mugs"]
    ids = [prompt(tokenizer, t) for t in texts]
    width = max(map(len, ids))
    batch = torch.tensor([[0] * (width - len(i)) + i for i in ids])
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
    with torch.inference_mode():
        outs = [m(batch, attention_mask=mask, use_cache=True) for m in (plain, packed)]
        assert_same_value(outs[1].logits, outs[0].logits, torch.float32)
        last = outs[0].logits[:, -1].argmax(-1)[:, None]
        step_mask = torch.cat([mask, mask.new_ones(len(ids), 1)], dim=1)
        positions = mask.sum(-1)[:, None]
        steps = [m(last, attention_mask=step_mask, position_ids=positions, past_key_values=o.past_key_values,
                   use_cache=True).logits for m, o in zip((plain, packed), outs)]
        assert_same_value(steps[1], steps[0], torch.float32)

    stops = [tokenizer.eos_token_id]
    answers = []
    for m in (plain, packed):
        rows = [Row(i, Sampling(max_tokens=10), lambda e: None) for i in ids]
        run(Decoder(m, tokenizer, stops, stops[0]), {0: rows})
        answers.append([r.tokens for r in rows])
    assert answers[1] == answers[0]


def test_packing_leaves_bf16_layers_as_they_are(tiny):
    import copy

    import torch

    from tasks.serving.packed import pack_linears

    model = copy.deepcopy(tiny[0]).to(torch.bfloat16)
    assert pack_linears(model) == 0
    assert any(type(m) is torch.nn.Linear for m in model.modules())
