"""Benchmark of the data layer: ingest + clean + split of synthetic Alpaca rows, against two pandas baselines.

    python bench/clean.py [--rows 1000000] [--repeats 3] [--seed 0] [--profile]

Writes a seeded JSONL file (about 90% unique rows, 5% exact duplicates after normalisation, 5% near duplicates,
0.5% dirt) to a temporary directory (not timed), then times on all of its rows, --repeats times each, interleaved:
- sftflow: `ingest_rows` + `clean_database` (the split is part of clean), default CleanConfig;
- pandas: bench/pandas_baseline.py with sftflow's own MinHash parameters (16 permutations built once, 8 bands of 2,
  exact Jaccard verification);
- pandas + datasketch: the same pandas rules, near duplicates by datasketch's MinHashLSH as its docs show.
Each side's median and spread (min-max) are printed, and the near-duplicate step's own seconds. The last line printed
is one JSON object: {"rows", "sftflow_s", "pandas_s", "datasketch_s", "speedup", "speedup_datasketch",
"near_speedup", ..., "cpu"}; `speedup` = pandas_s / sftflow_s (medians). Exits 1 when sftflow and the pandas
baseline disagree on a deterministic rule (dirt or exact duplicates).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time
import unicodedata
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")

import duckdb

import tasks.data.clean
from tasks.core.config import CleanConfig, DataConfig
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pandas_baseline import clean_pandas

GOAL_S, GOAL_SPEEDUP = 60.0, 10.0  # per 1M rows on 2 cores
DETERMINISTIC_RULES = ("missing_field", "empty_turn", "too_long", "duplicate")
LETTERS = np.array(list("abcdefghijklmnopqrstuvwxyz"))


# ---------------------------------------------------------------------------------------------------- data
def make_vocab(rng: np.random.Generator, size: int = 20_000) -> list[str]:
    """Return `size` distinct random words of 2-10 letters; about 2% carry a composed é (NFC)."""
    words: dict[str, None] = {}
    while len(words) < size:
        lengths = rng.integers(2, 11, size)
        letters = LETTERS[rng.integers(0, 26, int(lengths.sum()))]
        for w in np.split(letters, np.cumsum(lengths)[:-1]):
            s = "".join(w)
            if rng.random() < 0.02:
                s = s[:-1] + "\u00e9"
            words.setdefault(s, None)
    return list(words)[:size]


def sentence(words: list[str]) -> str:
    """Return the words as one sentence: capitalised, full stop."""
    s = " ".join(words)
    return s[:1].upper() + s[1:] + "."


def generate(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    """Write `rows` seeded Alpaca records to `path` (JSONL); return how many of each kind were written.

    Kinds: unique (~89.5%), exact duplicates of an earlier unique row (5%: verbatim, extra whitespace, or NFD
    unicode, all equal after normalisation), near duplicates (5%: an earlier unique row of >= 50 words with one
    answer word changed, word-3-gram Jaccard >= 0.88) and dirt (0.5%: empty, blank, missing, null or over-long
    answers). 0.3% of unique rows carry a control character, 1% a placeholder input such as "N/A".
    """
    rng = np.random.default_rng(seed)
    vocab = np.array(make_vocab(rng), dtype=object)
    weights = 1.0 / (np.arange(len(vocab)) + 200.0)  # a mild Zipf skew: common words, rare 3-grams
    weights /= weights.sum()

    kind = rng.choice(4, rows, p=[0.895, 0.05, 0.05, 0.005])  # 0 unique, 1 exact dup, 2 near dup, 3 dirt
    kind[:100] = 0
    fresh = (kind == 0) | (kind == 3)
    n_ins = np.where(fresh, rng.integers(15, 41, rows), 0)
    has_inp = fresh & (rng.random(rows) < 0.35)
    n_inp = np.where(has_inp, rng.integers(5, 31, rows), 0)
    dirt = np.where(kind == 3, rng.choice(5, rows, p=[0.3, 0.1, 0.2, 0.1, 0.3]), -1)  # empty blank missing null long
    n_out = np.where(fresh, np.where(dirt == 4, rng.integers(800, 1000, rows), rng.integers(20, 61, rows)), 0)
    brk = np.where(rng.random(rows) < 0.25, rng.integers(5, 15, rows), 0)  # answer paragraph break after word k
    placeholder = np.where(fresh & ~has_inp & (rng.random(rows) < 0.01), rng.integers(0, 3, rows), -1)
    ctrl = (kind == 0) & (rng.random(rows) < 0.003)

    counts = n_ins + n_inp + n_out
    ends = np.cumsum(counts)
    words = vocab[rng.choice(len(vocab), int(ends[-1]), p=weights)].tolist()
    starts = ends - counts

    # Sources of the copies: an earlier unique row (near duplicates: one of at least 50 words).
    uniq = np.flatnonzero(kind == 0)
    long_uniq = uniq[(n_ins + n_inp + n_out)[uniq] >= 50]
    u = rng.random(rows)
    src_exact = uniq[(u * np.searchsorted(uniq, np.arange(rows))).astype(np.int64)]
    src_near = long_uniq[(u * np.searchsorted(long_uniq, np.arange(rows))).astype(np.int64)]
    variant = rng.integers(0, 5, rows)  # exact dups: 0-1 verbatim, 2-3 whitespace, 4 NFD
    change_at = rng.random(rows)
    new_word = rng.integers(0, len(vocab), rows)

    # Plain lists: indexing numpy arrays one element at a time is slow.
    kind_l, starts_l, ends_l, n_ins_l, n_inp_l, n_out_l, brk_l, dirt_l, placeholder_l, ctrl_l = (
        a.tolist() for a in (kind, starts, ends, n_ins, n_inp, n_out, brk, dirt, placeholder, ctrl))
    src_exact_l, src_near_l, variant_l, change_at_l, new_word_l = (
        a.tolist() for a in (src_exact, src_near, variant, change_at, new_word))
    vocab_l = vocab.tolist()
    records: list[dict] = []
    answers: dict[int, list[str]] = {}  # answer words of the unique rows that near duplicates copy

    def answer(out: list[str], b: int) -> str:
        if b and b < len(out) - 3:
            return sentence(out[:b]) + "\n\n" + sentence(out[b:])
        return sentence(out)

    with open(path, "w", encoding="utf-8") as f:
        for i in range(rows):
            k = kind_l[i]
            if k in (0, 3):
                s, a, b = starts_l[i], starts_l[i] + n_ins_l[i], starts_l[i] + n_ins_l[i] + n_inp_l[i]
                out = words[b:ends_l[i]]
                rec = {"instruction": sentence(words[s:a]),
                       "input": " ".join(words[a:b]) if n_inp_l[i] else ("", "N/A", "<noinput>", "none")[
                           placeholder_l[i] + 1],
                       "output": answer(out, brk_l[i])}
                if k == 0 and n_ins_l[i] + n_inp_l[i] + n_out_l[i] >= 50:
                    answers[i] = out
                if ctrl_l[i]:
                    rec["output"] = rec["output"].replace(" ", " \x07", 1)
                if k == 3:
                    d = dirt_l[i]
                    if d == 0:
                        rec["output"] = ""
                    elif d == 1:
                        rec["output"] = "  \n \t"
                    elif d == 2:
                        del rec["output"]
                    elif d == 3:
                        rec["output"] = None
            elif k == 1:
                rec = dict(records[src_exact_l[i]])
                v = variant_l[i]
                if v in (2, 3):
                    rec["instruction"] = "  " + rec["instruction"].replace(" ", "   ", 2) + " \n"
                    rec["output"] = "\n" + rec["output"].replace("\n\n", "  \n\n", 1) + " \n\n"
                elif v == 4:
                    rec = {key: unicodedata.normalize("NFD", val) for key, val in rec.items()}
            else:
                j = src_near_l[i]
                rec = dict(records[j])
                out = list(answers[j])
                pos = int(change_at_l[i] * len(out))
                out[pos] = vocab_l[new_word_l[i]] if vocab_l[new_word_l[i]] != out[pos] else out[pos] + "s"
                rec["output"] = answer(out, brk_l[j])
                if ctrl_l[j]:
                    rec["output"] = rec["output"].replace(" ", " \x07", 1)
            records.append(rec)
            f.write(json.dumps(rec, ensure_ascii=False))
            f.write("\n")
    names = ["unique", "exact_duplicate", "near_duplicate", "dirt"]
    return {names[k]: int(n) for k, n in zip(*np.unique(kind, return_counts=True))}


# ---------------------------------------------------------------------------------------------------- sftflow
NEAR = "near_duplicate_clusters"


class TimedConnection:
    """A DuckDB connection that records the wall time of every execute() under the statement's first words."""

    def __init__(self, con: duckdb.DuckDBPyConnection, log: dict[str, float], scope: list[str]):
        self._con, self._log, self._scope = con, log, scope

    def execute(self, sql: str, *args, **kwargs):
        t = time.perf_counter()
        result = self._con.execute(sql, *args, **kwargs)
        self._log["".join(self._scope) + " ".join(sql.split()[:6])[:60]] += time.perf_counter() - t
        return result

    def __getattr__(self, name):
        return getattr(self._con, name)

    def __enter__(self):
        self._con.__enter__()
        return self

    def __exit__(self, *exc):
        return self._con.__exit__(*exc)


@contextmanager
def instrumented(log: dict[str, float]):
    """Time clean_database's SQL statements and its near-duplicate step (tasks code unchanged, only wrapped).

    Statements run inside near_duplicate_clusters are logged as "near_duplicate_clusters > <statement>".
    """
    real_near, scope = tasks.data.clean.near_duplicate_clusters, []

    def near(*args, **kwargs):
        scope.append(NEAR + " > ")
        t = time.perf_counter()
        try:
            return real_near(*args, **kwargs)
        finally:
            log[NEAR] += time.perf_counter() - t
            scope.pop()

    class Shim:  # the duckdb module, but connect() hands out timed connections
        def __getattr__(self, name):
            return getattr(duckdb, name)

        def connect(self, *a, **k):
            return TimedConnection(duckdb.connect(*a, **k), log, scope)

    with mock.patch.object(tasks.data.clean, "duckdb", Shim()), mock.patch.object(tasks.data.clean, NEAR, near):
        yield


def print_breakdown(log: dict[str, float], clean_s: float) -> None:
    """Print the clean phase's time per statement, near_duplicate_clusters with its own statements nested."""
    top = {k: v for k, v in log.items() if " > " not in k}
    nested = {k.split(" > ", 1)[1]: v for k, v in log.items() if " > " in k}
    for name, s in sorted(top.items(), key=lambda kv: -kv[1]):
        if s >= 0.01 or name == NEAR:
            print(f"    {s:7.2f}  {name}")
        if name == NEAR:
            for sub, t in sorted(nested.items(), key=lambda kv: -kv[1]):
                print(f"    {'':7}  {t:7.2f}  SQL: {sub}")
            rest = s - sum(nested.values())
            print(f"    {'':7}  {rest:7.2f}  word hashes (DuckDB), MinHash, LSH bands, verification, union-find")
    print(f"    {clean_s - sum(top.values()):7.2f}  other (connect, ATTACH, macros, Python)")


def run_sftflow(src: Path, work: Path, log: dict[str, float] | None = None) -> tuple[float, float, dict]:
    """Ingest + clean `src` in `work`; return (ingest seconds, clean seconds, accounting)."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = DataConfig(sources=[{"path": str(src)}])
    t0 = time.perf_counter()
    ingest_rows(cfg, work / "sources", work / "ingest.duckdb")
    t1 = time.perf_counter()
    if log is None:
        counts = clean_database(work / "ingest.duckdb", work / "clean.duckdb", CleanConfig())
    else:
        with instrumented(log):
            counts = clean_database(work / "ingest.duckdb", work / "clean.duckdb", CleanConfig())
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, counts


# ---------------------------------------------------------------------------------------------------- report
def compare(sft: dict, pds: dict) -> list[str]:
    """Print both accountings side by side; return the deterministic rules on which they differ."""
    rules = sorted(set(sft["dropped_by_rule"]) | set(pds["dropped_by_rule"]))
    rows = [("rows_raw", sft["rows_raw"], pds["rows_raw"]), ("rows_clean", sft["rows_clean"], pds["rows_clean"])]
    rows += [(f"  {r}", sft["dropped_by_rule"].get(r, 0), pds["dropped_by_rule"].get(r, 0)) for r in rules]
    rows += [(f"split {s}", sft["split"].get(s, 0), pds["split"].get(s, 0)) for s in ("train", "heldout")]
    print(f"  {'':24} {'sftflow':>10} {'pandas':>10}")
    for name, a, b in rows:
        print(f"  {name:24} {a:>10,} {b:>10,}")
    return [r for r in DETERMINISTIC_RULES if sft["dropped_by_rule"].get(r, 0) != pds["dropped_by_rule"].get(r, 0)]


def median_spread(values: list[float]) -> tuple[float, list[float]]:
    """Return the median and [min, max] of `values`, rounded."""
    return round(statistics.median(values), 2), [round(min(values), 2), round(max(values), 2)]


def timed_repeats(src: Path, tmp: Path, repeats: int) -> dict[str, list]:
    """Time sftflow and both pandas baselines `repeats` times each, interleaved (a load change hits all three);
    return {side: [(seconds, accounting or (ingest_s, clean_s, accounting), phase seconds), ...]}."""
    runs: dict[str, list] = {"sftflow": [], "pandas": [], "datasketch": []}
    for k in range(repeats):
        log: dict[str, float] = defaultdict(float)
        load = os.getloadavg()[0]
        shutil.rmtree(tmp / "sftflow", ignore_errors=True)
        ingest_s, clean_s, sft = run_sftflow(src, tmp / "sftflow", log)
        runs["sftflow"].append({"s": ingest_s + clean_s, "ingest_s": ingest_s, "clean_s": clean_s,
                                "near_s": log[NEAR], "log": dict(log), "counts": sft, "load": load})
        print(f"[{k + 1}/{repeats}] sftflow {ingest_s + clean_s:.2f}s (ingest {ingest_s:.2f}s, clean + split "
              f"{clean_s:.2f}s, of which near duplicates {log[NEAR]:.2f}s); load before {load:.2f}", flush=True)
        for near in ("pandas", "datasketch"):
            load = os.getloadavg()[0]
            t = time.perf_counter()
            counts = clean_pandas(src, near="same" if near == "pandas" else "datasketch")
            seconds = time.perf_counter() - t
            runs[near].append({"s": seconds, "near_s": counts["near_s"], "counts": counts, "load": load})
            print(f"[{k + 1}/{repeats}] {near} {seconds:.2f}s (near duplicates {counts['near_s']:.2f}s); load before "
                  f"{load:.2f}", flush=True)
    return runs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (default 1,000,000)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side (default 3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true",
                    help="after the timed runs, profile a further, untimed sftflow run with cProfile")
    args = ap.parse_args()
    import importlib.util

    if importlib.util.find_spec("datasketch") is None:  # the second baseline's library: fail now, not minutes in
        print("bench/clean.py: the pandas + datasketch baseline needs datasketch: `make bench` installs it, or "
              "`.venv/bin/pip install datasketch`", file=sys.stderr)
        return 2
    from tasks.model.precision import cpu_summary

    print(f"CPU: {cpu_summary()}; load {os.getloadavg()[0]:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sftflow-bench-") as tmp:
        tmp = Path(tmp)
        src = tmp / "bench.jsonl"
        t = time.perf_counter()
        kinds = generate(src, args.rows, args.seed)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t:.1f}s ({src.stat().st_size / 2**20:,.0f} "
              f"MiB, not timed): {kinds}", flush=True)
        runs = timed_repeats(src, tmp, args.repeats)
        print("\nsftflow's clean + split by statement (s), first run:")
        first = runs["sftflow"][0]
        print_breakdown(defaultdict(float, first["log"]), first["clean_s"])
        print(f"\naccounting of all {args.rows:,} rows (near duplicates are MinHash estimates on every side; the other "
              "rules must agree):")
        mismatched = compare(first["counts"], runs["pandas"][0]["counts"])
        sketched = runs["datasketch"][0]["counts"]["dropped_by_rule"].get("near_duplicate", 0)
        print(f"  {'near_duplicate, datasketch':24} {sketched:>21,}")
        if args.profile:
            print("\ncProfile of a further sftflow run (untimed; profiler overhead inflates Python-heavy code):")
            prof = cProfile.Profile()
            prof.runcall(run_sftflow, src, tmp / "sftflow-profile")
            pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
    return report(args, runs, mismatched, cpu_summary())


def report(args, runs: dict[str, list], mismatched: list[str], cpu: str) -> int:
    """Print the medians, spreads, ratios and goals; print the JSON line; return the exit code."""
    result = {"rows": args.rows, "repeats": args.repeats}
    for side, label in (("sftflow", "sftflow"), ("pandas", "pandas"), ("datasketch", "datasketch")):
        result[f"{label}_s"], result[f"{label}_spread_s"] = median_spread([r["s"] for r in runs[side]])
        result[f"{label}_near_s"], _ = median_spread([r["near_s"] for r in runs[side]])
        result[f"{label}_rows_per_s"] = round(args.rows / result[f"{label}_s"])
        result[f"{label}_near_duplicates"] = runs[side][0]["counts"]["dropped_by_rule"].get("near_duplicate", 0)
    result["speedup"] = round(result["pandas_s"] / result["sftflow_s"], 2)
    result["speedup_datasketch"] = round(result["datasketch_s"] / result["sftflow_s"], 2)
    result["near_speedup"] = round(result["pandas_near_s"] / result["sftflow_near_s"], 2)
    result["near_speedup_datasketch"] = round(result["datasketch_near_s"] / result["sftflow_near_s"], 2)
    result.update(ingest_s=median_spread([r["ingest_s"] for r in runs["sftflow"]])[0],
                  clean_s=median_spread([r["clean_s"] for r in runs["sftflow"]])[0],
                  rows_clean=runs["sftflow"][0]["counts"]["rows_clean"], cpu=cpu,
                  load_before=[round(r["load"], 2) for side in runs.values() for r in side])
    goal_s = GOAL_S * args.rows / 1e6
    print(f"\nmedians of {args.repeats} (spread min-max): sftflow {result['sftflow_s']}s {result['sftflow_spread_s']} "
          f"(goal <= {goal_s:.0f}s: {'met' if result['sftflow_s'] <= goal_s else 'NOT met'}); pandas "
          f"{result['pandas_s']}s {result['pandas_spread_s']}: {result['speedup']}x (goal >= {GOAL_SPEEDUP:.0f}x: "
          f"{'met' if result['speedup'] >= GOAL_SPEEDUP else 'NOT met'}); pandas + datasketch "
          f"{result['datasketch_s']}s {result['datasketch_spread_s']}: {result['speedup_datasketch']}x; "
          f"near duplicates alone: sftflow "
          f"{result['sftflow_near_s']}s, pandas {result['pandas_near_s']}s ({result['near_speedup']}x), datasketch "
          f"{result['datasketch_near_s']}s ({result['near_speedup_datasketch']}x); {cpu}")
    if mismatched:
        print(f"MISMATCH between sftflow and pandas on {', '.join(mismatched)}")
    print(json.dumps(result))
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
