"""The prompt model: what the host encodes for a WebUI prompt, step by step, and where a phrase sits.

One source of truth for both hosts (Forge keeps A1111's `prompt_parser`), written from the host
contract (shared/hosts/a1111.md §6) and checked against a table recorded from A1111 1.10.1:

* extra-network tags `<lora:…>` are gone before conditioning (A1111 strips them when the batch starts);
* a prompt is split on `AND` first, each part keeps a trailing `:weight` (negative and zero too);
* each part is scheduled alone: `[a:b:when]`, `[b:when]`, `[a::when]`, nested, `[a|b]` alternating
  per denoiser call; `when` with a decimal point is a fraction of the steps, else a step; a prompt
  the schedule grammar rejects is one literal text;
* at denoiser call `s` (0-based) a part encodes the first schedule entry whose end is ≥ s;
* emphasis `(x:1.2)` and `BREAK` stay in the row text: the host's tokenizer reads them (§6.1, §6.6);
  `plain_row_text` drops them for reading;
* token columns come from the host's own `tokenize_line` on the exact row text: chunk c, entry j is
  context column 77·c + j; padding and the specials are never a phrase's column.

Pure Python; the host's tokenizer is passed in as two functions (`Tokenizer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CHUNK_LENGTH = 77  # CLIP context of one chunk: BOS + 75 prompt tokens + EOS (a1111.md §6.6)

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
_SCHEDULE_NUMBER = re.compile(r"\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]")
_PLAIN_STOP = "\\[]():|"


# ---------------------------------------------------------------------------------------------
# AND parts


@dataclass(frozen=True)
class Row:
    """One conditioning row the host encodes: its exact text and its AND weight."""

    text: str
    weight: float = 1.0


def strip_extra_networks(prompt: str) -> str:
    """The prompt without `<name:args>` extra-network tags, as the host conditions it."""
    return _EXTRA_NETWORK.sub("", prompt)


def and_parts(prompt: str) -> list[Row]:
    """The AND sub-prompts with their weights (A1111 multicond: a trailing `:number`, default 1)."""
    parts = []
    for part in _AND.split(prompt):
        match = _AND_WEIGHT.search(part)
        text, weight = match.groups() if match is not None else (part, None)
        parts.append(Row(text, float(weight) if weight is not None else 1.0))
    return parts


# ---------------------------------------------------------------------------------------------
# Schedules: a small tree of text, [before:after:when] and [a|b|…] nodes


class _Rejected(Exception):
    """The schedule grammar does not accept the prompt (the host then uses it literally)."""


@dataclass
class _Scheduled:
    before: list | None
    after: list
    when: str
    at: int = 0  # the step it switches after, set by `_resolve_steps`


@dataclass
class _Alternate:
    options: list[list]


class _Stray(str):
    """A bracket or colon the top level reads as literal text."""


@dataclass
class _Top:
    """A construct at the top level, with where its text starts and ends: it may still be read as
    literal text (`_settle`)."""

    node: object
    start: int
    end: int


def _parse_nodes(text: str, pos: int, top: bool) -> tuple[list, int]:
    """Nodes from `pos` until a bracket, ':' or '|' that closes an enclosing construct (nested), or
    the end (top level, where stray brackets and colons are literal `_Stray` text)."""
    nodes: list = []
    while pos < len(text):
        char = text[pos]
        if char == "\\":
            if pos + 1 == len(text):
                raise _Rejected
            nodes.append(text[pos : pos + 2])
            pos += 2
        elif char in "[(":
            try:
                node, end = _parse_bracket(text, pos)
            except _Rejected:
                if not top:
                    raise
                nodes.append(_Stray(char))
                pos += 1
                continue
            nodes.append(_Top(node, pos, end) if top and not isinstance(node, _Alternate) else node)
            pos = end
        elif char == "|" and top:
            raise _Rejected
        elif char in _PLAIN_STOP:
            if not top:
                return nodes, pos
            nodes.append(_Stray(char))
            pos += 1
        else:
            end = pos
            while end < len(text) and text[end] not in _PLAIN_STOP:
                end += 1
            nodes.append(text[pos:end])
            pos = end
    if not top:
        raise _Rejected  # the construct was never closed
    return nodes, pos


def _read_as_strays(source: str, run: int) -> bool:
    """Whether lark reads a top-level construct as literal text, from the stray characters directly
    after it: an even run of 2 or more; for one made of brackets and colons only ("[]"), any run."""
    if not source.strip("[]():"):
        return run >= 1
    return run >= 2 and run % 2 == 0


def _settle(text: str, nodes: list) -> list:
    """The host's reading of the top level where its grammar is ambiguous: a schedule or emphasis
    followed by stray brackets and colons may be literal text (`_read_as_strays`), as lark 1.1.9's
    Earley parser resolves it (found by comparing many bracket-heavy prompts with the host's)."""
    settled: list = []
    run = 0  # stray characters directly after the node being settled
    pending = list(nodes)
    while pending:
        node = pending.pop()
        if isinstance(node, _Top) and _read_as_strays(text[node.start : node.end], run):
            inner, _ = _parse_nodes(text[: node.end], node.start + 1, top=True)
            pending += [_Stray(text[node.start]), *inner]
            continue
        settled.append(node.node if isinstance(node, _Top) else node)
        run = run + 1 if isinstance(node, _Stray) else 0
    return settled[::-1]


def _parse_bracket(text: str, pos: int) -> tuple[object, int]:
    """One `(…)`, `(…:…)`, `[…]`, `[…:when]`, `[…:…:when]` or `[…|…]` starting at `pos`."""
    opener = text[pos]
    first, pos = _parse_nodes(text, pos + 1, top=False)
    closer = ")" if opener == "(" else "]"
    if text[pos] == closer:
        return [opener, first, closer], pos + 1
    if opener == "(":
        if text[pos] != ":":
            raise _Rejected
        second, pos = _parse_nodes(text, pos + 1, top=False)
        if text[pos] != ")":
            raise _Rejected
        return ["(", first, ":", second, ")"], pos + 1
    if text[pos] == "|":
        options = [first]
        while text[pos] == "|":
            option, pos = _parse_nodes(text, pos + 1, top=False)
            options.append(option)
        if text[pos] != "]":
            raise _Rejected
        return _Alternate(options), pos + 1
    if text[pos] != ":":
        raise _Rejected
    return _parse_schedule(text, pos, first)


def _parse_schedule(text: str, pos: int, first: list) -> tuple[_Scheduled, int]:
    """The rest of `[first:when]` or `[first:second:when]`, from the ':' at `pos`."""
    number = _SCHEDULE_NUMBER.match(text, pos + 1)
    if number is not None:
        return _Scheduled(None, first, number.group(1)), number.end()
    second, pos = _parse_nodes(text, pos + 1, top=False)
    number = _SCHEDULE_NUMBER.match(text, pos + 1) if text[pos] == ":" else None
    if number is None:
        raise _Rejected
    return _Scheduled(first, second, number.group(1)), number.end()


def _walk(nodes: list):
    """Every schedule and alternation node in the tree, outer before inner."""
    for node in nodes:
        if isinstance(node, _Scheduled):
            yield node
            yield from _walk([node.before or [], node.after])
        elif isinstance(node, _Alternate):
            yield node
            yield from _walk(node.options)
        elif isinstance(node, list):
            yield from _walk(node)


def _switch_step(when: str, steps: int, int_offset: int, float_offset: float, old: bool) -> int:
    """The step a `when` switches after, capped at `steps` (a1111.md §6.2)."""
    value = float(when)
    if old:
        value = value * steps if value < 1 else value
    elif "." in when:
        value = (value - float_offset) * steps
    else:
        value = value - int_offset
    return min(steps, int(value))


def _resolve_steps(nodes: list, steps: int, int_offset: int, float_offset: float, old: bool) -> list[int]:
    """Sets each schedule's switch step; returns the sorted ends of the schedule's entries."""
    ends = {steps}
    for node in _walk(nodes):
        if isinstance(node, _Scheduled):
            node.at = _switch_step(node.when, steps, int_offset, float_offset, old)
            if node.at >= 1:
                ends.add(node.at)
        else:
            ends.update(range(1, steps + 1))
    return sorted(ends)


def _text_at(nodes: list, step: int) -> str:
    """The text the tree stands for at schedule step `step` (1-based, as the host counts)."""
    out = []
    for node in nodes:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, _Scheduled):
            out.append(_text_at(node.before or [], step) if step <= node.at else _text_at(node.after, step))
        elif isinstance(node, _Alternate):
            out.append(_text_at(node.options[(step - 1) % len(node.options)], step))
        else:
            out.append(_text_at(node, step))
    return "".join(out)


def prompt_schedule(
    text: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> list[tuple[int, str]]:
    """[(end_at_step, text)] of one AND part: A1111's `get_learned_conditioning_prompt_schedules`
    semantics; the hires pass (new scheduling) offsets integers by `steps` and maps 1..2 fractions."""
    int_offset, float_offset, total = 0, 0.0, steps
    if hires_steps is not None and not use_old_scheduling:
        int_offset, float_offset, total = steps, 1.0, hires_steps
    try:
        nodes = _settle(text, _parse_nodes(text, 0, top=True)[0])
        ends = _resolve_steps(nodes, total, int_offset, float_offset, use_old_scheduling)
        return [(end, _text_at(nodes, end)) for end in ends]
    except _Rejected:
        return [(total, text)]
    except RecursionError:  # thousands of nested brackets: read literally rather than fail the image
        return [(total, text)]


# ---------------------------------------------------------------------------------------------
# Steps: which rows the host encodes when


@dataclass(frozen=True)
class Segment:
    """Denoiser calls `first_step`..`last_step` (0-based, inclusive) and the rows encoded there."""

    first_step: int
    last_step: int
    rows: tuple[Row, ...]


def prompt_segments(
    prompt: str, steps: int, hires_steps: int | None = None, use_old_scheduling: bool = False
) -> tuple[Segment, ...]:
    """The segments of a run of `steps` denoiser calls (`hires_steps` in the hires pass) in which
    every AND part keeps its text; entries no call reaches (e.g. `[a:b:19]` of 19 calls) are left out."""
    parts = and_parts(strip_extra_networks(prompt))
    schedules = [prompt_schedule(part.text, steps, hires_steps, use_old_scheduling) for part in parts]
    calls = hires_steps if hires_steps is not None else steps
    ends = sorted({end for schedule in schedules for end, _ in schedule})
    if ends[-1] < calls - 1:  # old scheduling in a longer hires pass: the host falls back to entry 0
        ends.append(calls - 1)
    segments, first = [], 0
    for end in ends:
        last = min(end, calls - 1)
        if first <= last:
            rows = tuple(
                Row(next((text for entry_end, text in schedule if entry_end >= end), schedule[0][1]), part.weight)
                for part, schedule in zip(parts, schedules, strict=True)
            )
            segments.append(Segment(first, last, rows))
        first = end + 1
    return tuple(segments)


def span_at(spans: Sequence, step: int):
    """The segment or span (anything with first_step, last_step) holding denoiser call `step`, or None."""
    return next((span for span in spans if span.first_step <= step <= span.last_step), None)


# ---------------------------------------------------------------------------------------------
# Emphasis: the text a reader sees


_ATTENTION = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
BREAK_MARK = ("BREAK", -1.0)


def _scale_from(fragments: list[list], start: int, factor: float) -> None:
    for fragment in fragments[start:]:
        fragment[1] *= factor


def _weight(text: str | None) -> float | None:
    """An emphasis weight, or None where the host could not read one (e.g. '1.2.3')."""
    try:
        return float(text) if text is not None else None
    except ValueError:
        return None


def emphasis_fragments(text: str) -> list[tuple[str, float]]:
    """[(text, weight)] of a row text as the host's `parse_prompt_attention` reads it: `(x)` ×1.1,
    `(x:w)` ×w, `[x]` ÷1.1, escapes literal, unclosed brackets closed at the end, BREAK as
    BREAK_MARK, adjacent equal weights merged."""
    fragments: list[list] = []
    rounds: list[int] = []
    squares: list[int] = []
    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), _weight(match.group(1))
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token in "([":
            (rounds if token == "(" else squares).append(len(fragments))
        elif weight is not None and rounds:
            _scale_from(fragments, rounds.pop(), weight)
        elif token == ")" and rounds:
            _scale_from(fragments, rounds.pop(), 1.1)
        elif token == "]" and squares:
            _scale_from(fragments, squares.pop(), 1 / 1.1)
        else:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    fragments.append(list(BREAK_MARK))
                fragments.append([part, 1.0])
    for start in rounds:
        _scale_from(fragments, start, 1.1)
    for start in squares:
        _scale_from(fragments, start, 1 / 1.1)
    return _merge_equal_weights(fragments or [["", 1.0]])


def _merge_equal_weights(fragments: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in fragments:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged]


def plain_row_text(text: str) -> str:
    """A row text without emphasis, BREAK as a comma: the words the encoder reads."""
    pieces = ["," if (t, w) == BREAK_MARK else t for t, w in emphasis_fragments(text)]
    return "".join(pieces)


# ---------------------------------------------------------------------------------------------
# Token columns, through the host's tokenizer


@dataclass(frozen=True)
class Tokenizer:
    """The host's tokenizer: `chunks(text)` = its `tokenize_line` as 77-entry id lists (BOS + 75 +
    EOS, padding with EOS ids), `words(text)` = a phrase's ids without specials."""

    chunks: Callable[[str], list[list[int]]]
    words: Callable[[str], list[int]]

    @classmethod
    def of(cls, wrapper) -> Tokenizer | None:
        """From a text-encoder wrapper with `tokenize_line` and `tokenize` (A1111's CLIP wrappers,
        Forge's text processing engines), or None."""
        if wrapper is None or not (hasattr(wrapper, "tokenize_line") and hasattr(wrapper, "tokenize")):
            return None
        return cls(
            chunks=lambda text: [list(chunk.tokens) for chunk in wrapper.tokenize_line(text)[0]],
            words=lambda text: list(wrapper.tokenize([text])[0]),
        )


def _chunk_body(chunk: Sequence[int], index: int) -> list[int]:
    """The prompt tokens of one chunk: without BOS, EOS and the EOS-id padding before it."""
    if len(chunk) != CHUNK_LENGTH:
        raise ValueError(f"chunk {index} has {len(chunk)} entries, expected {CHUNK_LENGTH} (BOS + 75 + EOS)")
    body = list(chunk[1:-1])
    while body and body[-1] == chunk[-1]:
        body.pop()
    return body


def token_columns(chunks: Sequence[Sequence[int]], phrase_ids: Sequence[int]) -> list[int]:
    """Context columns of every occurrence of `phrase_ids` in the tokenized chunks: chunk c,
    entry j ↦ 77·c + j. Sorted, unique; never BOS, EOS or padding."""
    phrase = list(phrase_ids)
    columns: set[int] = set()
    for c, chunk in enumerate(chunks):
        body = _chunk_body(chunk, c)
        for start in range(len(body) - len(phrase) + 1 if phrase else 0):
            if body[start : start + len(phrase)] == phrase:
                columns.update(CHUNK_LENGTH * c + 1 + start + k for k in range(len(phrase)))
    return sorted(columns)


def end_of_text_columns(chunks: Sequence[Sequence[int]]) -> list[int]:
    """The column of each chunk's first end-of-text token (after its prompt tokens)."""
    return [CHUNK_LENGTH * c + 1 + len(_chunk_body(chunk, c)) for c, chunk in enumerate(chunks)]


@dataclass(frozen=True)
class ColumnSpan:
    """Denoiser calls `first_step`..`last_step` and, in the row encoded there, the columns of some
    phrases and of each chunk's end-of-text token."""

    first_step: int
    last_step: int
    columns: tuple[int, ...]
    end_of_text: tuple[int, ...]


def phrase_columns(text: str, phrases: Sequence[str], tokenizer: Tokenizer) -> dict[str, list[int]]:
    """{phrase: context columns} in one row text, through the host's tokenizer; absent → []."""
    chunks = tokenizer.chunks(text)
    return {phrase: token_columns(chunks, tokenizer.words(phrase)) for phrase in phrases}
