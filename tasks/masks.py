"""Loss masks for any chat template, found by rendering prefixes: no `{% generation %}` markers needed.

For assistant turn i of a conversation, the text before its answer is the rendering of turns[:i] with the generation
prompt, and its answer ends where the rendering of turns[:i+1] ends (trailing whitespace dropped, so the end-of-turn
marker stays in and the newline after it does not). Both must be prefixes of the whole rendering: a template that
renders earlier turns differently once later ones follow would train on one format and be asked in another, so that
fails with an example. Where a shape's skeleton is proved (tasks/skeletons.py), those prefix lengths come from it
instead of from Jinja. The texts are then tokenized (tasks/encoding.py) and a token is supervised when its characters
overlap a supervised span, the rule transformers' `return_assistant_tokens_mask` applies to `{% generation %}` spans
(tests/unit/test_templates_masks.py checks they agree). The ids are exactly what the tokenizer gives for the text.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np

from tasks.errors import ConfigError
from tasks.skeletons import Skeleton
from tasks.templates import ChatRenderer

MASK_MODES = ("assistant", "last_turn", "completion", "all")


@dataclass
class Rendered:
    """One conversation's text, its supervised character spans, and where the prompt of its last answer ends."""

    text: str
    spans: list[tuple[int, int]]
    prompt_end: int


def prefix_checked(renderer: ChatRenderer, convo: list[dict], upto: int, gen: bool, full: str) -> str:
    """Return the rendering of convo[:upto]; raise if the whole conversation's rendering does not start with it."""
    text = renderer.render(convo[:upto], add_generation_prompt=gen)
    if not full.startswith(text):
        at = next((k for k, (a, b) in enumerate(zip(text, full)) if a != b), min(len(text), len(full)))
        raise ConfigError(
            f"the chat template renders the first {upto} turns{' with the generation prompt' if gen else ''} as "
            f"{text[max(at - 30, 0):at + 30]!r} but the whole conversation as {full[max(at - 30, 0):at + 30]!r}, "
            "so the model would be prompted in a format it was not trained on; use a template that renders turns "
            "in order (chat.template or chat.chat_template)")
    return text


def render_spans(renderer: ChatRenderer, convo: list[dict], weights: list[float], mode: str) -> Rendered:
    """Return the rendered conversation with the character spans `mode` supervises.

    `weights` holds each assistant turn's loss weight, in order; a weight-0 turn is rendered but not supervised.
    """
    full = renderer.render(convo)
    kept = supervised_turns([m["role"] for m in convo], weights)
    return spans_from(kept, len(convo), mode, full,
                      lambda upto, gen: len(prefix_checked(renderer, convo, upto, gen, full)))


def supervised_turns(roles: list[str] | tuple[str, ...], weights: list[float]) -> list[int]:
    """Return the indices of the assistant turns with a loss weight other than 0; raise if there is none."""
    kept = [i for i, w in zip([i for i, r in enumerate(roles) if r == "assistant"], weights) if w]
    if not kept:
        raise ConfigError("a conversation has no assistant turn with a loss weight other than 0")
    return kept


def spans_from(kept: list[int], n: int, mode: str, full: str, prefix_length) -> Rendered:
    """Return the Rendered of an n-turn conversation whose whole rendering is `full` and whose supervised answers
    are turns `kept`, given `prefix_length(upto, gen)`: the length of the rendering of the first `upto` turns (with
    the generation prompt if gen), a prefix of `full`."""
    keys = sorted(needed_prefixes(n, kept, mode))
    return spans_many(kept, n, mode, [full], {key: [prefix_length(*key)] for key in keys})[0]


def spans_many(kept: list[int], n: int, mode: str, texts: list[str], prefix: dict[tuple[int, bool], list[int]]
               ) -> list[Rendered]:
    """Return the Rendered of n-turn conversations of one shape, whose whole renderings are `texts` and whose
    supervised answers are turns `kept`, given `prefix[upto, gen][row]`: the length of the rendering of the first
    `upto` turns of each (with the generation prompt if gen), a prefix of its text (`needed_prefixes` names them)."""
    if mode == "all":
        return [Rendered(text, [(0, len(text))], end) for text, end in zip(texts, prefix[kept[-1], True])]
    if mode == "completion":
        return [Rendered(text, [(end, len(text.rstrip()))], end) for text, end in zip(texts, prefix[kept[-1], True])]
    turns = kept if mode == "assistant" else kept[-1:]
    per_turn = []  # each turn's span in every row: it ends where the next turn starts, trailing whitespace dropped
    for i in turns:
        starts = prefix[i, True]
        if i == n - 1:
            per_turn.append([(a, a + len(text[a:].rstrip())) for text, a in zip(texts, starts)])
        else:
            per_turn.append([(a, a + len(text[a:b].rstrip())) for text, a, b in zip(texts, starts, prefix[i + 1, False])])
    return [Rendered(text, list(spans), spans[-1][0]) for text, spans in zip(texts, zip(*per_turn))]


class ShapePlan:
    """How to render conversations of one shape (roles, which answers are supervised) from skeletons: the whole
    rendering's skeleton and the skeleton of each prefix the masks need, each proved to start the whole one."""

    def __init__(self, full: Skeleton, prefixes: dict[tuple[int, bool], Skeleton], kept: list[int], n: int,
                 mode: str):
        self.full, self.prefixes, self.kept, self.n, self.mode = full, prefixes, kept, n, mode

    def render(self, convo: list[dict]) -> Rendered:
        return self.render_many([convo])[0]

    def render_many(self, convos: list[list[dict]]) -> list[Rendered]:
        """Return the Rendered of conversations of this shape, all at once."""
        contents = [[m["content"] for m in convo] for convo in convos]
        lengths = np.fromiter(map(len, chain.from_iterable(contents)), dtype=np.int64,
                              count=len(convos) * self.n).reshape(len(convos), self.n)
        prefix = {key: (skeleton.literal_length + lengths[:, list(skeleton.slots)].sum(axis=1)).tolist()
                  for key, skeleton in self.prefixes.items()}
        return spans_many(self.kept, self.n, self.mode, self.full.fill_many(contents), prefix)


def needed_prefixes(n: int, kept: list[int], mode: str) -> set[tuple[int, bool]]:
    """Return the (upto, gen) prefixes spans_from asks for, for an n-turn conversation supervising turns `kept`."""
    if mode in ("all", "completion"):
        return {(kept[-1], True)}
    turns = kept if mode == "assistant" else kept[-1:]
    return {(i, True) for i in turns} | {(i + 1, False) for i in turns if i < n - 1}


def shape_of(convo: list[dict], weights: list[float]) -> tuple | None:
    """Return the shape key of a conversation that skeletons can render (plain role/content messages with
    non-empty string contents), else None."""
    roles = []
    for m in convo:
        content = m.get("content")
        if len(m) != 2 or content.__class__ is not str or not content:
            return None
        roles.append(m["role"])
    return tuple(roles), tuple([bool(w) for w in weights])


def shape_plan(renderer: ChatRenderer, shape: tuple, mode: str) -> ShapePlan | None:
    """Return the plan of a shape, or None when a skeleton it needs is not proved (render such rows one by one)."""
    roles, supervised = shape
    if any(r.__class__ is not str for r in roles) or not any(supervised):
        return None  # rendered one by one, which fails with the reason
    kept = supervised_turns(roles, list(supervised))
    full = renderer.skeleton(roles, False)
    if full is None:
        return None
    prefixes = {}
    for upto, gen in needed_prefixes(len(roles), kept, mode):
        skeleton = renderer.skeleton(roles[:upto], gen)
        if skeleton is None or not skeleton.starts(full):
            return None  # rendered one by one: a template that breaks the prefix rule then fails with its example
        prefixes[upto, gen] = skeleton
    return ShapePlan(full, prefixes, kept, len(roles), mode)


def token_mask(offsets: np.ndarray, spans: list[tuple[int, int]]) -> np.ndarray:
    """Return 1 for each token whose characters overlap a span, else 0 (offsets: one (start, end) row per token)."""
    mask = np.zeros(len(offsets), dtype=np.int8)
    if len(offsets):
        starts, ends = offsets[:, 0], offsets[:, 1]
        for a, b in spans:
            mask[(starts < b) & (ends > a)] = 1
    return mask


def last_token(offsets: np.ndarray, span: tuple[int, int]) -> int:
    """Return the index of the last token that overlaps `span` (its end-of-turn token), or -1 if none does."""
    a, b = span
    i = int(np.searchsorted(offsets[:, 0], b)) - 1  # the last token starting before the span's end
    return i if i >= 0 and offsets[i, 1] > a else -1


@dataclass
class TokenBatch:
    """The tokens of a batch of rows in flat arrays, with each row's supervised spans in the unit of its offsets."""

    ids: np.ndarray  # int32, every row's ids one after another
    starts: np.ndarray  # int64 offset of each token's first byte/character within its row's text
    ends: np.ndarray  # int64 offset just past each token
    bounds: np.ndarray  # row r holds tokens bounds[r]:bounds[r + 1]
    spans: list[list[tuple[int, int]]]

    @classmethod
    def of_rows(cls, rows: list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]) -> TokenBatch:
        """Return the batch of per-row (ids, (start, end) offsets, spans)."""
        bounds = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum([len(ids) for ids, _, _ in rows], out=bounds[1:])
        offsets = np.concatenate([o for _, o, _ in rows]) if rows else np.zeros((0, 2), dtype=np.int64)
        ids = np.concatenate([i for i, _, _ in rows]).astype(np.int32) if rows else np.zeros(0, dtype=np.int32)
        return cls(ids, offsets[:, 0], offsets[:, 1], bounds, [s for _, _, s in rows])

    def rows(self) -> list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
        """Return per-row (ids, (start, end) offsets, spans)."""
        return [(self.ids[a:b], np.stack([self.starts[a:b], self.ends[a:b]], axis=1), spans)
                for a, b, spans in zip(self.bounds[:-1], self.bounds[1:], self.spans)]

    def masks_and_ends(self) -> tuple[np.ndarray, list[int]]:
        """Return every token's mask (1 where its characters overlap a span of its row: `token_mask`'s rule) and each
        row's `last_token`, for all rows at once: rows are laid end to end, each span covers the tokens from the
        first ending after its start to the last starting before its end, and one sorted search finds them all."""
        n, counts = len(self.spans), np.diff(self.bounds)
        if n == 0 or not len(self.ids):
            return np.zeros(len(self.ids), dtype=np.int8), [-1] * n
        # row r's offsets are shifted by base[r], past everything of the rows before it
        last_end = self.ends[np.maximum(self.bounds[1:] - 1, 0)] * (counts > 0)
        span_ends = [s[-1][1] if s else 0 for s in self.spans]
        base = np.zeros(n, dtype=np.int64)
        np.cumsum(np.maximum(last_end, span_ends)[:-1] + 1, out=base[1:])
        token_base = np.repeat(base, counts)
        gs, ge = self.starts + token_base, self.ends + token_base
        if (np.diff(gs) < 0).any() or (np.diff(ge) < 0).any():  # offsets out of order: the rule row by row
            rows = self.rows()
            return (np.concatenate([token_mask(offsets, spans) for _, offsets, spans in rows]),
                    [last_token(offsets, spans[-1]) for _, offsets, spans in rows])
        pairs = np.array([(a, b, r) for r, s in enumerate(self.spans) for a, b in s], dtype=np.int64).reshape(-1, 3)
        span_a, span_b = pairs[:, 0] + base[pairs[:, 2]], pairs[:, 1] + base[pairs[:, 2]]
        first = np.searchsorted(ge, span_a, side="right")  # the first token ending after the span starts
        stop = np.searchsorted(gs, span_b, side="left")  # past the last token starting before the span ends
        keep = first < stop
        first, stop = first[keep], stop[keep]
        edges = np.empty(2 * len(first) + 2, dtype=np.int64)
        edges[0], edges[1:-1:2], edges[2:-1:2], edges[-1] = 0, first, stop, len(gs)
        if (runs := np.diff(edges)).min() >= 0:  # the spans' tokens in order, none in two spans: runs of 0s and 1s
            mask = np.repeat(np.tile(np.array([0, 1], dtype=np.int8), len(first) + 1)[:len(runs)], runs)
        else:
            cover = (np.bincount(first, minlength=len(gs) + 1)
                     - np.bincount(stop, minlength=len(gs) + 1))  # +1 where a span's tokens start, -1 past them
            mask = (np.cumsum(cover[:-1]) > 0).astype(np.int8)
        # each row's last span: its last token is the last one starting before the span ends, if it overlaps
        last = np.array([len(s) and s[-1][0] for s in self.spans], dtype=np.int64) + base
        i = np.searchsorted(gs, np.asarray(span_ends, dtype=np.int64) + base) - 1
        ok = (i >= self.bounds[:-1]) & (ge[np.maximum(i, 0)] > last) & np.array([bool(s) for s in self.spans])
        return mask, np.where(ok, i - self.bounds[:-1], -1).tolist()


def marked_text(tokenizer, ids: list[int], mask: list[int], colour: bool = False) -> str:
    """Return the decoded tokens with each supervised run in [[…]] (green if `colour`) followed by its token count."""
    parts, start = [], 0
    for end in range(1, len(ids) + 1):
        if end == len(ids) or mask[end] != mask[start]:
            text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
            if mask[start]:
                text = f"\x1b[32m[[{text}]]\x1b[0m" if colour else f"[[{text}]]"
                text += f"({end - start})"
            parts.append(text)
            start = end
    return "".join(parts)
