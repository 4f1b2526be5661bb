"""Train: QLoRA with TRL's SFTTrainer and a PEFT LoRA config on the (4-bit) base, on the pre-tokenized rows.

Labels come from the format step's `assistant_masks` (TRL folds them into `labels`). Warmup then linear decay,
gradient accumulation, periodic adapter checkpoints; a retry resumes from the last checkpoint.
"""

from __future__ import annotations

import time
from pathlib import Path

from tasks.chat_format import load_tokenizer
from tasks.checkpoints import resume_training, training_key
from tasks.common import STAGE_CACHE, stage_logger, stage_task
from tasks.concurrency import training_slot
from tasks.config import TrainConfig
from tasks.errors import ConfigError, TrainingDiverged
from tasks.methods import save_trained
from tasks.modeling import has_cuda, load_base_model, model_precision
from tasks.monitoring import Tracking, log_outcome, monitoring_callbacks, open_training_run, report_training
from tasks.precision import Precision


def check_train_config(cfg: TrainConfig) -> None:
    """Fail before any training time is spent on options that cannot work here."""
    if cfg.load_in_4bit or cfg.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"train.method={cfg.method} needs bitsandbytes: `pip install bitsandbytes` "
                              "or set train.method=lora") from None
    if cfg.compute_dtype == "fp16" and not has_cuda():
        raise ConfigError("train.compute_dtype=fp16 needs a CUDA device (fp16 mixed precision); on a CPU use auto, "
                          "fp32 or bf16")
    if cfg.early_stopping_patience and cfg.save_steps % cfg.eval_steps:
        raise ConfigError(f"train.early_stopping_patience restores the best checkpoint at the end, so train.save_steps "
                          f"({cfg.save_steps}) must be a multiple of train.eval_steps ({cfg.eval_steps})")


SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}  # all warm up first


def sft_config(cfg: TrainConfig, out_dir: Path, precision: Precision):
    """Return TRL's SFTConfig for this run; autocast follows `precision` (TRL's own default is bf16 everywhere).

    No gradient checkpointing on a CPU (TRL turns it on by default): it recomputes every block's forward, and the
    activations it saves are small next to the memory a CPU has. Packing is BFD into pack_length rows, padding-free.
    """
    from trl import SFTConfig

    cuda, evals = has_cuda(), cfg.eval_steps is not None
    return SFTConfig(
        output_dir=str(out_dir), max_steps=cfg.max_steps or -1, num_train_epochs=cfg.num_epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps, learning_rate=cfg.learning_rate,
        lr_scheduler_type=SCHEDULERS[cfg.lr_scheduler], warmup_steps=cfg.warmup_ratio,  # a float < 1 is a ratio
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, eval_strategy="steps" if evals else "no", eval_steps=cfg.eval_steps,
        metric_for_best_model="eval_loss" if evals else None, load_best_model_at_end=bool(cfg.early_stopping_patience),
        seed=cfg.seed, report_to=[], use_cpu=not cuda, bf16=precision.name == "bf16", fp16=precision.name == "fp16",
        dataloader_num_workers=0, packing=cfg.packing, packing_strategy="bfd", padding_free=cfg.packing,
        max_length=cfg.pack_length if cfg.packing else None,
        gradient_checkpointing=cuda, disable_tqdm=True,
    )


def lora_config(cfg: TrainConfig):
    """Return the PEFT LoRA config (all linear layers by default), or None when the method trains full weights."""
    from peft import LoraConfig

    if not cfg.uses_lora:
        return None
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.target_modules, task_type="CAUSAL_LM")


def match_adapter_dtype(model, precision: Precision) -> None:
    """Keep trainable weights in fp32 unless bf16 is the compute dtype.

    TRL casts a quantized model's LoRA weights to bf16 (as the QLoRA paper does); on a CPU without native bf16 every
    LoRA matmul would then be emulated. fp16 runs keep fp32 master weights, as fp16 mixed precision needs.
    """
    from tasks.trainer import cast_trainable

    cast_trainable(model, trainable_dtype(precision))


def trainable_dtype(precision: Precision):
    """Return the dtype LoRA weights train in: bf16 when that is the compute dtype, else fp32 (see above)."""
    import torch

    return torch.bfloat16 if precision.name == "bf16" else torch.float32


def heldout_rows(formatted_dir: Path, cfg: TrainConfig):
    """Return the first eval_rows held-out rows for the periodic eval loss, or None without eval_steps."""
    from datasets import Dataset

    if cfg.eval_steps is None:
        return None
    rows = Dataset.from_parquet(str(formatted_dir / "heldout.parquet")).select_columns(["input_ids", "assistant_masks"])
    return rows.select(range(min(cfg.eval_rows, len(rows))))


def build_trainer(formatted_dir: Path, model_dir: str, out_dir: Path, cfg: TrainConfig, callbacks=()):
    """Return the trainer for `train.method` over the tokenized training rows (packed if asked): LoRA on a 4-bit,
    8-bit or full-precision base, or full weights (full, hft); early stopping on the held-out loss if asked."""
    from datasets import Dataset
    from transformers import EarlyStoppingCallback

    from tasks.methods import method_callbacks
    from tasks.packing import use_packed_attention, write_packing_report
    from tasks.trainer import sftflow_trainer_class

    check_train_config(cfg)
    precision = model_precision(cfg.compute_dtype)
    rows = Dataset.from_parquet(str(formatted_dir / "train.parquet")).select_columns(["input_ids", "assistant_masks"])
    model = load_base_model(model_dir, cfg.load_in_4bit, cfg.compute_dtype, cfg.load_in_8bit, cfg.trust_remote_code)
    if not cfg.uses_lora:
        model = model.float()  # full weights train in fp32 master weights; autocast gives the compute dtype
    if cfg.packing:
        use_packed_attention(model)  # attention within each conversation only, no flattened-batch-sized scores
    extra = [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []
    trainer = sftflow_trainer_class()(
        model=model, args=sft_config(cfg, out_dir / "checkpoints", precision), train_dataset=rows,
        eval_dataset=heldout_rows(formatted_dir, cfg), processing_class=load_tokenizer(model_dir, formatted_dir, cfg.trust_remote_code),
        peft_config=lora_config(cfg), callbacks=[*method_callbacks(model, cfg), *extra, *callbacks],
        lean_loss=cfg.lean_loss, trainable_dtype=trainable_dtype(precision) if cfg.uses_lora else None)
    if cfg.uses_lora:
        match_adapter_dtype(trainer.model, precision)
    if cfg.packing:
        report = write_packing_report(rows, trainer.train_dataset, cfg.pack_length, out_dir)
        stage_logger().info("train: packed %d conversations into %d rows of %d tokens, fill rate %.1f%%",
                            report["conversations"], report["packed_rows"], cfg.pack_length, 100 * report["fill_rate"])
    return trainer


def clock(seconds: float) -> str:
    """Return a duration as h:mm:ss or m:ss."""
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}" if minutes >= 60 else f"{minutes}:{secs:02d}"


def progress_callback():
    """Return a TrainerCallback that logs one line per optimizer step: loss, step time, elapsed time and ETA."""
    from transformers import TrainerCallback

    class StepProgress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.start = self.last = time.perf_counter()
            self.first_step, self.loss, self.pending = state.global_step, None, None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            done = state.global_step - self.first_step
            eta = (now - self.start) / max(done, 1) * (state.max_steps - state.global_step)
            self.pending = (state.global_step, state.max_steps, now - self.last, now - self.start, eta)
            self.last = now
            if not control.should_log:  # else on_log follows with this step's loss
                self.report()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.loss = logs["loss"]
                self.report()

        def report(self):
            if self.pending is None:
                return
            step, total, step_s, elapsed, eta = self.pending
            loss = "-" if self.loss is None else f"{self.loss:.4f}"
            stage_logger().info("train step %d/%d  loss %s  %.1f s/step  elapsed %s  ETA %s", step, total, loss,
                                step_s, clock(elapsed), clock(eta))
            self.pending = None

    return StepProgress()


def training_callbacks(out_dir: Path) -> list:
    """Return the callbacks every training process runs: tokens/s and peak memory in each log, live MLflow logging
    when the train task opened a run (out_dir/mlflow_run.json), the per-step progress line, the nan/inf stop."""
    *measure, stop = monitoring_callbacks(out_dir)
    return [*measure, progress_callback(), stop]


def train_model(formatted_dir: Path, model_dir: str, out_dir: Path, cfg: TrainConfig, callbacks=(),
                cores: int | None = None) -> Path:
    """Train the adapter, save it with the tokenizer to out_dir/adapter and the loss history; return the adapter.

    `cores`: the cores this training may use (its training slot's share), split among train.num_processes
    processes; None = all of this process's."""
    if cfg.num_processes > 1:  # one process per rank via accelerate launch, each building the same trainer
        from tasks.distributed import train_distributed
        return train_distributed(formatted_dir, model_dir, out_dir, cfg, cores)
    precision = model_precision(cfg.compute_dtype)
    rows = f"packed rows of {cfg.pack_length} tokens" if cfg.packing else "sequences"
    steps = f"{cfg.max_steps} steps" if cfg.max_steps else f"{cfg.num_epochs:g} epochs"
    stage_logger().info("train: compute dtype %s (%s); method %s, %s of %d x %d %s", precision.name, precision.reason,
                        cfg.method, steps, cfg.batch_size, cfg.gradient_accumulation_steps, rows)
    trainer = build_trainer(formatted_dir, model_dir, out_dir, cfg, [*training_callbacks(out_dir), *callbacks])
    resume_training(trainer, out_dir, training_key(formatted_dir, model_dir, cfg))  # from a checkpoint if any
    # adapter/ (LoRA methods) or model/ (full, hft), with the chat template the rows were formatted with
    return save_trained(trainer, load_tokenizer(model_dir, formatted_dir, cfg.trust_remote_code), out_dir, cfg)


@stage_task("train", retries=1)
def train_adapter(formatted_dir: Path, model_dir: str, out_dir: Path, cfg: TrainConfig,
                  tracking: Tracking | None = None, slots: int = 0) -> Path:
    """Train on the formatted rows (live metrics to the run's MLflow run when `tracking` is given), diagnose the
    curve, and return the adapter (or model) directory. A nan/inf stops at once with TrainingDiverged, never retried.

    Training holds one of this machine's `slots` training slots (`orchestrate.train_slots`, 0 = one per 2 cores; a
    Prefect global concurrency limit, tasks/concurrency.py), waiting for one while other runs hold them all, with
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
