"""Planning from the prompt model (issue 15): concepts only from subject rows and only while held,
regulation targets per step segment of the first row the host encodes, with one note for what is
skipped. The tokenizer is the test bed's (tests/testbed/text_encoder.py: one id per word or mark)."""

from types import SimpleNamespace

import torch

from guidance.engine import ImageInfo
from guidance.hosts.common import DETECTED_KEY, record_plan
from guidance.methods.attention_regulation import AttentionRegulator, _LayerState
from guidance.methods.concept_steering import ConceptSteering
from guidance.params import build_settings
from guidance.planning import RunSteps, plan_run, run_steps
from guidance.prompt_model import ColumnSpan, Tokenizer
from tests.testbed.text_encoder import TextEncoderStandIn

TOKENIZER = Tokenizer.of(TextEncoderStandIn())


def settings(**values):
    return build_settings({"enable": True, **values})


def regulation(targets: str = "", **values):
    return settings(regulation_enable=True, regulation_targets=targets, **values)


def plan(prompt: str, chosen, steps: int = 20, tokenizer=TOKENIZER):
    return plan_run(chosen, [ImageInfo(prompt, seed=3)], RunSteps(steps), tokenizer=tokenizer)


def test_subtracted_parts_give_no_concepts_and_a_users_absent_concept_is_noted():
    planned = plan("a castle on a hill AND a dragon :-1", settings(concepts_enable=True))
    (steering,) = planned.run.terms[0]
    assert steering.concepts == ("castle", "hill") and planned.detected_concepts == [["castle", "hill"]]
    assert [row.text for row in planned.run.extra_rows] == ["castle", "hill"]
    given = plan("a castle on a hill AND a dragon :-1", settings(concepts_enable=True, concepts="castle; dragon"))
    assert given.run.terms[0][0].concepts == ("castle",) and [r.text for r in given.run.extra_rows] == ["castle"]
    assert given.notes == ["Concept steering: dragon is in no row of the prompt with a positive weight; not steered."]
    assert given.detected_concepts == []
    nothing = plan("a castle AND a dragon :-1", settings(concepts_enable=True, concepts="dragon"))
    assert nothing.run.terms == [[]] and not nothing.acting


def test_a_scheduled_concept_is_steered_only_while_its_text_is_in_the_row():
    planned = plan("[a dog:a cat:0.5] on a sofa", settings(concepts_enable=True))
    steering: ConceptSteering = planned.run.terms[0][0]
    assert steering.concepts == ("dog", "sofa", "cat")
    assert [steering.presence(s) for s in (0, 10, 11, 19)] == [
        (True, True, False),
        (True, True, False),
        (False, True, True),
        (False, True, True),
    ]
    assert planned.detected_concepts == [["dog (steps 1–11)", "sofa", "cat (steps 12–20)"]]
    assert plan("[red apple:green pear:40]", settings(concepts_enable=True)).run.terms[0][0].concepts == ("red apple",)


def test_the_infotext_names_the_concepts_with_their_steps():
    planned = plan("[a dog:a cat:0.5] on a sofa", settings(concepts_enable=True))
    p = SimpleNamespace(extra_generation_params={})
    record_plan(p, planned)
    assert p.extra_generation_params[DETECTED_KEY] == "dog (steps 1–11); sofa; cat (steps 12–20)"


def test_regulation_targets_follow_the_row_of_each_segment():
    """`[a dog:a cat:0.5] on a sofa`: "sofa" is column 5 of both rows; "cat" only in the second."""
    planned = plan("[a dog:a cat:0.5] on a sofa", regulation("sofa; cat"))
    regulator: AttentionRegulator = planned.router.regulator
    assert regulator.spans == [[ColumnSpan(0, 10, (5,), (6,)), ColumnSpan(11, 19, (2, 5), (6,))]]
    assert planned.notes == [
        "Attention regulation: cat (steps 1–11) not in the first conditioning row; not regulated there."
    ]
    assert regulator.active(0, 20) and (regulator.targets, regulator.restore) == ([[5]], [[0, 6]])
    regulator.at_step(11)
    assert (regulator.targets, regulator.restore) == ([[2, 5]], [[0, 6]])


def test_regulation_never_targets_the_padding_of_another_and_part():
    planned = plan("a red book AND a gold clock", regulation("red book; gold clock"))
    assert planned.router.regulator.spans == [[ColumnSpan(0, 19, (2, 3), (4,))]]
    assert planned.notes == ["Attention regulation: gold clock not in the first conditioning row; not regulated there."]
    off = plan("a red book AND a gold clock", regulation("gold clock"))
    assert off.router is None
    assert off.notes == ["Attention regulation: none of the target words is in the prompt's first row; it is off."]


def test_regulation_of_detected_concepts_and_without_a_tokenizer():
    planned = plan("a red book BREAK a gold clock", regulation())
    assert planned.router.regulator.spans == [[ColumnSpan(0, 19, (2, 3, 79, 80), (4, 81))]]
    none = plan("a red book", regulation("book"), tokenizer=None)
    assert none.router is None
    assert none.notes == ["Attention regulation: the host offers no tokenizer for target positions; it is off."]


def test_a_change_of_targets_starts_the_bias_history_afresh():
    spans = [[ColumnSpan(0, 1, (5,), (6,)), ColumnSpan(2, 3, (2,), (6,))], [ColumnSpan(0, 3, (3,), (4,))]]
    regulator = AttentionRegulator([[5], [3]], seeds=[1, 2], spans=spans)
    bias = torch.zeros(2, 4, 1)
    regulator._state[("layer", 0)] = regulator._state[("layer", 1)] = _LayerState(1, bias, bias)
    regulator.at_step(1)
    assert set(regulator._state) == {("layer", 0), ("layer", 1)}
    regulator.at_step(2)
    assert set(regulator._state) == {("layer", 1)} and regulator.targets == [[2], [3]]
    assert regulator.restore == [[0, 6], [0, 4]]
    regulator.at_step(9)  # past every span: no targets, nothing regulated
    assert regulator.targets == [[], []] and not regulator.active(9, 10)


def test_run_steps_as_the_host_schedules_its_conds():
    first = SimpleNamespace(steps=20, firstpass_steps=39, is_hr_pass=False)
    assert run_steps(first) == RunSteps(39) and run_steps(first).calls == 39
    hires = SimpleNamespace(steps=20, firstpass_steps=40, is_hr_pass=True, hr_second_pass_steps=10)
    assert run_steps(hires) == RunSteps(40, 20) and run_steps(hires).calls == 20
    assert run_steps(SimpleNamespace(steps=8)) == RunSteps(8)
