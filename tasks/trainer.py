"""The trainer: TRL's SFTTrainer with an optional memory-lean loss (`train.lean_loss`).

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

from contextlib import contextmanager


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
                local = inputs["input_ids"].new_tensor(int(mask.sum()) if mask is not None else inputs["input_ids"].numel())
                self._total_train_tokens += int(self.accelerator.gather_for_metrics(local).sum())
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return loss

    return SftflowTrainer
