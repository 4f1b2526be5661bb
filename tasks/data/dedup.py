"""Near-duplicate detection: MinHash over word 3-gram shingles with LSH banding, verified by exact Jaccard.

Words are hashed in DuckDB. Shingle hashes and MinHash signatures are vectorised numpy over blocks of rows small
enough to stay in the CPU cache, on several threads (numpy releases the GIL); LSH buckets are sorted per band. LSH only
proposes candidate pairs: a pair joins one cluster only if the exact Jaccard similarity of the two rows' shingle
sets reaches the threshold, so MinHash noise never merges rows on its own.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import duckdb
import numpy as np
import pyarrow as pa

# Bands of 2 rows (one uint64 key each): pairs from ~0.5 Jaccard up become candidates, then are verified exactly.
NUM_PERM, BANDS = 16, 8
SMALL_BUCKET = 64  # buckets up to this size compare all their pairs; larger ones only signature neighbours
BLOCK_ROWS = 8192  # rows per numpy block: a block's shingles (~2 MB) stay in the CPU cache for all permutations
THREADS = min(8, os.cpu_count() or 2)  # numpy releases the GIL: blocks and bands run in parallel threads

_rng = np.random.default_rng(0)
PERM_A = _rng.integers(1, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
PERM_B = _rng.integers(0, 2**32, NUM_PERM, dtype=np.uint64).astype(np.uint32)
MIX_1, MIX_2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)

# Per row, the hash of each word of the lower-cased text (spaces, tabs and line feeds separate words).
# `rows` is a query with columns row_id, priority, text.
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


def bucket_pairs(order: np.ndarray, first: np.ndarray, next_key: np.ndarray) -> list[np.ndarray]:
    """Return the pairs of one band's buckets (`order` grouped by bucket, `first` marking each bucket's start).

    Buckets of up to SMALL_BUCKET rows give all their pairs. A larger bucket (loosely similar rows sharing
    boilerplate) gives a chain of neighbours, ordered by the next band's key so that rows sharing that band too are
    neighbours; ties by row, so the result never depends on how the sort ordered equal keys.
    """
    starts = np.flatnonzero(first)
    sizes = np.diff(np.append(starts, len(order)))
    pairs = [np.stack([order[starts[sizes == 2]], order[starts[sizes == 2] + 1]], axis=1)]
    for start, size in zip(starts[sizes > 2].tolist(), sizes[sizes > 2].tolist()):
        members = order[start:start + size]
        if size <= SMALL_BUCKET:
            i, j = np.triu_indices(size, k=1)
        else:
            members = members[np.lexsort((members, next_key[members]))]
            i, j = np.arange(size - 1), np.arange(1, size)
        pairs.append(np.stack([members[i], members[j]], axis=1))
    return pairs


def candidate_pairs(sig: np.ndarray) -> np.ndarray:
    """Return the distinct index pairs (i < j) of rows that share an LSH band (see bucket_pairs)."""
    keys = [sig[:, 2 * b].astype(np.uint64) << np.uint64(32) | sig[:, 2 * b + 1] for b in range(BANDS)]  # 2 per band

    def band_pairs(band: int) -> list[np.ndarray]:
        order = np.argsort(keys[band])  # buckets = runs of equal keys
        ordered = keys[band][order]
        return bucket_pairs(order, np.r_[True, ordered[1:] != ordered[:-1]], keys[(band + 1) % BANDS])

    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        pairs = np.concatenate([np.empty((0, 2), dtype=np.int64)]
                               + [p for ps in pool.map(band_pairs, range(BANDS)) for p in ps])
    low, high = pairs.min(axis=1), pairs.max(axis=1)
    distinct = np.unique(low * len(sig) + high)
    return np.stack([distinct // len(sig), distinct % len(sig)], axis=1)


def verified_pairs(pairs: np.ndarray, results: list, threshold: float) -> np.ndarray:
    """Return the candidate pairs (row indices) whose shingle sets have a Jaccard similarity >= threshold.

    Vectorised: every member row's distinct shingles are sorted once under a (member, hash) key; each pair then
    looks its second row's shingles up among its first row's with one searchsorted over all pairs.
    """
    if len(pairs) == 0:
        return pairs
    members = np.unique(pairs)
    values, offsets = gather_shingles(members, results)
    member = np.repeat(np.arange(len(members), dtype=np.uint64), np.diff(offsets))
    keys = np.sort(member << np.uint64(32) | values.astype(np.uint64))
    distinct = np.r_[True, keys[1:] != keys[:-1]]
    sizes = np.add.reduceat(distinct.astype(np.int64), offsets[:-1])  # every member has shingles
    keys = keys[distinct]
    starts = np.cumsum(sizes) - sizes
    a, b = np.searchsorted(members, pairs[:, 0]), np.searchsorted(members, pairs[:, 1])
    n = sizes[b]  # one query per distinct shingle of the second row: is it among the first row's?
    query_starts = np.cumsum(n) - n
    taken = np.repeat(starts[b] - query_starts, n) + np.arange(n.sum())
    queries = np.repeat(a.astype(np.uint64), n) << np.uint64(32) | keys[taken] & np.uint64(0xFFFFFFFF)
    found = keys[np.minimum(np.searchsorted(keys, queries), len(keys) - 1)] == queries
    common = np.add.reduceat(found.astype(np.int64), query_starts)
    return pairs[common / (sizes[a] + sizes[b] - common) >= threshold]


def gather_shingles(rows: np.ndarray, results: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Return (shingle hashes of sorted `rows`, one after another; offsets) from the per-block results."""
    values, lengths, first_row = [], [], 0
    for counts, hashes, _ in results:
        block_rows = rows[(rows >= first_row) & (rows < first_row + len(counts))] - first_row
        n = counts[block_rows]
        starts = np.cumsum(counts)[block_rows] - n
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)  # 0, 1, ... within each row
        values.append(hashes[np.repeat(starts, n) + within])
        lengths.append(n)
        first_row += len(counts)
    return np.concatenate(values), np.concatenate(([0], np.cumsum(np.concatenate(lengths))))


def cluster_representatives(pairs: np.ndarray, ids: np.ndarray, priority: np.ndarray) -> dict[int, int]:
    """Union the pairs of row indices into clusters; return {row_id: representative row_id} for every row of a
    cluster but its representative (lowest priority, then lowest id)."""
    rank = np.empty(len(ids), dtype=np.int64)
    rank[np.lexsort((ids, priority))] = np.arange(len(ids))
    rank_of = rank.tolist()
    parent: dict[int, int] = {}

    def find(i: int) -> int:
        while parent.get(i, i) != i:
            parent[i] = parent.get(parent[i], parent[i])
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            if rank_of[ri] < rank_of[rj]:
                parent[rj] = ri
            else:
                parent[ri] = rj
    return {int(ids[i]): int(ids[find(i)]) for i in list(parent) if find(i) != i}


def near_duplicate_clusters(con: duckdb.DuckDBPyConnection, rows: str, threshold: float) -> dict[int, int]:
    """Return {row_id: representative row_id} for the rows of query `rows` (row_id, priority, text) that have a near
    duplicate. The result does not depend on the order in which the query returns its rows."""
    table = con.sql(WORD_HASHES_SQL.format(rows=rows)).to_arrow_table()  # rows: an internal query
    ids, priority = table.column("row_id").to_numpy(), table.column("priority").to_numpy()
    with ThreadPoolExecutor(max_workers=THREADS) as pool:
        results = list(pool.map(lambda block: block_signatures(*block), blocks(table.column("words"))))
    if not any(len(sig) for _, _, sig in results):
        return {}
    sig = np.concatenate([s for _, _, s in results])
    present = np.flatnonzero(np.concatenate([c for c, _, _ in results]) > 0)  # row index of each signature
    if np.any(np.diff(ids[present]) < 0):  # signatures in row_id order: the result is order-independent
        by_id = np.argsort(ids[present], kind="stable")
        present, sig = present[by_id], sig[by_id]
    pairs = present[candidate_pairs(sig)]  # signature positions -> row indices
    return cluster_representatives(verified_pairs(pairs, results, threshold), ids, priority)
