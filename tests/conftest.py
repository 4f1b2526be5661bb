"""Shared fixtures: hermetic environment, a tiny random llama with the real SmolLM2 tokenizer, helper writers."""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tasks.core.common import collect_garbage_less_often
from tasks.core.settings import apply_defaults

collect_garbage_less_often()  # as in sftflow's own processes, before the tests' imports

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SFTFLOW_TEST_DATA") or ROOT.parent / "shared" / "data")


def shared_data(name: str) -> Path:
    """Return the real data set `name` from SHARED_DATA (GSM8K, the Alpaca demo), or fail the test in one line saying
    where it is looked for: beside the clone in ../shared/data, or in the folder SFTFLOW_TEST_DATA names."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: this test reads the real data sets in ../shared/data; clone sftflow beside "
                    "shared/ or set SFTFLOW_TEST_DATA to the folder that holds them", pytrace=False)
    return path

# sftflow's own environment (tasks/core/settings.py), with its state in a throwaway home rather than the project's
# .sftflow, and the Hub forbidden: tests are hermetic. Set before anything imports Prefect.
os.environ["SFTFLOW_HOME"] = TEST_HOME = tempfile.mkdtemp(prefix="sftflow-tests-")
atexit.register(shutil.rmtree, TEST_HOME, ignore_errors=True)  # each pytest process removes the home it made
os.environ.pop("PREFECT_HOME", None)
os.environ["HF_HUB_OFFLINE"] = "1"
apply_defaults()


# The files that take longest (seconds of their tests in `make test`, three workers on a 2-core AMD EPYC with
# AVX512-BF16, 2026-12-03), longest first. pytest-xdist hands whole files to its workers (`--dist loadfile`) in the
# collected order (`--no-loadscope-reorder` in pyproject.toml; by default it would hand them out by their number of
# tests), each worker taking the next file as it starts the second-last test of its current one. A long file started
# last leaves the other workers idle while one ends it (with xdist's own order, 2.5 minutes of one worker alone at the
# end): these start first, in this order. A file missing here only starts later; keep the list in step with the
# slowest files (`pytest --durations`).
LONGEST_FILES = (
    "scale_out/test_placement.py", "flows/test_cli.py", "flows/test_concurrency.py", "flows/test_portable_model.py",
    "model/test_resume.py", "server/test_deployment.py", "server/test_openai_serve.py", "scale_out/test_machines.py",
    "flows/test_remote_tracking.py", "flows/test_until.py", "flows/test_orchestration.py", "flows/test_registry.py",
    "flows/test_faults.py", "model/test_methods.py", "unit/test_base_model.py", "model/test_distributed.py",
    "model/test_evaluate.py", "flows/test_temporary_server.py", "model/test_qlora.py", "unit/test_trl_templates.py",
    "flows/test_broken_invariant.py", "unit/test_fast_tokenizer.py", "flows/test_sft_pipeline.py",
    "data/test_raw_and_tokenized_suites.py", "flows/test_safety.py",
)


@functools.cache
def slow_as_a_whole(path: Path) -> bool:
    """Return whether a test file's module-level `pytestmark` includes the slow marker (read with ast, not imported)."""
    import ast

    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            return "slow" in ast.unparse(node.value)
    return False


def pytest_ignore_collect(collection_path, config):
    """Under `-m "not slow"` (make test-fast), do not import the files whose tests are all slow: every one would be
    deselected, and importing them (the openai client, servers' helpers) cost each worker ~3 s of a core."""
    if config.getoption("markexpr") == "not slow" and collection_path.suffix == ".py" and \
            collection_path.name.startswith("test_") and slow_as_a_whole(collection_path):
        return True
    return None


def pytest_collection_modifyitems(session, config, items):
    """Start the files in LONGEST_FILES first, longest first, then the other files whose tests are slow as a whole (a
    module-level `pytestmark` with `slow`), each file kept together, every other order as collected."""
    def rank(item) -> tuple[int, int]:
        path = Path(item.fspath).relative_to(ROOT / "tests").as_posix()
        if path in LONGEST_FILES:
            return 0, LONGEST_FILES.index(path)
        return (1 if slow_as_a_whole(Path(item.fspath)) else 2), 0

    items.sort(key=rank)  # stable: the order within each group stays


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
def prefect_backend(tmp_path_factory):
    """A real Prefect API for the session (Prefect's test harness: a temporary SQLite server) with result storage in
    a temp dir. tests/flows uses it for every test; elsewhere a test asks for it. One per pytest-xdist worker: a
    second harness would cost another server start (~20 s on 2 busy cores). The first harness of the session keeps
    a copy of its database, just migrated, for the later ones (`seed_prefect_database`)."""
    from unittest import mock

    import prefect.testing.utilities as harness
    from filelock import FileLock
    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH, temporary_settings

    results, database = tmp_path_factory.mktemp("prefect-results"), tmp_path_factory.mktemp("prefect-harness")
    template = migrated_prefect_db(tmp_path_factory)
    with contextlib.ExitStack() as stack:
        with FileLock(f"{template}.lock"):  # the others wait for the first's migrations rather than run their own
            seeded = seed_prefect_database(database, tmp_path_factory, name="prefect-test.db")
            with mock.patch.object(harness, "mkdtemp", return_value=str(database)):  # where it puts its database
                stack.enter_context(temporary_settings({PREFECT_LOCAL_STORAGE_PATH: results}))
                stack.enter_context(harness.prefect_test_harness(server_startup_timeout=120))
            if not seeded:
                copy_sqlite(database / "prefect-test.db", template)
        yield


def migrated_prefect_db(tmp_path_factory) -> Path:
    """Return where the session keeps the copy of the first harness's database, just migrated."""
    return shared_root(tmp_path_factory) / "prefect-migrated.db"


def copy_sqlite(source: Path, target: Path) -> None:
    """Copy an SQLite database, consistent even while a server has it open (SQLite's online backup), atomically."""
    import sqlite3

    partial = target.with_name(f"{target.name}.partial")
    partial.unlink(missing_ok=True)
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(partial)) as dst:
        src.backup(dst)
    partial.replace(target)


def seed_prefect_database(prefect_home: Path, tmp_path_factory, name: str = "prefect.db") -> bool:
    """Give a Prefect server about to start in `prefect_home` a copy of the session's migrated database, once the
    first harness has made one; return whether it did. A server on an empty database runs Prefect's 100+
    migrations first: 13.5 CPU-s to healthy against 6 for a copy (2-core AMD EPYC). Only where a new database is
    not what the test is about: a bare environment's first `sftflow run` still migrates its own."""
    import shutil

    template = migrated_prefect_db(tmp_path_factory)
    if not template.is_file():
        return False
    prefect_home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, prefect_home / name)
    return True


def shared_root(tmp_path_factory) -> Path:
    """Return the temp directory every pytest-xdist worker of this session shares (the base temp's parent), or the
    one SFTFLOW_TEST_SHARED names: `make test` gives its dtype re-run and the suite one, so the tiny model and the
    migrated database are made once for both."""
    if os.environ.get("SFTFLOW_TEST_SHARED"):
        return Path(os.environ["SFTFLOW_TEST_SHARED"])
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


def built_once(tmp_path_factory, name: str, build) -> Path:
    """Return `name` in the session's shared temp directory, made by `build(path)` once for the whole session: the
    pytest-xdist workers share the base temp directory's parent, and the first worker to ask builds under a file lock
    while the others wait, then read it (`make test`'s workers would each spend ~10 s of a core on the same model)."""
    from filelock import FileLock

    root = shared_root(tmp_path_factory)
    out, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock")):
        if not done.exists():
            build(out)
            done.touch()
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer random llama (hidden 64) saved with the SmolLM2 tokenizer and chat template
    (tasks/model/tiny_model.py), built once for the session and read-only to the tests."""
    from tasks.model.tiny_model import build_tiny_model

    return built_once(tmp_path_factory, "tiny-llama", build_tiny_model)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny llama as a GGUF file with the packaged GGUF's tokenizer and template: a base given by a GGUF spec,
    converted as the default one is, in seconds (tasks/model/tiny_model.py `build_tiny_gguf`)."""
    from tasks.model.tiny_model import build_tiny_gguf

    return built_once(tmp_path_factory, "tiny-llama.gguf", lambda out: build_tiny_gguf(out, tiny_model_dir))


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


SERVED = "serve-test"  # the registered model `served_store` holds


@pytest.fixture(scope="session")
def served_store(tmp_path_factory, tiny_model_dir) -> str:
    """Return the tracking URI of a sqlite MLflow store holding SERVED, three versions of the tiny llama:
    1 (@champion) a LoRA adapter over it (a random B too, so the adapter changes what it says); 2 full weights whose
    final norm is zero, so every logit ties, greedy picks token 0, and token 0 is an EOS of its generation config: it
    stops at once; 3 the same weights with token 0 no EOS and 8192 positions: it never stops before its budget."""
    import torch
    from mlflow import MlflowClient
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("served-store")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(1)
    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(root / "adapter")
    for out, eos, positions in ((root / "stops", [tokenizer.eos_token_id, 0], None),
                                (root / "endless", tokenizer.eos_token_id, 8192)):
        full = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        with torch.no_grad():
            full.model.norm.weight.zero_()
        full.generation_config.eos_token_id = eos
        if positions:
            full.config.max_position_embeddings = positions
        full.save_pretrained(out)
    uri = new_store(root / "mlflow.db")
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("serve", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model(SERVED)
    for trained, method in ((root / "adapter", "lora"), (root / "stops", "full"), (root / "endless", "full")):
        tokenizer.save_pretrained(trained)
        run_id = client.create_run(experiment).info.run_id
        client.log_artifacts(run_id, str(trained), "trained")
        client.set_terminated(run_id)
        client.create_model_version(SERVED, f"runs:/{run_id}/trained", run_id=run_id,
                                    tags={"base_model": str(tiny_model_dir), "train_method": method})
    client.set_registered_model_alias(SERVED, "champion", "1")
    return uri


def new_store(db: Path) -> str:
    """Return the URI of a new MLflow sqlite store at `db` (kept if it is there), started as sftflow starts its own:
    a copy of the cache's empty migrated store (tasks/core/mlflow_store.py), not MLflow's ~60 migrations again."""
    from tasks.core.mlflow_store import seed_sqlite_store

    seed_sqlite_store(uri := f"sqlite:///{db}")
    return uri


def registry_client(uri: str):
    """Return an MlflowClient on store `uri` for runs and the registry alike. (Given a tracking URI only, MLflow takes
    the registry from mlflow.set_registry_uri, which register sets process-wide for the run's store: another test's
    store, in this pytest process.)"""
    from mlflow import MlflowClient

    return MlflowClient(uri, registry_uri=uri)


def free_port() -> int:
    """Return a TCP port free on the loopback interface now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_hosts(port: int) -> set[str]:
    """Return the addresses a process on this machine listens on at TCP `port`."""
    import psutil

    return {c.laddr.ip for c in psutil.net_connections("inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def wait_for_http(url: str, proc, timeout: float = 180) -> None:
    """Wait until `url` answers 200, or raise when the process `proc` serving it exits first or `timeout` passes."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with {proc.returncode} before answering")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout} s")
