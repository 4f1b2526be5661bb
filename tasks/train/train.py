"""Train: the Prefect task. It takes a training slot, opens the MLflow run, trains in this process or through
`accelerate launch` (tasks/train/distributed.py) with the trainer tasks/train/trainer.py builds, resumes from the last
valid checkpoint (tasks/train/checkpoints.py), saves the adapter or weights (tasks/train/methods.py) and diagnoses the
curve.

Labels come from the format step's `assistant_masks` (TRL folds them into `labels`). Warmup then linear decay,
gradient accumulation, periodic adapter checkpoints; a retry resumes from the last checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from tasks.core.common import stage_logger
from tasks.core.config import TrainConfig
from tasks.core.errors import TrainingDiverged
from tasks.core.stage import STAGE_CACHE, stage_task
from tasks.model.modeling import model_precision
from tasks.model.tokenizer import load_tokenizer
from tasks.train.checkpoints import resume_training, training_key
from tasks.train.concurrency import training_slot
from tasks.train.distributed import train_distributed
from tasks.train.methods import save_trained
from tasks.train.monitoring import Tracking, log_outcome, open_training_run, report_training
from tasks.train.trainer import build_trainer, training_callbacks


def train_model(formatted_dir: Path, model_dir: str, out_dir: Path, cfg: TrainConfig, callbacks=(),
                cores: int | None = None) -> Path:
    """Train the adapter, save it with the tokenizer to out_dir/adapter and the loss history; return the adapter.

    `cores`: the cores this training may use (its training slot's share), split among train.num_processes
    processes; None = all of this process's."""
    if cfg.num_processes > 1:  # one process per rank via accelerate launch, each building the same trainer
        return train_distributed(formatted_dir, model_dir, out_dir, cfg, cores)
    precision = model_precision(cfg.compute_dtype)
    rows = f"packed rows of {cfg.pack_length} tokens" if cfg.packing else "sequences"
    steps = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.num_epochs:g} epochs"
    stage_logger().info("train: compute dtype %s (%s); method %s, %s of %d x %d %s", precision.name, precision.reason,
                        cfg.method, steps, cfg.batch_size, cfg.gradient_accumulation_steps, rows)
    trainer = build_trainer(formatted_dir, model_dir, out_dir, cfg, [*training_callbacks(out_dir, cfg), *callbacks])
    resume_training(trainer, out_dir, training_key(formatted_dir, model_dir, cfg))  # from a checkpoint if any
    # adapter/ (LoRA methods) or model/ (full, hft), with the chat template the rows were formatted with
    return save_trained(trainer, load_tokenizer(model_dir, formatted_dir, cfg.trust_remote_code), out_dir, cfg)


@stage_task("train", retries=1)
def train_adapter(formatted_dir: Path, model_dir: str, out_dir: Path, cfg: TrainConfig,
                  tracking: Tracking | None = None, slots: int = 0) -> Path:
    """Train on the formatted rows (live metrics to the run's MLflow run when `tracking` is given), diagnose the
    curve, and return the adapter (or model) directory. A nan/inf stops at once with TrainingDiverged, never retried.

    Training holds one of this machine's `slots` training slots (`orchestrate.train_slots`, 0 = one per 2 cores; a
    Prefect global concurrency limit, tasks/train/concurrency.py), waiting for one while other runs hold them all, with
    torch threads set to one slot's share of the cores."""
    with training_slot(slots, out_dir) as threads:
        run_id = open_training_run(tracking, out_dir, cfg) if tracking is not None else None
        try:
            adapter = train_model(formatted_dir, model_dir, out_dir, cfg, cores=threads)
        except BaseException as err:
            if isinstance(err, TrainingDiverged):  # its history was saved with the step: show what happened
                report_training(out_dir, tracking, run_id, failed=True)
            elif run_id is not None:
                log_outcome(run_id, tracking.tracking_uri, {}, [], failed=True)
            raise
    report_training(out_dir, tracking, run_id, failed=False)
    stage_logger().info("train: adapter saved to %s", adapter)
    return adapter


# the slot count decides when and how fast training runs, never what it trains: a new count is no reason to retrain
train_adapter = train_adapter.with_options(cache_policy=STAGE_CACHE - "slots")
