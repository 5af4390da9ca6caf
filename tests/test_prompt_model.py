"""The prompt model against the host: a table recorded from A1111 1.10.1's own `prompt_parser`
(tests/record_prompt_table.py → tests/data/prompt_table.json), and token columns through the test
bed's tokenizer (word-level, BOS + 75 + EOS chunks, BREAK closes a chunk) checked by hand."""

import json
from pathlib import Path

import pytest

from guidance import prompt_model as pm
from tests.testbed.text_encoder import BOS, EOS, TextEncoderStandIn, token_id

TABLE = json.loads((Path(__file__).resolve().parent / "data" / "prompt_table.json").read_text())
CASES = TABLE["cases"]
IDS = [f"{i}:{case['prompt'][:40]}" for i, case in enumerate(CASES)]


def test_the_table_is_recorded_from_the_host_and_large_enough():
    assert "v1.10.1" in TABLE["source"] and len(CASES) >= 30
    assert sum(len(case["parts"]) > 1 for case in CASES) >= 5  # AND prompts
    assert sum(any(len(part["schedule"]) > 1 for part in case["parts"]) for case in CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_and_parts_and_weights_as_the_host_splits_them(case):
    parts = pm.and_parts(case["prompt"])
    assert [(row.text, row.weight) for row in parts] == [(part["text"], part["weight"]) for part in case["parts"]]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_each_parts_schedule_as_the_host_resolves_it(case):
    for part in case["parts"]:
        schedule = pm.prompt_schedule(part["text"], case["steps"], case["hires_steps"], case["use_old_scheduling"])
        assert [list(entry) for entry in schedule] == part["schedule"], part["text"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_rows_at_every_denoiser_call(case):
    """At call s the host encodes, per part, the first entry whose end is ≥ s, else the first entry
    (reconstruct_cond_batch; only old scheduling in a longer hires pass gets there)."""
    calls = case["hires_steps"] or case["steps"]
    segments = pm.prompt_segments(case["prompt"], case["steps"], case["hires_steps"], case["use_old_scheduling"])
    assert segments[0].first_step == 0 and segments[-1].last_step == calls - 1
    for step in range(calls):
        expected = [
            (next((text for end, text in part["schedule"] if step <= end), part["schedule"][0][1]), part["weight"])
            for part in case["parts"]
        ]
        rows = pm.span_at(segments, step).rows
        assert [(row.text, row.weight) for row in rows] == expected, step
    assert pm.span_at(segments, calls) is None


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_emphasis_of_every_scheduled_text(case):
    for text, fragments in case["emphasis"].items():
        if isinstance(fragments, str):  # the host raises on this text: the model must not
            assert pm.plain_row_text(text)
            continue
        assert [list(f) for f in pm.emphasis_fragments(text)] == fragments, text


def fuzz_mismatches(case) -> list[str]:
    """Where the model differs from the host on one recorded case: parts, schedules, emphasis."""
    found = []
    parts = pm.and_parts(case["prompt"])
    if [(row.text, row.weight) for row in parts] != [(part["text"], part["weight"]) for part in case["parts"]]:
        found.append("AND parts")
    for part in case["parts"]:
        schedule = pm.prompt_schedule(part["text"], case["steps"], case["hires_steps"], case["use_old_scheduling"])
        if [list(e) for e in schedule] != part["schedule"]:
            found.append(f"schedule of {part['text']!r}")
    for text, fragments in case["emphasis"].items():
        if not isinstance(fragments, str) and [list(f) for f in pm.emphasis_fragments(text)] != fragments:
            found.append(f"emphasis of {text!r}")
    return found


def test_random_bracket_heavy_prompts_read_as_the_host_reads_them():
    """600 recorded random prompts full of stray brackets, colons, escapes, AND and BREAK."""
    assert len(TABLE["fuzz"]) == 600
    mismatches = {case["prompt"]: found for case in TABLE["fuzz"] if (found := fuzz_mismatches(case))}
    assert mismatches == {}


def test_the_issue_prompts():
    """Issue 15: what each step of a 20-call run encodes."""
    castle = pm.prompt_segments("a castle on a hill AND a dragon :-1", 20)
    assert [(r.text, r.weight) for r in castle[0].rows] == [("a castle on a hill", 1.0), (" a dragon", -1.0)]
    dog = pm.prompt_segments("[a dog:a cat:0.5] on a sofa", 20)
    assert [(s.first_step, s.last_step, s.rows[0].text) for s in dog] == [
        (0, 10, "a dog on a sofa"),
        (11, 19, "a cat on a sofa"),
    ]
    pear = pm.prompt_segments("[red apple:green pear:40]", 20)
    assert [(s.first_step, s.last_step, s.rows[0].text) for s in pear] == [(0, 19, "red apple")]
    # an entry no call reaches is no segment: [a:b:19] of 19 calls encodes "a" throughout
    assert [s.rows[0].text for s in pm.prompt_segments("[a:b:19]", 19)] == ["a"]


def test_extra_network_tags_are_not_text():
    segments = pm.prompt_segments("<lora:add_detail:0.8> a cabin <hypernet:anime:1>, snow AND x:0.5", 10)
    assert [(r.text, r.weight) for r in segments[0].rows] == [(" a cabin , snow", 1.0), (" x", 0.5)]


def test_plain_row_text_drops_emphasis_and_marks_break():
    assert pm.plain_row_text("(masterpiece:1.2), ((best quality)), [blurry]") == "masterpiece, best quality, blurry"
    assert pm.plain_row_text(r"a \(weird\) sign BREAK a dragon") == "a (weird) sign,a dragon"
    assert pm.plain_row_text("(a:1.2.3) b") == "a:1.2.3) b"


# ---------------------------------------------------------------------------------------------
# Token columns through the test bed's tokenizer (checked by hand: one id per word or mark)

ENCODER = TextEncoderStandIn()
TOKENIZER = pm.Tokenizer.of(ENCODER)


def columns(text: str, phrase: str) -> list[int]:
    return pm.phrase_columns(text, [phrase], TOKENIZER)[phrase]


def test_tokenizer_of_needs_both_host_functions():
    assert pm.Tokenizer.of(None) is None and pm.Tokenizer.of(object()) is None
    assert TOKENIZER.words("Red book") == [token_id("red"), token_id("book")]


@pytest.mark.parametrize(
    "text, phrase, expected",
    [
        ("a red book and a red book on a table", "red book", [2, 3, 6, 7]),  # every occurrence
        ("a red book", "gold clock", []),  # absent: no column, never the padding
        ("a cat on a sofa", "sofa", [5]),  # the row of [a dog:a cat:0.5] on a sofa
        ("a red book", "a", [1]),
        ("a knight BREAK a dragon", "dragon", [77 + 2]),  # BREAK closes chunk 0
        ("a knight BREAK a dragon", "knight", [2]),
        ("x, y BREAK BREAK z", "z", [154 + 1]),  # an empty chunk between two BREAKs
        (" ".join(["grass"] * 80) + " golden clock", "golden clock", [77 + 6, 77 + 7]),  # > 75 tokens
        (" ".join(["grass"] * 75) + " clock", "clock", [77 + 1]),  # the 76th token opens chunk 1
    ],
)
def test_phrase_columns_by_hand(text, phrase, expected):
    assert columns(text, phrase) == expected


def test_long_prompts_keep_every_column_of_a_repeated_word():
    assert columns(" ".join(["grass"] * 80), "grass") == list(range(1, 76)) + list(range(78, 83))


def test_end_of_text_columns_by_hand():
    assert pm.end_of_text_columns(TOKENIZER.chunks("a red book")) == [4]
    assert pm.end_of_text_columns(TOKENIZER.chunks("a knight BREAK a dragon")) == [3, 77 + 3]
    assert pm.end_of_text_columns(TOKENIZER.chunks("")) == [1]
    assert pm.end_of_text_columns(TOKENIZER.chunks(" ".join(["grass"] * 75))) == [76]


def test_specials_and_malformed_chunks():
    chunks = TOKENIZER.chunks("a cat")
    assert pm.token_columns(chunks, [EOS]) == [] and pm.token_columns(chunks, [BOS]) == []
    assert pm.token_columns(chunks, []) == []
    with pytest.raises(ValueError, match="expected 77"):
        pm.token_columns([[BOS, 5, EOS]], [5])


def test_absurd_nesting_does_not_fail():
    deep = "(" * 3000 + "a [b:c:0.5]" + ")" * 3000
    assert pm.prompt_schedule(deep, 10) == [(10, deep)]
    assert [s.rows[0].text for s in pm.prompt_segments(deep, 10)] == [deep]
