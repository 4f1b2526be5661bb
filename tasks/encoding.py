"""Encode conversations: render (tasks/masks.py), tokenize and mask them in batches, checked, spread over the cores.

`ChatEncoder` renders with skeletons where they are proved (tasks/skeletons.py) and tokenizes with tiktoken where it is
proved to give the HF tokenizer's ids (tasks/fast_tokenizer.py); a sample of each run's rows is also done the slow way
and compared, and any difference sends the whole run the slow way. `encode_all` spreads the rows: tokenizer threads
in this process where skeletons render them (the tokenizers release the GIL), processes where Jinja must.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Protocol

import numpy as np

from tasks.errors import ConfigError
from tasks.fast_tokenizer import FastTokenizer
from tasks.masks import (
    MASK_MODES,
    Rendered,
    ShapePlan,
    TokenBatch,
    last_token,
    render_spans,
    shape_of,
    shape_plan,
    token_mask,
)
from tasks.templates import ChatRenderer

FAST_CHECK_FIRST = 128  # rows at the start of each run whose shortcut results are checked the slow way
CHECK_EVERY = 200  # and one in this many of the rest (hash-chosen)
ROWS_PER_PROCESS = 10_000  # below this many rows per process, starting one (imports, ~3 s) costs more than it saves


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
    """Token ids and masks of a batch of conversations (a numpy array per row: a list, or Rows of one chunk), and
    the checks' findings."""

    ids: list[np.ndarray] | Rows = field(default_factory=list)
    masks: list[np.ndarray] | Rows = field(default_factory=list)
    # index of the last token of each row's final supervised span (its end-of-turn token), -1 if none
    last_token: list[int] = field(default_factory=list)
    prompt_failures: list[tuple[int, str]] = field(default_factory=list)  # (row index in the batch, why)
    fast_mismatches: list[tuple[int, str]] = field(default_factory=list)  # (row of the run, what differs from HF)
    # (row of the run, what differs) where a skeleton's rendering differs from Jinja's
    render_mismatches: list[tuple[int, str]] = field(default_factory=list)
    tokenizer: str = "hf"  # which tokenizer gave the ids: tiktoken or hf

    def extend(self, other: Encoded, offset: int, rows: bool = True) -> None:
        """Append another batch's results (its row indices shifted by `offset`); its rows too unless not `rows`."""
        if rows:
            if not isinstance(self.ids, list):  # Rows: from here on, a view per row
                self.ids, self.masks = list(self.ids), list(self.masks)
            self.ids += other.ids
            self.masks += other.masks
            self.last_token += other.last_token
        self.prompt_failures += [(offset + i, why) for i, why in other.prompt_failures]
        self.fast_mismatches += other.fast_mismatches
        self.render_mismatches += other.render_mismatches


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
        out: list[Rendered | None] = [None] * len(convos)
        shapes: dict[int, tuple[ShapePlan, list[int]]] = {}
        for i, (convo, w) in enumerate(zip(convos, weights)):
            plan = self.plan(convo, w)
            if plan is None:
                out[i] = render_spans(self.renderer, convo, w, self.mode)
            else:
                shapes.setdefault(id(plan), (plan, []))[1].append(i)
        for plan, rows in shapes.values():  # each shape's rows at once
            for i, rendered in zip(rows, plan.render_many([convos[i] for i in rows])):
                out[i] = rendered
        planned = {i for _, rows in shapes.values() for i in rows}
        mismatches = [(start + i, "rendering") for i in sorted(checked_rows(start, len(convos)) & planned)
                      if out[i] != render_spans(self.renderer, convos[i], weights[i], self.mode)]
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
        out.ids, out.masks = Rows(batch.ids, batch.bounds), Rows(masks, batch.bounds)
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
    return max(1, min(cpu_count(), rows // ROWS_PER_PROCESS))


class Sink(Protocol):
    """Takes encoded rows in order as encode_all finishes them, instead of its result holding them."""

    def add(self, part: Encoded, start: int) -> None:
        """Take rows start… of the run."""

    def restart(self) -> None:
        """Forget every row taken: the run starts again, the slow way."""


def encode_all(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
               num_proc: int = 0, chunk: int = 1000, sink: Sink | None = None) -> Encoded:
    """Return the ids and masks of every conversation, in order; with a `sink`, hand it each chunk's rows in order
    as they are done instead (the result then holds only the checks' findings), so a consumer works meanwhile.

    Where skeletons render the rows (tasks/skeletons.py), what is left is mostly tokenizing, and tiktoken and the HF
    tokenizer both release the GIL: the rows are encoded in this process, chunks tokenized in one thread per core
    while the next chunk renders. Rows that need Jinja go to `num_proc` processes (0: by row count and cores).
    A sampled row that a shortcut gets wrong sends the whole run through the slow way, with a warning naming the
    row, so one run's rows never mix the two: a skeleton rendering that differs from Jinja's (rendered again with
    Jinja), or fast-path ids that differ from the HF tokenizer's (encoded again by HF)."""
    how, workers = parallelism(encoder, convos, weights, num_proc)
    if how == "threads":
        out = encode_threaded(encoder, convos, weights, check_prompts, workers, chunk, sink)
    else:
        out = encode_chunks(encoder, convos, weights, check_prompts, workers, chunk, sink)
    for found, what, slower in ((out.render_mismatches, "skeleton {}'s text or spans differ from Jinja's",
                                 encoder.without_skeletons),
                                (out.fast_mismatches, "fast tokenizer's {} differ from the HF tokenizer's",
                                 encoder.without_fast)):
        if found:
            from tasks.common import stage_logger

            row, detail = found[0]
            stage_logger().warning("format: the %s on row %d (%d of the checked rows differ); encoding every row the "
                                   "slow way", what.format(detail), row, len(found))
            if sink is not None:
                sink.restart()
            return encode_all(slower(), convos, weights, check_prompts, num_proc, chunk, sink)
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
                  procs: int, chunk: int, sink: Sink | None = None) -> Encoded:
    """Return the encoded chunks of `chunk` rows, joined in order, from `procs` processes (see encode_all's `sink`)."""
    starts = list(range(0, len(convos), chunk))
    if procs == 1:
        return encode_threaded(encoder, convos, weights, check_prompts, 1, chunk, sink)
    # spawn, not fork: the parent may run other threads (Prefect's). Each worker gets the encoder once.
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn"), initializer=start_worker,
                             initargs=(encoder,)) as pool:
        parts = pool.map(encode_in_worker, [convos[s:s + chunk] for s in starts],
                         [weights[s:s + chunk] for s in starts], [check_prompts] * len(starts), starts)
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
            from tasks.common import stage_logger

            stage_logger().info("format: encoded %d/%d rows (%.0f rows/s)", rows, self.total,
                                rows / max(now - self.started, 1e-9))
            self.last = now


PROGRESS_S = 5.0


def taken(out: Encoded, part: Encoded, start: int, sink: Sink | None) -> None:
    """Add a finished chunk (rows start…) to `out`, its rows to the sink if there is one."""
    out.extend(part, start, rows=sink is None)
    if sink is not None:
        sink.add(part, start)


def encode_threaded(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
                    threads: int, chunk: int, sink: Sink | None = None) -> Encoded:
    """Return the encoded chunks in order: this thread renders chunk after chunk and finishes them in order, while
    `threads` threads tokenize (the Rust tokenizers release the GIL, so they share the cores with the rendering).
    See encode_all for `sink`."""
    out, pending, progress = Encoded(), [], Progress(len(convos))

    def finish_oldest() -> None:
        s0, rendered0, render_mismatches, tokens0 = pending.pop(0)
        part = encoder.finish(rendered0, tokens0.result(), check_prompts, s0)
        part.render_mismatches = render_mismatches
        taken(out, part, s0, sink)
        progress.done(s0 + len(rendered0))

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
