"""Shared fixtures: hermetic environment, a tiny random llama with the real SmolLM2 tokenizer, helper writers."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from tasks.core.settings import apply_defaults

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"

# sftflow's own environment (tasks/core/settings.py), with its state in a throwaway home rather than the project's
# .sftflow, and the Hub forbidden: tests are hermetic. Set before anything imports Prefect.
os.environ["SFTFLOW_HOME"] = tempfile.mkdtemp(prefix="sftflow-tests-")
os.environ.pop("PREFECT_HOME", None)
os.environ["HF_HUB_OFFLINE"] = "1"
apply_defaults()


def compute_dtype():
    """Return the torch dtype training and evaluation compute in when train.compute_dtype is auto: the one
    SFTFLOW_COMPUTE_DTYPE forces (`make test` runs the model tests in both), else this machine's native one."""
    from tasks.model.modeling import model_precision

    return model_precision("auto").torch_dtype


def tolerance(dtype) -> tuple[float, float]:
    """Return (rtol, atol) for two computations of one value in `dtype` that differ only in the order of their
    arithmetic (lean vs full loss, resumed vs uninterrupted run, packed vs alone, batched vs one row at a time).

    Each result carries a few roundings of the dtype it is stored in. bf16 keeps 8 significant bits: one rounding is
    up to 2^-8 = 0.0039 of the value, so rtol is 4 of them, 1.6% (torch.testing's own bf16 default); its sums
    accumulate in fp32, so the roundings of the result dominate (lean vs full gradients: 0.75% of their scale apart on a
    2-core EPYC, one rounding). fp32 keeps 24 bits (2^-24 = 6e-8), and there the long sums dominate instead (a LoRA
    gradient element sums over every token): the same gradients were 1e-6 apart, so rtol is 1e-5, not 4 roundings.
    atol is the same fraction of the compared values' scale (`assert_same_value`): an element near zero is a sum of
    cancelling terms, and carries their rounding, not a rounding of its own small value.
    """
    import torch

    unit_roundoff = torch.finfo(dtype).eps / 2  # torch's eps is the gap above 1.0: two unit roundoffs
    rtol = max(4 * unit_roundoff, 1e-5)
    return rtol, rtol


def assert_same_value(actual, expected, dtype) -> None:
    """Assert that two computations of a tensor in `dtype` agree within `tolerance(dtype)`, atol scaled by the size
    of `expected`'s largest element."""
    import torch

    rtol, atol = tolerance(dtype)
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random llama (hidden 64) saved with the SmolLM2 tokenizer and chat template
    (tasks/model/tiny_model.py)."""
    from tasks.model.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    """Write rows (dicts, or raw strings written verbatim) as JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def formatted_run(runs: Path, base_model_dir: Path, run_id: str = "run-a"):
    """Return (config, RunPaths) of a run of configs/tiny.yaml in `runs` taken up to its formatted rows, laid out as
    the flow lays it out (train.base_model = `base_model_dir`)."""
    from tasks.core.config import RunPaths, dump_config, load_config
    from tasks.data.clean import clean
    from tasks.data.ingest import fingerprint_sources, ingest
    from tasks.formatting.chat_format import format_chats
    from tasks.reporting.report import save_config

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={runs}", f"train.base_model={base_model_dir}"])
    run = RunPaths(runs, run_id)
    save_config.fn(dump_config(cfg), run.config)
    raw_db = ingest.fn(cfg.data, fingerprint_sources.fn(cfg.data), run.sources, run.ingest_db)
    clean_db = clean.fn(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean)
    format_chats.fn(clean_db, str(base_model_dir), run.formatted, cfg.chat)
    return cfg, run
