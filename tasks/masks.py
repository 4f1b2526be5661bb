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
import zlib
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context

import numpy as np

from tasks.errors import ConfigError
from tasks.fast_tokenizer import FastTokenizer
from tasks.templates import ChatRenderer

MASK_MODES = ("assistant", "last_turn", "completion", "all")
FAST_CHECK_FIRST = 256  # rows at the start of each run whose fast-path result is checked against HF
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
    answers = [i for i, m in enumerate(convo) if m["role"] == "assistant"]
    kept = [i for i, w in zip(answers, weights) if w]
    if not kept:
        raise ConfigError("a conversation has no assistant turn with a loss weight other than 0")
    if mode == "all":
        prompt_end = len(prefix_checked(renderer, convo, kept[-1], True, full))
        return Rendered(full, [(0, len(full))], prompt_end)
    if mode == "completion":
        prompt_end = len(prefix_checked(renderer, convo, kept[-1], True, full))
        return Rendered(full, [(prompt_end, len(full.rstrip()))], prompt_end)
    spans = []
    for i in kept if mode == "assistant" else kept[-1:]:
        start = len(prefix_checked(renderer, convo, i, True, full))
        turn = full if i == len(convo) - 1 else prefix_checked(renderer, convo, i + 1, False, full)
        spans.append((start, start + len(turn[start:].rstrip())))
    return Rendered(full, spans, spans[-1][0])


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
    tokenizer: str = "hf"  # which tokenizer gave the ids: tiktoken or hf

    def extend(self, other: Encoded, offset: int) -> None:
        """Append another batch's rows (its row indices shifted by `offset`)."""
        self.ids += other.ids
        self.masks += other.masks
        self.last_token += other.last_token
        self.prompt_failures += [(offset + i, why) for i, why in other.prompt_failures]
        self.fast_mismatches += other.fast_mismatches


class ChatEncoder:
    """Render and tokenize conversations with loss masks; picklable, so worker processes can each hold one."""

    def __init__(self, renderer: ChatRenderer, backend, mode: str, fast: FastTokenizer | None = None):
        """`backend` is the fast tokenizer's Rust tokenizer (`tokenizer.backend_tokenizer`); `fast`, where given,
        is tiktoken proved to give its ids (tasks/fast_tokenizer.py), checked again on a sample of rows."""
        if mode not in MASK_MODES:
            raise ConfigError(f"chat.mask={mode!r}: use one of {', '.join(MASK_MODES)}")
        self.renderer, self.backend, self.mode, self.fast = renderer, backend, mode, fast

    def __getstate__(self) -> dict:
        return {**self.__dict__, "backend": self.backend.to_str()}

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

    def encode(self, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool = False,
               start: int = 0) -> Encoded:
        """Return the ids and masks of `convos` (rows `start`… of the run); with `check_prompts`, also check each
        generation prompt's tokens are a prefix of its conversation's tokens (the round trip evaluation relies on).
        On the fast path, the sampled rows (`checked_row`) are also encoded by HF and any difference is recorded."""
        rendered = self.render(convos, weights)
        return self.finish(rendered, self.tokenize(rendered), check_prompts, start)

    def render(self, convos: list[list[dict]], weights: list[list[float]]) -> list[Rendered]:
        """Return each conversation's text and supervised spans."""
        return [render_spans(self.renderer, c, w, self.mode) for c, w in zip(convos, weights)]

    def finish(self, rendered: list[Rendered], tokens: list, check_prompts: bool, start: int) -> Encoded:
        """Return the ids and masks of rendered rows from their `tokenize` result (see `encode`)."""
        out = Encoded()
        for ids, offsets, spans in tokens:
            out.ids.append(ids)
            out.masks.append(token_mask(offsets, spans))
            out.last_token.append(last_token(offsets, spans[-1]))
        if self.fast is not None:
            out.fast_mismatches = self.fast_mismatches(rendered, out, start)
        if check_prompts:
            prompts = self.backend.encode_batch([r.text[:r.prompt_end] for r in rendered], add_special_tokens=False)
            out.prompt_failures = [(i, why) for i, (p, ids) in enumerate(zip(prompts, out.ids))
                                   if (why := prefix_problem(self.backend, p, ids))]
        return out

    def tokenize(self, rendered: list[Rendered]) -> list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
        """Return each text's (ids, token offsets, supervised spans), offsets and spans in one unit: bytes on the
        fast path, characters on HF's (a text the fast path leaves to HF gets HF's)."""
        fast = self.fast.encode_batch([r.text for r in rendered]) if self.fast else [None] * len(rendered)
        left = [i for i, f in enumerate(fast) if f is None]
        slow = dict(zip(left, self.hf_tokenize([rendered[i] for i in left])))
        return [slow[i] if f is None else (*f, byte_spans(r.text, r.spans))
                for i, (r, f) in enumerate(zip(rendered, fast))]

    def hf_tokenize(self, rendered: list[Rendered]) -> list[tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]]:
        """Return each text's (ids, character offsets, supervised spans) from the HF tokenizer."""
        encodings = self.backend.encode_batch([r.text for r in rendered], add_special_tokens=False) if rendered else []
        return [(np.asarray(e.ids, dtype=np.int32), np.asarray(e.offsets, dtype=np.int64).reshape(-1, 2), r.spans)
                for r, e in zip(rendered, encodings)]

    def fast_mismatches(self, rendered: list[Rendered], out: Encoded, start: int) -> list[tuple[int, str]]:
        """Return (run row, what differs) for each sampled row whose fast ids, mask or end token differ from HF's."""
        rows = [i for i in range(len(rendered)) if checked_row(start + i)]
        found = []
        for i, (ids, offsets, spans) in zip(rows, self.hf_tokenize([rendered[i] for i in rows])):
            if not np.array_equal(ids, out.ids[i]):
                found.append((start + i, "token ids"))
            elif not np.array_equal(token_mask(offsets, spans), out.masks[i]):
                found.append((start + i, "loss mask"))
            elif last_token(offsets, spans[-1]) != out.last_token[i]:
                found.append((start + i, "end-of-turn token"))
        return found


def checked_row(row: int) -> bool:
    """Return whether the fast path's result for this row of a run is checked against HF: the first
    FAST_CHECK_FIRST rows and a hash-chosen 1% of the rest."""
    return row < FAST_CHECK_FIRST or zlib.crc32(row.to_bytes(8, "little")) % 100 == 0


def byte_spans(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Return character spans of `text` as UTF-8 byte spans."""
    if text.isascii():
        return spans
    return [(len(text[:a].encode()), len(text[:b].encode())) for a, b in spans]


def prefix_problem(backend, prompt, ids: np.ndarray) -> str | None:
    """Return why the prompt's tokens are not a prefix of the conversation's `ids`, or None if they are."""
    if list(ids[:len(prompt.ids)]) == prompt.ids:
        return None
    at = next((k for k, (a, b) in enumerate(zip(prompt.ids, ids)) if a != b), len(ids))
    training = backend.id_to_token(int(ids[at])) if at < len(ids) else None
    return f"prompt token {at} is {prompt.tokens[at]!r} but {training!r} in the training text"


def process_count(rows: int, num_proc: int) -> int:
    """Return how many processes to format `rows` rows with (chat.num_proc; 0 picks by rows and CPU cores)."""
    if num_proc:
        return num_proc
    return max(1, min(len(os.sched_getaffinity(0)), rows // ROWS_PER_PROCESS))


def encode_all(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
               num_proc: int = 0, chunk: int = 2000) -> Encoded:
    """Return the ids and masks of every conversation, in order, encoded in `num_proc` processes.

    On the fast path, if any checked row differs from what the HF tokenizer gives, the whole run is encoded again by
    HF (with a warning naming the row), so one run's rows never mix the two."""
    out = encode_chunks(encoder, convos, weights, check_prompts, process_count(len(convos), num_proc), chunk)
    if out.fast_mismatches:
        from tasks.common import stage_logger

        row, what = out.fast_mismatches[0]
        stage_logger().warning("format: the fast tokenizer's %s differ from the HF tokenizer's on row %d (%d of the "
                               "checked rows differ); encoding every row with the HF tokenizer", what, row,
                               len(out.fast_mismatches))
        return encode_all(encoder.without_fast(), convos, weights, check_prompts, num_proc, chunk)
    out.tokenizer = encoder.tokenizer_path
    return out


def encode_chunks(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
                  procs: int, chunk: int) -> Encoded:
    """Return the encoded chunks of `chunk` rows, joined in order, from `procs` processes."""
    starts = list(range(0, len(convos), chunk))
    if procs == 1:
        return encode_pipelined(encoder, convos, weights, check_prompts, starts, chunk)
    # spawn, not fork: the parent may run other threads (Prefect's). Each worker gets the encoder once.
    with ProcessPoolExecutor(procs, mp_context=get_context("spawn"), initializer=start_worker,
                             initargs=(encoder,)) as pool:
        parts = pool.map(encode_in_worker, [convos[s:s + chunk] for s in starts],
                         [weights[s:s + chunk] for s in starts], [check_prompts] * len(starts), starts)
        out = Encoded()
        for s, part in zip(starts, parts):
            out.extend(part, s)
    return out


def encode_pipelined(encoder: ChatEncoder, convos: list[list[dict]], weights: list[list[float]], check_prompts: bool,
                     starts: list[int], chunk: int) -> Encoded:
    """Return the encoded chunks in order, each tokenized in a second thread while the next one is rendered: the
    Rust tokenizers release the GIL, so rendering (Python) and tokenizing share the cores without processes."""
    out, pending = Encoded(), []
    with ThreadPoolExecutor(1) as pool:
        for s in starts:
            rendered = encoder.render(convos[s:s + chunk], weights[s:s + chunk])
            pending.append((s, rendered, pool.submit(encoder.tokenize, rendered)))
            if len(pending) == 2:
                s0, rendered0, tokens0 = pending.pop(0)
                out.extend(encoder.finish(rendered0, tokens0.result(), check_prompts, s0), s0)
        for s0, rendered0, tokens0 in pending:
            out.extend(encoder.finish(rendered0, tokens0.result(), check_prompts, s0), s0)
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
