"""A straightforward pandas + datasketch implementation of sftflow's clean rules (default CleanConfig, Alpaca rows).

It is the yardstick of bench/clean.py: the code a pandas user would write for the same rules, vectorised where
pandas offers a string method, and one MinHash per row (datasketch) for the near duplicates. The rules follow
tasks/data/ingest.py (prompt = instruction + blank line + input, placeholder inputs dropped) and tasks/data/clean.py, in
its order: missing_field, empty_turn, too_long, duplicate, near_duplicate; then a hash split.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
from datasketch import MinHash, MinHashLSH

CONTROL_CHARS = r"[\x00-\x08\x0B\x0C\x0E-\x1F\x7F]"
WHITESPACE = r"[ \t\n\f\r]+"  # RE2's \s, which DuckDB uses (Python's \s would also match \v and Unicode spaces)
NO_INPUT = {"", "n/a", "none", "not applicable", "<noinput>", "no input"}  # as tasks/data/ingest.py
MAX_CHARS, THRESHOLD, NUM_PERM, HELDOUT = 4000, 0.8, 32, 0.1  # CleanConfig() defaults, dedup.NUM_PERM


def scrub(s: pd.Series) -> pd.Series:
    """NFC-normalise and strip ASCII control characters."""
    return s.str.normalize("NFC").str.replace(CONTROL_CHARS, "", regex=True)


def shingles(text: str) -> set[str]:
    """Word 3-grams of the lowercased, whitespace-collapsed text (one shingle for fewer than three words)."""
    words = " ".join(text.lower().split()).split(" ")
    if len(words) < 3:
        return {" ".join(words)}
    return {" ".join(words[i:i + 3]) for i in range(len(words) - 2)}


def clean_pandas(path: Path, nrows: int | None = None) -> dict:
    """Clean the first `nrows` Alpaca records of a JSONL file; return the row accounting (as clean_database)."""
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

    # Near duplicates: one MinHash per surviving row, in row order; a row close to a kept one is dropped.
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM)
    kept: dict[int, MinHash] = {}
    text = prompt + "\n" + output
    for i in df.index[rule.isna()]:
        m = MinHash(num_perm=NUM_PERM)
        m.update_batch([s.encode("utf-8") for s in shingles(text[i])])
        if any(m.jaccard(kept[j]) >= THRESHOLD for j in lsh.query(m)):
            rule[i] = "near_duplicate"
        else:
            lsh.insert(i, m)
            kept[i] = m

    # Split by content hash: 10% held out.
    clean = key[rule.isna()]
    heldout = clean.map(lambda k: int(hashlib.md5(k.encode("utf-8")).hexdigest(), 16) % 1_000_000
                        < HELDOUT * 1_000_000)
    return {
        "rows_raw": len(df), "rows_clean": len(clean), "rows_quarantined": int(rule.notna().sum()),
        "dropped_by_rule": rule.value_counts().to_dict(),
        "split": {"heldout": int(heldout.sum()), "train": int((~heldout).sum())},
    }
