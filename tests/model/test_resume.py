"""Checkpoints and resume: what a checkpoint holds, a killed `sftflow task train` continuing where it stopped, a
broken checkpoint skipped, and checkpoints of another job never resumed."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.core.config import RunPaths, TrainConfig, dump_config, load_config
from tasks.data.clean import clean
from tasks.data.ingest import fingerprint_data, ingest
from tasks.formatting.chat_format import format_chats
from tasks.model.prepare import prepare_base_model
from tasks.reporting.report import save_config
from tasks.train.checkpoints import checkpoint_problem, resumable_checkpoint, training_key
from tasks.train.train import train_model
from tests.conftest import ROOT, compute_dtype, tolerance

# Few, cheap steps (tiny.yaml: packed rows of 256 tokens, 2 a micro-batch, 2 micro-batches a step), a checkpoint
# every 2.
SETTINGS = ["train.max_steps=4", "train.save_steps=2", "train.logging_steps=1"]


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory) -> RunPaths:
    """A run directory as `sftflow run` leaves it before training: saved config, ingested, cleaned, formatted."""
    runs = tmp_path_factory.mktemp("runs")
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"runs_dir={runs}", f"train.base_model={tiny_model_dir}",
                                                       *SETTINGS])
    run = RunPaths(runs, "resume")
    save_config.fn(dump_config(cfg), run.config)
    raw_db = ingest.fn(cfg.data, fingerprint_data(cfg.data), run.sources, run.ingest_db)
    clean_db = clean.fn(raw_db, run.clean_db, run.clean_report, run.quarantine, cfg.clean)
    format_chats.fn(clean_db, prepare_base_model.fn(cfg.train.base_model), run.formatted, cfg.chat)
    return run


def base(run: RunPaths) -> str:
    return prepare_base_model.fn(load_config(run.config).train.base_model)


def train_config(run: RunPaths, **changes) -> TrainConfig:
    return TrainConfig(**{**load_config(run.config).train.model_dump(), **changes})


def train(run: RunPaths, out_dir: Path, callbacks=(), **changes) -> list[int]:
    """Train the run's job into out_dir; return the global steps this call trained."""
    from transformers import TrainerCallback

    seen = []

    class RecordSteps(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(state.global_step)

    train_model(run.formatted, base(run), out_dir, train_config(run, **changes), [RecordSteps(), *callbacks])
    return seen


def crash_at(step: int):
    """A callback that fails the run right after optimizer step `step`, as a preemption would."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step:
                raise RuntimeError("simulated preemption")

    return Crash()


def logged(out_dir: Path) -> dict[int, dict]:
    """Return the logged training records of out_dir's last run, by step."""
    return {r["step"]: r for r in json.loads((out_dir / "log_history.json").read_text()) if "loss" in r}


def checkpoint_names(out_dir: Path) -> list[str]:
    return sorted(p.name for p in (out_dir / "checkpoints").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def straight(run, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run (checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("straight")
    assert train(run, out) == [1, 2, 3, 4]
    return out


@pytest.fixture(scope="module")
def crashed(run, tmp_path_factory) -> Path:
    """The same job, failed right after step 3: checkpoint-2 is the last one."""
    out = tmp_path_factory.mktemp("crashed")
    with pytest.raises(RuntimeError, match="preemption"):
        train(run, out, callbacks=[crash_at(3)])
    return out


def copy_of(out_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(out_dir, tmp_path / out_dir.name))


@pytest.mark.dtype_sensitive
def test_a_checkpoint_holds_adapter_optimizer_scheduler_rng_and_step_and_a_resume_restores_all_of_them(
        run, straight, crashed, tmp_path):
    out = copy_of(crashed, tmp_path)
    assert checkpoint_names(out) == ["checkpoint-2"]
    checkpoint = out / "checkpoints" / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
            "trainer_state.json"} <= names
    assert json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] == 2
    assert checkpoint_problem(checkpoint) is None

    assert train(run, out) == [3, 4]  # steps 1-2 came from checkpoint-2, not re-run
    resumed, reference = logged(out), logged(straight)
    assert sorted(resumed) == [1, 2, 3, 4]
    # Step 3 sees batch 3 (data position), at the scheduled rate (scheduler), from the same Adam moments (optimizer)
    # and random state (RNG): the resumed curve is the uninterrupted one, to the roundings of the compute dtype (the
    # fp32 test below asks for more). In bf16 it is not exact: Trainer reloads the checkpoint's adapter through PEFT's
    # load_adapter, which upcasts bf16 LoRA weights to fp32, so from step 3 on the gradients are no longer rounded to
    # bf16 (grad norm 0.05% apart at step 3, 0.1% at step 4).
    rtol, _ = tolerance(compute_dtype())
    for step in (3, 4):
        for key in ("loss", "learning_rate", "grad_norm"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=rtol), (step, key)


def test_in_fp32_a_resumed_run_repeats_the_uninterrupted_curve_to_fp32s_roundings(run, tmp_path):
    # Pinned to fp32, whatever this CPU or SFTFLOW_COMPUTE_DTYPE would pick: the same steps from a restored state are
    # the same arithmetic, so the curves agree to fp32's few roundings (they were identical here), and a resume that
    # restores a little less (a moment, a batch, an RNG draw) cannot hide inside bf16's 1.6%.
    straight, out = tmp_path / "straight", tmp_path / "resumed"
    assert train(run, straight, compute_dtype="fp32") == [1, 2, 3, 4]
    with pytest.raises(RuntimeError, match="preemption"):
        train(run, out, callbacks=[crash_at(3)], compute_dtype="fp32")
    assert train(run, out, compute_dtype="fp32") == [3, 4]
    resumed, reference = logged(out), logged(straight)
    rtol, _ = tolerance(torch.float32)
    for step in (1, 2, 3, 4):
        for key in ("loss", "learning_rate", "grad_norm"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=rtol), (step, key)


def test_a_rerun_with_other_logging_and_checkpoint_settings_still_resumes_and_follows_the_new_ones(
        run, crashed, tmp_path):
    out = copy_of(crashed, tmp_path)
    assert train(run, out, logging_steps=2, save_steps=4, save_total_limit=1) == [3, 4]
    assert sorted(logged(out)) == [1, 2, 4]  # steps 1-2 logged by the first run, then every 2nd step, not every one
    assert checkpoint_names(out) == ["checkpoint-4"]


def test_a_finished_run_reruns_as_is_but_a_changed_max_steps_or_learning_rate_trains_from_step_0(
        run, straight, tmp_path):
    out = copy_of(straight, tmp_path)
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")

    assert train(run, out) == []  # resumed at its last step: nothing left to train
    assert sorted(logged(out)) == [1, 2, 3, 4]
    again = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter.keys() == again.keys() and all(torch.equal(adapter[k], again[k]) for k in adapter)

    assert train(run, out, max_steps=6) == [1, 2, 3, 4, 5, 6]  # a new schedule, not steps 5-6 of the old one
    assert checkpoint_names(out) == ["checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "checkpoints" / "checkpoint-4" / "trainer_state.json").read_text())["max_steps"] == 6

    assert train(run, out, max_steps=6, learning_rate=1e-3) == [1, 2, 3, 4, 5, 6]
    assert all(r["learning_rate"] <= 1e-3 for r in logged(out).values())


def test_a_checkpoint_where_training_was_told_to_stop_early_is_the_end_of_its_job(run, straight, tmp_path):
    out = copy_of(straight, tmp_path)
    shutil.rmtree(out / "checkpoints" / "checkpoint-4")
    state_file = out / "checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["stateful_callbacks"]["TrainerControl"]["args"]["should_training_stop"] = True  # as early stopping leaves it
    state_file.write_text(json.dumps(state))
    assert train(run, out) == []
    assert sorted(logged(out)) == [1, 2]
    saved = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    exported = load_file(out / "adapter" / "adapter_model.safetensors")
    assert saved.keys() == exported.keys() and all(torch.equal(saved[k], exported[k]) for k in saved)


def test_the_training_key_ignores_only_settings_that_do_not_change_what_is_learned(run):
    def key(**changes):
        return training_key(run.formatted, base(run), train_config(run, **changes))

    assert key() == key(logging_steps=3, save_steps=5, save_total_limit=7, eval_steps=2, eval_rows=4)
    cfg = train_config(run)
    for changes in ({"learning_rate": cfg.learning_rate / 2}, {"max_steps": cfg.max_steps + 1}, {"seed": cfg.seed + 1},
                    {"lora_r": cfg.lora_r * 2}, {"batch_size": cfg.batch_size + 1}):
        assert key(**changes) != key(), changes
    early = {"early_stopping_patience": 2, "eval_steps": 2}
    assert key(**early) != key(**{**early, "eval_steps": 4})  # the eval loss decides when training stops
    assert key() != training_key(run.formatted, base(run) + "-other", train_config(run))


BREAKAGES = {
    "missing trainer_state.json": lambda c: (c / "trainer_state.json").unlink(),
    "truncated trainer_state.json": lambda c: truncate(c / "trainer_state.json", 40),
    "missing optimizer.pt": lambda c: (c / "optimizer.pt").unlink(),
    "truncated optimizer.pt": lambda c: truncate(c / "optimizer.pt", 1000),
    "a flipped byte in optimizer.pt": lambda c: flip_byte(c / "optimizer.pt", 2000),
    "zero-length adapter": lambda c: truncate(c / "adapter_model.safetensors", 0),
    "truncated adapter": lambda c: truncate(c / "adapter_model.safetensors", 3000),
    "missing scheduler.pt": lambda c: (c / "scheduler.pt").unlink(),
    "zero-length rng_state.pth": lambda c: truncate(c / "rng_state.pth", 0),
    "another step's trainer_state.json": lambda c: c.rename(c.with_name("checkpoint-3")),
}


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_truncated_or_corrupt_checkpoint_is_recognised(straight, tmp_path, breakage):
    checkpoint = Path(shutil.copytree(straight / "checkpoints" / "checkpoint-4", tmp_path / "checkpoint-4"))
    assert checkpoint_problem(checkpoint) is None
    BREAKAGES[breakage](checkpoint)
    checkpoint = next(tmp_path.glob("checkpoint-*"))
    assert checkpoint_problem(checkpoint) is not None, breakage


def test_broken_newest_checkpoints_are_skipped_with_a_warning_naming_each_and_the_older_valid_one_resumed(
        run, tmp_path, caplog):
    out = tmp_path / "train"
    assert train(run, out, save_steps=1, save_total_limit=3) == [1, 2, 3, 4]
    checkpoints = out / "checkpoints"
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    truncate(checkpoints / "checkpoint-4" / "optimizer.pt", 1000)  # killed while writing
    (checkpoints / "checkpoint-3" / "trainer_state.json").unlink()  # killed before the state was written
    shutil.rmtree(out / "adapter")

    caplog.set_level(logging.INFO, logger="sftflow")
    assert train(run, out, save_steps=1, save_total_limit=3) == [3, 4]  # from checkpoint-2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and r.name == "sftflow"]
    assert len(warnings) == 2
    assert "checkpoint-4: optimizer.pt is unreadable" in warnings[0]
    assert "checkpoint-3: no trainer_state.json" in warnings[1]
    assert any(f"resuming from {checkpoints / 'checkpoint-2'}" in r.getMessage() for r in caplog.records)
    assert json.loads((checkpoints / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_with_no_valid_checkpoint_left_training_starts_at_step_0(straight, tmp_path, caplog):
    out = copy_of(straight, tmp_path)
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]
    for checkpoint in (out / "checkpoints").glob("checkpoint-*"):
        truncate(checkpoint / "adapter_model.safetensors", 0)
    caplog.set_level(logging.INFO, logger="sftflow")
    assert resumable_checkpoint(out, (out / "job.json").read_text()) is None
    assert checkpoint_names(out) == []
    assert "no valid checkpoint" in caplog.text


def test_a_distributed_rank_only_reads_the_train_dir_its_launcher_cleared(straight, tmp_path):
    # every rank of an accelerate job resumes; only the launcher on machine 0 may rewrite job.json or remove
    # checkpoints (a rank rewriting it raced the others, and on a shared runs_dir left it with machine 1's mode)
    out = copy_of(straight, tmp_path)
    key = (out / "job.json").read_text()
    truncate(out / "checkpoints" / "checkpoint-4" / "optimizer.pt", 1000)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert resumable_checkpoint(out, key, clear=False) == str(out / "checkpoints" / "checkpoint-2")
    assert resumable_checkpoint(out, "another job", clear=False) is None
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4"]  # the broken one skipped, not removed
    shutil.rmtree(out / "checkpoints")
    assert resumable_checkpoint(out, key, clear=False) is None
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == {
        p: t for p, t in before.items() if "checkpoints" not in p.parts}  # nothing written, nothing else removed


def sftflow_train(run: RunPaths, log: Path) -> subprocess.Popen:
    """Start `sftflow task train --run <id>` as a user would, in a session of its own, its output going to `log`, on
    the session's Prefect API (the test harness, as a worker's flow run has its server's: no temporary server to
    start, each start ~12 CPU-s)."""
    from prefect.settings import PREFECT_API_URL

    with log.open("w") as sink:
        return subprocess.Popen([str(Path(sys.executable).parent / "sftflow"), "task", "train", "--run", run.run_id,
                                 "--runs-dir", str(run.runs_dir)], stdout=sink, stderr=subprocess.STDOUT,
                                cwd=run.runs_dir, env={**os.environ, "HF_HUB_OFFLINE": "1",
                                                       "PREFECT_API_URL": PREFECT_API_URL.value()},
                                start_new_session=True)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL what is left of `proc`'s session (any process the step started outlives it)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_for_checkpoint(proc: subprocess.Popen, checkpoint: Path, timeout: float = 600) -> None:
    """Return once `checkpoint` is fully saved (its trainer_state.json, written last, reads back)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            json.loads((checkpoint / "trainer_state.json").read_text())
            return
        except (OSError, ValueError):
            time.sleep(0.02)
    raise AssertionError(f"{checkpoint} never appeared (exit code {proc.poll()})")


@pytest.mark.slow  # a train step in a subprocess, SIGKILLed and rerun
def test_a_sigkilled_train_step_reruns_from_its_checkpoint_to_the_same_steps_and_loss(run, tmp_path, prefect_backend):
    steps, overrides = 8, ["train.max_steps=8"]
    cfg = load_config(run.config, overrides)
    job = RunPaths(run.runs_dir, "killed")
    shutil.copytree(run.formatted, job.formatted)
    save_config.fn(dump_config(cfg), job.config)

    first = sftflow_train(job, tmp_path / "first.log")
    try:
        wait_for_checkpoint(first, job.train / "checkpoints" / "checkpoint-2")
        os.kill(first.pid, signal.SIGKILL)  # the training process itself, mid-run
        first.wait()
    finally:
        kill_group(first)
    assert first.returncode == -signal.SIGKILL
    assert not (job.train / "adapter").exists()  # killed mid-run, not after it
    saved = [p for p in (job.train / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    resume_at = max(int(p.name.split("-")[1]) for p in saved)
    assert resume_at < steps

    second = sftflow_train(job, tmp_path / "second.log")
    try:
        second.wait(timeout=600)
    finally:
        kill_group(second)
    output = (tmp_path / "second.log").read_text()
    assert second.returncode == 0, output[-3000:]
    assert f"train: resuming from {job.train / 'checkpoints' / f'checkpoint-{resume_at}'}" in output
    trained = [int(s) for s in re.findall(rf"train step (\d+)/{steps}\b", output)]
    assert trained == list(range(resume_at + 1, steps + 1))  # continued; steps up to the checkpoint not re-run
    final = json.loads((job.train / "checkpoints" / f"checkpoint-{steps}" / "trainer_state.json").read_text())
    assert final["global_step"] == final["max_steps"] == steps

    reference = tmp_path / "uninterrupted"
    train(run, reference, max_steps=steps)
    resumed, straight = logged(job.train), logged(reference)
    assert sorted(resumed) == sorted(straight) == list(range(1, steps + 1))
    rtol, _ = tolerance(compute_dtype())  # fp32: identical here; bf16: 0.07% apart at step 8
    assert resumed[steps]["loss"] == pytest.approx(straight[steps]["loss"], rel=rtol)
