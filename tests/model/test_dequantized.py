"""The 4-bit base's frozen weights dequantized once on a CPU (tasks/model/dequantized.py): the same losses, gradients
and answers as bitsandbytes' own path, bit for bit, in both compute dtypes; used in training; never saved."""

import contextlib

import pytest
import torch

from tasks.model.dequantized import ATTRIBUTE, SHARE_OF_AVAILABLE, choose, dequantize_once, linear_4bit_modules

GIB = 2**30


def test_choose_takes_the_copies_only_on_a_cpu_and_only_while_they_fit_a_quarter_of_the_free_memory():
    assert choose(True, 10**8, 2, 64 * GIB) == choose(True, 10**8, 2, 64 * GIB)
    assert not choose(True, 10**8, 2, 64 * GIB).once  # CUDA: bitsandbytes' fused kernels
    assert not choose(False, 0, 2, 64 * GIB).once  # nothing quantized
    small = choose(False, 106 * 10**6, 2, 20 * GIB)  # SmolLM2-135M's linear layers in bf16: 0.20 GiB
    assert small.once and "0.20 GiB" in small.reason and "106M weights" in small.reason
    big = choose(False, 7 * 10**9, 2, 24 * GIB)  # a 7B base in bf16: 13 GiB, more than a quarter of 24
    assert not big.once and "13.04 GiB" in big.reason and "24.0 GiB available" in big.reason
    edge = int(8 * GIB * SHARE_OF_AVAILABLE)  # exactly a quarter fits; one byte more does not
    assert choose(False, edge // 4, 4, 8 * GIB).once and not choose(False, edge // 4 + 1, 4, 8 * GIB).once


def qlora_model(model_dir, dtype):
    """The tiny llama in 4-bit NF4 computing in `dtype`, with LoRA adapters whose B is non-zero (so that the
    gradients of every adapter weight depend on the base's weights), in training mode."""
    from peft import LoraConfig, get_peft_model

    from tasks.model.modeling import load_base_model

    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    torch.manual_seed(0)
    model = get_peft_model(load_base_model(str(model_dir), True, name),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for param_name, param in model.named_parameters():
        if "lora_B" in param_name:
            torch.nn.init.normal_(param, std=0.1)
    return model.train()


def loss_and_grads(model, dtype):
    """One forward and backward on a fixed batch, under autocast in `dtype` (as the Trainer runs bf16) or without it."""
    model.zero_grad(set_to_none=True)
    ids = torch.arange(3, 99).reshape(2, 48) % 1000
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_training_with_the_kept_weights_gives_bitsandbytes_loss_and_gradients_bit_for_bit(tiny_model_dir, dtype,
                                                                                           monkeypatch):
    import bitsandbytes as bnb

    reference = loss_and_grads(qlora_model(tiny_model_dir, dtype), dtype)

    model = qlora_model(tiny_model_dir, dtype)
    choice = dequantize_once(model, dtype, cuda=False)
    layers = linear_4bit_modules(model)
    assert choice.once and layers and all(getattr(layer, ATTRIBUTE).dtype == dtype for layer in layers)
    calls = []
    real = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or real(self, x))
    loss, grads = loss_and_grads(model, dtype)
    assert calls == []  # every 4-bit layer computed with its kept weight, none through bitsandbytes' dequantization
    assert torch.equal(loss, reference[0])
    assert grads.keys() == reference[1].keys() and all(torch.equal(grads[n], reference[1][n]) for n in grads)


def test_kept_weights_in_another_dtype_than_the_matmul_leave_it_to_bitsandbytes(tiny_model_dir, monkeypatch):
    import bitsandbytes as bnb

    reference = loss_and_grads(qlora_model(tiny_model_dir, torch.bfloat16), torch.bfloat16)
    model = qlora_model(tiny_model_dir, torch.bfloat16)
    dequantize_once(model, torch.float32, cuda=False)  # kept in fp32, while the layers compute in bf16
    calls = []
    real = bnb.nn.Linear4bit.forward
    monkeypatch.setattr(bnb.nn.Linear4bit, "forward", lambda self, x: calls.append(1) or real(self, x))
    loss, grads = loss_and_grads(model, torch.bfloat16)
    assert len(calls) == len(linear_4bit_modules(model))  # each layer's forward, once, went to bitsandbytes
    assert torch.equal(loss, reference[0]) and all(torch.equal(grads[n], reference[1][n]) for n in grads)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_inference_logits_and_what_is_saved_are_unchanged(tiny_model_dir, dtype):
    """In eval mode without gradients (bitsandbytes' CPU inference kernel where the CPU has one) the logits are
    bitsandbytes' own, and the state dict (checkpoints, adapters) holds nothing new."""
    ids = torch.arange(5, 45).reshape(2, 20)
    reference = qlora_model(tiny_model_dir, dtype).eval()
    model = qlora_model(tiny_model_dir, dtype)
    dequantize_once(model, dtype, cuda=False)
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert model.state_dict().keys() == reference.state_dict().keys()
    assert not any(ATTRIBUTE in key for key in model.state_dict())


def test_the_train_task_uses_the_kept_weights_and_logs_why(formatted, tiny_model_dir, tmp_path, caplog):
    from tasks.train.trainer import build_trainer
    from tests.model.conftest import tiny_train_config

    with caplog.at_level("INFO"):
        trainer = build_trainer(formatted, str(tiny_model_dir), tmp_path, tiny_train_config(max_steps=1))
    layers = linear_4bit_modules(trainer.model)
    assert layers and all(hasattr(layer, ATTRIBUTE) for layer in layers)
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)  # train_without_repacking
    assert any("4-bit weights: CPU: the base's frozen 4-bit weights dequantized once" in r.getMessage()
               for r in caplog.records)
    lora = build_trainer(formatted, str(tiny_model_dir), tmp_path / "lora", tiny_train_config(max_steps=1,
                                                                                               method="lora"))
    assert linear_4bit_modules(lora.model) == []  # nothing quantized, nothing to keep


def test_the_budget_is_shared_among_this_machines_training_processes(tiny_model_dir, monkeypatch):
    import types

    import psutil

    model = qlora_model(tiny_model_dir, torch.bfloat16)
    need = sum(layer.out_features * layer.in_features for layer in linear_4bit_modules(model)) * 2
    monkeypatch.setattr(psutil, "virtual_memory", lambda: types.SimpleNamespace(available=int(need * 4 * 1.5)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # accelerate launch: 4 processes on this machine, each its own copies
    assert not dequantize_once(model, torch.bfloat16, cuda=False).once
    assert not any(hasattr(layer, ATTRIBUTE) for layer in linear_4bit_modules(model))
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert dequantize_once(model, torch.bfloat16, cuda=False).once  # alone, 1.5x its need is a quarter of the free


@pytest.mark.parametrize("compute_dtype", ["bf16", "fp32"])
def test_evaluate_keeps_the_weights_only_where_bitsandbytes_has_no_cpu_inference_kernel_and_answers_alike(
        tiny_model_dir, tmp_path, monkeypatch, compute_dtype):
    """An AVX2-only CPU (bitsandbytes' AVX512-BF16 probe patched off) generates with the kept weights: the same
    tokens as bitsandbytes' dequantization at every step. Where the kernel exists, evaluate leaves the model alone."""
    import bitsandbytes.nn.modules

    from tasks.core.config import TrainConfig
    from tasks.model import dequantized
    from tasks.model.modeling import load_trained_model

    adapter = tmp_path / "adapter"
    qlora_model(tiny_model_dir, torch.bfloat16).save_pretrained(adapter)  # lora_B non-zero: the adapter matters
    cfg = TrainConfig(compute_dtype=compute_dtype)
    ids = torch.arange(5, 25).reshape(2, 10)

    monkeypatch.setattr(dequantized, "inference_kernel", lambda: True)
    with_kernel = load_trained_model(str(tiny_model_dir), adapter, cfg, generating=True).eval()
    assert not any(hasattr(layer, ATTRIBUTE) for layer in linear_4bit_modules(with_kernel))

    monkeypatch.setattr(dequantized, "inference_kernel", lambda: False)
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    plain = load_trained_model(str(tiny_model_dir), adapter, cfg).eval()
    kept = load_trained_model(str(tiny_model_dir), adapter, cfg, generating=True).eval()
    assert all(hasattr(layer, ATTRIBUTE) for layer in linear_4bit_modules(kept))
    assert not any(hasattr(layer, ATTRIBUTE) for layer in linear_4bit_modules(plain))
    with torch.no_grad():
        expected = plain.generate(input_ids=ids, max_new_tokens=12, do_sample=False)
        assert torch.equal(kept.generate(input_ids=ids, max_new_tokens=12, do_sample=False), expected)
        assert torch.equal(kept(input_ids=ids).logits, plain(input_ids=ids).logits)


def evaluate_then_step(model, dtype):
    """A held-out forward in eval mode without gradients (as the Trainer's evaluation runs), then a training step."""
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        model(input_ids=torch.arange(5, 25).reshape(2, 10))
    model.train()
    return loss_and_grads(model, dtype)


@pytest.mark.parametrize("keep", [False, True], ids=["bitsandbytes-path", "kept-weights"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_an_evaluation_during_training_leaves_the_next_steps_gradients_exact(tiny_model_dir, dtype, keep):
    """bitsandbytes repacks its 4-bit weights for its CPU inference kernel at the first no-gradient eval forward, and
    then trains through an op without a backward (the input's gradient dropped). Guarded, the step after an
    evaluation gets the gradients of a step with no evaluation before it, with or without the kept weights."""
    from tasks.model.dequantized import train_without_repacking

    reference = loss_and_grads(qlora_model(tiny_model_dir, dtype), dtype)
    model = qlora_model(tiny_model_dir, dtype)
    assert train_without_repacking(model) == len(linear_4bit_modules(model)) > 0
    if keep:
        assert dequantize_once(model, dtype, cuda=False).once
    loss, grads = evaluate_then_step(model, dtype)
    assert torch.equal(loss, reference[0]) and all(torch.equal(grads[n], reference[1][n]) for n in grads)


def test_without_the_guard_bitsandbytes_drops_the_gradient_after_an_evaluation_on_an_avx512_bf16_cpu(tiny_model_dir):
    """Why the guard exists, shown on the CPUs where bitsandbytes has the kernel (elsewhere it never repacks). If a
    bitsandbytes release fixes it, this fails: then the guard can go."""
    from tasks.model.dequantized import inference_kernel

    reference = loss_and_grads(qlora_model(tiny_model_dir, torch.bfloat16), torch.bfloat16)
    with pytest.warns(UserWarning, match="autograd kernel was not registered") if inference_kernel() else \
            contextlib.nullcontext():
        _, grads = evaluate_then_step(qlora_model(tiny_model_dir, torch.bfloat16), torch.bfloat16)
    first = next(n for n in grads if "layers.0.self_attn.q_proj.lora_A" in n)
    assert torch.equal(grads[first], reference[1][first]) != inference_kernel()
