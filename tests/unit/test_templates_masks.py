"""Masks from rendered prefixes, for the model's template and every named one: they supervise exactly the answers
and their end-of-turn markers, agree with TRL's `{% generation %}` masks, and each prompt's ids are the ids before its
answer."""

import json

import duckdb
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from tasks.core.config import ChatConfig, CleanConfig, DataConfig
from tasks.core.errors import ConfigError
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tasks.formatting.chat_format import chat_encoder, format_rows, tokenize_conversation, training_template
from tasks.formatting.encoding import encode_all
from tasks.formatting.masks import marked_text
from tasks.formatting.templates import NAMED_TEMPLATES, ChatRenderer, named_template, special_tokens
from tasks.model.tokenizer import TEMPLATE_FILE, load_tokenizer
from tests.conftest import write_jsonl

CHAT = [{"role": "system", "content": "Answer in JSON."}, {"role": "user", "content": "a=1?"},
        {"role": "assistant", "content": '{"a": 1}'}, {"role": "user", "content": "and b?"},
        {"role": "assistant", "content": "def f():\n    return 2"}]
CHATS = [CHAT, CHAT[1:3], [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there!"},
                           {"role": "user", "content": "Name?"},
                           {"role": "assistant", "content": "  Ada\n\nLovelace."}]]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]
# Each family's special tokens (added to the test tokenizer, as its own model's tokenizer has them) and what a
# supervised answer decodes to: the answer plus its end-of-turn marker, as the template writes them.
FAMILIES = {
    "model": ({}, "{}<|im_end|>"),
    "chatml": ({}, "{}<|im_end|>"),
    "llama2": ({"bos_token": "<s>", "eos_token": "</s>"}, " {} </s>"),
    "mistral": ({"bos_token": "<s>", "eos_token": "</s>", "additional_special_tokens": ["[INST]", "[/INST]"]},
                "{}</s>"),
    "llama3": ({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
                "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>"]}, "{}<|eot_id|>"),
    "gemma": ({"bos_token": "<bos>", "eos_token": "<eos>",
               "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]}, "{}<end_of_turn>"),
    "alpaca": ({}, "{}<|im_end|>"),
}


def family(tiny_model_dir, name):
    """The tiny model's tokenizer with the family's special tokens, and the template to format with."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens(FAMILIES[name][0])
    return tokenizer, tokenizer.chat_template if name == "model" else named_template(name)


def supervised_text(tokenizer, encoded):
    return tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["assistant_masks"]) if m])


def test_every_named_template_has_a_test():
    assert set(FAMILIES) == {"model", *NAMED_TEMPLATES}


@pytest.mark.parametrize("name", FAMILIES)
def test_supervised_tokens_decode_to_exactly_the_answers_and_their_end_of_turn_markers(tiny_model_dir, name):
    tokenizer, template = family(tiny_model_dir, name)
    out = tokenize_conversation(tokenizer, template, CHAT, max_length=512)
    assert supervised_text(tokenizer, out) == "".join(FAMILIES[name][1].format(a) for a in ANSWERS)
    assert out["last_eot_supervised"] and out["n_supervised"] == sum(out["assistant_masks"])


@pytest.mark.parametrize("name", FAMILIES)
def test_pieces_join_to_the_text_apply_chat_template_renders_and_ids_are_each_pieces_own(tiny_model_dir, name):
    tokenizer, template = family(tiny_model_dir, name)
    renderer = ChatRenderer(template, special_tokens(tokenizer))
    for gen in (False, True):
        text = tokenizer.apply_chat_template(CHAT, chat_template=template, tokenize=False, add_generation_prompt=gen)
        assert renderer.render(CHAT, add_generation_prompt=gen) == text
    encoder = chat_encoder(tokenizer, template, fast=False)
    (part,), _ = encoder.plan_row(CHAT, [1.0, 1.0], None)
    assert part.text == tokenizer.apply_chat_template(CHAT, chat_template=template, tokenize=False)
    out = tokenize_conversation(tokenizer, template, CHAT, max_length=512)
    assert out["input_ids"] == [i for piece in part.pieces for i in tokenizer(piece, add_special_tokens=False)
                                ["input_ids"]]


@pytest.mark.parametrize(("messages", "w"), [(CHAT, [1.0, 1.0]), (CHAT, [0.0, 1.0]), (CHAT, [1.0, 0.0]),
                                             (CHATS[1], [1.0])])
def test_prefix_masks_equal_trls_generation_marker_masks_for_smollm2(tiny_tokenizer, messages, w):
    ours = tokenize_conversation(tiny_tokenizer, tiny_tokenizer.chat_template, messages, 512, w)
    trl = tiny_tokenizer.apply_chat_template(messages, chat_template=training_template(tiny_tokenizer), tokenize=True,
                                             return_dict=True, return_assistant_tokens_mask=True)
    spans, start = [], None  # TRL's mask with the weight-0 turns' spans cleared, one span per assistant turn
    for i, m in enumerate([*trl["assistant_masks"], 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            spans, start = [*spans, (start, i)], None
    expected = [0] * len(trl["input_ids"])
    for (a, b), weight in zip(spans, w):
        expected[a:b] = [int(bool(weight))] * (b - a)
    assert ours["input_ids"] == list(trl["input_ids"]) and ours["assistant_masks"] == expected


def test_an_answer_is_tokenized_from_its_own_start_so_its_prompt_is_a_prefix_where_whole_text_tokens_differ(
        tiny_tokenizer):
    # "\n" + "  Ada": tokenized as one text, GPT-2's pre-tokenizer joins the newline to a space ("\n ", " Ada"), so
    # the prompt alone (ending "\n") is not a token prefix of it; format tokenizes the answer on its own
    messages = CHATS[2]
    whole = tiny_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    prompt_text = tiny_tokenizer.apply_chat_template(messages[:3], tokenize=False, add_generation_prompt=True)
    prompt = tiny_tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    assert list(whole[:len(prompt)]) != prompt
    encoder = chat_encoder(tiny_tokenizer, tiny_tokenizer.chat_template, fast=False)
    out = encoder.encode([messages], [[1.0, 1.0]])
    assert out.ids[0][:len(prompt)].tolist() == prompt == encoder.encode_prompt(messages[:3])
    assert tiny_tokenizer.decode(out.ids[0][out.masks[0] == 1]) == "Hello there!<|im_end|>  Ada\n\nLovelace.<|im_end|>"


def test_mask_modes_supervise_the_last_turn_the_completion_or_everything(tiny_tokenizer):
    def supervised(mode):
        return supervised_text(tiny_tokenizer, tokenize_conversation(tiny_tokenizer, tiny_tokenizer.chat_template,
                                                                     CHAT, 512, mode=mode))

    assert supervised("last_turn") == "def f():\n    return 2<|im_end|>"
    assert supervised("completion") == "def f():\n    return 2<|im_end|>"
    assert supervised("all") == tiny_tokenizer.apply_chat_template(CHAT, tokenize=False)
    with pytest.raises(ConfigError, match="chat.mask='answers'"):
        tokenize_conversation(tiny_tokenizer, tiny_tokenizer.chat_template, CHAT, 512, mode="answers")


def test_a_template_whose_generation_prompt_no_answer_can_follow_fails_with_an_example(tiny_tokenizer):
    # the generation prompt says "bot", the rendered answers say "assistant"
    template = tiny_tokenizer.chat_template.replace("'<|im_start|>assistant\n'", "'<|im_start|>bot\n'")
    with pytest.raises(ConfigError, match="generation prompt ends .*bot.* but the same conversation with its answer "
                                          "renders .*assistant"):
        tokenize_conversation(tiny_tokenizer, template, CHAT, 512)


def test_parallel_encoding_gives_the_same_rows_in_order(tiny_tokenizer):
    convos = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}]
              for i in range(40)]
    encoder = chat_encoder(tiny_tokenizer, tiny_tokenizer.chat_template)
    one = encode_all(encoder, convos, [[1.0]] * 40, num_proc=1, chunk=7)
    two = encode_all(encoder, convos, [[1.0]] * 40, num_proc=2, chunk=7)
    assert [x.tolist() for x in two.ids] == [x.tolist() for x in one.ids]
    assert [x.tolist() for x in two.masks] == [x.tolist() for x in one.masks]
    assert two.row_of == one.row_of == list(range(40)) and two.prompt_tokens == one.prompt_tokens
    assert tiny_tokenizer.decode(one.ids[39][one.masks[39] == 1]) == "answer 39<|im_end|>"


def clean_db(tmp_path, records, heldout=0.3):
    src = write_jsonl(tmp_path / "c.jsonl", records)
    ingest_rows(DataConfig(sources=[{"path": str(src)}]), tmp_path, tmp_path / "i.duckdb")
    clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=heldout))
    return tmp_path / "c.duckdb"


LONG = [{"instruction": f"question {i}", "output": " ".join(["word"] * (5 if i % 4 else 80))} for i in range(40)]


def test_too_long_rows_are_quarantined_as_too_many_tokens_and_the_accounting_holds(tiny_model_dir, tmp_path):
    db = clean_db(tmp_path, [*LONG, {"instruction": "", "output": "empty prompt"}])
    stats = format_rows(db, str(tiny_model_dir), tmp_path / "fmt", ChatConfig(max_length=60), tmp_path / "q.parquet")
    quarantine = pq.read_table(tmp_path / "q.parquet").to_pylist()
    assert sorted(r["rule"] for r in quarantine) == ["empty_turn"] + ["too_many_tokens"] * 10
    assert next(r for r in quarantine if r["rule"] == "too_many_tokens")["detail"].endswith("> chat.max_length=60")
    acc = stats["accounting"]
    assert acc["rows_raw"] == 41 == acc["rows_formatted"] + acc["rows_quarantined"]
    assert acc["dropped_by_rule"] == {"too_many_tokens": 10}
    assert stats["train"]["rows_dropped_too_long"] + stats["heldout"]["rows_dropped_too_long"] == 10
    assert 0 < stats["train"]["drop_rate"] < 1 and stats["train"]["truncation_rate"] == 0.0
    with duckdb.connect(str(db), read_only=True) as con:  # the clean step's own quarantine is left as it was
        assert con.execute("SELECT count(*) FROM quarantine").fetchall() == [(1,)]


def test_too_long_rows_are_cut_when_chat_too_long_is_truncate(tiny_model_dir, tmp_path):
    stats = format_rows(clean_db(tmp_path, LONG), str(tiny_model_dir), tmp_path / "fmt",
                        ChatConfig(max_length=60, too_long="truncate"))
    rows = pq.read_table(tmp_path / "fmt" / "train.parquet").to_pylist()
    cut = [r for r in rows if r["truncated"]]
    assert cut and all(r["n_tokens"] == 60 and not r["last_eot_supervised"] for r in cut)
    assert stats["train"]["truncation_rate"] == len(cut) / len(rows) and stats["accounting"]["dropped_by_rule"] == {}


def test_the_template_formatted_with_is_saved_and_used_by_load_tokenizer(tiny_model_dir, tmp_path):
    format_rows(clean_db(tmp_path, LONG[:20]), str(tiny_model_dir), tmp_path / "fmt", ChatConfig(template="alpaca"))
    saved = tmp_path / "fmt" / TEMPLATE_FILE
    assert saved.read_text() == named_template("alpaca")
    tokenizer = load_tokenizer(str(tiny_model_dir), tmp_path / "fmt")
    row = pq.read_table(tmp_path / "fmt" / "heldout.parquet").to_pylist()[0]
    prompt = tokenizer.apply_chat_template(json.loads(row["prompt"]), tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("Below is an instruction") and prompt.endswith("### Response:\n")
    assert tokenizer.decode(row["input_ids"]).startswith(prompt)


def test_a_prompt_that_would_merge_into_its_answer_is_still_the_prefix_evaluate_generates_from(tiny_model_dir,
                                                                                                 tmp_path):
    # "assistant: " ends in a space: alone it is its own token, before an answer it would merge into " answer"; the
    # answer is tokenized on its own, so the held-out row's first prompt_tokens ids are its prompt's own ids
    custom = tmp_path / "t.jinja"
    custom.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    format_rows(clean_db(tmp_path, LONG[:20]), str(tiny_model_dir), tmp_path / "fmt", ChatConfig(chat_template=custom))
    tokenizer = load_tokenizer(str(tiny_model_dir), tmp_path / "fmt")
    for row in pq.read_table(tmp_path / "fmt" / "heldout.parquet").to_pylist():
        prompt = tokenizer.apply_chat_template(json.loads(row["prompt"]), tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("assistant: ")
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert row["input_ids"][:row["prompt_tokens"]] == ids and row["assistant_masks"][row["prompt_tokens"]] == 1


def test_marked_text_brackets_the_supervised_tokens_with_their_counts(tiny_tokenizer):
    out = tokenize_conversation(tiny_tokenizer, tiny_tokenizer.chat_template, CHAT[1:3], 512)
    text = marked_text(tiny_tokenizer, out["input_ids"], out["assistant_masks"])
    assert text.endswith(f'<|im_start|>assistant\n[[{{"a": 1}}<|im_end|>]]({out["n_supervised"]})\n')
