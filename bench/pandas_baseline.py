"""Two pandas implementations of sftflow's clean rules (default CleanConfig, Alpaca rows): the yardsticks of
bench/clean.py.

Both are the code a pandas user would write for the same rules: vectorised where pandas offers a string method, one
row at a time for the near duplicates. The rules follow tasks/data/ingest.py (prompt = instruction + blank line +
input, placeholder inputs dropped) and tasks/data/clean.py, in its order: missing_field, empty_turn, too_long,
duplicate, near_duplicate; then a hash split. They differ only in the near-duplicate step:

- `near="same"` (the pandas baseline): sftflow's own MinHash parameters (tasks/data/dedup.py): word 3-gram shingles,
  NUM_PERM = 16 permutations h * a + b (mod 2^32) of a 32-bit shingle hash, the permutations built once, LSH with
  BANDS = 8 bands of 2 rows, and every candidate pair verified by the exact Jaccard similarity of the two rows'
  shingle sets (as sftflow verifies). A row close to a row kept before it is dropped.
- `near="datasketch"`: datasketch's own MinHash and MinHashLSH as its documentation shows them: `MinHash.generator`
  (the permutations built once and shared), `MinHashLSH(threshold=0.8, num_perm=16)` (datasketch picks its own
  bands for the threshold: 2 bands of 8 rows), `query` before `insert`, and a candidate counts when the MinHash
  estimate of its Jaccard similarity reaches the threshold (datasketch keeps no shingle sets to verify with).
"""

from __future__ import annotations

import hashlib
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tasks.data.dedup import BANDS, NUM_PERM, PERM_A, PERM_B  # noqa: E402  the same permutations, built once

CONTROL_CHARS = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"
WHITESPACE = r"[ \t\n\f\r]+"  # RE2's \s, which DuckDB uses (Python's \s would also match \v and Unicode spaces)
NO_INPUT = {"", "n/a", "none", "not applicable", "<noinput>", "no input"}  # as tasks/data/ingest.py
MAX_CHARS, THRESHOLD, HELDOUT = 4000, 0.8, 0.1  # CleanConfig() defaults
ROWS_PER_BAND = NUM_PERM // BANDS


def scrub(s: pd.Series) -> pd.Series:
    """NFC-normalise and strip ASCII control characters."""
    return s.str.normalize("NFC").str.replace(CONTROL_CHARS, "", regex=True)


def shingles(text: str) -> set[str]:
    """Word 3-grams of the lowercased, whitespace-collapsed text (one shingle for fewer than three words)."""
    words = " ".join(text.lower().split()).split(" ")
    if len(words) < 3:
        return {" ".join(words)}
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}


def near_same(texts: pd.Series) -> list:
    """Return the index labels of near duplicates, with sftflow's MinHash parameters and exact verification."""
    buckets: list[dict] = [{} for _ in range(BANDS)]
    kept: list[np.ndarray] = []  # each kept row's sorted distinct shingle hashes
    dropped = []
    a, b = PERM_A.astype(np.uint32), PERM_B.astype(np.uint32)
    for label, text in texts.items():
        hashes = np.unique(np.fromiter((zlib.crc32(s.encode("utf-8")) for s in shingles(text)), np.uint32))
        with np.errstate(over="ignore"):
            sig = (hashes[:, None] * a + b).min(axis=0).tolist()
        keys = [(band, sig[band * ROWS_PER_BAND], sig[band * ROWS_PER_BAND + 1]) for band in range(BANDS)]
        candidates = {j for band, key in enumerate(keys) for j in buckets[band].get(key, ())}
        if any(jaccard(hashes, kept[j]) >= THRESHOLD for j in candidates):
            dropped.append(label)
            continue
        for band, key in enumerate(keys):
            buckets[band].setdefault(key, []).append(len(kept))
        kept.append(hashes)
    return dropped


def jaccard(x: np.ndarray, y: np.ndarray) -> float:
    """Return the Jaccard similarity of two sorted arrays of distinct values."""
    common = len(np.intersect1d(x, y, assume_unique=True))
    return common / (len(x) + len(y) - common)


def near_datasketch(texts: pd.Series) -> list:
    """Return the index labels of near duplicates found by datasketch's MinHashLSH, used as its docs show."""
    from datasketch import MinHash, MinHashLSH

    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    kept: dict = {}
    dropped = []
    sets = ([s.encode("utf-8") for s in shingles(text)] for text in texts)
    for label, m in zip(texts.index, MinHash.generator(sets, num_perm=NUM_PERM)):
        if any(m.jaccard(kept[j]) >= THRESHOLD for j in lsh.query(m)):
            dropped.append(label)
        else:
            lsh.insert(label, m)
            kept[label] = m
    return dropped


NEAR = {"same": near_same, "datasketch": near_datasketch}


def clean_pandas(path: Path, nrows: int | None = None, near: str = "same") -> dict:
    """Clean the first `nrows` Alpaca records of a JSONL file; return the row accounting (as clean_database) and
    the seconds of its two phases (`rules_s`: read, normalise, rules, exact duplicates, split; `near_s`)."""
    start = time.perf_counter()
    df = pd.read_json(path, lines=True, nrows=nrows)
    for col in ("instruction", "input", "output"):
        if col not in df:
            df[col] = None
    rule = pd.Series(pd.NA, index=df.index, dtype="object")

    # Ingest: the prompt turn is the instruction plus a non-placeholder input.
    inp = df["input"].fillna("")
    has_input = ~inp.str.strip().str.lower().isin(NO_INPUT)
    prompt = df["instruction"].where(~has_input, df["instruction"] + "\n\n" + inp)

    # Normalise: prompts collapse whitespace; answers lose trailing spaces per line and surrounding blank lines.
    prompt = scrub(prompt).str.replace(WHITESPACE, " ", regex=True).str.strip(" ")
    output = (scrub(df["output"]).str.replace(r"[ \t]+(\r?\n)", r"\1", regex=True)
              .str.replace(r"^([ \t]*\r?\n)+", "", regex=True).str.rstrip(" \t\n\r"))

    # Rules, first match wins.
    rule[df["instruction"].isna() | df["output"].isna()] = "missing_field"
    rule[rule.isna() & ((prompt == "") | (output == ""))] = "empty_turn"
    rule[rule.isna() & (prompt.str.len() + output.str.len() > MAX_CHARS)] = "too_long"
    key = prompt + "\x02" + output
    dup = key[rule.isna()].duplicated(keep="first")
    rule[dup[dup].index] = "duplicate"
    rules_s = time.perf_counter() - start

    # Near duplicates, one surviving row at a time in row order.
    start = time.perf_counter()
    survivors = rule.isna()
    rule[NEAR[near]((prompt + "\n" + output)[survivors])] = "near_duplicate"
    near_s = time.perf_counter() - start

    # Split by content hash: 10% held out.
    start = time.perf_counter()
    clean = key[rule.isna()]
    heldout = clean.map(lambda k: int(hashlib.md5(k.encode("utf-8")).hexdigest(), 16) % 1_000_000
                        < HELDOUT * 1_000_000)
    return {
        "rows_raw": len(df), "rows_clean": len(clean), "rows_quarantined": int(rule.notna().sum()),
        "dropped_by_rule": rule.value_counts().to_dict(),
        "split": {"heldout": int(heldout.sum()), "train": int((~heldout).sum())},
        "rules_s": rules_s + time.perf_counter() - start, "near_s": near_s,
    }
