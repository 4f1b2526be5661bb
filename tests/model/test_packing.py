"""Packing on the tiny model: BFD rows, padding-free batches, and attention that never crosses a conversation."""

import json

import pyarrow.parquet as pq
import pytest
import torch

from tasks.train.packing import PACKED_ATTENTION
from tasks.train.trainer import build_trainer
from tests.conftest import assert_same_value, compute_dtype
from tests.model.conftest import ANSWER, tiny_train_config

PACK = 256  # the fixture's conversations are 10-90 tokens: several share a packed row


@pytest.fixture(scope="module")
def packed(formatted, tiny_model_dir, tmp_path_factory):
    """A LoRA trainer over the packed fixture rows (lora_B starts at zero: its model computes the base's logits)."""
    out = tmp_path_factory.mktemp("packed")
    return build_trainer(formatted, str(tiny_model_dir), out,
                         tiny_train_config(method="lora", max_steps=1, pack_length=PACK)), out


def segments(position_ids):
    """Return (start, end) of each sequence in a flattened row, from where its position ids restart at 0."""
    starts = (position_ids == 0).nonzero().flatten().tolist()
    return list(zip(starts, starts[1:] + [len(position_ids)]))


def test_conversations_are_bfd_packed_and_the_fill_rate_is_reported(formatted, packed):
    trainer, out = packed
    source = pq.read_table(formatted / "train.parquet").column("input_ids").to_pylist()
    rows = trainer.train_dataset
    assert len(rows) < len(source)  # conversations share rows
    assert all(len(ids) <= PACK for ids in rows["input_ids"])
    assert sorted(n for lengths in rows["seq_lengths"] for n in lengths) == sorted(len(s) for s in source)
    report = json.loads((out / "packing.json").read_text())
    real = sum(len(s) for s in source)
    assert report["real_tokens"] == real and report["truncated_tokens"] == 0
    assert report["packed_rows"] == len(rows) and report["slot_tokens"] == len(rows) * PACK
    assert report["fill_rate"] == round(real / (len(rows) * PACK), 4) > 0.5


def test_a_padding_free_batch_is_one_row_whose_positions_restart_and_labels_stay_the_assistant_turns(
        packed, tiny_tokenizer):
    trainer, _ = packed
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # no padding at all
    spans = segments(batch["position_ids"][0])
    assert len(spans) == sum(len(trainer.train_dataset[i]["seq_lengths"]) for i in (0, 1))
    expected = {ANSWER + "<|im_end|>", "first<|im_end|>second<|im_end|>"}
    for start, end in spans:
        assert torch.equal(batch["position_ids"][0, start:end], torch.arange(end - start))
        labels = batch["labels"][0, start:end]
        assert tiny_tokenizer.decode(labels[labels != -100]) in expected


@pytest.mark.dtype_sensitive
@pytest.mark.parametrize("attention", [PACKED_ATTENTION, "sdpa"])
def test_each_packed_conversation_gets_the_logits_it_gets_alone(packed, attention):
    """Both the per-conversation attention training uses and transformers' own sdpa with the block-diagonal mask it
    derives from the restarting position ids (masking_utils.find_packed_sequence_indices) keep conversations apart."""
    trainer, _ = packed
    model = trainer.model.eval()
    assert model.config._attn_implementation == PACKED_ATTENTION  # what build_trainer set for packing
    model.set_attn_implementation(attention)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if attention == "sdpa":
        inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}  # positions alone
    ids, spans = batch["input_ids"], segments(batch["position_ids"][0])
    assert len(spans) >= 4
    dtype = compute_dtype()  # of the 4-bit base's matmuls and the LoRA weights: other shapes, other roundings
    try:
        with torch.no_grad():
            together = model(**inputs).logits[0]
            unmasked = model(input_ids=ids).logits[0]  # the same row with one running position: attention crosses
            for start, end in spans:
                alone = model(input_ids=ids[:, start:end]).logits[0]
                assert_same_value(together[start:end], alone, dtype)
    finally:
        model.set_attn_implementation(PACKED_ATTENTION)
    start, end = spans[1]
    with pytest.raises(AssertionError):  # the check above can fail: crossing attention is far outside the tolerance
        assert_same_value(unmasked[start:end], together[start:end], dtype)
