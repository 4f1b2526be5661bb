"""Training checkpoints: which job they belong to, whether one is whole, and where a retry or rerun resumes.

Trainer's checkpoints (every train.save_steps steps, the newest train.save_total_limit kept) hold everything a
resume needs: the adapter (adapter_model.safetensors), optimizer.pt, scheduler.pt, the RNG states (rng_state.pth,
rng_state_<rank>.pth with several processes) and trainer_state.json, whose global_step is the data position: a
resumed run skips the batches already trained on and continues with the same order and random numbers.
"""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

from tasks.core.common import fingerprint_path, stage_logger
from tasks.core.config import TrainConfig

# TrainConfig fields that decide when a run logs, evaluates or saves, never what it learns: changing one between a
# killed run and its rerun still resumes. eval_steps and eval_rows steer training when early stopping acts on them.
OBSERVING_FIELDS = frozenset({"logging_steps", "save_steps", "save_total_limit", "eval_steps", "eval_rows"})
EVAL_FIELDS = frozenset({"eval_steps", "eval_rows"})
CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
TORCH_FILES = (".pt", ".pth", ".bin")  # torch.save writes zip archives with a CRC per entry


def training_key(formatted_dir: Path, model_dir: str, cfg: TrainConfig) -> str:
    """Return what identifies a training job: the tokenized data, the base model and the train config.

    A checkpoint is resumed only by the same job. Every setting that changes the trajectory is part of the key,
    max_steps and num_epochs included (the learning-rate schedule warms up and decays over them, so a changed
    max_steps trains from step 0 rather than continuing an old schedule or stopping at once with an old adapter).
    The settings in OBSERVING_FIELDS are left out: they only say when to log, evaluate or save and how many
    checkpoints to keep, so changing them does not throw away a killed run's progress (eval_steps and eval_rows
    stay in when early stopping is on, because there the eval loss decides when training stops).
    """
    ignored = OBSERVING_FIELDS - EVAL_FIELDS if cfg.early_stopping_patience else OBSERVING_FIELDS
    return json.dumps({"data": fingerprint_path(formatted_dir), "model": model_dir,
                       "cfg": cfg.model_dump(mode="json", exclude=set(ignored))}, sort_keys=True)


def file_problem(path: Path) -> str | None:
    """Return why one checkpoint file cannot be read back (empty, truncated, corrupt), or None if it reads."""
    from safetensors import SafetensorError, safe_open

    if path.stat().st_size == 0:
        return "is empty"
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:  # checks the header and that the data covers every tensor
                f.keys()
        elif path.suffix in TORCH_FILES:
            with zipfile.ZipFile(path) as archive:
                if (bad := archive.testzip()) is not None:
                    return f"is corrupt (bad CRC in {bad})"
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, SafetensorError) as e:  # ValueError: bad JSON
        return f"is unreadable ({type(e).__name__}: {str(e)[:120]})"
    return None


def checkpoint_problem(path: Path) -> str | None:
    """Return what makes a checkpoint unusable (a missing, empty or unreadable file), or None if it can resume."""
    needed = {"trainer_state.json": ["trainer_state.json"], "scheduler.pt": ["scheduler.pt"],
              "optimizer state": ["optimizer.pt", "optimizer_0"], "RNG state": ["rng_state*.pth"],
              "model weights": ["*.safetensors", "pytorch_model*"]}
    for what, patterns in needed.items():
        if not any(any(path.glob(p)) for p in patterns):
            return f"no {what}"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        if problem := file_problem(file):
            return f"{file.relative_to(path)} {problem}"
    step = json.loads((path / "trainer_state.json").read_text(encoding="utf-8")).get("global_step")
    if step != int(CHECKPOINT_NAME.match(path.name).group(1)):
        return f"trainer_state.json says global_step {step}"
    return None


def checkpoints_newest_first(checkpoints: Path) -> list[Path]:
    """Return the checkpoint-<step> directories under `checkpoints`, highest step first."""
    found = [p for p in checkpoints.glob("checkpoint-*") if p.is_dir() and CHECKPOINT_NAME.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_NAME.match(p.name).group(1)), reverse=True)


def latest_valid_checkpoint(checkpoints: Path, clear: bool = True) -> Path | None:
    """Return the newest whole checkpoint; remove, with a warning naming each, the broken ones newer than it (with
    clear=False only skip them)."""
    for path in checkpoints_newest_first(checkpoints):
        if (problem := checkpoint_problem(path)) is None:
            return path
        if not clear:
            continue
        stage_logger().warning("train: skipping checkpoint %s: %s (an interrupted save?); removed it", path, problem)
        shutil.rmtree(path, ignore_errors=True)  # else Trainer would later write into it or count it as kept
    return None


def resumable_checkpoint(out_dir: Path, key: str, clear: bool = True) -> str | None:
    """Return the newest valid checkpoint of the same training job, if any; clear checkpoints of a different job.

    out_dir/job.json holds the key of the job that owns out_dir/checkpoints. Checkpoints of another job (other data,
    base model or trajectory settings, see training_key) are deleted, never resumed: their optimizer state and data
    position belong to another run. A truncated or corrupt checkpoint (a process killed while saving it) is skipped
    and removed with a warning, and the next older valid one is used; with none left, training starts at step 0.
    A finished run of the same job resumes at its last step and trains no further steps.

    clear=False only reads: a distributed job's ranks, whose launcher on machine 0 already cleared and marked out_dir,
    must not rewrite job.json or remove checkpoints one of them may be writing.
    """
    checkpoints, marker = out_dir / "checkpoints", out_dir / "job.json"
    if not clear:
        same = checkpoints.is_dir() and marker.is_file() and marker.read_text(encoding="utf-8") == key
        latest = latest_valid_checkpoint(checkpoints, clear=False) if same else None
        return str(latest) if latest is not None else None
    if checkpoints.is_dir() and marker.is_file() and marker.read_text(encoding="utf-8") == key:
        latest = latest_valid_checkpoint(checkpoints)
        if latest is not None:
            stage_logger().info("train: resuming from %s", latest)
            return str(latest)
        stage_logger().info("train: no valid checkpoint in %s; training from step 0", checkpoints)
        return None
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        stage_logger().info("train: removing checkpoints of a different training job (data, base model or "
                            "train settings changed) from %s; training from step 0", checkpoints)
    shutil.rmtree(checkpoints, ignore_errors=True)  # never resume another config's or data's optimizer state
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_suffix(".tmp")
    tmp.write_text(key, encoding="utf-8")
    tmp.replace(marker)
    return None


def current_intervals_callback():
    """Return a TrainerCallback that makes a resumed run log, evaluate and save at this run's intervals.

    On resume Trainer replaces its state with the checkpoint's trainer_state.json, intervals included, so a rerun
    with a changed logging_steps, eval_steps or save_steps would silently keep the killed run's.
    """
    from transformers import TrainerCallback

    class CurrentIntervals(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            state.compute_steps(args, state.max_steps)

    return CurrentIntervals()


def is_finished(checkpoint: Path) -> bool:
    """Return True when a checkpoint is the last step of its job: max_steps reached, or training told to stop there
    (early stopping), as the Trainer's control state saved with it says."""
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    control = state.get("stateful_callbacks", {}).get("TrainerControl", {}).get("args", {})
    return state["global_step"] >= state["max_steps"] > 0 or bool(control.get("should_training_stop"))


def restore_finished(trainer, checkpoint: Path) -> None:
    """Load a finished job's final weights (its best checkpoint's with load_best_model_at_end) and state."""
    from transformers import TrainerState

    trainer.state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    best = trainer.state.best_model_checkpoint
    final = best if trainer.args.load_best_model_at_end and best and Path(best).is_dir() else checkpoint
    trainer._load_from_checkpoint(str(final))  # Trainer's own loader: an adapter, full weights or shards alike


def resume_training(trainer, out_dir: Path, key: str, clear: bool = True) -> None:
    """Train `trainer`'s job to max_steps, from its newest valid checkpoint if there is one (resumable_checkpoint).

    A finished job's rerun (a retry after training ended, `sftflow task train` again) trains no further step: resumed
    at max_steps, Trainer would run one step past it, so the final checkpoint's weights and state are loaded instead.
    An early-stopped job counts as finished when its stop step was saved; when the stop fell between checkpoints, the
    rerun resumes from the last one and early stopping (its patience count restored) stops it at the next evaluation.
    """
    checkpoint = resumable_checkpoint(out_dir, key, clear)
    if checkpoint is not None and is_finished(Path(checkpoint)):
        stage_logger().info("train: %s is the job's last step; nothing left to train", checkpoint)
        restore_finished(trainer, Path(checkpoint))
        return
    trainer.add_callback(current_intervals_callback())
    trainer.train(resume_from_checkpoint=checkpoint)
