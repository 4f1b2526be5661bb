"""Sources: datasets.load_dataset paths, several sources with caps and weights, the `source` column kept."""

import duckdb
import pyarrow.parquet as pq
import pytest

from tasks.core.config import ChatConfig, CleanConfig, DataConfig
from tasks.core.errors import InputError
from tasks.data.clean import clean_database
from tasks.data.ingest import ingest_rows
from tasks.formatting.chat_format import format_rows
from tests.conftest import write_jsonl


def test_a_local_dataset_opens_through_datasets_load_dataset(tmp_path):
    folder = tmp_path / "my_dataset"
    write_jsonl(folder / "train.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(5)])
    cfg = DataConfig(sources=[{"hf_dataset": str(folder), "columns": {"instruction": "question", "output": "answer"}}])
    assert ingest_rows(cfg, tmp_path, tmp_path / "i.duckdb") == {"my_dataset": 5}
    with duckdb.connect(str(tmp_path / "i.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT source_file, line_number, messages[2].content FROM raw ORDER BY row_id").fetchall()
    assert rows[0] == (f"hf://{folder}[train]", 1, "a0") and len(rows) == 5


def test_a_dataset_that_cannot_be_loaded_is_one_line(tmp_path):
    with pytest.raises(InputError) as err:
        ingest_rows(DataConfig(sources=[{"hf_dataset": str(tmp_path / "missing")}]), tmp_path, tmp_path / "i.duckdb")
    assert str(err.value).startswith(f"{tmp_path / 'missing'}: datasets.load_dataset failed") and \
        "\n" not in str(err.value)


def test_sources_mix_with_caps_quarantined_and_weights_repeating_training_rows(tiny_model_dir, tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"alpha {i}", "output": f"A{i}"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"instruction": f"beta {i}", "output": f"B{i}"} for i in range(40)])
    cfg = DataConfig(sources=[{"path": str(a), "max_rows": 10}, {"path": str(b), "weight": 2.0, "name": "bee"}])
    ingest_rows(cfg, tmp_path, tmp_path / "i.duckdb")
    counts = clean_database(tmp_path / "i.duckdb", tmp_path / "c.duckdb", CleanConfig(heldout_fraction=0.2))
    assert counts["dropped_by_rule"] == {"source_cap": 30}
    stats = format_rows(tmp_path / "c.duckdb", str(tiny_model_dir), tmp_path / "fmt", ChatConfig())
    with duckdb.connect(str(tmp_path / "c.duckdb"), read_only=True) as con:
        clean_train = dict(con.execute("SELECT source, count(*) FROM clean WHERE split = 'train' "
                                       "GROUP BY 1").fetchall())
    assert stats["train"]["rows_by_source"] == {"a": clean_train["a"], "bee": 2 * clean_train["bee"]}
    heldout = pq.read_table(tmp_path / "fmt" / "heldout.parquet").column("row_id").to_pylist()
    assert len(heldout) == len(set(heldout))  # weights never repeat held-out rows
