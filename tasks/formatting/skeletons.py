"""Render a chat template once per conversation shape, then fill each conversation in: no Jinja per row.

A conversation's shape is its roles in order. For a shape, the template is rendered with a marker object in place of
each message's content; the rendering splits into literal pieces around the markers, and any conversation of that
shape renders as those pieces joined with its contents. That holds only if the template inserts content verbatim and
decides nothing on it, which is proved for each shape before its skeleton is used:
1. Traced: the markers are str subclasses that record any use other than being output or concatenated: a method
   call (strip, split, startswith, …), a comparison, `in`, len, indexing, iteration, hashing, formatting with a
   spec. Truthiness is allowed (it is part of the shape: only non-empty contents use skeletons).
2. Verbatim: each marker appears exactly once in the output. Markers hold characters that an escape, JSON encoding,
   indent, case change or str.format would alter (quotes, braces, backslash, newline, tab, '<', '&', '%', non-ASCII,
   mixed case), so a transformation the tracing cannot see (C code reading the string) still shows.
3. Stable: three renderings with different markers (other lengths and characters) give the same literal pieces, so
   nothing depends on the content's length or characters.
A shape that fails any check keeps per-row rendering. On top of the proof, the format step renders a sample of each
run's rows for real and compares (tasks/formatting/encoding.py), falling back to per-row rendering for the run on any
difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

# Uses of a content string that output or concatenate it verbatim: anything else on a marker is recorded.
VERBATIM = frozenset({
    "__str__", "__add__", "__radd__", "__bool__", "__new__", "__init__", "__getattribute__", "__setattr__",
    "__delattr__", "__init_subclass__", "__subclasshook__", "__reduce__", "__reduce_ex__", "__getnewargs__",
    "__sizeof__", "__dir__", "__class__", "__doc__", "__getstate__",
})


class Marker(str):
    """A stand-in for one message's content that records every non-verbatim use in `uses`."""

    uses: list[str]

    def __new__(cls, text: str, uses: list[str]):
        obj = super().__new__(cls, text)
        obj.uses = uses
        return obj

    def __bool__(self) -> bool:
        return True  # a skeleton stands for non-empty contents only

    def __add__(self, other):
        return str.__add__(str(self), other)

    def __radd__(self, other):
        if not isinstance(other, str):
            self.uses.append("__radd__")
            return NotImplemented
        return str.__add__(other, str(self))

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        if spec:
            self.uses.append(f"format {spec!r}")
        return str.__format__(str(self), spec)


def _recording(name: str):
    method = getattr(str, name)

    def record(self, *args, **kwargs):
        self.uses.append(name)
        return method(str(self) if name != "__hash__" else self, *args, **kwargs)

    record.__name__ = name
    return record


for _name in dir(str):
    if _name not in VERBATIM and _name not in Marker.__dict__ and callable(getattr(str, _name)):
        setattr(Marker, _name, _recording(_name))


def marker_texts(n: int, variant: int) -> list[str]:
    """Return n distinct marker strings. The variants differ in length (one character of Unicode's private use area,
    a few dozen, over 2,000) and characters, and variant 1 has whitespace at both ends, so a trim, a case change, a
    padding or a length test applied to a copy the tracing cannot follow still changes the rendering (check 3)."""
    if variant == 2:
        return [chr(0xE000 + k) for k in range(n)]
    if variant == 0:
        return [f"\x02Slot{k}: \"q\" 'a' {{}} <b>&amp; %s \\ é€\n\tEnd{k}\x03" for k in range(n)]
    return [f" \n\x02mARK-{k}-{'x' * 2048} [{{0}}] <i>\"\"</i> %d \\\\ ü中\r\n  ZZ{k}\x03\t " for k in range(n)]


@dataclass(frozen=True)
class Skeleton:
    """A shape's rendering: literal pieces around the contents, which appear in the order of `slots`."""

    pieces: tuple[str, ...]  # len(slots) + 1 literal strings
    slots: tuple[int, ...]  # message index of each content, in output order

    @cached_property
    def literal_length(self) -> int:
        return sum(map(len, self.pieces))

    def fill(self, contents: list[str]) -> str:
        """Return the rendering of a conversation of this shape with these message contents."""
        return self.fill_many([contents])[0]

    @cached_property
    def format_string(self) -> str:
        """The pieces as a str.format string with a field per slot."""
        return "{}".join(piece.replace("{", "{{").replace("}", "}}") for piece in self.pieces)

    def fill_many(self, rows: list[list[str]]) -> list[str]:
        """Return the renderings of conversations of this shape, given each one's message contents, through one
        str.format per row."""
        fmt, slots = self.format_string.format, list(self.slots)
        if slots == list(range(len(slots))) and all(len(contents) == len(slots) for contents in rows):
            return [fmt(*contents) for contents in rows]
        return [fmt(*[contents[slot] for slot in slots]) for contents in rows]

    def starts(self, other: Skeleton) -> bool:
        """Return whether every filling of self is a prefix of the same filling of `other` (structurally)."""
        k = len(self.slots)
        return (self.slots == other.slots[:k] and self.pieces[:k] == other.pieces[:k]
                and other.pieces[k].startswith(self.pieces[k]))


def split_rendering(text: str, markers: list[str]) -> Skeleton | None:
    """Return the skeleton of a rendering made with `markers`, or None unless each marker occurs exactly once."""
    found = []
    for k, m in enumerate(markers):
        at = text.find(m)
        if at < 0 or text.find(m, at + 1) >= 0:
            return None
        found.append((at, k))
    found.sort()
    pieces, pos = [], 0
    for at, k in found:
        if at < pos:  # overlapping markers: cannot happen with distinct framed markers, but never guess
            return None
        pieces.append(text[pos:at])
        pos = at + len(markers[k])
    pieces.append(text[pos:])
    return Skeleton(tuple(pieces), tuple(k for _, k in found))


def prove_skeleton(render, roles: tuple[str, ...], add_generation_prompt: bool) -> Skeleton | None:
    """Return the skeleton of conversations with these roles if the template provably inserts their contents
    verbatim (the module docstring's checks 1-3), else None. `render(messages, add_generation_prompt)` renders."""
    skeletons = []
    for variant in (0, 1, 2):
        uses: list[str] = []
        texts = marker_texts(len(roles), variant)
        messages = [{"role": role, "content": Marker(text, uses)} for role, text in zip(roles, texts)]
        try:
            rendered = render(messages, add_generation_prompt)
        except Exception:  # noqa: BLE001 - a template that fails on markers keeps per-row rendering
            return None
        if uses or not isinstance(rendered, str):
            return None
        skeleton = split_rendering(str(rendered), texts)
        if skeleton is None:
            return None
        skeletons.append(skeleton)
    return skeletons[0] if skeletons[0] == skeletons[1] == skeletons[2] else None
