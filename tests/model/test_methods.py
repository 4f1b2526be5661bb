"""Training methods on the tiny model (LoRA on fp32 and 8-bit bases, full, HFT), the lean loss, the schedule and early
stopping. QLoRA itself is covered in test_qlora.py."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tasks.core.config import EvaluateConfig
from tasks.evaluate.evaluate import evaluate_model
from tasks.model.modeling import load_base_model, load_trained_model, model_precision, trained_model_dir
from tasks.train.methods import hft_halves, transformer_blocks
from tasks.train.train import train_model
from tasks.train.trainer import build_trainer
from tests.conftest import assert_same_value
from tests.model.conftest import tiny_train_config


def method_config(method, **kw):
    return tiny_train_config(**{"method": method, "max_steps": 8, "batch_size": 2, "gradient_accumulation_steps": 1,
                                "logging_steps": 1, "save_steps": 100, "pack_length": 256, "hft_round_steps": 4, **kw})


def logged(train_dir, key="loss"):
    return [r for r in json.loads((train_dir / "log_history.json").read_text()) if key in r]


@pytest.mark.dtype_sensitive  # the loss must halve in either dtype
@pytest.mark.parametrize("method", ["lora", "lora_8bit", "full", "hft"])
def test_each_method_lowers_the_loss_trains_its_parameters_and_evaluate_loads_the_result(
        method, formatted, tiny_model_dir, tmp_path):
    cfg = method_config(method)
    before = {k: v.clone() for k, v in load_base_model(str(tiny_model_dir), False).state_dict().items()}
    trained = train_model(formatted, str(tiny_model_dir), tmp_path / "train", cfg)
    losses = [r["loss"] for r in logged(tmp_path / "train")]
    assert losses[-1] < 0.5 * losses[0]
    assert trained == trained_model_dir(tmp_path / "train")

    if cfg.uses_lora:  # only LoRA weights trained and saved; the base stays as it was
        assert trained.name == "adapter" and not (tmp_path / "train" / "model").exists()
        saved = load_file(trained / "adapter_model.safetensors")
        assert saved and all("lora_A" in k or "lora_B" in k for k in saved)
        assert all(v.abs().sum() > 0 for k, v in saved.items() if "lora_B" in k)  # lora_B starts at zero
        if method == "lora":
            base = load_trained_model(str(tiny_model_dir), trained, cfg).get_base_model().state_dict()
            for name, weight in before.items():
                assert torch.equal(weight, base.get(name, base.get(name.replace(".weight", ".base_layer.weight"))))
        else:
            model = load_trained_model(str(tiny_model_dir), trained, cfg)
            assert any("8bit" in type(m).__name__ for m in model.modules())
    else:  # full weights, every tensor trained (HFT: each half in its round)
        assert trained.name == "model" and not (tmp_path / "train" / "adapter").exists()
        after = load_trained_model(str(tiny_model_dir), trained, cfg).state_dict()
        assert after.keys() == before.keys()
        assert [k for k in before if torch.equal(before[k], after[k])] == []

    report = evaluate_model(formatted, str(tiny_model_dir), trained, tmp_path / "eval",
                            EvaluateConfig(max_samples=2, max_new_tokens=4, batch_size=2), cfg)
    assert report["eval_loss"] < report["base_eval_loss"]  # the trained weights were loaded, not the base


def test_hft_keeps_the_frozen_half_unchanged_in_each_round_and_swaps_halves(formatted, tiny_model_dir,
                                                                           tmp_path):
    from transformers import TrainerCallback

    snapshots = []

    def snapshot(model):
        blocks = [torch.cat([p.detach().flatten().clone() for p in b.parameters()]) for b in transformer_blocks(model)]
        return blocks, model.get_input_embeddings().weight.detach().clone()

    class Snapshots(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            snapshots.append(snapshot(model))

        def on_step_end(self, args, state, control, model=None, **kwargs):
            snapshots.append(snapshot(model))

    cfg = method_config("hft", max_steps=4, hft_round_steps=2, warmup_ratio=0.0)  # step 1 must move the weights
    train_model(formatted, str(tiny_model_dir), tmp_path, cfg, callbacks=[Snapshots()])
    first, second = hft_halves(2, cfg.seed)
    changed = [{i for i in range(2) if not torch.equal(snapshots[a][0][i], snapshots[b][0][i])}
               for a, b in ((0, 1), (1, 2), (2, 3), (3, 4))]
    assert changed == [set(first), set(first), set(second), set(second)]  # steps 1-2, then 3-4
    assert all(not torch.equal(snapshots[i][1], snapshots[i + 1][1]) for i in range(4))  # embeddings train always


# fp32 pinned: the two losses are the same sum, so they agree to fp32's roundings whatever the CPU; auto: the dtype
# this machine (or SFTFLOW_COMPUTE_DTYPE) computes in, where bf16 gradients differ by a rounding or two of bf16
@pytest.mark.parametrize("compute_dtype", ["fp32", pytest.param("auto", marks=pytest.mark.dtype_sensitive)])
@pytest.mark.parametrize("packing", [True, False])
def test_the_lean_loss_and_its_gradients_equal_the_full_logits_loss(formatted, tiny_model_dir, tmp_path,
                                                                    packing, compute_dtype):
    cfg = tiny_train_config(method="lora", max_steps=1, packing=packing, pack_length=256, compute_dtype=compute_dtype)
    trainer = build_trainer(formatted, str(tiny_model_dir), tmp_path, cfg)
    dtype = model_precision(cfg.compute_dtype).torch_dtype
    model = trainer.model
    torch.manual_seed(0)
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    for name, param in model.named_parameters():
        if "lora_B" in name:  # non-zero, so the gradients reach every LoRA weight
            param.data.normal_(0, 0.1)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(3)]))
    assert (batch["input_ids"].shape[0] == 1) == packing  # padding-free: one row; else padded rows
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    results = {}
    for lean in (True, False):
        trainer.lean_loss = lean
        trainer._metrics["train"].clear()
        model.zero_grad()
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(2 * labelled))
        loss.backward()
        results[lean] = loss.detach(), [p.grad.clone() for p in trainable], set(trainer._metrics["train"])
    assert {g.dtype for g in results[True][1]} == {dtype}  # LoRA weights, so their gradients, are in the compute dtype
    assert_same_value(results[True][0], results[False][0], dtype)
    for lean_grad, full_grad in zip(results[True][1], results[False][1]):
        assert_same_value(lean_grad, full_grad, dtype)
    assert "entropy" in results[False][2] and "entropy" not in results[True][2]  # no full-vocabulary metrics


def test_null_max_steps_trains_whole_epochs_with_warmup_then_cosine_decay(formatted, tiny_model_dir,
                                                                         tmp_path):
    cfg = tiny_train_config(method="lora", max_steps=None, num_epochs=2, lr_scheduler="cosine", warmup_ratio=0.25,
                            batch_size=2, gradient_accumulation_steps=1, logging_steps=1, save_steps=100,
                            pack_length=256)
    train_model(formatted, str(tiny_model_dir), tmp_path, cfg)
    packed_rows = json.loads((tmp_path / "packing.json").read_text())["packed_rows"]
    records = logged(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 2 * math.ceil(packed_rows / 2) + 1))
    rates = [r["learning_rate"] for r in records]
    peak = rates.index(max(rates))
    assert 0 < peak < len(rates) - 1 and rates[peak] == pytest.approx(cfg.learning_rate, rel=0.2)
    assert rates[peak:] == sorted(rates[peak:], reverse=True) and rates[-1] < 0.1 * cfg.learning_rate


def test_early_stopping_ends_training_when_the_heldout_loss_stops_improving(formatted, tiny_model_dir,
                                                                           tmp_path):
    # A clipped-to-nothing gradient leaves every weight as it is, so the held-out loss can never improve
    cfg = tiny_train_config(method="full", max_steps=10, max_grad_norm=1e-30, learning_rate=1e-9, eval_steps=1,
                            eval_rows=2, early_stopping_patience=1, save_steps=1, save_total_limit=1, logging_steps=1,
                            pack_length=256)
    train_model(formatted, str(tiny_model_dir), tmp_path, cfg)
    evals = logged(tmp_path, "eval_loss")
    assert [r["step"] for r in evals] == [1, 2]  # the first eval sets the best, the second did not beat it
    assert evals[0]["eval_loss"] == evals[1]["eval_loss"]
    assert max(r["step"] for r in logged(tmp_path)) == 2  # of max_steps 10
