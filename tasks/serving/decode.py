"""Batched step-wise decoding over one KV cache: each row with its own settings, rows joining and leaving per step.

Why not `model.generate()`: one call takes one max_new_tokens, one temperature and top_p, one seed (torch's global
generator) and one set of stop strings for its whole batch, and it returns when its last row is done. A server batching
unrelated requests needs each row's own budget, sampling and seed, each answer streamed as it grows, a row dropped the
moment its client leaves, and a newcomer joining a batch that is already running. So the loop is here, and small: one
forward per step over each row's last token and the cache, then one token chosen per row.

Layout: prompts are left-padded, so every row's next token sits in the last column; position ids count each row's own
tokens (pads excluded), as generate() counts them. Newcomers are prefilled together: one forward over their
left-padded prompts, logits for the last column only, the head they share with recent prompts lent by the prefix
cache (tasks/serving/prefix.py), so a row is [head | padding | own tail]. Their cache is then padded on the left to the
running cache's length (or the running one to theirs) and the two are concatenated along the batch. A finished or
cancelled row leaves the cache (`batch_select_indices`), and columns that are padding in every row left are cut off.
Padding is masked out and RoPE takes the explicit position ids, so a row's logits do not depend on its neighbours
beyond float rounding.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tasks.core.errors import ConfigError
from tasks.serving.prefix import PrefixCache


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings: a budget of new tokens, greedy (temperature 0) or seeded sampling, stop text,
    and a repetition penalty (None: the decoder's default, the one the served version was evaluated with)."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class Event:
    """What a row reports: new answer text; on its last event also why it ended (stop/length) and its token count."""

    text: str = ""
    finish: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Row:
    """One request being answered: its prompt ids, its settings, and `emit`, where its events go (called from the
    model's thread)."""

    prompt: list[int]
    sampling: Sampling
    emit: Callable[[Event], None]
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer text already emitted
    cancelled: bool = False  # set by the server when the client leaves: the row is dropped before the next step
    done: bool = False
    rng: Any = None

    def __post_init__(self):
        import torch

        self.rng = torch.Generator()
        if self.sampling.seed is None:
            self.rng.seed()
        else:
            self.rng.manual_seed(self.sampling.seed % 2**64)


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """Return how many characters at the end of `text` must not be sent yet: a possible start of a stop string, or
    an incomplete UTF-8 character (the tokenizer decodes half a character as U+FFFD)."""
    partial = max((n for s in stops for n in range(min(len(s) - 1, len(text)), 0, -1) if s.startswith(text[-n:])),
                  default=0)
    return max(partial, len(text) - len(text.rstrip("\ufffd")))


@dataclass
class Batch:
    """The running rows, their KV cache, attention mask (rows x cache columns), next position ids and last tokens."""

    rows: list[Row]
    cache: Any
    mask: Any
    positions: Any
    last: Any


class Decoder:
    """One model answering Rows in a shared batch: `advance` admits newcomers, runs one step, drops finished rows."""

    def __init__(self, model, tokenizer, stop_ids: list[int], pad_id: int, repetition_penalty: float = 1.0):
        import torch

        self.model, self.tokenizer, self.stop_ids, self.pad_id = model, tokenizer, set(stop_ids), pad_id
        self.repetition_penalty = repetition_penalty  # a row's default (Sampling.repetition_penalty None)
        self.seconds = Counter(step=0.0, prefill=0.0)  # time spent in decode steps and in prefills, for /health
        self.prefix = PrefixCache(model)
        self.device = next(model.parameters()).device
        with torch.inference_mode():  # a model whose cache is not plain dynamic layers cannot be padded and merged
            cache = model(torch.tensor([[pad_id]], device=self.device), use_cache=True).past_key_values
        if kinds := {type(layer).__name__ for layer in getattr(cache, "layers", [None])} - {"DynamicLayer"}:
            raise ConfigError(f"{type(model).__name__} keeps a {', '.join(sorted(kinds))} cache; sftflow serve batches "
                              "models with full-attention dynamic caches only (llama, qwen2, mistral without sliding "
                              "window)")

    def advance(self, batch: Batch | None, newcomers: list[Row]) -> Batch | None:
        """Return the batch after dropping cancelled rows, admitting `newcomers` (their first token chosen) and one
        decode step of the rows already running; None when no row is left."""
        if batch is not None:
            batch = self.keep(batch, [r for r in batch.rows if not r.cancelled])
        start = time.perf_counter()
        if batch is not None:
            batch = self.step(batch)
        stepped = time.perf_counter()
        if newcomers:
            batch = self.merge(batch, self.prefill(newcomers))
        self.seconds["step"] += stepped - start
        self.seconds["prefill"] += time.perf_counter() - stepped
        return batch

    def prefill(self, rows: list[Row]) -> Batch | None:
        """Return the newcomers as a batch after a forward over their left-padded prompts (less the head the prefix
        cache lends them, tasks/serving/prefix.py) and their first token."""
        import torch

        k = self.prefix.lookup([r.prompt for r in rows])
        width = max(len(r.prompt) - k for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, r in enumerate(rows):
            ids[n, width - len(r.prompt) + k:] = torch.tensor(r.prompt[k:])
            mask[n, width - len(r.prompt) + k:] = 1
        positions = k + (mask.cumsum(-1) - 1).clamp(min=0)  # the tails count on from the head
        mask = torch.cat([torch.ones((len(rows), k), dtype=torch.long), mask], dim=1).to(self.device)
        out = self.model(ids.to(self.device), attention_mask=mask, position_ids=positions.to(self.device),
                         past_key_values=self.prefix.lend(len(rows), k) if k else None, use_cache=True,
                         logits_to_keep=1)
        lengths = torch.tensor([len(r.prompt) for r in rows], device=self.device)
        return self.choose(Batch(rows, out.past_key_values, mask, lengths, None), out.logits[:, -1])

    def step(self, batch: Batch) -> Batch | None:
        """Return the batch after one forward over its rows' last tokens and the next token of each."""
        import torch

        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((len(batch.rows), 1))], dim=1)
        out = self.model(batch.last, attention_mask=batch.mask, position_ids=batch.positions[:, None],
                         past_key_values=batch.cache, use_cache=True)
        batch.cache, batch.positions = out.past_key_values, batch.positions + 1
        return self.choose(batch, out.logits[:, -1])

    def choose(self, batch: Batch, logits) -> Batch | None:
        """Pick each row's next token (greedy or its own sampler) after its repetition penalty, report it, and return
        the rows still going."""
        penalties = [self.repetition_penalty if r.sampling.repetition_penalty is None else r.sampling.repetition_penalty
                     for r in batch.rows]
        if any(p != 1.0 for p in penalties):
            logits = logits.float()  # as generate() scores: float32 logits, then the processors
            for k, (row, penalty) in enumerate(zip(batch.rows, penalties)):
                if penalty != 1.0:
                    logits[k] = penalised(logits[k], row.prompt + row.tokens, penalty)
        tokens = logits.argmax(-1).tolist()
        for k, row in enumerate(batch.rows):
            if row.sampling.temperature > 0:
                tokens[k] = sample(logits[k], row.sampling, row.rng)
            self.report(row, tokens[k])
        batch.last = logits.new_tensor(tokens, dtype=batch.positions.dtype)[:, None]
        return self.keep(batch, [r for r in batch.rows if not r.done])

    def report(self, row: Row, token: int) -> None:
        """Add `token` to the row's answer and emit the text that is now safe to send; mark the row done when a stop
        id, a stop string or its budget ends it."""
        row.tokens.append(token)
        ended = token in self.stop_ids
        text = self.tokenizer.decode(row.tokens[:-1] if ended else row.tokens, skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False)
        cut = min((i for i in (text.find(s) for s in row.sampling.stop) if i >= 0), default=-1)
        if cut >= 0:
            ended, text = True, text[:max(cut, row.sent)]
        finish = "stop" if ended else "length" if len(row.tokens) >= row.sampling.max_tokens else None
        safe = len(text) if finish else len(text) - held_back(text, row.sampling.stop)
        delta, row.sent = text[row.sent:safe], max(safe, row.sent)
        row.done = finish is not None
        if delta or finish:
            row.emit(Event(delta, finish, len(row.tokens) if finish else 0))

    def keep(self, batch: Batch, rows: list[Row]) -> Batch | None:
        """Return the batch narrowed to `rows` (None if empty), without the columns that are padding in all of them."""
        if len(rows) == len(batch.rows):
            return batch
        if not rows:
            return None
        import torch

        index = torch.tensor([batch.rows.index(r) for r in rows], device=self.device)
        batch.cache.batch_select_indices(index)
        mask = batch.mask[index]
        start = int(mask.any(0).long().argmax())  # first column some row attends to
        for layer in batch.cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        return Batch(rows, batch.cache, mask[:, start:], batch.positions[index], batch.last[index])

    def merge(self, a: Batch | None, b: Batch | None) -> Batch | None:
        """Return one batch of both batches' rows: the shorter cache padded on the left, then concatenated."""
        if a is None or b is None:
            return a or b
        import torch

        width = max(a.mask.shape[1], b.mask.shape[1])
        for la, lb in zip(a.cache.layers, b.cache.layers):
            la.keys, la.values = (torch.cat([left_pad(x, width), left_pad(y, width)])
                                  for x, y in ((la.keys, lb.keys), (la.values, lb.values)))
        mask = torch.cat([left_pad(a.mask, width), left_pad(b.mask, width)])
        return Batch(a.rows + b.rows, a.cache, mask, torch.cat([a.positions, b.positions]), torch.cat([a.last, b.last]))


def left_pad(x, width: int):
    """Return `x` (a mask: rows x columns, or cached keys/values: rows x heads x columns x dim) with zero columns
    added on the left up to `width`."""
    import torch

    dim = 1 if x.dim() == 2 else -2
    missing = width - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


def penalised(logits, seen: list[int], penalty: float):
    """Return one row's `logits` with transformers' repetition penalty on the `seen` ids (its prompt, no padding, and
    its answer so far): a positive logit divided by `penalty`, a negative one multiplied, as
    RepetitionPenaltyLogitsProcessor does, so the served answer is evaluate's."""
    import torch

    ids = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    ids = ids[ids < logits.shape[-1]]  # an id past the output vocabulary cannot be generated: nothing to penalise
    scores = logits[ids]
    return logits.index_put((ids,), torch.where(scores < 0, scores * penalty, scores / penalty))


def sample(logits, sampling: Sampling, rng) -> int:
    """Return a token drawn from softmax(logits / temperature), cut to the top_p nucleus, with the row's generator."""
    import torch

    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        sorted_probs[(sorted_probs.cumsum(0) - sorted_probs) >= sampling.top_p] = 0  # keep the smallest set >= top_p
        return int(order[torch.multinomial(sorted_probs, 1, generator=rng)])
    return int(torch.multinomial(probs, 1, generator=rng))
