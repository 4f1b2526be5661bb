"""Near-duplicate clustering: verified MinHash clusters that do not depend on row order or block boundaries."""

import random

import duckdb
import pytest

from tasks.data import dedup
from tasks.data.dedup import near_duplicate_clusters


@pytest.fixture
def rows_table():
    """300 rows of 30 random words; rows 200-259 repeat rows 0-59 with one word changed, rows 260-299 are short."""
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(5000)]
    texts = [" ".join(rng.choice(vocab) for _ in range(30)) for _ in range(200)]
    for i in range(60):
        words = texts[i].split()
        words[rng.randrange(30)] = "changed"
        texts.append(" ".join(words))
    texts += [f"short {i}" for i in range(40)]  # under three words: no shingles, never near duplicates
    con = duckdb.connect()
    con.execute("CREATE TABLE t AS SELECT unnest(range(300)) AS row_id, 1 AS priority, unnest($t) AS text",
                {"t": texts})
    yield con
    con.close()


def test_each_near_duplicate_points_at_the_row_it_repeats(rows_table):
    reps = near_duplicate_clusters(rows_table, "SELECT * FROM t", 0.8)
    assert reps == {200 + i: i for i in range(60)}


def test_result_is_the_same_in_any_row_order_and_block_size(rows_table, monkeypatch):
    expected = near_duplicate_clusters(rows_table, "SELECT * FROM t ORDER BY row_id", 0.8)
    assert near_duplicate_clusters(rows_table, "SELECT * FROM t ORDER BY hash(row_id)", 0.8) == expected
    monkeypatch.setattr(dedup, "BLOCK_ROWS", 7)  # blocks that cut through the rows
    assert near_duplicate_clusters(rows_table, "SELECT * FROM t ORDER BY row_id DESC", 0.8) == expected


def test_a_lower_priority_row_represents_its_cluster(rows_table):
    rows_table.execute("UPDATE t SET priority = 0 WHERE row_id = 205")  # e.g. a pinned held-out row
    reps = near_duplicate_clusters(rows_table, "SELECT * FROM t", 0.8)
    assert reps[5] == 205 and 205 not in reps
