"""Near-duplicate detection: MinHash over word 3-gram shingles with LSH banding, verified by exact Jaccard.

Words are hashed in DuckDB; shingle hashes, MinHash signatures and LSH buckets are vectorised numpy over all rows
at once. LSH only proposes candidate pairs; a pair joins one cluster only if the exact Jaccard similarity of the
two rows' shingle sets reaches the threshold, so MinHash noise never merges rows on its own.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np

# Bands of 2 rows (one uint64 key each): pairs from ~0.5 Jaccard up become candidates, then are verified exactly.
NUM_PERM, BANDS = 16, 8
SMALL_BUCKET = 64  # buckets up to this size compare all their pairs; larger ones only signature neighbours

# Per row, the hash of each word of the lower-cased text (any whitespace separates words).
WORD_HASHES_SQL = """
SELECT row_id, priority, list_transform(
    list_filter(string_split(replace(replace(lower(text), chr(10), ' '), chr(9), ' '), ' '), lambda w: w <> ''),
    lambda w: hash(w)) AS words
FROM {table} ORDER BY row_id
"""


def shingle_hashes(words) -> tuple[np.ndarray, np.ndarray]:
    """Return (row index of each shingle, shingle hash) for word 3-grams, in row order.

    Rows of fewer than three words have no shingle: they take part in exact deduplication only.
    """
    offsets = np.asarray(words.offsets, dtype=np.int64)
    flat = np.asarray(words.values, dtype=np.uint64)
    counts = np.maximum(np.diff(offsets) - 2, 0)  # 3-grams per row
    if len(flat) < 3 or not counts.any():
        return np.empty(0, np.int64), np.empty(0, np.uint64)
    with np.errstate(over="ignore"):
        tri = flat[:-2] * np.uint64(0x9E3779B97F4A7C15) + flat[1:-1] * np.uint64(0xC2B2AE3D27D4EB4F) + flat[2:]
    valid = np.ones(len(tri), dtype=bool)  # a 3-gram may not run past its row's last word
    ends = offsets[1:][offsets[1:] >= 2]
    valid[ends[ends - 1 < len(tri)] - 1] = False
    valid[ends[ends - 2 < len(tri)] - 2] = False
    return np.repeat(np.arange(len(counts)), counts), tri[valid]


def minhash_signatures(rows: np.ndarray, hashes: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return (row indices that have shingles, NUM_PERM MinHash values per such row) from row-sorted shingles."""
    present, starts = np.unique(rows, return_index=True)
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)
    h32 = (hashes >> np.uint64(32)).astype(np.uint32) ^ hashes.astype(np.uint32)
    sig = np.empty((len(present), NUM_PERM), dtype=np.uint32)

    def column(k: int) -> None:  # numpy releases the GIL on big arrays: two threads use both cores
        sig[:, k] = np.minimum.reduceat(h32 * a[k] + b[k], starts)

    with np.errstate(over="ignore"), ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(column, range(NUM_PERM)))
    return present, sig


def bucket_pairs(order: np.ndarray, first: np.ndarray) -> list[np.ndarray]:
    """Return the pairs of one band's buckets: all pairs in buckets of up to SMALL_BUCKET rows, else a chain."""
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, len(order)))
    previous = np.r_[order[:1], order[:-1]]
    pairs = [np.stack([previous[~first], order[~first]], axis=1)]  # neighbours (chain) in every bucket
    for start, size in zip(starts[(sizes > 2) & (sizes <= SMALL_BUCKET)], sizes[(sizes > 2) & (sizes <= SMALL_BUCKET)]):
        members = order[start:start + size]
        i, j = np.triu_indices(size, k=2)  # k=1 pairs are already in the chain
        pairs.append(np.stack([members[i], members[j]], axis=1))
    return pairs


def candidate_pairs(sig: np.ndarray) -> np.ndarray:
    """Return index pairs (i < j) of rows that share an LSH band.

    Within a band's bucket rows are ordered by the next band's key, so in a large bucket of loosely similar rows
    (shared boilerplate) rows that also share the next band are neighbours in the chain.
    """
    keys = [sig[:, 2 * b].astype(np.uint64) << np.uint64(32) | sig[:, 2 * b + 1] for b in range(BANDS)]  # 2 per band
    pairs = [np.empty((0, 2), dtype=np.int64)]
    for band in range(BANDS):
        by_next = np.argsort(keys[(band + 1) % BANDS], kind="stable")
        order = by_next[np.argsort(keys[band][by_next], kind="stable")]
        pairs += bucket_pairs(order, np.r_[True, keys[band][order][1:] != keys[band][order][:-1]])
    return np.unique(np.sort(np.concatenate(pairs), axis=1), axis=0)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Return the exact Jaccard similarity of two sets of shingle hashes."""
    a, b = np.unique(a), np.unique(b)
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def cluster_representatives(pairs: np.ndarray, rows: np.ndarray, hashes: np.ndarray, ids: np.ndarray,
                            priority: np.ndarray, threshold: float) -> dict[int, int]:
    """Union verified pairs of row indices; return {row_id: representative row_id} (lowest priority, then id)."""
    parent: dict[int, int] = {}
    members = np.unique(pairs)
    span = dict(zip(members.tolist(), zip(np.searchsorted(rows, members).tolist(),
                                          np.searchsorted(rows, members + 1).tolist())))

    def shingles(i: int) -> np.ndarray:
        return hashes[span[i][0]:span[i][1]]

    def find(i: int) -> int:
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        if jaccard(shingles(i), shingles(j)) >= threshold:
            ri, rj = find(i), find(j)
            if ri != rj:
                keep, drop = sorted((ri, rj), key=lambda r: (priority[r], ids[r]))
                parent[drop] = keep
    return {int(ids[i]): int(ids[find(i)]) for i in list(parent) if find(i) != i}


def near_duplicate_clusters(con: duckdb.DuckDBPyConnection, table: str, threshold: float) -> dict[int, int]:
    """Return {row_id: representative row_id} for rows of `table` (row_id, text, priority) with a near duplicate."""
    words = con.sql(WORD_HASHES_SQL.format(table=table)).to_arrow_table()  # table: an internal name
    rows, hashes = shingle_hashes(words.column("words").combine_chunks())
    if len(hashes) == 0:
        return {}
    present, sig = minhash_signatures(rows, hashes)
    pairs = present[candidate_pairs(sig)]  # signature positions -> row indices
    return cluster_representatives(pairs, rows, hashes, words.column("row_id").to_numpy(),
                                   words.column("priority").to_numpy(), threshold)
