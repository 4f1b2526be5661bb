"""Near-duplicate detection: MinHash over word 3-gram shingles with LSH banding.

Shingles are hashed in DuckDB; the MinHash signatures are computed with vectorised numpy (one pass per hash
function over all shingles), candidate pairs come from LSH bands, and each candidate is verified against the
estimated Jaccard similarity before two rows are joined into one cluster.
"""

from __future__ import annotations

import duckdb
import numpy as np

NUM_PERM, BANDS = 32, 8  # 8 bands of 4 rows: pairs from ~0.6 Jaccard up become candidates, then are verified

# One row per (row, shingle hash); rows of fewer than three words hash as a single shingle.
SHINGLES_SQL = """
SELECT row_id, unnest(CASE WHEN len(w) < 3 THEN [hash(array_to_string(w, ' '))]
       ELSE list_transform(range(1, len(w) - 1), lambda i: hash(array_to_string(w[i:i + 2], ' '))) END) AS h
FROM (SELECT row_id, string_split(trim(regexp_replace(lower(text), '\\s+', ' ', 'g')), ' ') AS w FROM {table})
ORDER BY row_id
"""


def minhash_signatures(row_ids: np.ndarray, hashes: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (unique row ids, NUM_PERM MinHash values per row) from row-sorted (row_id, shingle hash) pairs."""
    ids, starts = np.unique(row_ids, return_index=True)
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**63, NUM_PERM, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 2**63, NUM_PERM, dtype=np.uint64)
    sig = np.empty((len(ids), NUM_PERM), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(NUM_PERM):  # universal hashing mod 2^64, a fresh permutation per column
            sig[:, k] = np.minimum.reduceat(hashes * a[k] + b[k], starts)
    return ids, sig


def candidate_pairs(sig: np.ndarray) -> np.ndarray:
    """Return index pairs (i, j) of rows that share at least one LSH band (each paired with its bucket's first)."""
    rows = NUM_PERM // BANDS
    mix = np.random.default_rng(1).integers(1, 2**63, rows, dtype=np.uint64) | np.uint64(1)
    pairs = []
    with np.errstate(over="ignore"):
        for band in range(BANDS):
            keys = (sig[:, band * rows:(band + 1) * rows] * mix).sum(axis=1)
            order = np.argsort(keys, kind="stable")
            sorted_keys = keys[order]
            first = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
            leader = order[np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))]
            pairs.append(np.stack([leader[~first], order[~first]], axis=1))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.empty((0, 2), dtype=np.int64)


def cluster_representatives(ids: np.ndarray, sig: np.ndarray, priority: np.ndarray, threshold: float) -> np.ndarray:
    """Return, per row, the id of its cluster's representative (lowest priority value, then lowest id)."""
    parent = np.arange(len(ids))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in candidate_pairs(sig):
        if (sig[i] == sig[j]).mean() >= threshold:
            ri, rj = find(i), find(j)
            if ri != rj:
                keep, drop = sorted((ri, rj), key=lambda r: (priority[r], ids[r]))
                parent[drop] = keep
    return ids[[find(i) for i in range(len(ids))]]


def near_duplicate_clusters(con: duckdb.DuckDBPyConnection, table: str, threshold: float) -> dict[int, int]:
    """Return {row_id: representative row_id} for rows of `table` (row_id, text, priority) with a near duplicate."""
    pairs = con.execute(SHINGLES_SQL.format(table=table)).fetchnumpy()  # table is an internal name, not user input
    if len(pairs["row_id"]) == 0:
        return {}
    ids, sig = minhash_signatures(np.asarray(pairs["row_id"]), np.asarray(pairs["h"], dtype=np.uint64))
    prio = dict(con.execute(f"SELECT row_id, priority FROM {table}").fetchall())
    reps = cluster_representatives(ids, sig, np.array([prio[i] for i in ids]), threshold)
    return {int(i): int(r) for i, r in zip(ids, reps) if i != r}
