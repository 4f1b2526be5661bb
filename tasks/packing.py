"""Packing: TRL packs the tokenized conversations best-fit-decreasing (`pack_dataset`, strategy "bfd") into rows of
`train.pack_length` tokens, and its padding-free collator flattens a micro-batch into one row whose position ids
restart at 0 for each conversation. transformers reads the restarts as sequence boundaries (masking_utils
`find_packed_sequence_indices`) and builds a block-diagonal causal mask, so no conversation attends to another (a test
checks each conversation's logits inside a packed row against the same conversation run alone).

The fill rate is the share of a packed row's slots that hold real tokens: real tokens over packed rows x pack_length.
"""

from __future__ import annotations

import json
from pathlib import Path


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
