"""The tiktoken fast path gives exactly the HF tokenizer's ids and masks, is used only where that is proved, and a
run whose checked rows differ falls back to HF whole."""

import json
import logging
from itertools import pairwise

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

from tasks.formatting.chat_format import chat_encoder
from tasks.formatting.encoding import encode_all
from tasks.formatting.fast_tokenizer import ROW_SEPARATOR, FastTokenizer, fast_tokenizer
from tests.conftest import shared_data

ADVERSARIAL = [
    "", " ", "  ", "\n", "\n\n\n", "\t\t x", "a  b   c    d", "  leading", "trailing  ", " \n \n", "x\r\ny\rz",
    "1234567890 12 3.14159 1,000,000 ١٢٣ ½ Ⅷ", "it's they're we've I'm you'll he'd 'S 'T ''s", "don't'll 'dd",
    "Ünïcödé naïve café", "日本語のテキスト 中文 한국어", "emoji 😀👍🏽 👨‍👩‍👧 🇫🇷",
    "e\u0301 a\u0308 \u200b\u200d x\u00a0y",
    "<|im_start|>", "x<|im_end|>y", "<|im_end|><|im_start|>", "<|im_start|<|im_end|>>", "<|endoftext|> <|im_end|>\n",
    "<repo_name><reponame>", "< |im_end| >", "\x00\x01\x7f", "tab\tnew\nline\x0bvt\x0cff", "\u2028\u2029\u0085",
    "ﬁ ﬀ ＡＢＣ ｶﾞ", "ab" * 300, " " * 50 + "x", "\n" * 40, "$$\\frac{1}{2}$$ <<48/2=24>>24 #### 72",
    "\U00040000\U00080000 \U000e0001", "a\x04b \x06 \x13\x14\x16\x1d",  # bytes the vocabulary lacks: HF drops them
]


@pytest.fixture(scope="module")
def encoder(tiny_tokenizer):
    return chat_encoder(tiny_tokenizer, tiny_tokenizer.chat_template)


def hf_ids(backend, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def fast_ids(encoder, texts: list[str]) -> list[list[int] | None]:
    return [None if f is None else f[0].tolist() for f in encoder.fast.encode_batch(texts)]


def chats(contents: list[str]) -> list[list[dict]]:
    return [[{"role": "system", "content": c}, {"role": "user", "content": c + "?"},
             {"role": "assistant", "content": c}, {"role": "user", "content": c},
             {"role": "assistant", "content": "ok " + c}] for c in contents]


def assert_same_as_hf(encoder, convos: list[list[dict]]) -> None:
    fast = encode_all(encoder, convos, [[1.0, 1.0]] * len(convos), num_proc=1)
    slow = encode_all(encoder.without_fast(), convos, [[1.0, 1.0]] * len(convos), num_proc=1)
    assert (fast.tokenizer, slow.tokenizer) == ("tiktoken", "hf")
    for k in range(len(convos)):
        assert fast.ids[k].tolist() == slow.ids[k].tolist(), convos[k][0]["content"]
        assert fast.masks[k].tolist() == slow.masks[k].tolist(), convos[k][0]["content"]
        assert fast.last_token[k] == slow.last_token[k] and fast.prompt_tokens[k] == slow.prompt_tokens[k]


def test_the_smollm2_tokenizer_is_proved_and_gives_hf_ids_on_every_gsm8k_and_alpaca_row(encoder):
    rows = [json.loads(line) for line in shared_data("gsm8k_train.jsonl").read_text(encoding="utf-8").splitlines()]
    alpaca = json.loads(shared_data("alpaca_en_demo.json").read_text(encoding="utf-8"))
    convos = [[{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]
              for r in rows]
    convos += [[{"role": "user", "content": f"{a['instruction']}\n{a['input']}".strip()},
                {"role": "assistant", "content": a["output"]}] for a in alpaca]
    texts = [encoder.renderer.render(c) for c in convos]
    assert encoder.tokenizer_path == "tiktoken"
    assert fast_ids(encoder, texts) == hf_ids(encoder.backend, texts)
    assert_same_as_hf(encoder, [[*c, *c] for c in convos[::40]])  # masks too, two supervised turns each


def test_adversarial_strings_give_hf_ids_and_masks(encoder):
    texts = ADVERSARIAL + [a + b for a in ADVERSARIAL[:20] for b in ADVERSARIAL[18:26]]
    fast = fast_ids(encoder, texts)
    assert [f for f, t in zip(fast, texts) if f is None] == [None] * 2  # the two with bytes HF drops go to HF
    assert [f for f in fast if f is not None] == [h for f, h in zip(fast, hf_ids(encoder.backend, texts))
                                                  if f is not None]
    assert_same_as_hf(encoder, chats(ADVERSARIAL))


def test_rows_encoded_in_one_joined_call_equal_rows_encoded_alone_even_a_row_holding_the_separator(encoder):
    texts = ADVERSARIAL[:30] + ["x" + ROW_SEPARATOR[:-1], ROW_SEPARATOR[1:] + "y", "<|sftflow-row-separator|>"]
    ids, starts, ends, bounds, _ = encoder.fast.encode_flat(texts)
    alone = [encoder.fast.encode_flat([t]) for t in texts]
    assert len(bounds) == len(texts) + 1
    for r, (a, b) in enumerate(pairwise(bounds)):
        assert ids[a:b].tolist() == alone[r][0].tolist(), texts[r]
        assert (starts[a:b].tolist(), ends[a:b].tolist()) == (alone[r][1].tolist(), alone[r][2].tolist())
    with_separator = texts + ["a" + ROW_SEPARATOR + "b"]  # the whole batch is then encoded row by row, as HF does
    assert fast_ids(encoder, with_separator)[-1] == hf_ids(encoder.backend, with_separator[-1:])[0]
    assert fast_ids(encoder, with_separator)[:-1] == fast_ids(encoder, texts)


def test_every_code_point_of_planes_0_to_3_and_14_tokenizes_as_hf_does(encoder):
    points = [c for c in [*range(0x40000), *range(0xE0000, 0xE1000)] if not 0xD800 <= c < 0xE000]
    # each code point after a letter, a digit, a space, a newline and itself: its regex class decides the pieces
    texts = ["".join(f"a{ch}1{ch} {ch}\n{ch}{ch}'s" for ch in map(chr, points[k:k + 64]))
             for k in range(0, len(points), 64)]
    fast, slow = fast_ids(encoder, texts), hf_ids(encoder.backend, texts)
    differ = [k for k, (f, h) in enumerate(zip(fast, slow)) if f is not None and f != h]
    assert differ == []
    assert sum(f is None for f in fast) < len(texts) / 100  # only the few with a byte the vocabulary lacks


def test_white_space_is_unicodes_white_space_property():
    import regex

    from tasks.formatting.fast_tokenizer import WHITE_SPACE

    every_code_point = "".join(map(chr, range(0x110000)))  # one string: a match's offset is its code point
    assert set(WHITE_SPACE) == {m.start() for m in regex.finditer(r"\p{White_Space}", every_code_point)}


def test_cut_plain_pattern_pieces_equal_the_gpt2_regex_around_every_whitespace_run(encoder):
    from tasks.formatting.fast_tokenizer import PIECE_CUT, WHITE_SPACE

    fast = encoder.fast
    assert fast.cuttable
    # White_Space, what Python alone calls space (\x1c-\x1f) and zero-width characters that are not White_Space
    spaces = [chr(c) for c in WHITE_SPACE] + ["\x1c", "\x1d", "\x1e", "\x1f", "\u200b", "\u2060", "\ufeff"]
    contexts = ["{a}{b}How", "x{a}{b}1", "{a}{a}{b}'s", " {a}{b}é", "{a}{b}", "{a}{b}<|im_end|>", "{a}<|im_start|>{b}x",
                "q{a}{b}{a}{b}.", "{a} {b}\n", "\n{a}{b}\n\nx", "{a}{b}😀"]
    texts = [c.format(a=a, b=b) for a in spaces for b in spaces for c in contexts]
    ids, _, _, bounds, bad = fast.encode_flat(texts)  # one joined, cut call
    hf = hf_ids(encoder.backend, texts)
    lacking = [t for t, b in zip(texts, bad) if b]  # a byte the vocabulary lacks (HF drops it): left to HF
    assert len(lacking) < len(texts) / 10 and all(set(t) & {"\x1c", "\x1d", "\x1e", "\x1f"} for t in lacking)
    assert [ids[a:b].tolist() for (a, b), b_ in zip(pairwise(bounds), bad) if not b_] == [
        h for h, b_ in zip(hf, bad) if not b_]
    # the cuts are what makes the plain pattern agree: without them these texts split differently
    uncut = fast.plain.encode_ordinary("Mark has 3 apples.  How many?\n\nAnswer")
    assert fast.hf_ids[uncut].tolist() != hf_ids(encoder.backend, ["Mark has 3 apples.  How many?\n\nAnswer"])[0]
    assert fast.with_cuts("a  b\n\n<|im_end|>") == "a " + PIECE_CUT + " b\n\n<|im_end|>"


def smollm2_backend(tiny_tokenizer) -> Tokenizer:
    return Tokenizer.from_str(tiny_tokenizer.backend_tokenizer.to_str())


def test_a_tokenizer_with_a_normalizer_takes_the_hf_path(tiny_tokenizer):
    backend = smollm2_backend(tiny_tokenizer)
    backend.normalizer = normalizers.NFKC()
    assert fast_tokenizer(backend) == (None, "it has a normalizer")


def test_a_unigram_tokenizer_takes_the_hf_path():
    unigram = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0), ("b", -2.0), ("ab", -1.5)], 0))
    unigram.pre_tokenizer = pre_tokenizers.Metaspace()
    why = "the pre-tokenizer is not ByteLevel with the GPT-2 regex and no prefix space"
    assert fast_tokenizer(unigram) == (None, why)


def test_merges_that_tiktoken_would_apply_differently_take_the_hf_path():
    # "bc" merges first, so HF never sees the pair ("ab", "c") that makes "abc"; tiktoken would join "a" + "bc".
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab.update({"bc": len(vocab), "ab": len(vocab) + 1, "abc": len(vocab) + 2})
    bpe = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    assert bpe.encode("abc").tokens == ["a", "bc"]
    assert fast_tokenizer(bpe) == (None, "the token 'abc' is not its own bytes' BPE encoding")


def test_a_run_whose_checked_rows_differ_from_hf_is_encoded_by_hf_whole(tiny_tokenizer, caplog):
    encoder = chat_encoder(tiny_tokenizer, tiny_tokenizer.chat_template)
    broken = encoder.fast.hf_ids.copy()
    broken[encoder.fast.ranks[b"?"]] = 42  # "?" now gets a wrong id
    encoder.fast.hf_ids = broken
    convos = chats(["no question here"] * 300 + ["a question?"])
    with caplog.at_level(logging.WARNING):
        out = encode_all(encoder, convos, [[1.0, 1.0]] * len(convos), num_proc=1)
    assert "differ from the HF tokenizer's on row 0" in caplog.text  # every row has the user turn's "?"
    assert out.tokenizer == "hf"
    reference = encode_all(encoder.without_fast(), convos, [[1.0, 1.0]] * len(convos), num_proc=1)
    assert all(np.array_equal(a, b) for a, b in zip(out.ids, reference.ids))


def test_the_costly_part_of_the_proof_is_recorded_per_tokenizer_and_only_once_it_held(tiny_model_dir):
    from tokenizers import Tokenizer

    from tasks.formatting.fast_tokenizer import fast_tokenizer, proof_file

    backend = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))  # not the shared fixture: others pad it
    text = backend.to_str()
    proof_file(text).unlink(missing_ok=True)
    proved = fast_tokenizer(backend)[0]
    assert proved is not None and proof_file(text).is_file()
    # the record holds the encoder the proof built: loaded, it is the same; a damaged one is proved again
    for damage in (None, b"not an npz", "truncated"):
        if damage:
            whole = proof_file(text).read_bytes()
            proof_file(text).write_bytes(whole[:len(whole) // 2] if damage == "truncated" else damage)
        again = fast_tokenizer(backend)[0]
        assert again.ranks == proved.ranks and list(again.ranks.values()) == list(range(len(proved.ranks)))
        assert np.array_equal(again.hf_ids, proved.hf_ids) and again.added == proved.added
    assert FastTokenizer.load(proof_file(text)).special == proved.special
    # a tokenizer whose merges make a token that is not its own bytes' encoding: refused, and nothing recorded
    cfg = json.loads(text)
    cfg["model"]["merges"] = cfg["model"]["merges"][:300] + cfg["model"]["merges"][301:]
    broken = json.dumps(cfg)
    assert proof_file(broken) != proof_file(text)
    fast, why = fast_tokenizer(Tokenizer.from_str(broken))
    assert fast is None and why and not proof_file(broken).is_file()


def test_a_split_written_while_it_encodes_is_written_again_whole_when_its_checked_rows_differ(
        tiny_tokenizer, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from tasks.core.config import ChatConfig
    from tasks.formatting.chat_format import SplitRows, SplitWriter, format_split

    monkeypatch.setattr(SplitWriter, "ROWS_PER_GROUP", 100)  # row groups on disk before the check finds the fault
    convos = chats([f"no question here {i}" for i in range(2100)] + ["a question?"])
    rows = SplitRows(list(range(len(convos))), ["s"] * len(convos), np.ones(len(convos), dtype=np.int32), convos,
                     [[1.0, 1.0]] * len(convos), [4] * len(convos), [None] * len(convos))
    encoder = chat_encoder(tiny_tokenizer, tiny_tokenizer.chat_template)
    broken = encoder.fast.hf_ids.copy()
    broken[encoder.fast.ranks[b"?"]] = 42  # "?" now gets a wrong id
    encoder.fast.hf_ids = broken
    cfg = ChatConfig(max_length=64, too_long="truncate")
    lengths, _, _ = format_split(rows, "train", encoder, cfg, tmp_path / "fast.parquet")
    format_split(rows, "train", encoder.without_fast(), cfg, tmp_path / "hf.parquet")
    assert pq.read_table(tmp_path / "fast.parquet").equals(pq.read_table(tmp_path / "hf.parquet"))
    assert pq.ParquetFile(tmp_path / "fast.parquet").metadata.num_row_groups == 3  # a group per 1000-row chunk
    assert lengths.num_rows == len(convos) and sorted(p.name for p in tmp_path.iterdir()) == ["fast.parquet",
                                                                                             "hf.parquet"]


def test_rows_encoded_in_worker_processes_are_written_as_the_threaded_path_writes_them(tiny_tokenizer, tmp_path):
    import pyarrow.parquet as pq

    from tasks.core.config import ChatConfig
    from tasks.formatting.chat_format import SplitRows, format_split
    from tasks.formatting.encoding import parallelism

    convos = chats([f"row {i}: what is {i}" + " plus one" * (i % 4) for i in range(2100)])
    weights = [[1.0, 1.0]] * len(convos)
    rows = SplitRows(list(range(len(convos))), ["s"] * len(convos), np.arange(len(convos)) % 3, convos, weights,
                     [4] * len(convos), [None] * len(convos))  # 0, 1 or 2 copies of each row
    encoder = chat_encoder(tiny_tokenizer, tiny_tokenizer.chat_template)
    jinja = encoder.without_skeletons()  # rows Jinja must render go to worker processes
    assert parallelism(jinja, convos, weights, rows.tools, 2) == ("processes", 2)
    assert parallelism(encoder, convos, weights, rows.tools, 2) == ("threads", 2)
    cfg = ChatConfig(max_length=100, too_long="drop", num_proc=2)
    by_processes = format_split(rows, "train", jinja, cfg, tmp_path / "processes.parquet")
    by_threads = format_split(rows, "train", encoder, cfg, tmp_path / "threads.parquet")
    assert pq.read_table(tmp_path / "processes.parquet").equals(pq.read_table(tmp_path / "threads.parquet"))
    assert by_processes[0].equals(by_threads[0]) and by_processes[1] == by_threads[1]
    assert 0 < len(by_threads[1]) < len(convos) and by_threads[0].num_rows > 0  # some dropped for length, some kept
