"""Packing: TRL packs the tokenized conversations best-fit-decreasing (`pack_dataset`, strategy "bfd") into rows of
`train.pack_length` tokens, and its padding-free collator flattens a micro-batch into one row whose position ids
restart at 0 for each conversation. transformers reads the restarts as sequence boundaries (masking_utils
`find_packed_sequence_indices`) and builds a block-diagonal causal mask, so no conversation attends to another (a test
checks each conversation's logits inside a packed row against the same conversation run alone).

The fill rate is the share of a packed row's slots that hold real tokens: real tokens over packed rows x pack_length.

That block-diagonal mask still makes sdpa attend over the whole flattened micro-batch: batch x pack_length squared
scores per head and layer, kept for the backward pass (on a CPU, with a mask, sdpa takes its math path). For a 4k-token
micro-batch of SmolLM2-135M that was ~0.5 GB per layer, 16 GB a step, and 10x the time. So packed training uses
`PACKED_ATTENTION`: transformers' sdpa run causally on each conversation alone, cut at the collator's `cu_seq_lens_q`
boundaries, which costs each conversation's own length squared and needs no mask at all.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

PACKED_ATTENTION = "sftflow_packed_sdpa"


def packing_report(source, packed, pack_length: int) -> dict:
    """Return how well the conversations packed: rows before and after, real and slot tokens, the fill rate, and the
    tokens BFD cut from conversations longer than a packed row."""
    real = sum(len(ids) for ids in packed["input_ids"])
    source_tokens = sum(len(ids) for ids in source["input_ids"])
    slots = len(packed) * pack_length
    return {"conversations": len(source), "packed_rows": len(packed), "pack_length": pack_length,
            "real_tokens": real, "slot_tokens": slots, "fill_rate": round(real / max(slots, 1), 4),
            "truncated_tokens": source_tokens - real}


def write_packing_report(source, packed, pack_length: int, out_dir: Path) -> dict:
    """Write the packing report to out_dir/packing.json and return it."""
    report = packing_report(source, packed, pack_length)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "packing.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Attention for padding-free batches: sdpa with is_causal on each sequence between the `cu_seq_lens_q`
    boundaries (query/key/value are batch x heads x tokens x dim); plain causal sdpa when there are none."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = kwargs.pop("cu_seq_lens_q", None)
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k", "is_causal"):
        kwargs.pop(name, None)
    if bounds is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    bounds = bounds.tolist()
    outputs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                      dropout=dropout, scaling=scaling, is_causal=True, **kwargs)[0]
               for s, e in itertools.pairwise(bounds) if e > s]
    return torch.cat(outputs, dim=1), None


def use_packed_attention(model) -> None:
    """Switch `model` to per-sequence attention for padding-free packed batches (registered once, by name)."""
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    model.set_attn_implementation(PACKED_ATTENTION)
