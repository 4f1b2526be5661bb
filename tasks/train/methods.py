"""Training methods beyond LoRA: full fine-tuning and Half Fine-Tuning (HFT), and where each method saves its result.

HFT (Hui et al., 2024, "HFT: Half Fine-Tuning for Large Language Models") updates half of the transformer blocks at a
time: in each round of `train.hft_round_steps` optimizer steps one half is frozen and the other trained, and the halves
swap between rounds. A frozen block gets no gradient, so AdamW skips it (no update, no weight decay) and its optimizer
state waits for its next round. The parameters outside the blocks (embeddings, final norm, LM head) train in every
round, as in full fine-tuning.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

from tasks.core.config import TrainConfig
from tasks.core.errors import ConfigError


def transformer_blocks(model) -> list:
    """Return the model's transformer blocks, in order (the ModuleList with one entry per hidden layer)."""
    import torch

    count = model.config.get_text_config().num_hidden_layers
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == count:
            return list(module)
    raise ConfigError(f"train.method=hft: found no list of {count} transformer blocks in {type(model).__name__}")


def hft_halves(num_blocks: int, seed: int) -> tuple[list[int], list[int]]:
    """Return the two halves of the block indices HFT alternates between: a seeded random split, each half sorted."""
    if num_blocks < 2:
        raise ConfigError(f"train.method=hft needs at least 2 transformer blocks to halve; the model has {num_blocks}")
    order = list(range(num_blocks))
    random.Random(seed).shuffle(order)
    half = num_blocks // 2
    return sorted(order[:half]), sorted(order[half:])


def hft_trained_half(step: int, cfg: TrainConfig, halves: tuple[list[int], list[int]]) -> list[int]:
    """Return the block indices trained in the round that optimizer step `step` (0-based) belongs to."""
    return halves[(step // cfg.hft_round_steps) % 2]


def hft_callback(model, cfg: TrainConfig):
    """Return a TrainerCallback that, before each optimizer step, freezes the blocks outside this round's half.

    The round follows from the global step, so a run resumed from a checkpoint continues the same schedule.
    """
    from transformers import TrainerCallback

    blocks = transformer_blocks(model)
    halves = hft_halves(len(blocks), cfg.seed)

    class HalfFineTuning(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            trained = set(hft_trained_half(state.global_step, cfg, halves))
            for index, block in enumerate(blocks):
                for param in block.parameters():
                    param.requires_grad_(index in trained)

    return HalfFineTuning()


def method_callbacks(model, cfg: TrainConfig) -> list:
    """Return the callbacks a training method needs (HFT's half schedule), none for the others."""
    return [hft_callback(model, cfg)] if cfg.method == "hft" else []


def saved_name(cfg: TrainConfig) -> str:
    """Return the directory name training writes in the train dir: adapter (LoRA methods) or model (full weights)."""
    return "adapter" if cfg.uses_lora else "model"


def save_trained(trainer, tokenizer, out_dir: Path, cfg: TrainConfig) -> Path:
    """Save what training produced, atomically: full weights to out_dir/model (full, hft) or the LoRA adapter to
    out_dir/adapter, with the tokenizer, and the loss history to out_dir/log_history.json; remove the other kind, so
    `trained_model_dir` finds this run's result. Return the directory.

    Called on every rank under accelerate launch: `trainer.save_model` gathers the full state dict there (FSDP) and
    writes on the main process only, which alone moves files.
    """
    name, other = saved_name(cfg), "model" if cfg.uses_lora else "adapter"
    final, tmp = out_dir / name, out_dir / f"{name}.tmp"
    main = trainer.is_world_process_zero()
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    if main:
        (tmp / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(tmp)  # the inference chat template the rows were formatted with
        shutil.rmtree(final, ignore_errors=True)
        shutil.rmtree(out_dir / other, ignore_errors=True)
        tmp.replace(final)
        (out_dir / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1), encoding="utf-8")
    return final
