"""Loss masks for any chat template, built so that every supervised answer's inference prompt is a token prefix of
the training tokens by construction: no `{% generation %}` markers, and no check that refuses.

A conversation is rendered and cut into pieces, and each piece is tokenized on its own; the training ids are the
pieces' ids one after another, and a piece is supervised or not as a whole (TRL's prompt-completion path and
LLaMA-Factory's multi-turn encoding also tokenize segment by segment). For the answer of assistant turn i:
- its prompt P(i) is the conversation before it rendered with the generation prompt, exactly what evaluation and
  serving render; the training text T of the answer's part starts with P(i), and the answer is what follows:
  the rest of the conversation rendered up to and including turn i, trailing whitespace dropped (so the end-of-turn
  marker, and a template's end-of-conversation EOS, is supervised). A generation prompt that opens a thinking block
  the history lacks (DeepSeek's `<think>\n`) is followed by the trace, `</think>` and the answer.
- every assistant turn h before it in T is cut where its answer starts and ends in T (`history_cut`: where the
  renderings of the conversation before h, with the generation prompt, and up to h, stop agreeing with T).
Why the prompt is a prefix: `encode_prompt` tokenizes the prompt of a conversation P(a) with the same cuts: those of
the assistant turns before a, found by the same rule against P(a). P(a) is a prefix of T (as a string), and each
cut depends only on T's text up to it, so the cuts below len(P(a)) are the same, and T has a cut at len(P(a)). The
same pieces give the same ids, whatever the tokenizer would merge across a cut (Llama 3's "\n\n" before an answer).

Earlier supervised answers share their part with the last one when the history shows them as the model would write
them after their own prompt (P(k) a prefix of T, and the answer in T equal to its own completion up to end-of-turn
markers). A template that renders an earlier answer differently once later turns follow (Qwen3 drops earlier
thinking traces; a non-thinking generation prompt adds an empty `<think></think>` the history lacks) gets a part of
its own for that answer, so every supervised answer is still trained after its true prompt.

`ShapePlan` computes the same pieces for every conversation of one shape without Jinja per row
(tasks/formatting/skeletons.py): the rule runs once on marker contents, three marker variants must give the same pieces,
and sampled rows of each run are also done row by row and compared (tasks/formatting/encoding.py).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property

from tasks.core.errors import ConfigError
from tasks.formatting.skeletons import Marker, marker_texts
from tasks.formatting.templates import THINK_CLOSE, THINK_OPEN, ChatRenderer

MASK_MODES = ("assistant", "last_turn", "completion", "all")


@dataclass
class Part:
    """One training row: text cut into pieces that are tokenized one by one, which of them are supervised, and how
    many pieces make the inference prompt of its last supervised answer."""

    pieces: list[str]
    supervised: list[bool]
    prompt_pieces: int

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def common_prefix(a: str, b: str) -> int:
    """Return the length of the longest common prefix of two strings (compared in C, halving)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class Tokens:
    """The tokenizer's added tokens' texts, to keep cuts out of them and to strip end-of-turn markers."""

    def __init__(self, added: tuple[str, ...]):
        self.added = added
        self.longest = max(map(len, added), default=0)
        self.pattern = re.compile("|".join(map(re.escape, added))) if added else None

    def straddling(self, text: str, at: int) -> int | None:
        """Return the start of an added token's occurrence in `text` that `at` falls strictly inside, else None."""
        if self.pattern is None or at <= 0 or at >= len(text):
            return None
        lo = max(0, at - self.longest + 1)
        for m in self.pattern.finditer(text, lo, min(len(text), at + self.longest - 1)):
            if m.start() < at < m.end():
                return m.start()
            if m.start() >= at:
                break
        return None

    def at(self, text: str, pos: int) -> str | None:
        """Return the added token that starts at text[pos], if one does."""
        m = self.pattern.match(text, pos) if self.pattern is not None else None
        return m.group() if m else None

    def ends_with_one(self, text: str) -> bool:
        """Return whether `text` ends with an added token."""
        return any(text.endswith(t) for t in self.added)

    def strip_end(self, text: str) -> str:
        """Return `text` without its trailing whitespace and added tokens (the end-of-turn markers)."""
        while True:
            text = text.rstrip()
            token = next((t for t in self.added if text.endswith(t)), None)
            if token is None:
                return text
            text = text[:-len(token)]


def supervised_turns(roles: list[str] | tuple[str, ...], weights: list[float]) -> list[int]:
    """Return the indices of the assistant turns with a loss weight other than 0; raise if there is none."""
    kept = [i for i, w in zip([i for i, r in enumerate(roles) if r == "assistant"], weights) if w]
    if not kept:
        raise ConfigError("a conversation has no assistant turn with a loss weight other than 0")
    return kept


class Conversation:
    """One conversation's renderings (cached) and the rules that cut it."""

    def __init__(self, renderer: ChatRenderer, messages: list[dict], kwargs: dict, tokens: Tokens):
        self.r, self.messages, self.kwargs, self.tokens = renderer, messages, kwargs, tokens
        self.assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        self._cache: dict[tuple, str] = {}

    def render(self, upto: int, gen: bool, plain: bool = False) -> str:
        """Return the rendering of messages[:upto] (with the generation prompt if gen; with the last message's
        answer alone, no thinking trace, if plain)."""
        key = (upto, gen, plain)
        if key not in self._cache:
            messages = self.messages[:upto]
            if plain:
                last = messages[-1]
                messages = [*messages[:-1], {"role": last["role"], "content": last.get("_answer", last["content"])}]
            try:
                self._cache[key] = self.r.render(messages, add_generation_prompt=gen, **self.kwargs)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 -- the template's own raise_exception or a Jinja error
                raise ConfigError(f"the chat template cannot render this conversation ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0] if str(e) else ''}); roles "
                                  f"{[m['role'] for m in messages]}") from None
        return self._cache[key]

    def completion(self, a: int) -> str:
        """Return what the model is trained to write after the prompt of assistant turn a: through its end-of-turn
        marker (and a template's end-of-conversation text), trailing whitespace dropped."""
        prompt, done = self.render(a, True), self.render(a + 1, False)
        if done.startswith(prompt):
            return done[len(prompt):].rstrip()
        x = common_prefix(prompt, done)
        opened = prompt[x:]
        if not opened.strip():  # the generation prompt only adds whitespace the answer's rendering lacks
            return done[x:].strip()
        if opened.rstrip().endswith(THINK_OPEN) and THINK_CLOSE not in opened:
            # the generation prompt opens a thinking block the rendered answer lacks (DeepSeek-R1, -V3): the model
            # writes the trace (or nothing), closes the block, then the answer as the template renders it
            trace = (self.messages[a].get("_reasoning") or "").strip()
            plain = self.render(a + 1, False, plain=True)
            answer = plain[common_prefix(prompt, plain):].lstrip()
            return f"{trace}\n{THINK_CLOSE}\n\n{answer}".rstrip()
        raise ConfigError(
            f"the chat template's generation prompt ends {prompt[max(x - 30, 0):][:60]!r} but the same conversation "
            f"with its answer renders {done[max(x - 30, 0):][:60]!r} there, so no answer can follow the prompt the "
            "model will be asked with; use another template (chat.template or chat.chat_template)")

    def history_cut(self, i: int, text: str) -> tuple[int, int]:
        """Return where assistant turn i's answer starts and ends (its end-of-turn marker included) in `text`."""
        start, done = common_prefix(self.render(i, True), text), self.render(i + 1, False)
        c = common_prefix(done, text)
        # where the two differ inside a control token of either (<|end|> / <|return|>), the turn ends before it
        inside = self.tokens.straddling(text, c)
        inside = self.tokens.straddling(done, c) if inside is None else inside
        end = start + len(text[start:c if inside is None else inside].rstrip()) if c > start else start
        # the history ends the turn with another marker than a last turn does (gpt-oss: <|end|>, <|return|>)
        if inside is not None and end == inside and end > start and not self.tokens.ends_with_one(text[start:end]):
            end += len(self.tokens.at(text, end) or "")
        return start, end

    def fits(self, k: int, text: str) -> bool:
        """Return whether supervised turn k can be trained inside `text`: its prompt is a prefix of it, and the
        answer there is the one the model writes after that prompt, end-of-turn markers aside."""
        if not text.startswith(self.render(k, True)):
            return False
        start, end = self.history_cut(k, text)
        return self.tokens.strip_end(text[start:end]) == self.tokens.strip_end(self.completion(k))

    def cuts(self, last: int, text: str) -> set[int]:
        """Return the cut positions in `text` of the assistant turns other than `last` that it shows."""
        out: set[int] = set()
        for i in self.assistants:
            if i != last and (i < last or text.startswith(self.render(i, True))):
                out.update(self.history_cut(i, text))
        return out


def plan_parts(renderer: ChatRenderer, messages: list[dict], weights: list[float], mode: str, kwargs: dict,
               tokens: Tokens) -> list[Part]:
    """Return the training parts of one conversation (template messages, see ChatRenderer.messages_for): usually
    one; an earlier supervised answer the history renders otherwise gets a part of its own (module docstring)."""
    convo = Conversation(renderer, messages, kwargs, tokens)
    kept = supervised_turns([m["role"] for m in messages], weights)
    turns = kept if mode == "assistant" else kept[-1:]
    groups: list[list[int]] = []
    text, group = None, []
    for k in reversed(turns):
        if text is not None and convo.fits(k, text):
            group.insert(0, k)
            continue
        if group:
            groups.insert(0, group)
        group, text = [k], convo.render(k, True) + convo.completion(k)
    groups.insert(0, group)
    return [part_of(convo, group, mode, final=k == len(groups) - 1) for k, group in enumerate(groups)]


def part_of(convo: Conversation, group: list[int], mode: str, final: bool) -> Part:
    """Return the part that trains the answers `group`: the last one's prompt, then its completion, then (the
    `final` part) the rest of the conversation as the template renders it, where that keeps the same start."""
    last = group[-1]
    prompt = convo.render(last, True)
    answer = prompt + convo.completion(last)
    text = answer
    for rest in (convo.render(len(convo.messages), False),) * final + (convo.render(last + 1, False),):
        if rest.startswith(answer):
            text = rest
            break
    end = len(text.rstrip()) if mode in ("completion", "all") else len(answer)
    spans = [convo.history_cut(k, text) for k in group[:-1]] + [(len(prompt), end)]
    cuts = sorted({0, len(text), *convo.cuts(last, text), *(x for span in spans for x in span)})
    pieces = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
    supervised = [mode == "all" or any(s <= a and b <= e for s, e in spans) for a, b in pieces]
    return Part([text[a:b] for a, b in pieces], supervised, sum(b <= len(prompt) for _, b in pieces))


def prompt_pieces(renderer: ChatRenderer, messages: list[dict], kwargs: dict, tokens: Tokens) -> list[str]:
    """Return the pieces of the inference prompt of a conversation whose next turn is the assistant's: the same
    cuts a training row of it has (module docstring), so its ids are the training ids' prefix."""
    convo = Conversation(renderer, messages, kwargs, tokens)
    text = convo.render(len(messages), True)
    cuts = sorted({0, len(text), *convo.cuts(len(messages), text)})
    return [text[a:b] for a, b in zip(cuts, cuts[1:]) if b > a]


def shape_of(convo: list[dict], weights: list[float]) -> tuple | None:
    """Return the shape key of a conversation that skeletons can render (plain role/content turns with non-empty
    string contents, no trace, no tool calls), else None."""
    roles = []
    for m in convo:
        content = m.get("content")
        if content.__class__ is not str or not content or m.get("reasoning") or m.get("tool_calls"):
            return None
        roles.append(m["role"])
    return tuple(roles), tuple([bool(w) for w in weights])


@dataclass(frozen=True)
class PieceTemplate:
    """A piece of a shape's parts: literal text around the contents of messages `slots`, in order."""

    literals: tuple[str, ...]
    slots: tuple[int, ...]

    @cached_property
    def format_string(self) -> str:
        return "{}".join(x.replace("{", "{{").replace("}", "}}") for x in self.literals)

    def fill_many(self, contents: list[list[str]]) -> list[str]:
        """Return this piece of every row, given each row's message contents."""
        if not self.slots:
            return [self.literals[0]] * len(contents)
        fmt, slots = self.format_string.format, self.slots
        return [fmt(*[row[s] for s in slots]) for row in contents]


def piece_template(text: str, markers: list[str]) -> PieceTemplate | None:
    """Return the template of a piece rendered with `markers` as contents, or None if a marker is cut."""
    found = sorted((text.find(m), k) for k, m in enumerate(markers) if m in text)
    literals, pos = [], 0
    for at, k in found:
        if at < pos or text.find(markers[k], at + 1) >= 0:
            return None
        literals.append(text[pos:at])
        pos = at + len(markers[k])
    literals.append(text[pos:])
    return PieceTemplate(tuple(literals), tuple(k for _, k in found))


@dataclass
class ShapePlan:
    """The parts of every conversation of one shape, as piece templates filled with each row's contents."""

    parts: list[tuple[list[PieceTemplate], list[bool], int]] = field(default_factory=list)

    def render_many(self, convos: list[list[dict]]) -> list[list[Part]]:
        """Return the parts of conversations of this shape, all at once."""
        contents = [[m["content"] for m in convo] for convo in convos]
        rows: list[list[Part]] = [[] for _ in convos]
        for templates, supervised, prompt in self.parts:
            columns = [t.fill_many(contents) for t in templates]
            for r, pieces in enumerate(zip(*columns)):
                rows[r].append(Part(list(pieces), supervised, prompt))
        return rows


def shape_plan(renderer: ChatRenderer, shape: tuple, mode: str, tokens: Tokens) -> ShapePlan | None:
    """Return the plan of a shape, or None when it cannot be proved (its rows are then done one by one): the rule
    run on three marker variants (tasks/formatting/skeletons.py) gives the same pieces, no marker is used but verbatim,
    and every content appears whole in its piece."""
    roles, supervised = shape
    if any(r.__class__ is not str for r in roles) or not any(supervised) or "text" in roles:
        return None
    weights = [1.0 if s else 0.0 for s in supervised]
    plans = []
    for variant in (0, 1, 2):
        uses: list[str] = []
        texts = marker_texts(len(roles), variant)
        convo = [{"role": role, "content": Marker(text, uses)} for role, text in zip(roles, texts)]
        messages, kwargs, fallbacks = renderer.messages_for(convo)
        try:
            parts = plan_parts(renderer, messages, weights, mode, kwargs, tokens)
        except Exception:  # noqa: BLE001 -- rendered one by one, which fails with the reason
            return None
        if uses or fallbacks:
            return None
        plan = ShapePlan()
        for part in parts:
            templates = [piece_template(str(p), texts) for p in part.pieces]
            whole = str(part.text)
            if any(t is None for t in templates) or sum(len(t.slots) for t in templates) != sum(
                    whole.count(m) for m in texts):
                return None
            plan.parts.append((templates, part.supervised, part.prompt_pieces))
        plans.append(plan)
    return plans[0] if plans[0] == plans[1] == plans[2] else None


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
