"""A one-entry prefix cache: the keys and values of the prompt head that requests share, computed once.

Every prompt a fine-tuned version is sent starts alike: the chat template's system turn (SmolLM2's adds a default one),
the user header, and for a task model its fixed instruction ("Extract the order as JSON with keys ..."): over 50 of the
~70 tokens of the default data's prompts. Prefill cost grows with the tokens computed, and a batch does not make it
cheaper per token, so recomputing that head for every request is most of a short request's prefill. This keeps one
head's cache (batch 1, per layer keys and values) and lends a prefill its first k columns, so it computes only each
prompt's own tail.

Which head: when the cached one shares fewer than MIN_SHARED tokens with the prompts being prefilled, the head these
prompts share with the previous prefill's first prompt replaces it (one forward over that head). A workload with a
fixed head therefore computes it once; a changing one pays at most one extra forward over a head per change. Every
prompt keeps at least its last token to compute, whose logits choose its first answer token. The head's keys carry
their RoPE positions already, so a row [head | padding | tail] with the tail's position ids counting on from the head
attends exactly as the whole prompt would, up to float rounding (the head is computed in a forward of its own).
"""

from __future__ import annotations

from typing import Any

MIN_SHARED = 16  # tokens; below this a head is not worth a forward of its own


def common_prefix(sequences: list[list[int]]) -> int:
    """Return the length of the longest head all `sequences` share."""
    n = min(len(s) for s in sequences)
    first = sequences[0]
    for k in range(n):
        if any(s[k] != first[k] for s in sequences[1:]):
            return k
    return n


class PrefixCache:
    """The cached head (its ids and per-layer keys and values, batch 1) and the previous prefill's first prompt."""

    def __init__(self, model):
        self.model = model
        self.ids: list[int] = []
        self.layers: list[tuple[Any, Any]] = []
        self.previous: list[int] | None = None
        self.reused = 0  # prompt tokens not computed thanks to the cache, for /health

    def lookup(self, prompts: list[list[int]]) -> int:
        """Return how many head tokens of `prompts` the cache holds for them (0: prefill them whole), after replacing
        the cached head when it does not serve them and they share a longer one with the previous prompt."""
        longest = min(len(p) for p in prompts) - 1  # each prompt computes at least its last token
        k = min(common_prefix([self.ids, *prompts]), longest) if self.ids else 0
        if k < MIN_SHARED and self.previous is not None:
            head = min(common_prefix([self.previous, *prompts]), longest)
            if head >= MIN_SHARED:
                self.store(prompts[0][:head])
                k = head
        self.previous = prompts[0]
        if k < MIN_SHARED:
            return 0
        self.reused += k * len(prompts)
        return k

    def store(self, ids: list[int]) -> None:
        """Compute and keep the keys and values of head `ids`."""
        import torch

        device = next(self.model.parameters()).device
        cache = self.model(torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1).past_key_values
        self.ids, self.layers = list(ids), [(layer.keys, layer.values) for layer in cache.layers]

    def lend(self, rows: int, k: int):
        """Return a new cache holding the first `k` head columns for each of `rows` rows."""
        from transformers import DynamicCache

        return DynamicCache([(keys[..., :k, :].expand(rows, -1, -1, -1), values[..., :k, :].expand(rows, -1, -1, -1))
                             for keys, values in self.layers])
