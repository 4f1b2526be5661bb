r"""A tiktoken encoder that gives exactly a byte-level BPE fast tokenizer's ids, built only when that is proved.

tiktoken's BPE runs about 3x faster than the Hugging Face tokenizer's Rust `encode_batch` here. It differs in three
ways, each closed here before the encoder is used:
1. Its merge priority is the rank of the merged bytes, HF's the rank of the merge (pair). Ranks are taken from the
   merges list (bytes first, then each merge's result in merge order), so a listed pair has the same priority in
   both. An adjacent pair that is not listed but whose bytes form a token ("extra pair") would merge in tiktoken
   only. Each token's own bytes, BPE-encoded alone by HF's model, must give that one token: then no HF run ever holds
   an extra pair (the symbols spanning it would be a state of that lone run, whose last two symbols are the listed
   pair), and tiktoken's shortcut for a piece that is a whole token agrees too.
2. A byte the vocabulary lacks is dropped by HF (its neighbours may then merge) but kept by tiktoken: such a byte
   maps to -1 here, and a text holding one is left to HF (`FastTokenizer.encode_batch` returns None for it).
3. Added tokens are matched before pre-tokenizing in both; the match is the same when none contains another and
   none strips whitespace or needs a whole word.
4. The GPT-2 regex's `\s+(?!\S)` needs a backtracking engine (fancy-regex), which makes tiktoken 2.5x slower than
   the same regex without it (`PLAIN_PATTERN`), run by the regex crate alone. The two split a text alike except at a
   run of 2+ whitespace characters that a non-whitespace character follows: GPT-2's regex leaves the run's last
   character to start the next piece ("  How" -> " ", " How"), the plain one keeps the run whole ("  ", "How").
   (Where A, the alternatives before `\s+(?!\S)`, match, both take A's match; where A fails the character is
   whitespace and not a space before a non-space, and `\s+(?!\S)` gives the whole run if nothing follows it in
   the text, the run but its last character if that is 2+ long and a non-space follows, else fails, leaving `\s+`'s
   whole run.) So the text is cut, by a special token removed from the result (`PIECE_CUT`), before the last
   character of every such run: each part then holds no such run, and GPT-2's regex always ends a piece there and
   never looks past it, so the parts' plain pieces are GPT-2's pieces of the whole. A run that a special token
   follows ends its text for both (tiktoken and HF split at special tokens first) and is not cut; this needs special
   tokens without whitespace, else the GPT-2 regex is used. `\s` is Unicode's White_Space (`WHITE_SPACE`).
The pre-tokenizer must be ByteLevel with the GPT-2 regex (given to tiktoken as is), no normalizer, no dropout, no
byte fallback, no word prefix/suffix. tests/unit/test_fast_tokenizer.py checks the ids on real data, strings chosen
to break it and every code point of planes 0-3; the format step also re-checks a sample of each run
(tasks/formatting/encoding.py).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cache
from itertools import pairwise
from pathlib import Path
from zipfile import BadZipFile

import numpy as np

# joins the rows of one tiktoken call (FastTokenizer.encode_rows); no tokenizer has it, and NULs keep it out of text
ROW_SEPARATOR = "\x00<|sftflow-row-separator|>\x00"
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
PLAIN_PATTERN = GPT2_PATTERN.replace(r"|\s+(?!\S)", "")  # the same without its backtracking: point 4 above
# cuts a text into parts that PLAIN_PATTERN splits as GPT2_PATTERN does (point 4); removed from every result
PIECE_CUT = "\x00<|sftflow-piece-cut|>\x00"
# Unicode's White_Space: what `\s` matches in the regex crate, which both of tiktoken's regex engines use
WHITE_SPACE = (*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F, 0x205F,
               0x3000)


@cache
def byte_of_char() -> dict[str, int]:
    """Return GPT-2's byte-level alphabet: the printable character that stands for each byte, mapped to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = dict(zip(printable, printable))
    for b in range(256):
        if b not in chars:
            chars[b] = 256 + len(chars) - len(printable)
    return {chr(c): b for b, c in chars.items()}


def unprovable(cfg: dict) -> str | None:
    """Return why tiktoken cannot be shown to tokenize like this tokenizer.json (`cfg`), or None if it can."""
    model, pre = cfg.get("model") or {}, cfg.get("pre_tokenizer") or {}
    checks = {
        "it has a normalizer": cfg.get("normalizer") is not None,
        "the pre-tokenizer is not ByteLevel with the GPT-2 regex and no prefix space":
            (pre.get("type"), pre.get("add_prefix_space"), pre.get("use_regex")) != ("ByteLevel", False, True),
        "the model is not BPE": model.get("type") != "BPE",
        "BPE dropout, byte fallback, ignore_merges or a word prefix/suffix is set":
            bool(model.get("dropout") or model.get("byte_fallback") or model.get("ignore_merges")
                 or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix")),
        "truncation or padding is set": bool(cfg.get("truncation") or cfg.get("padding")),
        "an added token strips whitespace, needs a whole word or is empty":
            any(t["lstrip"] or t["rstrip"] or t["single_word"] or not t["content"] for t in cfg["added_tokens"]),
    }
    if why := next((why for why, failed in checks.items() if failed), None):
        return why
    added = [t["content"] for t in cfg["added_tokens"]]
    if any(a != b and a in b for a in added for b in added):
        return "an added token contains another"
    alphabet = byte_of_char()
    if any(c not in alphabet for token in model["vocab"] for c in token if token not in added):
        return "a vocabulary token is not byte-level"
    return None


def merge_ranks(cfg: dict, backend) -> dict[bytes, int] | str:
    """Return tiktoken's ranks (the 256 bytes, then each merge's result in merge order), or why they don't agree
    with HF's merges: a merge of unknown tokens, two merges with one result, or a token whose own bytes HF does not
    encode as itself (see the module docstring)."""
    alphabet, vocab = byte_of_char(), cfg["model"]["vocab"]
    ranks = {bytes([b]): b for b in range(256)}
    for merge in cfg["model"]["merges"]:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        if left not in vocab or right not in vocab or left + right not in vocab:
            return f"the merge {left!r} + {right!r} joins or makes a token outside the vocabulary"
        result = bytes(alphabet[c] for c in left + right)
        if result in ranks:
            return f"two merges make {left + right!r}"
        ranks[result] = len(ranks)
    byte_chars = {b: c for c, b in alphabet.items()}
    for token in ranks:
        chars = "".join(byte_chars[b] for b in token)
        if chars in vocab and [t.id for t in backend.model.tokenize(chars)] != [vocab[chars]]:
            return f"the token {chars!r} is not its own bytes' BPE encoding"
    return ranks


class FastTokenizer:
    """tiktoken with HF's ids: `encode_batch` returns each text's HF ids and token byte offsets (picklable)."""

    def __init__(self, ranks: dict[bytes, int], added: dict[str, int], hf_ids: np.ndarray):
        """`ranks`: tiktoken's, in rank order; `added`: the added tokens' text and HF id; `hf_ids`: the HF id of
        each tiktoken id (`hf_ids_of`)."""
        self.ranks, self.added, self.hf_ids = ranks, added, hf_ids
        self.special = {text: len(ranks) + k for k, text in enumerate(added)}
        self.byte_lengths = np.array([len(t) for t in ranks] + [len(t.encode()) for t in added], dtype=np.int64)
        self.separator_id = len(ranks) + len(added)  # ROW_SEPARATOR's id: tiktoken's only, removed from every result
        self.cut_id = self.separator_id + 1  # PIECE_CUT's, likewise
        # the texts a whitespace run may end at without being cut (point 4): where tiktoken splits the text anyway
        self.split_at = (*added, ROW_SEPARATOR, PIECE_CUT)
        self.cuttable = not any(ord(c) in WHITE_SPACE for text in self.split_at for c in text)
        self._encoding = self._plain = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_encoding": None, "_plain": None}

    @staticmethod
    def hf_ids_of(ranks: dict[bytes, int], added: dict[str, int], vocab: dict[str, int]) -> np.ndarray:
        """Return each tiktoken id's HF id (-1: a byte the vocabulary lacks), from HF's byte-level vocabulary."""
        byte_chars = {b: c for c, b in byte_of_char().items()}
        return np.array([vocab.get("".join(byte_chars[b] for b in t), -1) for t in ranks] + list(added.values()),
                        dtype=np.int32)

    def save(self, path: Path) -> None:
        """Write what the encoder is built from to `path` (an .npz without pickles), atomically."""
        tokens = list(self.ranks)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with tmp.open("wb") as fh:
            np.savez(fh, tokens=np.frombuffer(b"".join(tokens), dtype=np.uint8),
                     lengths=np.array([len(t) for t in tokens], dtype=np.int64), hf_ids=self.hf_ids,
                     added=np.frombuffer(json.dumps(self.added).encode(), dtype=np.uint8))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> FastTokenizer:
        """Return the encoder `save` wrote to `path`."""
        with np.load(path, allow_pickle=False) as saved:
            blob, lengths = saved["tokens"].tobytes(), saved["lengths"]
            hf_ids, added = saved["hf_ids"], json.loads(saved["added"].tobytes())
        bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
        return cls({blob[a:b]: rank for rank, (a, b) in enumerate(pairwise(bounds))}, added, hf_ids)

    @property
    def encoding(self):
        """The tiktoken Encoding with the GPT-2 regex (built on first use, so a worker process builds its own)."""
        if self._encoding is None:
            import tiktoken

            self._encoding = tiktoken.Encoding("sftflow-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=self.ranks,
                                               special_tokens={**self.special, ROW_SEPARATOR: self.separator_id})
        return self._encoding

    @property
    def plain(self):
        """The tiktoken Encoding with PLAIN_PATTERN, for texts cut by `with_cuts` (point 4 of the module docstring)."""
        if self._plain is None:
            import tiktoken

            self._plain = tiktoken.Encoding("sftflow-bpe-plain", pat_str=PLAIN_PATTERN, mergeable_ranks=self.ranks,
                                            special_tokens={**self.special, ROW_SEPARATOR: self.separator_id,
                                                            PIECE_CUT: self.cut_id})
        return self._plain

    def with_cuts(self, text: str) -> str:
        """Return `text` with PIECE_CUT before the last character of each run of 2+ whitespace characters that a
        character other than whitespace or the start of a special token follows (point 4 of the module docstring)."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        white = (codes <= 32) & ((codes == 32) | ((codes >= 9) & (codes <= 13)))  # ASCII's, then the few others
        if (high := np.flatnonzero(codes >= 0x85)).size:
            table = _white_space_table()
            white[high] = table[np.minimum(codes[high], len(table) - 1)]
        at = np.flatnonzero(white[:-2] & white[1:-1] & ~white[2:]) + 1
        if not at.size:
            return text
        cuts = [k for k in at.tolist() if not text.startswith(self.split_at, k + 1)]
        return PIECE_CUT.join([text[a:b] for a, b in pairwise([0, *cuts, len(text)])])

    def encode_rows(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Return the texts' tiktoken ids, all rows in one array, and the row bounds.

        The texts are encoded in one tiktoken call, joined by ROW_SEPARATOR: a special token, so tiktoken encodes
        the text between two of them exactly as it would that text alone, and one call per chunk instead of one per
        row hands the GIL back once (2 threads, GSM8K rows: 12.5k rows/s row by row, 15k joined). The joined text
        is cut (`with_cuts`) and encoded with PLAIN_PATTERN, 2.4x faster than the GPT-2 regex with the same ids
        (point 4 of the module docstring). A text that holds the separator or the cut itself is encoded row by row,
        with the GPT-2 regex."""
        joined = ROW_SEPARATOR.join(texts)
        if texts and joined.count(ROW_SEPARATOR) == len(texts) - 1 and PIECE_CUT not in joined:
            # tiktoken releases the GIL while it encodes
            if self.cuttable:
                tk = self.plain.encode_to_numpy(self.with_cuts(joined), allowed_special={*self.split_at})
            else:
                tk = self.encoding.encode_to_numpy(joined, allowed_special={*self.special, ROW_SEPARATOR})
            dropped = (tk == self.separator_id) | (tk == self.cut_id)
            kept_upto = np.cumsum(~dropped)  # tokens kept up to each one: a separator's is its row's end
            ends = kept_upto[tk == self.separator_id]
            bounds = np.concatenate([[0], ends, [kept_upto[-1] if len(tk) else 0]]).astype(np.int64)
            return tk[~dropped], bounds
        encode = self.encoding.encode_to_numpy
        arrays = [encode(text, allowed_special=set(self.special), disallowed_special=()) for text in texts]
        bounds = np.zeros(len(arrays) + 1, dtype=np.int64)
        np.cumsum([len(x) for x in arrays], out=bounds[1:])
        return (np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint32)), bounds

    def encode_flat(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return the texts' HF ids and token byte starts and ends (within each text), all rows in one array each,
        the row bounds (row r is [bounds[r], bounds[r + 1])) and a bool per row: True where HF must encode it."""
        tk, bounds = self.encode_rows(texts)
        ids, lengths, total = self.hf_ids[tk], self.byte_lengths[tk], np.zeros(len(tk) + 1, dtype=np.int64)
        np.cumsum(lengths, out=total[1:])
        ends = total[1:] - np.repeat(total[bounds[:-1]], np.diff(bounds))  # each row's bytes counted from its start
        bad = np.zeros(len(texts), dtype=bool)
        if ids.size and ids.min() < 0:
            bad[np.searchsorted(bounds, np.flatnonzero(ids < 0), side="right") - 1] = True
        return ids, ends - lengths, ends, bounds, bad

    def encode_batch(self, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray] | None]:
        """Return (HF ids, token byte offsets as (start, end) rows) per text; None for a text HF must encode."""
        ids, starts, ends, bounds, bad = self.encode_flat(texts)
        return [None if bad[r] else (ids[a:b], np.stack([starts[a:b], ends[a:b]], axis=1))
                for r, (a, b) in enumerate(pairwise(bounds))]

@cache
def _white_space_table() -> np.ndarray:
    """Return a bool per code point up to the last White_Space one, and one False for every code point above."""
    table = np.zeros(max(WHITE_SPACE) + 2, dtype=bool)
    table[list(WHITE_SPACE)] = True
    return table


def fast_tokenizer(backend) -> tuple[FastTokenizer | None, str | None]:
    """Return a FastTokenizer giving exactly `backend`'s ids (a `tokenizers.Tokenizer`) and None, or None and why
    that cannot be proved (a normalizer, a non-BPE model, another pre-tokenizer, inconsistent merges, no tiktoken)."""
    try:
        import tiktoken  # noqa: F401
    except ImportError:
        return None, "tiktoken is not installed"
    if getattr(backend, "encode_special_tokens", False):  # set on the object, not in its JSON
        return None, "special tokens are encoded as text"
    text = backend.to_str()
    # the proof (~3 s, most of it HF re-encoding every token) is done once per tokenizer: a file named by the hash
    # of the tokenizer's whole JSON and of this module's source records that it held, with the encoder it built
    proof = proof_file(text)
    if proof.is_file():
        try:
            return FastTokenizer.load(proof), None
        except (OSError, ValueError, KeyError, EOFError, BadZipFile):  # an unreadable record: prove it again
            pass
    cfg = json.loads(text)
    if why := unprovable(cfg):
        return None, why
    ranks = merge_ranks(cfg, backend)
    if isinstance(ranks, str):
        return None, ranks
    added = {t["content"]: t["id"] for t in cfg["added_tokens"]}
    fast = FastTokenizer(ranks, added, FastTokenizer.hf_ids_of(ranks, added, cfg["model"]["vocab"]))
    proof.parent.mkdir(parents=True, exist_ok=True)
    fast.save(proof)
    return fast, None


def proof_file(tokenizer_json: str) -> Path:
    """Return the file that records a proof for this tokenizer JSON by this version of the proof."""
    from tasks.core.settings import cache_root

    digest = hashlib.sha256(tokenizer_json.encode() + Path(__file__).read_bytes()).hexdigest()
    return cache_root() / "tokenizer-proofs" / f"{digest}.npz"
