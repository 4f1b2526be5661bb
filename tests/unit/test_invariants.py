"""A broken invariant is a bug, not a transient error: never retried, reported as one line with the traceback kept in
a file; and the config checks that stop a run before it starts (pack_length against max_length)."""

import traceback

import duckdb
import pytest
from prefect.states import Failed

from flows.cli import main, release
from flows.sft_pipeline import step_tasks, trains
from flows.steps import STEPS, RunContext, run_names
from tasks.core.config import STEP_NAMES, RunPaths, load_config
from tasks.core.errors import ConfigError, DataValidationError
from tasks.core.stage import retry_unless_user_error
from tasks.reporting.failure import TRACEBACK_FILE, FailureReport, rerun_command, step_failure
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"


def failed_with(error: BaseException):
    """Return a Failed state holding `error`, as Prefect hands it to the retry condition."""
    return Failed(data=error)


def test_a_broken_invariant_and_user_errors_are_not_retried_but_a_network_error_is():
    assert retry_unless_user_error(None, None, failed_with(AssertionError("row accounting broken"))) is False
    assert retry_unless_user_error(None, None, failed_with(DataValidationError("bad rows"))) is False
    assert retry_unless_user_error(None, None, failed_with(ConnectionError("reset by peer"))) is True


def raise_with_a_connection(db: str):
    """Raise an AssertionError from a frame that holds an open DuckDB connection, as format's accounting does."""
    with duckdb.connect(db) as con:  # noqa: F841 -- the frame's local is the point
        raise AssertionError("row accounting broken: clean 3 != formatted 2 + dropped 0")


def test_a_step_failing_alone_is_one_line_naming_the_traceback_file_it_wrote(tmp_path):
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    try:
        raise_with_a_connection(str(tmp_path / "x.duckdb"))
    except AssertionError as e:
        report = step_failure("format", tmp_path / "runs", run, e)
    assert report.line() == (f"step format failed: AssertionError: row accounting broken: clean 3 != formatted 2 + "
                             f"dropped 0; outputs so far in {run}; traceback in {run / TRACEBACK_FILE}; rerun: "
                             f"sftflow task format --run r1 --runs-dir {tmp_path / 'runs'}")
    saved = (run / TRACEBACK_FILE).read_text()
    assert saved.startswith("Traceback (most recent call last)") and "in raise_with_a_connection" in saved
    assert "\n" not in report.line()


def test_the_failure_line_names_the_traceback_only_when_one_was_saved(tmp_path):
    assert FailureReport("id", "clean", "boom", tmp_path, [], "cmd").line() == \
        f"step clean failed: boom; outputs so far in {tmp_path}; rerun: cmd"
    assert FailureReport("id", "clean", "boom", tmp_path, [], "cmd", "Traceback ...").line() == \
        f"step clean failed: boom; outputs so far in {tmp_path}; traceback in {tmp_path / TRACEBACK_FILE}; rerun: cmd"


def test_the_rerun_command_of_a_forced_run_is_forced_too(tmp_path):
    parameters = {"config_path": "configs/tiny.yaml", "overrides": ["train.max_steps=2"], "force": True}
    assert rerun_command(None, tmp_path, tmp_path / "r1", parameters) == \
        "sftflow run configs/tiny.yaml --run-id r1 --set train.max_steps=2 --force"


def test_release_clears_the_frames_that_hold_a_failed_steps_duckdb_connection(tmp_path):
    try:
        try:
            raise_with_a_connection(str(tmp_path / "x.duckdb"))
        except AssertionError as inner:
            raise RuntimeError("the flow failed") from inner
    except RuntimeError as e:
        error = e
    frames = [f for f, _ in traceback.walk_tb(error.__cause__.__traceback__)]
    assert any(isinstance(v, duckdb.DuckDBPyConnection) for f in frames for v in f.f_locals.values())
    release(error)
    assert not any(isinstance(v, duckdb.DuckDBPyConnection) for f in frames for v in f.f_locals.values())


def test_pack_length_below_max_length_is_refused_at_load_naming_both_keys_and_the_fix():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["chat.max_length=512"])  # tiny.yaml packs rows of 256 tokens
    assert str(err.value) == (
        f"{TINY}: invalid config: train.pack_length=256 < chat.max_length=512: a conversation longer than a packed "
        "row would be cut; set train.pack_length to at least 512 (or lower chat.max_length, or set "
        "train.packing=false)")
    assert load_config(TINY, ["chat.max_length=512", "train.packing=false"]).chat.max_length == 512  # no packed rows
    assert load_config(TINY, ["chat.max_length=512", "train.pack_length=512"]).train.pack_length == 512


def test_until_must_name_a_step_and_only_steps_from_train_on_pass_the_data_gate():
    cfg = load_config(TINY)
    assert list(step_tasks(cfg, False, None, "format")) == list(STEP_NAMES)
    assert [s for s in STEP_NAMES if trains(s)] == ["train", "evaluate", "register"] and trains(None)
    with pytest.raises(ConfigError, match=r"^until='trian' is not a step; use one of prepare-base-model, ingest, "):
        step_tasks(cfg, False, None, "trian")


def test_the_flow_and_sftflow_task_read_one_table_of_steps_in_the_order_the_config_names_them(tmp_path):
    assert tuple(STEPS) == STEP_NAMES
    cfg = load_config(TINY, [f"runs_dir={tmp_path}"])
    names = run_names(cfg)
    assert names["train"] == "train[qlora r=16, 6 steps]" and all(names[s].startswith(f"{s}[") for s in STEP_NAMES)
    # a step's arguments come from earlier results when the flow hands them over, else from the run's layout
    run = RunPaths(tmp_path, "r1")
    handed = RunContext(cfg, run, results={"clean_db": tmp_path / "x.duckdb", "base": "/models/b",
                                           "fingerprint": "f"})
    assert STEPS["format"].args(handed)[:2] == (tmp_path / "x.duckdb", "/models/b")
    saved = RunContext(cfg, run, results={"base": "/models/b"})
    assert STEPS["format"].args(saved)[:3] == (run.clean_db, "/models/b", run.formatted)
    assert STEPS["validate-tokens"].args(saved)[1] == run.formatted and STEPS["evaluate"].returns == "evaluation"


def test_an_unknown_until_step_is_one_line_listing_the_steps(capsys):
    assert main(["run", str(TINY), "--until", "trian"]) == 2
    assert capsys.readouterr().err == (f"sftflow: error: --until trian: not a step; use one of "
                                       f"{', '.join(STEP_NAMES)}\n")
