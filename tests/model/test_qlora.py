"""QLoRA on a tiny random llama, on the CPU: the real bitsandbytes 4-bit + PEFT + TRL path."""

import json

import pytest
import torch

from tasks.train.train import train_model
from tasks.train.trainer import build_trainer
from tests.model.conftest import ANSWER, tiny_train_config


def test_trl_labels_are_exactly_the_assistant_turns_plus_end_of_turn(formatted, tiny_model_dir, tiny_tokenizer,
                                                                     tmp_path):
    trainer = build_trainer(formatted, str(tiny_model_dir), tmp_path, tiny_train_config(max_steps=1, packing=False))
    decoded = {tiny_tokenizer.decode([t for t in row["labels"] if t != -100]) for row in trainer.train_dataset}
    assert decoded == {ANSWER + "<|im_end|>", "first<|im_end|>second<|im_end|>"}
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    for labels in batch["labels"]:  # padding never carries a label
        kept = labels[labels != -100]
        assert tiny_tokenizer.decode(kept) in decoded


def test_qlora_lowers_the_loss_changes_only_lora_weights_and_learns_the_answer(formatted, tiny_model_dir,
                                                                               tiny_tokenizer, tmp_path):
    from peft import PeftModel

    from tasks.core.config import EvaluateConfig
    from tasks.evaluate.evaluate import generate_answers
    from tasks.model.modeling import load_base_model

    base_before = {k: v.detach().clone() for k, v in load_base_model(str(tiny_model_dir), True).state_dict().items()}
    adapter = train_model(formatted, str(tiny_model_dir), tmp_path, tiny_train_config())
    losses = [r["loss"] for r in json.loads((tmp_path / "log_history.json").read_text()) if "loss" in r]
    assert losses[-1] < 0.5 * losses[0]

    model = PeftModel.from_pretrained(load_base_model(str(tiny_model_dir), True), str(adapter))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # lora_B starts at zero: non-zero means it trained
    base_after = model.get_base_model().state_dict()
    for name, before in base_before.items():
        after = base_after[name.replace(".weight", ".base_layer.weight")] if name not in base_after else \
            base_after[name]
        assert torch.equal(before, after), f"base weight {name} changed"
    assert any("4bit" in type(m).__name__ for m in model.modules())  # trained over a real 4-bit NF4 base

    prompt = [[{"role": "user", "content": "Extract the order #3."}]]
    (answer,) = generate_answers(model.eval(), tiny_tokenizer, prompt, EvaluateConfig(max_new_tokens=40))
    with model.disable_adapter():
        (base_answer,) = generate_answers(model, tiny_tokenizer, prompt, EvaluateConfig(max_new_tokens=40))
    assert answer.startswith(ANSWER) and not base_answer.startswith(ANSWER)


@pytest.mark.parametrize("flags, dtype", [({"avx2"}, torch.float32), ({"avx2", "amx_bf16"}, torch.bfloat16)])
def test_the_trainer_keeps_lora_weights_and_4bit_compute_in_the_cpus_native_dtype(formatted, tiny_model_dir, tmp_path,
                                                                                  monkeypatch, flags, dtype):
    from tasks.model import precision

    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.delenv(precision.COMPUTE_DTYPE_ENV, raising=False)  # what the CPU picks, not what make test forces
    trainer = build_trainer(formatted, str(tiny_model_dir), tmp_path, tiny_train_config(max_steps=1))
    trainable = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert trainable == {dtype}  # TRL alone casts a quantized model's adapters to bf16, emulated on AVX2
    assert trainer.model.config.quantization_config.bnb_4bit_compute_dtype == dtype
    assert trainer.args.bf16 == (dtype == torch.bfloat16)
