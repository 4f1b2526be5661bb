"""Encode conversations: plan their pieces (tasks/formatting/masks.py), tokenize each piece, mask, in batches, checked,
spread over the cores.

`ChatEncoder` plans with shape plans where they are proved (tasks/formatting/masks.py, tasks/formatting/skeletons.py)
and tokenizes with tiktoken where it is proved to give the HF tokenizer's ids (tasks/formatting/fast_tokenizer.py); a
sample of each run's rows is also done the plain way (Jinja for every row, the HF tokenizer) and compared, and any
difference sends the whole run the plain way. A row is one or more parts (tasks/formatting/masks.py); each part is one
training row of ids, masked by piece. `encode_all` spreads the rows: tokenizer threads in this process where shape plans
cover them (the tokenizers release the GIL), processes where Jinja must render.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Protocol

import numpy as np

from tasks.core.errors import ConfigError
from tasks.formatting.fast_tokenizer import FastTokenizer
from tasks.formatting.masks import MASK_MODES, Part, ShapePlan, Tokens, plan_parts, prompt_pieces, shape_of, shape_plan
from tasks.formatting.templates import ChatRenderer

FAST_CHECK_FIRST = 128  # rows at the start of each run whose shortcut results are checked the slow way
CHECK_EVERY = 200  # and one in this many of the rest (hash-chosen)
ROWS_PER_PROCESS = 10_000  # below this many rows per process, starting one (imports, ~3 s) costs more than it saves
TEXT_ROLE = "text"  # a plain text row (continued pre-training): its text and EOS, all supervised, no template


class Rows(Sequence):
    """Rows laid end to end in one array: row r is values[bounds[r]:bounds[r + 1]] (a view, made when asked for),
    so a chunk's rows are not 1,000 array objects and a consumer can take the flat arrays whole."""

    def __init__(self, values: np.ndarray, bounds: np.ndarray):
        self.values, self.bounds = values, bounds

    def __len__(self) -> int:
        return len(self.bounds) - 1

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[k] for k in range(*r.indices(len(self)))]
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(r)
        return self.values[self.bounds[r]:self.bounds[r + 1]]


@dataclass
class Encoded:
    """Token ids and masks of a batch of conversations' parts (a numpy array per part: a list, or Rows of one chunk),
    which row each part belongs to, and the checks' findings."""

    ids: list[np.ndarray] | Rows = field(default_factory=list)
    masks: list[np.ndarray] | Rows = field(default_factory=list)
    # index of the last token of each part's final supervised piece (its end-of-turn token), -1 if none
    last_token: list[int] = field(default_factory=list)
    prompt_tokens: list[int] = field(default_factory=list)  # each part's tokens before its last supervised answer
    row_of: list[int] = field(default_factory=list)  # each part's row (index in the batch)
    fast_mismatches: list[tuple[int, str]] = field(default_factory=list)  # (row of the run, what differs from HF)
    # (row of the run, what differs) where a shape plan's pieces differ from planning the row with Jinja
    render_mismatches: list[tuple[int, str]] = field(default_factory=list)
    fallbacks: Counter = field(default_factory=Counter)  # template fallbacks taken (templates.py), rows each
    extra_parts: int = 0  # parts beyond one per row: answers trained after their own prompt (tasks/formatting/masks.py)
    tokenizer: str = "hf"  # which tokenizer gave the ids: tiktoken or hf

    def extend(self, other: Encoded, offset: int, rows: bool = True) -> None:
        """Append another batch's results (its row indices shifted by `offset`); its parts too unless not `rows`."""
        if rows:
            if not isinstance(self.ids, list):  # Rows: from here on, a view per part
                self.ids, self.masks = list(self.ids), list(self.masks)
            self.ids += list(other.ids)
            self.masks += list(other.masks)
            self.last_token += other.last_token
            self.prompt_tokens += other.prompt_tokens
            self.row_of += [offset + r for r in other.row_of]
        self.fast_mismatches += other.fast_mismatches
        self.render_mismatches += other.render_mismatches
        self.fallbacks += other.fallbacks


@dataclass
class PieceTokens:
    """The ids of a batch's pieces laid end to end: piece p is ids[bounds[p]:bounds[p + 1]]; with the sampled rows
    whose fast ids differ from the HF tokenizer's (`ChatEncoder.tokenize_rows`)."""

    ids: np.ndarray
    bounds: np.ndarray
    mismatches: list[tuple[int, str]] = field(default_factory=list)


class ChatEncoder:
    """Plan, tokenize and mask conversations; picklable, so worker processes can each hold one."""

    def __init__(self, renderer: ChatRenderer, backend, mode: str, fast: FastTokenizer | None = None,
                 text_ends: tuple[str | None, str | None] = (None, None)):
        """`backend` is the fast tokenizer's Rust tokenizer (`tokenizer.backend_tokenizer`); `fast`, where given,
        is tiktoken proved to give its ids (tasks/formatting/fast_tokenizer.py), checked again on a sample of rows.
        `text_ends`: the BOS the tokenizer puts before a text (None if it puts none) and its EOS, for plain text
        rows."""
        if mode not in MASK_MODES:
            raise ConfigError(f"chat.mask={mode!r}: use one of {', '.join(MASK_MODES)}")
        self.renderer, self.backend, self.mode, self.fast, self.text_ends = renderer, backend, mode, fast, text_ends
        self.tokens = Tokens(renderer.added_tokens)
        self._plans: dict[tuple, ShapePlan | None] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "backend": self.backend.to_str(), "_plans": {}, "tokens": None}

    def __setstate__(self, state: dict) -> None:
        from tokenizers import Tokenizer

        self.__dict__.update(state, backend=Tokenizer.from_str(state["backend"]))
        self.tokens = Tokens(self.renderer.added_tokens)

    @property
    def tokenizer_path(self) -> str:
        """Which tokenizer gives the ids: tiktoken (proved equal) or the HF tokenizer itself."""
        return "hf" if self.fast is None else "tiktoken"

    def without_fast(self) -> ChatEncoder:
        """Return a copy that tokenizes with the HF tokenizer only."""
        return ChatEncoder(self.renderer, self.backend, self.mode, text_ends=self.text_ends)

    def without_skeletons(self) -> ChatEncoder:
        """Return a copy that plans every conversation with Jinja."""
        return ChatEncoder(self.renderer.without_skeletons(), self.backend, self.mode, self.fast, self.text_ends)

    def encode(self, convos: list[list[dict]], weights: list[list[float]], tools: Sequence | None = None,
               start: int = 0) -> Encoded:
        """Return the ids and masks of the parts of `convos` (rows `start`… of the run). On the shortcuts, the
        sampled rows (`checked_rows`) are also done the plain way and any difference is recorded."""
        parts, render_mismatches, fallbacks = self.render(convos, weights, tools, start)
        out = self.finish(parts, self.tokenize_rows(parts, start), start)
        out.render_mismatches, out.fallbacks = render_mismatches, fallbacks
        return out

    def plan_row(self, convo: list[dict], weights: list[float], tools: list | None) -> tuple[list[Part], list[str]]:
        """Return one conversation's parts, planned with Jinja, and the template fallbacks taken."""
        if convo and convo[0]["role"] == TEXT_ROLE:
            bos, eos = self.text_ends
            pieces = [p for p in (bos, convo[0]["content"], eos) if p]
            return [Part(pieces, [True] * len(pieces), 0)], []
        messages, kwargs, fallbacks = self.renderer.messages_for(convo, tools)
        return plan_parts(self.renderer, messages, weights, self.mode, kwargs, self.tokens), fallbacks

    def render(self, convos: list[list[dict]], weights: list[list[float]], tools: Sequence | None = None,
               start: int = 0) -> tuple[list[list[Part]], list[tuple[int, str]], Counter]:
        """Return each conversation's parts, from its shape's plan where one is proved, (run row, what differs) for
        each sampled row whose planned parts differ from planning it with Jinja, and the fallbacks taken."""
        tools = tools if tools is not None else [None] * len(convos)
        out: list[list[Part] | None] = [None] * len(convos)
        shapes: dict[int, tuple[ShapePlan, list[int]]] = {}
        fallbacks: Counter = Counter()
        for i, (convo, w) in enumerate(zip(convos, weights)):
            plan = self.plan(convo, w) if not tools[i] else None
            if plan is None:
                out[i], taken = self.plan_row(convo, w, tools[i])
                fallbacks.update(set(taken))
            else:
                shapes.setdefault(id(plan), (plan, []))[1].append(i)
        for plan, rows in shapes.values():  # each shape's rows at once
            for i, parts in zip(rows, plan.render_many([convos[i] for i in rows])):
                out[i] = parts
        planned = {i for _, rows in shapes.values() for i in rows}
        mismatches = [(start + i, "pieces") for i in sorted(checked_rows(start, len(convos)) & planned)
                      if out[i] != self.plan_row(convos[i], weights[i], tools[i])[0]]
        return out, mismatches, fallbacks

    def plan(self, convo: list[dict], weights: list[float]) -> ShapePlan | None:
        """Return the shape plan for this conversation's shape, or None to plan it with Jinja."""
        if not self.renderer.skeletons or (shape := shape_of(convo, weights)) is None:
            return None
        if shape not in self._plans:
            self._plans[shape] = shape_plan(self.renderer, shape, self.mode, self.tokens)
        return self._plans[shape]

    def tokenize(self, parts: list[Part]) -> PieceTokens:
        """Return the ids of every piece of `parts`, in order: tiktoken where it can, else the HF tokenizer."""
        pieces = [piece for part in parts for piece in part.pieces]
        if self.fast is None:
            return self.hf_tokenize(pieces)
        ids, _, _, bounds, bad = self.fast.encode_flat(pieces)
        if not bad.any():
            return PieceTokens(ids.astype(np.int32), bounds)
        arrays = [ids[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        left = np.flatnonzero(bad)
        hf = self.hf_tokenize([pieces[i] for i in left])
        for k, i in enumerate(left):
            arrays[i] = hf.ids[hf.bounds[k]:hf.bounds[k + 1]]
        return pieces_of(arrays)

    def tokenize_rows(self, parts: list[list[Part]], start: int) -> PieceTokens:
        """Return the ids of every piece of the rows' parts (`tokenize`), rows `start`… of the run; on the fast path
        with the sampled rows (`checked_rows`) whose ids differ from the HF tokenizer's. The check runs here, in the
        tokenizer threads, not in the thread that plans the next chunk (encode_threaded): it was a fifth of the
        format task's wall time there."""
        tokens = self.tokenize([p for row in parts for p in row])
        if self.fast is not None:
            tokens.mismatches = self.fast_mismatches(parts, tokens, start)
        return tokens

    def hf_tokenize(self, pieces: list[str]) -> PieceTokens:
        """Return each piece's ids from the HF tokenizer."""
        encodings = self.backend.encode_batch(pieces, add_special_tokens=False) if pieces else []
        return pieces_of([np.asarray(e.ids, dtype=np.int32) for e in encodings])

    def finish(self, parts: list[list[Part]], tokens: PieceTokens, start: int) -> Encoded:
        """Return the parts' ids and masks from their pieces' ids (`tokenize`), with their rows, last supervised
        tokens and prompt lengths; compare sampled rows with the HF tokenizer on the fast path."""
        out = Encoded()
        flat = [p for row in parts for p in row]
        counts = np.diff(tokens.bounds)
        flags = np.fromiter((s for p in flat for s in p.supervised), dtype=np.int8, count=len(counts))
        masks = np.repeat(flags, counts)
        n_pieces = np.fromiter((len(p.pieces) for p in flat), dtype=np.int64, count=len(flat))
        first = np.zeros(len(flat) + 1, dtype=np.int64)
        np.cumsum(n_pieces, out=first[1:])
        part_bounds = tokens.bounds[first]
        out.ids, out.masks = Rows(tokens.ids, part_bounds), Rows(masks, part_bounds)
        out.row_of = [r for r, row in enumerate(parts) for _ in row]
        for k, p in enumerate(flat):
            base = part_bounds[k]
            out.prompt_tokens.append(int(tokens.bounds[first[k] + p.prompt_pieces] - base))
            last = max((j for j, s in enumerate(p.supervised) if s), default=None)
            out.last_token.append(-1 if last is None else int(tokens.bounds[first[k] + last + 1] - base - 1))
        out.fast_mismatches = tokens.mismatches
        return out

    def fast_mismatches(self, parts: list[list[Part]], tokens: PieceTokens, start: int) -> list[tuple[int, str]]:
        """Return (run row, "token ids") for each sampled row (`checked_rows`) whose pieces' ids in `tokens` differ
        from the HF tokenizer's, piece by piece (ids and where each piece ends); HF encodes every sampled piece in
        one batch."""
        first = np.zeros(len(parts) + 1, dtype=np.int64)  # each row's first piece
        np.cumsum([sum(len(p.pieces) for p in row) for row in parts], out=first[1:])
        rows = sorted(checked_rows(start, len(parts)))
        hf = self.hf_tokenize([piece for r in rows for part in parts[r] for piece in part.pieces])
        found, k = [], 0
        for r in rows:
            a, b = first[r], first[r + 1]
            lengths, hf_lengths = np.diff(tokens.bounds[a:b + 1]), np.diff(hf.bounds[k:k + b - a + 1])
            if not (np.array_equal(lengths, hf_lengths) and np.array_equal(
                    tokens.ids[tokens.bounds[a]:tokens.bounds[b]], hf.ids[hf.bounds[k]:hf.bounds[k + b - a]])):
                found.append((start + r, "token ids"))
            k += b - a
        return found

    def encode_prompt(self, convo: list[dict], tools: list | None = None, thinking: bool | None = None
                      ) -> list[int]:
        """Return the ids of the inference prompt after canonical turns `convo`: the same pieces a training row of
        the conversation has before the next answer, so they are its prefix (tasks/formatting/masks.py). `thinking` sets
        a template's thinking switch (default: on when a turn has a trace)."""
        messages, kwargs, _ = self.renderer.messages_for(convo, tools, thinking)
        pieces = prompt_pieces(self.renderer, messages, kwargs, self.tokens)
        return self.hf_tokenize(pieces).ids.tolist()


def pieces_of(arrays: list[np.ndarray]) -> PieceTokens:
    """Return per-piece id arrays as PieceTokens."""
    bounds = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum([len(a) for a in arrays], out=bounds[1:])
    ids = np.concatenate(arrays).astype(np.int32) if arrays else np.zeros(0, dtype=np.int32)
    return PieceTokens(ids, bounds)


def checked_rows(start: int, n: int) -> set[int]:
    """Return which of rows start…start+n-1 of a run have their shortcut results (shape plans, fast ids) checked
    against the plain way: the first FAST_CHECK_FIRST rows and a hash-chosen one in CHECK_EVERY of the rest (index
    in the chunk)."""
    rows = np.arange(start, start + n, dtype=np.uint64)
    hashed = (rows * np.uint64(2654435761)) % np.uint64(1 << 32) % np.uint64(CHECK_EVERY)  # Knuth's multiplicative
    return set(np.flatnonzero((rows < FAST_CHECK_FIRST) | (hashed == 0)).tolist())


def is_checked(row: int) -> bool:
    """Return whether row `row` of a run is one `checked_rows` samples."""
    return row < FAST_CHECK_FIRST or (row * 2654435761) % (1 << 32) % CHECK_EVERY == 0


def process_count(rows: int, num_proc: int) -> int:
    """Return how many processes to format `rows` rows with (chat.num_proc; 0 picks by rows and CPU cores)."""
    if num_proc:
        return num_proc
    return max(1, min(cpu_count(), rows // ROWS_PER_PROCESS))


class Sink(Protocol):
    """Takes encoded rows in order as encode_all finishes them, instead of its result holding them."""

    def add(self, part: Encoded, start: int) -> None:
        """Take rows start… of the run."""

    def restart(self) -> None:
        """Forget every row taken: the run starts again, the slow way."""


def encode_all(encoder: ChatEncoder, convos: Sequence[list[dict]], weights: Sequence[list[float]],
               tools: Sequence | None = None, num_proc: int = 0, chunk: int = 1000, sink: Sink | None = None
               ) -> Encoded:
    """Return the ids and masks of every conversation's parts, in order; with a `sink`, hand it each chunk's parts
    in order as they are done instead (the result then holds only the checks' findings), so a consumer works
    meanwhile.

    Where shape plans cover the rows, what is left is mostly tokenizing, and tiktoken and the HF tokenizer both
    release the GIL: the rows are encoded in this process, chunks tokenized in one thread per core while the next
    chunk is planned. Rows that need Jinja go to `num_proc` processes (0: by row count and cores). A sampled row that
    a shortcut gets wrong sends the whole run through the slow way, with a warning naming the row, so one run's rows
    never mix the two: planned pieces that differ from Jinja's (planned again with Jinja), or fast-path ids that
    differ from the HF tokenizer's (encoded again by HF)."""
    tools = tools if tools is not None else [None] * len(convos)
    how, workers = parallelism(encoder, convos, weights, tools, num_proc)
    if how == "threads":
        out = encode_threaded(encoder, convos, weights, tools, workers, chunk, sink)
    else:
        out = encode_chunks(encoder, convos, weights, tools, workers, chunk, sink)
    for found, what, slower in ((out.render_mismatches, "shape plan's {} differ from Jinja's",
                                 encoder.without_skeletons),
                                (out.fast_mismatches, "fast tokenizer's {} differ from the HF tokenizer's",
                                 encoder.without_fast)):
        if found:
            from tasks.core.common import stage_logger

            row, detail = found[0]
            stage_logger().warning("format: the %s on row %d (%d of the checked rows differ); encoding every row the "
                                   "slow way", what.format(detail), row, len(found))
            if sink is not None:
                sink.restart()
            return encode_all(slower(), convos, weights, tools, num_proc, chunk, sink)
    out.tokenizer = encoder.tokenizer_path
    return out


SKELETON_SHARE = 0.9  # rows covered by shape plans, at least, for one process with tokenizer threads to pay
SHARE_SAMPLE = 1000  # rows that decide it


def parallelism(encoder: ChatEncoder, convos: Sequence[list[dict]], weights: Sequence[list[float]], tools: Sequence,
                num_proc: int) -> tuple[str, int]:
    """Return how encode_all spreads the rows: ("threads", tokenizer threads) in this process where shape plans
    cover them, else ("processes", how many)."""
    sample = range(min(len(convos), SHARE_SAMPLE))
    covered = sum(not tools[i] and (encoder.plan(convos[i], weights[i]) is not None
                                    or (convos[i] and convos[i][0]["role"] == TEXT_ROLE)) for i in sample)
    if covered / max(len(sample), 1) >= SKELETON_SHARE:
        return "threads", num_proc or cpu_count()
    return "processes", process_count(len(convos), num_proc)


def cpu_count() -> int:
    """Return the cores this process may run on."""
    return len(os.sched_getaffinity(0))


def encode_chunks(encoder: ChatEncoder, convos: Sequence[list[dict]], weights: Sequence[list[float]],
                  tools: Sequence, procs: int, chunk: int, sink: Sink | None = None) -> Encoded:
    """Return the encoded chunks of `chunk` rows, joined in order, from `procs` processes (see encode_all's `sink`)."""
    starts = list(range(0, len(convos), chunk))
    if procs == 1:
        return encode_threaded(encoder, convos, weights, tools, 1, chunk, sink)
    # spawn, not fork: the parent may run other threads (Prefect's). Each worker gets the encoder once.
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn"), initializer=start_worker,
                             initargs=(encoder,)) as pool:
        parts = pool.map(encode_in_worker, [convos[s:s + chunk] for s in starts],
                         [weights[s:s + chunk] for s in starts], [tools[s:s + chunk] for s in starts], starts)
        out, progress = Encoded(), Progress(len(convos))
        for s, part in zip(starts, parts):
            taken(out, part, s, sink)
            progress.done(min(s + chunk, len(convos)))
    return out


class Progress:
    """Log how far encoding got, at most every PROGRESS_S seconds (a long format step is never silent)."""

    def __init__(self, total: int):
        self.total, self.started, self.last = total, time.perf_counter(), time.perf_counter()

    def done(self, rows: int) -> None:
        """Record that `rows` rows are encoded; log it when PROGRESS_S passed since the last line."""
        now = time.perf_counter()
        if now - self.last >= PROGRESS_S and rows < self.total:
            from tasks.core.common import stage_logger

            stage_logger().info("format: encoded %d/%d rows (%.0f rows/s)", rows, self.total,
                                rows / max(now - self.started, 1e-9))
            self.last = now


PROGRESS_S = 5.0


def taken(out: Encoded, part: Encoded, start: int, sink: Sink | None) -> None:
    """Add a finished chunk (rows start…) to `out`, its rows to the sink if there is one."""
    out.extend(part, start, rows=sink is None)
    if sink is not None:
        sink.add(part, start)


def encode_threaded(encoder: ChatEncoder, convos: Sequence[list[dict]], weights: Sequence[list[float]],
                    tools: Sequence, threads: int, chunk: int, sink: Sink | None = None) -> Encoded:
    """Return the encoded chunks in order: this thread plans chunk after chunk and finishes them in order, while
    `threads` threads tokenize (the Rust tokenizers release the GIL, so they share the cores with the planning).
    See encode_all for `sink`."""
    out, pending, progress = Encoded(), [], Progress(len(convos))

    def finish_oldest() -> None:
        s0, parts0, render_mismatches, fallbacks, tokens0 = pending.pop(0)
        part = encoder.finish(parts0, tokens0.result(), s0)
        part.render_mismatches, part.fallbacks = render_mismatches, fallbacks
        taken(out, part, s0, sink)
        progress.done(s0 + len(parts0))

    with ThreadPoolExecutor(threads) as pool:
        for s in range(0, len(convos), chunk):
            parts, render_mismatches, fallbacks = encoder.render(convos[s:s + chunk], weights[s:s + chunk],
                                                                 tools[s:s + chunk], s)
            pending.append((s, parts, render_mismatches, fallbacks, pool.submit(encoder.tokenize_rows, parts, s)))
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


def encode_in_worker(convos: list[list[dict]], weights: list[list[float]], tools: list, start: int) -> Encoded:
    """Encode one chunk (rows `start`… of the run) with this worker's encoder."""
    return _WORKER["encoder"].encode(convos, weights, tools, start)
