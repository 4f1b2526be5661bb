"""Loss masks for any chat template, found by rendering prefixes: no `{% generation %}` markers needed.

For assistant turn i of a conversation, the text before its answer is the rendering of turns[:i] with the generation
prompt, and its answer ends where the rendering of turns[:i+1] ends (trailing whitespace dropped, so the end-of-turn
marker stays in and the newline after it does not). Both must be prefixes of the whole rendering: a template that
renders earlier turns differently once later ones follow would train on one format and be asked in another, so that
fails with an example. The whole texts are then tokenized in batches (the fast tokenizer's Rust `encode_batch`, with
offsets) and a token is supervised when its characters overlap a supervised span, the rule transformers'
`return_assistant_tokens_mask` applies to `{% generation %}` spans (tests/unit/test_templates_masks.py checks they
agree). The ids are exactly what the tokenizer gives for the rendered text.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import pairwise
from multiprocessing import get_context

import numpy as np

from tasks.errors import ConfigError
from tasks.fast_tokenizer import FastTokenizer
from tasks.skeletons import Skeleton
from tasks.templates import ChatRenderer

MASK_MODES = ("assistant", "last_turn", "completion", "all")
FAST_CHECK_FIRST = 128  # rows at the start of each run whose shortcut results are checked the slow way
CHECK_EVERY = 200  # and one in this many of the rest (hash-chosen)
ROWS_PER_PROCESS = 10_000  # below this many rows per process, starting one (imports, ~3 s) costs more than it saves


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
    if mode == "all":
        return Rendered(full, [(0, len(full))], prefix_length(kept[-1], True))
    if mode == "completion":
        prompt_end = prefix_length(kept[-1], True)
        return Rendered(full, [(prompt_end, len(full.rstrip()))], prompt_end)
    spans = []
    for i in kept if mode == "assistant" else kept[-1:]:
        start = prefix_length(i, True)
        end = len(full) if i == n - 1 else prefix_length(i + 1, False)
        spans.append((start, start + len(full[start:end].rstrip())))
    return Rendered(full, spans, spans[-1][0])


class ShapePlan:
    """How to render conversations of one shape (roles, which answers are supervised) from skeletons: the whole
    rendering's skeleton and the skeleton of each prefix the masks need, each proved to start the whole one."""

    def __init__(self, full: Skeleton, prefixes: dict[tuple[int, bool], Skeleton], kept: list[int], n: int,
                 mode: str):
        self.full, self.prefixes, self.kept, self.n, self.mode = full, prefixes, kept, n, mode

    def render(self, convo: list[dict]) -> Rendered:
        contents = [m["content"] for m in convo]
        lengths = [len(c) for c in contents]
        prefixes = self.prefixes
        return spans_from(self.kept, self.n, self.mode, self.full.fill(contents),
                          lambda upto, gen: prefixes[upto, gen].length(lengths))


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
class Encoded:
    """Token ids and masks of a batch of conversations (numpy arrays, one per row), and prompt check results."""

    ids: list[np.ndarray] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    # index of the last token of each row's final supervised span (its end-of-turn token), -1 if none
    last_token: list[int] = field(default_factory=list)
    prompt_failures: list[tuple[int, str]] = field(default_factory=list)  # (row index in the batch, why)
    fast_mismatches: list[tuple[int, str]] = field(default_factory=list)  # (row of the run, what differs from HF)
    # (row of the run, what differs) where a skeleton's rendering differs from Jinja's
    render_mismatches: list[tuple[int, str]] = field(default_factory=list)
    tokenizer: str = "hf"  # which tokenizer gave the ids: tiktoken or hf

    def extend(self, other: Encoded, offset: int) -> None:
        """Append another batch's rows (its row indices shifted by `offset`)."""
        self.ids += other.ids
        self.masks += other.masks
        self.last_token += other.last_token
        self.prompt_failures += [(offset + i, why) for i, why in other.prompt_failures]
        self.fast_mismatches += other.fast_mismatches
        self.render_mismatches += other.render_mismatches


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
            masks = [token_mask(np.stack([self.starts[a:b], self.ends[a:b]], axis=1), s)
                     for a, b, s in zip(self.bounds[:-1], self.bounds[1:], self.spans)]
            return np.concatenate(masks), [last_token(np.stack([self.starts[a:b], self.ends[a:b]], axis=1), s[-1])
                                           for a, b, s in zip(self.bounds[:-1], self.bounds[1:], self.spans)]
        pairs = np.array([(a, b, r) for r, s in enumerate(self.spans) for a, b in s], dtype=np.int64).reshape(-1, 3)
        span_a, span_b = pairs[:, 0] + base[pairs[:, 2]], pairs[:, 1] + base[pairs[:, 2]]
        first = np.searchsorted(ge, span_a, side="right")  # the first token ending after the span starts
        stop = np.searchsorted(gs, span_b, side="left")  # past the last token starting before the span ends
        cover = np.zeros(len(gs) + 1, dtype=np.int32)
        keep = first < stop
        np.add.at(cover, first[keep], 1)
        np.add.at(cover, stop[keep], -1)
        mask = (np.cumsum(cover[:-1]) > 0).astype(np.int8)
        # each row's last span: its last token is the last one starting before the span ends, if it overlaps
        last = np.array([len(s) and s[-1][0] for s in self.spans], dtype=np.int64) + base
        i = np.searchsorted(gs, np.asarray(span_ends, dtype=np.int64) + base) - 1
        ok = (i >= self.bounds[:-1]) & (ge[np.maximum(i, 0)] > last) & np.array([bool(s) for s in self.spans])
        return mask, np.where(ok, i - self.bounds[:-1], -1).tolist()


class ChatEncoder:
    """Render and tokenize conversations with loss masks; picklable, so worker processes can each hold one."""

    def __init__(self, renderer: ChatRenderer, backend, mode: str, fast: FastTokenizer | None = None):
        """`backend` is the fast tokenizer's Rust tokenizer (`tokenizer.backend_tokenizer`); `fast`, where given,
        is tiktoken proved to give its ids (tasks/fast_tokenizer.py), checked again on a sample of rows."""
        if mode not in MASK_MODES:
            raise ConfigError(f"chat.mask={mode!r}: use one of {', '.join(MASK_MODES)}")
        self.renderer, self.backend, self.mode, self.fast = renderer, backend, mode, fast
        self._plans: dict[tuple, ShapePlan | None] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "backend": self.backend.to_str(), "_plans": {}}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.__dict__.update(state, backend=Tokenizer.from_str(state["backend"]))

    @property
    def tokenizer_path(self) -> str:
        """Which tokenizer gives the ids: tiktoken (proved equal) or the HF tokenizer itself."""
        return "hf" if self.fast is None else "tiktoken"

    def without_fast(self) -> ChatEncoder:
        """Return a copy that tokenizes with the HF tokenizer only."""
        return ChatEncoder(self.renderer, self.backend, self.mode)

    def without_skeletons(self) -> ChatEncoder:
        """Return a copy that renders every conversation with Jinja."""
        return ChatEncoder(self.renderer.without_skeletons(), self.backend, self.mode, self.fast)

    def encode(self, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool = False,
               start: int = 0) -> Encoded:
        """Return the ids and masks of `convos` (rows `start`… of the run); with `check_prompts`, also check each
        generation prompt's tokens are a prefix of its conversation's tokens (the round trip evaluation relies on).
        On the fast path, the sampled rows (`checked_rows`) are also encoded by HF and any difference is recorded."""
        rendered, render_mismatches = self.render(convos, weights, start)
        out = self.finish(rendered, self.tokenize(rendered), check_prompts, start)
        out.render_mismatches = render_mismatches
        return out

    def render(self, convos: list[list[dict]], weights: list[list[float]], start: int = 0
               ) -> tuple[list[Rendered], list[tuple[int, str]]]:
        """Return each conversation's text and supervised spans, from its shape's skeletons where they are proved
        (tasks/skeletons.py), and (run row, what differs) for each sampled row (`checked_rows`) whose skeleton
        rendering differs from rendering it with Jinja."""
        out, mismatches, checked = [], [], checked_rows(start, len(convos))
        for i, (convo, w) in enumerate(zip(convos, weights)):
            plan = self.plan(convo, w)
            if plan is None:
                out.append(render_spans(self.renderer, convo, w, self.mode))
                continue
            rendered = plan.render(convo)
            if i in checked and rendered != render_spans(self.renderer, convo, w, self.mode):
                mismatches.append((start + i, "rendering"))
            out.append(rendered)
        return out, mismatches

    def plan(self, convo: list[dict], weights: list[float]) -> ShapePlan | None:
        """Return the skeleton plan for this conversation's shape, or None to render it with Jinja."""
        if not self.renderer.skeletons or (shape := shape_of(convo, weights)) is None:
            return None
        if shape not in self._plans:
            self._plans[shape] = shape_plan(self.renderer, shape, self.mode)
        return self._plans[shape]

    def finish(self, rendered: list[Rendered], batch: TokenBatch, check_prompts: bool, start: int) -> Encoded:
        """Return the ids and masks of rendered rows from their `tokenize` result (see `encode`)."""
        out = Encoded()
        masks, out.last_token = batch.masks_and_ends()
        bounds = list(pairwise(batch.bounds.tolist()))
        out.ids, out.masks = [batch.ids[a:b] for a, b in bounds], [masks[a:b] for a, b in bounds]
        if self.fast is not None:
            out.fast_mismatches = self.fast_mismatches(rendered, out, start)
        if check_prompts:
            out.prompt_failures = self.prompt_failures(rendered, out.ids)
        return out

    def prompt_failures(self, rendered: list[Rendered], ids: list[np.ndarray]) -> list[tuple[int, str]]:
        """Return (row, why) for each row whose generation prompt does not tokenize as a prefix of its ids, with
        the tokenizer that gave the ids (tiktoken gives HF's ids, as proved; a text it leaves to HF goes to HF)."""
        prompts = [r.text[:r.prompt_end] for r in rendered]
        fast = self.fast.encode_batch(prompts) if self.fast else [None] * len(prompts)
        failures = []
        for i, (f, row_ids) in enumerate(zip(fast, ids)):
            prompt_ids = f[0] if f is not None else np.asarray(
                self.backend.encode(prompts[i], add_special_tokens=False).ids, dtype=np.int32)
            if not np.array_equal(row_ids[:len(prompt_ids)], prompt_ids):
                failures.append((i, prefix_problem(self.backend, prompt_ids, row_ids)))
        return failures

    def tokenize(self, rendered: list[Rendered]) -> TokenBatch:
        """Return the rows' tokens with their offsets and supervised spans in one unit per row: bytes on the fast
        path, characters on HF's (a text the fast path leaves to HF gets HF's)."""
        if self.fast is None:
            return TokenBatch.of_rows(self.hf_tokenize(rendered))
        ids, starts, ends, bounds, bad = self.fast.encode_flat([r.text for r in rendered])
        batch = TokenBatch(ids, starts, ends, bounds, [byte_spans(r.text, r.spans) for r in rendered])
        if not bad.any():
            return batch
        rows = batch.rows()
        left = np.flatnonzero(bad)
        for i, row in zip(left, self.hf_tokenize([rendered[i] for i in left])):
            rows[i] = row
        return TokenBatch.of_rows(rows)

    def hf_tokenize(self, rendered: list[Rendered]) -> list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
        """Return each text's (ids, character offsets, supervised spans) from the HF tokenizer."""
        encodings = self.backend.encode_batch([r.text for r in rendered], add_special_tokens=False) if rendered else []
        return [(np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2), r.spans)
                for r, e in zip(rendered, encodings)]

    def fast_mismatches(self, rendered: list[Rendered], out: Encoded, start: int) -> list[tuple[int, str]]:
        """Return (run row, what differs) for each sampled row whose fast ids, mask or end token differ from HF's."""
        rows = sorted(checked_rows(start, len(rendered)))
        found = []
        for i, (ids, offsets, spans) in zip(rows, self.hf_tokenize([rendered[i] for i in rows])):
            if not np.array_equal(ids, out.ids[i]):
                found.append((start + i, "token ids"))
            elif not np.array_equal(token_mask(offsets, spans), out.masks[i]):
                found.append((start + i, "loss mask"))
            elif last_token(offsets, spans[-1]) != out.last_token[i]:
                found.append((start + i, "end-of-turn token"))
        return found


def checked_rows(start: int, n: int) -> set[int]:
    """Return which of rows start…start+n-1 of a run have their shortcut results (skeleton rendering, fast ids)
    checked against the slow way: the first FAST_CHECK_FIRST rows and a hash-chosen one in CHECK_EVERY of the rest
    (index in the chunk)."""
    rows = np.arange(start, start + n, dtype=np.uint64)
    hashed = (rows * np.uint64(2654435761)) % np.uint64(1 << 32) % np.uint64(CHECK_EVERY)  # Knuth's multiplicative
    return set(np.flatnonzero((rows < FAST_CHECK_FIRST) | (hashed == 0)).tolist())


def byte_spans(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return character spans of `text` as UTF-8 byte spans."""
    if text.isascii():
        return spans
    return [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]


def prefix_problem(backend, prompt_ids: np.ndarray, ids: np.ndarray) -> str:
    """Return where the prompt's tokens stop being a prefix of the conversation's `ids`."""
    at = next((k for k, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(ids), len(prompt_ids)))
    training = backend.id_to_token(int(ids[at])) if at < len(ids) else None
    return f"prompt token {at} is {backend.id_to_token(int(prompt_ids[at]))!r} but {training!r} in the training text"


def process_count(rows: int, num_proc: int) -> int:
    """Return how many processes to format `rows` rows with (chat.num_proc; 0 picks by rows and CPU cores)."""
    if num_proc:
        return num_proc
    return max(1, min(len(os.sched_getaffinity(0)), rows // ROWS_PER_PROCESS))


def encode_all(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
               num_proc: int = 0, chunk: int = 1000) -> Encoded:
    """Return the ids and masks of every conversation, in order.

    Where skeletons render the rows (tasks/skeletons.py), what is left is mostly tokenizing, and tiktoken and the HF
    tokenizer both release the GIL: the rows are encoded in this process, chunks tokenized in one thread per core
    while the next chunk renders. Rows that need Jinja go to `num_proc` processes (0: by row count and cores).
    A sampled row that a shortcut gets wrong sends the whole run through the slow way, with a warning naming the
    row, so one run's rows never mix the two: a skeleton rendering that differs from Jinja's (rendered again with
    Jinja), or fast-path ids that differ from the HF tokenizer's (encoded again by HF)."""
    how, workers = parallelism(encoder, convos, weights, num_proc)
    if how == "threads":
        out = encode_threaded(encoder, convos, weights, check_prompts, workers, chunk)
    else:
        out = encode_chunks(encoder, convos, weights, check_prompts, workers, chunk)
    for found, what, slower in ((out.render_mismatches, "skeleton {}'s text or spans differ from Jinja's",
                                 encoder.without_skeletons),
                                (out.fast_mismatches, "fast tokenizer's {} differ from the HF tokenizer's",
                                 encoder.without_fast)):
        if found:
            from tasks.common import stage_logger

            row, detail = found[0]
            stage_logger().warning("format: the %s on row %d (%d of the checked rows differ); encoding every row the "
                                   "slow way", what.format(detail), row, len(found))
            return encode_all(slower(), convos, weights, check_prompts, num_proc, chunk)
    out.tokenizer = encoder.tokenizer_path
    return out


SKELETON_SHARE = 0.9  # rows rendered from skeletons, at least, for one process with tokenizer threads to pay
SHARE_SAMPLE = 1000  # rows that decide it


def parallelism(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], num_proc: int
                ) -> tuple[str, int]:
    """Return how encode_all spreads the rows: ("threads", tokenizer threads) in this process where skeletons render
    them, else ("processes", how many)."""
    if skeleton_share(encoder, convos, weights) >= SKELETON_SHARE:
        return "threads", num_proc or cpu_count()
    return "processes", process_count(len(convos), num_proc)


def skeleton_share(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]]) -> float:
    """Return the share of the first rows whose shape has a proved skeleton plan."""
    sample = range(min(len(convos), SHARE_SAMPLE))
    return sum(encoder.plan(convos[i], weights[i]) is not None for i in sample) / max(len(sample), 1)


def cpu_count() -> int:
    """Return the cores this process may run on."""
    return len(os.sched_getaffinity(0))


def encode_chunks(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
                  procs: int, chunk: int) -> Encoded:
    """Return the encoded chunks of `chunk` rows, joined in order, from `procs` processes."""
    starts = list(range(0, len(convos), chunk))
    if procs == 1:
        return encode_threaded(encoder, convos, weights, check_prompts, 1, chunk)
    # spawn, not fork: the parent may run other threads (Prefect's). Each worker gets the encoder once.
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn"), initializer=start_worker,
                             initargs=(encoder,)) as pool:
        parts = pool.map(encode_in_worker, [convos[s:s + chunk] for s in starts],
                         [weights[s:s + chunk] for s in starts], [check_prompts] * len(starts), starts)
        out = Encoded()
        for s, part in zip(starts, parts):
            out.extend(part, s)
    return out


def encode_threaded(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
                    threads: int, chunk: int) -> Encoded:
    """Return the encoded chunks in order: this thread renders chunk after chunk and finishes them in order, while
    `threads` threads tokenize (the Rust tokenizers release the GIL, so they share the cores with the rendering)."""
    out, pending = Encoded(), []

    def finish_oldest() -> None:
        s0, rendered0, render_mismatches, tokens0 = pending.pop(0)
        part = encoder.finish(rendered0, tokens0.result(), check_prompts, s0)
        part.render_mismatches = render_mismatches
        out.extend(part, s0)

    with ThreadPoolExecutor(threads) as pool:
        for s in range(0, len(convos), chunk):
            rendered, render_mismatches = encoder.render(convos[s:s + chunk], weights[s:s + chunk], s)
            pending.append((s, rendered, render_mismatches, pool.submit(encoder.tokenize, rendered)))
            if len(pending) > threads:
                finish_oldest()
        while pending:
            finish_oldest()
    return out


_WORKER: dict = {}


def start_worker(encoder: ChatEncoder) -> None:
    """Keep the encoder for this worker process; its Rust tokenizer runs single-threaded, as the processes
    already share the cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER["encoder"] = encoder


def encode_in_worker(convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
                     start: int) -> Encoded:
    """Encode one chunk (rows `start`… of the run) with this worker's encoder."""
    return _WORKER["encoder"].encode(convos, weights, check_prompts, start)


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
