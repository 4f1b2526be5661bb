"""Near-duplicate detection: MinHash over word 3-gram shingles with LSH banding, verified by exact Jaccard.

Words are hashed in DuckDB. Shingle hashes and MinHash signatures are vectorised numpy over blocks of rows small
enough to stay in the CPU cache, on two threads (numpy releases the GIL); LSH buckets are sorted per band. LSH only
proposes candidate pairs: a pair joins one cluster only if the exact Jaccard similarity of the two rows' shingle
sets reaches the threshold, so MinHash noise never merges rows on its own.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa

# Bands of 2 rows (one uint64 key each): pairs from ~0.5 Jaccard up become candidates, then are verified exactly.
NUM_PERM, BANDS = 16, 8
SMALL_BUCKET = 64  # buckets up to this size compare all their pairs; larger ones only signature neighbours
BLOCK_ROWS = 8192  # rows per numpy block: a block's shingles (~2 MB) stay in the CPU cache for all permutations
THREADS = 2

_rng = np.random.default_rng(0)
PERM_A = _rng.integers(1, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
PERM_B = _rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)
MIX_1, MIX_2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)

# Per row, the hash of each word of the lower-cased text (any whitespace separates words). `rows` is a query with
# columns row_id, priority, text.
WORD_HASHES_SQL = """
SELECT row_id, priority, list_transform(
    list_filter(string_split(replace(replace(lower(text), chr(10), ' '), chr(9), ' '), ' '), lambda w: w <> ''),
    lambda w: hash(w)) AS words
FROM ({rows})
"""


def shingle_hashes(offsets: np.ndarray, words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (3-grams per row, 32-bit 3-gram hashes in row order) for rows given as word-hash list offsets.

    Rows of fewer than three words have no shingle: they take part in exact deduplication only.
    """
    counts = np.maximum(np.diff(offsets) - 2, 0)
    if len(words) < 3 or not counts.any():
        return counts, np.empty(0, np.uint32)
    with np.errstate(over="ignore"):
        tri = words[:-2] * MIX_1 + words[1:-1] * MIX_2 + words[2:]
    valid = np.ones(len(tri), dtype=bool)  # a 3-gram may not run past its row's last word
    ends = offsets[1:][offsets[1:] >= 2]
    valid[ends[ends - 1 < len(tri)] - 1] = False
    valid[ends[ends - 2 < len(tri)] - 2] = False
    tri = tri[valid]
    return counts, (tri >> np.uint64(32)).astype(np.uint32) ^ tri.astype(np.uint32)


def block_signatures(offsets: np.ndarray, words: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (shingles per row, shingle hashes, NUM_PERM MinHash values per row that has shingles) for one block."""
    counts, hashes = shingle_hashes(offsets, words)
    starts = (np.cumsum(counts) - counts)[counts > 0]
    sig = np.empty((len(starts), NUM_PERM), dtype=np.uint32)
    if len(starts):
        with np.errstate(over="ignore"):
            for k in range(NUM_PERM):  # h * a + b (mod 2^32, a odd): a permutation of the 32-bit hashes
                sig[:, k] = np.minimum.reduceat(hashes * PERM_A[k] + PERM_B[k], starts)
    return counts, hashes, sig


def blocks(words: pa.ChunkedArray):
    """Yield (offsets from 0, word hashes) for each block of up to BLOCK_ROWS rows of a list<uint64> column."""
    for chunk in words.chunks:
        offsets = np.asarray(chunk.offsets, dtype=np.int64)
        values = np.asarray(chunk.values, dtype=np.uint64)
        for start in range(0, len(chunk), BLOCK_ROWS):
            o = offsets[start:start + BLOCK_ROWS + 1]
            yield o - o[0], values[o[0]:o[-1]]


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

    def band_pairs(band: int) -> list[np.ndarray]:
        order = np.lexsort((keys[(band + 1) % BANDS], keys[band]))
        ordered = keys[band][order]
        return bucket_pairs(order, np.r_[True, ordered[1:] != ordered[:-1]])

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        pairs = [np.empty((0, 2), dtype=np.int64)] + [p for ps in pool.map(band_pairs, range(BANDS)) for p in ps]
    return np.unique(np.sort(np.concatenate(pairs), axis=1), axis=0)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """Return the exact Jaccard similarity of two sets of shingle hashes."""
    a, b = np.unique(a), np.unique(b)
    inter = len(np.intersect1d(a, b, assume_unique=True))
    return inter / (len(a) + len(b) - inter)


def cluster_representatives(pairs: np.ndarray, shingles, ids: np.ndarray, priority: np.ndarray,
                            threshold: float) -> dict[int, int]:
    """Union verified pairs of row indices; return {row_id: representative row_id} (lowest priority, then id).

    `shingles(i)` returns row i's shingle hashes.
    """
    parent: dict[int, int] = {}

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


def near_duplicate_clusters(con: duckdb.DuckDBPyConnection, rows: str, threshold: float) -> dict[int, int]:
    """Return {row_id: representative row_id} for the rows of query `rows` (row_id, priority, text) that have a near
    duplicate. The result does not depend on the order in which the query returns its rows."""
    table = con.sql(WORD_HASHES_SQL.format(rows=rows)).to_arrow_table()  # rows: an internal query
    ids, priority = table.column("row_id").to_numpy(), table.column("priority").to_numpy()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda block: block_signatures(*block), blocks(table.column("words"))))
    counts = np.concatenate([r[0] for r in results]) if results else np.empty(0, np.int64)
    hashes = np.concatenate([r[1] for r in results]) if results else np.empty(0, np.uint32)
    if len(hashes) == 0:
        return {}
    sig = np.concatenate([r[2] for r in results])
    present = np.flatnonzero(counts > 0)  # row index of each signature
    by_id = np.argsort(ids[present], kind="stable")  # signatures in row_id order: the result is order-independent
    present, sig = present[by_id], sig[by_id]
    ends = np.cumsum(counts)
    pairs = present[candidate_pairs(sig)]  # signature positions -> row indices

    def shingles(i: int) -> np.ndarray:
        return hashes[ends[i] - counts[i]:ends[i]]

    return cluster_representatives(pairs, shingles, ids, priority, threshold)
