"""`sftflow task format --run ID --inspect N`: the formatted rows as text, supervised tokens marked with counts."""

import re

import pyarrow.parquet as pq
import pytest

from flows.cli import main
from tasks.core.config import RunPaths, dump_config, load_config
from tasks.data.clean import clean
from tasks.data.ingest import fingerprint_sources, ingest
from tasks.reporting.report import save_config
from tests.conftest import ROOT

ROW = re.compile(r"--- row (\d+) \((\w+)\): (\d+) tokens, (\d+) supervised\n(.*?)(?=\n--- row |\Z)", re.DOTALL)


@pytest.fixture
def cleaned_run(tiny_model_dir, tmp_path):
    """A run directory with its saved config and clean database, as `sftflow run` leaves them."""
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={tmp_path}", f"train.base_model={tiny_model_dir}"])
    run = RunPaths(tmp_path, "inspect-1")
    save_config.fn(dump_config(cfg), run.config)
    raw_db = ingest.fn(cfg.data, fingerprint_sources.fn(cfg.data), run.sources, run.ingest_db)
    clean.fn(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean)
    return run


def test_inspect_prints_n_rows_with_exactly_the_answer_and_end_of_turn_marked(cleaned_run, capsys):
    assert main(["task", "format", "--run", "inspect-1", "--runs-dir", str(cleaned_run.runs_dir),
                 "--inspect", "3"]) == 0
    shown = ROW.findall(capsys.readouterr().out)
    rows = pq.read_table(cleaned_run.formatted / "train.parquet").slice(0, 3).to_pylist()
    assert len(shown) == 3
    for (row_id, source, n_tokens, n_supervised, text), row in zip(shown, rows):
        assert (int(row_id), source, int(n_tokens), int(n_supervised)) == \
            (row["row_id"], row["source"], row["n_tokens"], row["n_supervised"])
        marked = re.findall(r"\[\[(.*?)\]\]\((\d+)\)", text, re.DOTALL)
        assert marked == [(row["reference"] + "<|im_end|>", n_supervised)]
        assert text.startswith("<|im_start|>system\n") and text.rstrip("\n").endswith(f"]]({n_supervised})")


def test_inspect_with_another_step_is_a_usage_error(cleaned_run, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["task", "train", "--run", "inspect-1", "--runs-dir", str(cleaned_run.runs_dir), "--inspect", "1"])
    assert exit_.value.code == 2 and "--inspect works with the format step only" in capsys.readouterr().err
