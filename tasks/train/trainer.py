"""The trainer: TRL's SFTTrainer, its config and callbacks for a run (`build_trainer`), with an optional
memory-lean loss (`train.lean_loss`). Both the train task and each `accelerate launch` rank build it here.

The lean loss builds logits only at positions whose next token carries a label. With SmolLM2's 49k vocabulary the
logits of a 4k-token micro-batch are 800 MB in fp32, and the loss keeps more copies of that size for the backward
pass; prompt tokens are the larger part of a chat row and need none of it. Padding-free batches are one flattened row,
so the labelled positions go to the model as `logits_to_keep` (a 1-D tensor of sequence indices); in padded batches
a hook on the LM head gathers the hidden states of the labelled positions before the projection. Both go through the
model's own forward, so PEFT, autocast and DDP wrappers stay in charge. The loss is TRL's: summed token cross-entropy
over `num_items_in_batch` (the labelled tokens of the whole accumulated step), and TRL's entropy and token-accuracy
metrics (a full-vocabulary pass over every position on a CPU) are skipped.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from tasks.core.common import stage_logger
from tasks.core.config import TrainConfig
from tasks.core.errors import ConfigError
from tasks.model.dequantized import dequantize_once, train_without_repacking
from tasks.model.modeling import has_cuda, load_base_model, model_precision
from tasks.model.precision import Precision
from tasks.model.tokenizer import load_tokenizer
from tasks.train.fast_paths import device_kernels
from tasks.train.monitoring import monitoring_callbacks
from tasks.train.utilisation import ledger_callback


def next_token_labels(labels):
    """Return, for each position, the label of the token it predicts (labels shifted left, -100 at the end)."""
    import torch

    return torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)


@contextmanager
def gather_lm_head_input(lm_head, keep):
    """Within the block, the LM head projects only the hidden states where `keep` (batch x sequence) is True."""
    handle = lm_head.register_forward_pre_hook(lambda module, args: (args[0][keep],))
    try:
        yield
    finally:
        handle.remove()


def lean_loss_sum(model, inputs: dict, lm_head):
    """Return (summed cross-entropy over labelled tokens, their count) without full-sequence logits."""
    import torch

    targets = next_token_labels(inputs["labels"])
    keep = targets != -100
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    model_inputs["use_cache"] = False
    if targets.shape[0] == 1:  # padding-free: one flattened row, so the labelled positions are sequence indices
        positions = keep[0].nonzero().squeeze(1)
        logits = model(**model_inputs, logits_to_keep=positions).logits[0]
        wanted = targets[0, positions]
    else:
        with gather_lm_head_input(lm_head, keep):
            logits = model(**model_inputs).logits  # (labelled tokens, vocabulary)
        wanted = targets[keep]
    loss_sum = torch.nn.functional.cross_entropy(logits.float(), wanted, reduction="sum")
    return loss_sum, keep.sum()


def cast_trainable(model, dtype) -> None:
    """Cast every trainable parameter of `model` to `dtype` (in place)."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def sftflow_trainer_class():
    """Return the SFTTrainer subclass sftflow trains with (imported lazily: TRL is heavy)."""
    import torch
    from trl import SFTTrainer

    class SftflowTrainer(SFTTrainer):
        """SFTTrainer with `lean_loss`: logits only at labelled positions, no full-vocabulary metrics; trainable
        weights kept in `trainable_dtype` across a resume."""

        def __init__(self, *args, lean_loss: bool = False, trainable_dtype=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.lean_loss, self.trainable_dtype = lean_loss, trainable_dtype

        def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
            # PEFT's load_adapter casts the LoRA weights back to fp32 (autocast_adapter_dtype): a resumed bf16 run
            # would train on in fp32 and drift from an uninterrupted one. Cast them back before the optimizer exists.
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            if self.trainable_dtype is not None:
                cast_trainable(self.model, self.trainable_dtype)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not self.lean_loss or return_outputs:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            lm_head = self.accelerator.unwrap_model(model).get_output_embeddings()
            loss_sum, count = lean_loss_sum(model, inputs, lm_head)
            denominator = count if num_items_in_batch is None else num_items_in_batch
            loss = loss_sum / torch.as_tensor(denominator, device=loss_sum.device).clamp(min=1)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL: DDP averages, the count spans every rank
            if self.model.training:  # TRL's running token count, cheap: no logits involved
                mask = inputs.get("attention_mask")
                local = inputs["input_ids"].new_tensor(int(mask.sum()) if mask is not None
                                                       else inputs["input_ids"].numel())
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(local).sum())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

        def log(self, logs, start_time=None):
            # The run's summary log (train_runtime, ...) comes after the last evaluation, in eval mode, so TRL's log
            # drops the pending train metrics: a run that ends before its first logging step would report no tokens
            # to the ledger (tasks/train/utilisation.py). The summary carries the run's count itself.
            if "train_runtime" in logs:
                logs = {**logs, "num_tokens": self._total_train_tokens}
            super().log(logs, start_time)

    return SftflowTrainer


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


def sft_config(cfg: TrainConfig, out_dir: Path, precision: Precision, liger: bool = False):
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
        activation_checkpointing=cuda, disable_tqdm=True, use_liger_kernel=liger,  # not gradient_checkpointing (v6)
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
    from transformers import EarlyStoppingCallback, PrinterCallback

    from tasks.train.methods import method_callbacks
    from tasks.train.packing import use_packed_attention, write_packing_report

    check_train_config(cfg)
    precision = model_precision(cfg.compute_dtype)
    kernels = device_kernels(cfg.packing, cfg.lean_loss)  # the libraries' GPU fast paths on CUDA, ours on a CPU
    stage_logger().info("train: kernels: %s", kernels.reason)
    rows = Dataset.from_parquet(str(formatted_dir / "train.parquet")).select_columns(["input_ids", "assistant_masks"])
    model = load_base_model(model_dir, cfg.load_in_4bit, cfg.compute_dtype, cfg.load_in_8bit, cfg.trust_remote_code,
                            attn_implementation=kernels.attention)
    if cfg.load_in_4bit:  # the frozen NF4 weights dequantized once on a CPU, not twice a micro-batch
        train_without_repacking(model)  # an in-training evaluation must not switch bitsandbytes to its inference op
        stage_logger().info("train: 4-bit weights: %s",
                            dequantize_once(model, precision.torch_dtype, has_cuda()).reason)
    if not cfg.uses_lora:
        model = model.float()  # full weights train in fp32 master weights; autocast gives the compute dtype
    if cfg.packing and kernels.attention is None:
        use_packed_attention(model)  # attention within each conversation only, no flattened-batch-sized scores
    extra = [EarlyStoppingCallback(cfg.early_stopping_patience)] if cfg.early_stopping_patience else []
    trainer = sftflow_trainer_class()(
        model=model, args=sft_config(cfg, out_dir / "checkpoints", precision, kernels.liger), train_dataset=rows,
        eval_dataset=heldout_rows(formatted_dir, cfg),
        processing_class=load_tokenizer(model_dir, formatted_dir, cfg.trust_remote_code),
        peft_config=lora_config(cfg), callbacks=[*method_callbacks(model, cfg), *extra, *callbacks],
        lean_loss=cfg.lean_loss and not kernels.liger,
        trainable_dtype=trainable_dtype(precision) if cfg.uses_lora else None)
    if cfg.uses_lora:
        match_adapter_dtype(trainer.model, precision)
    # With tqdm off the Trainer prints every log dict to stdout; the train task logs each step itself (and MLflow
    # records the metrics), so the prints only repeated it.
    trainer.remove_callback(PrinterCallback)
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


def training_callbacks(out_dir: Path, cfg: TrainConfig | None = None) -> list:
    """Return the callbacks every training process runs: tokens/s and peak memory in each log, MFU and the cost
    ledger (tasks/train/utilisation.py), live MLflow logging when the train task opened a run
    (out_dir/mlflow_run.json), the per-step progress line, the nan/inf stop."""
    throughput, *measure, stop = monitoring_callbacks(out_dir)
    precision = model_precision(cfg.compute_dtype if cfg else "auto").name
    book = ledger_callback(out_dir, precision, cfg.price_per_hour if cfg else None)
    return [throughput, book, *measure, progress_callback(), stop]
