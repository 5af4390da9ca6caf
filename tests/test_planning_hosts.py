"""One prompt model for both hosts: the same prompt through the A1111 stand-in (real script) and the
Forge stand-in plans the same concepts, the same steps and the same regulation columns (targets and
end-of-text), each adapter with its own host's tokenizer object."""

import pytest

from guidance.hosts import a1111 as a1111_adapter
from guidance.hosts import forge as forge_adapter
from guidance.params import build_settings
from tests.a1111_host import A1111StandIn, a1111_modules
from tests.test_forge_adapter import run as forge_run
from tests.testbed.forge import ForgeDiffusionEngine

PROMPTS = ["[a dog:a cat:0.5] on a sofa AND a red book:0.5", "a red book AND a gold clock BREAK a [cat|fox]"]
VALUES = dict(
    enable=True,
    concepts_enable=True,
    regulation_enable=True,
    regulation_targets="cat; sofa; red book; gold clock",
    regulation_iterations=2,
)


@pytest.fixture(scope="module")
def a1111(tiny_unet):
    with a1111_modules():
        yield A1111StandIn(tiny_unet)


def recorded_plans(monkeypatch, module) -> list:
    """Every PlannedRun the adapter in `module` makes, with the RunSteps it was given."""
    plans, original = [], module.plan_run

    def recording(settings, images, steps, **kw):
        planned = original(settings, images, steps, **kw)
        plans.append((steps, planned))
        return planned

    monkeypatch.setattr(module, "plan_run", recording)
    return plans


def summary(steps, planned) -> dict:
    """What a plan says about the prompt: concepts and when they hold, regulation columns."""
    concepts = [term for terms in planned.run.terms for term in terms]
    return {
        "steps": steps,
        "concepts": [(c.concepts, [c.presence(s) for s in range(steps.calls)]) for c in concepts],
        "spans": planned.router.regulator.spans,
        "notes": planned.notes,
    }


@pytest.mark.parametrize("prompt", PROMPTS)
def test_both_hosts_plan_the_same_prompt_alike(a1111, monkeypatch, prompt):
    a1111_plans = recorded_plans(monkeypatch, a1111_adapter)
    processed = a1111.generate(prompt=prompt, args=a1111.args(**VALUES), width=64, height=64, steps=4)
    assert processed.errors == []
    forge_plans = recorded_plans(monkeypatch, forge_adapter)
    forge_run(ForgeDiffusionEngine(seed=0), build_settings(VALUES), prompts=(prompt,), steps=4)
    assert len(a1111_plans) == len(forge_plans) == 1
    a, f = summary(*a1111_plans[0]), summary(*forge_plans[0])
    assert a == f
    assert a["spans"][0] and all(span.end_of_text for span in a["spans"][0])


def test_what_both_hosts_plan_for_a_scheduled_prompt(a1111, monkeypatch):
    plans = recorded_plans(monkeypatch, forge_adapter)
    forge_run(ForgeDiffusionEngine(seed=0), build_settings(VALUES), prompts=(PROMPTS[0],), steps=4)
    found = summary(*plans[0])
    # 4 calls, 0.5 → after call 2: "a dog on a sofa" for calls 0-2, "a cat on a sofa" for call 3
    assert [(s.first_step, s.last_step, s.columns, s.end_of_text) for s in found["spans"][0]] == [
        (0, 2, (5,), (6,)),
        (3, 3, (2, 5), (6,)),
    ]
    assert found["concepts"][0][0] == ("dog", "sofa", "red book", "cat")  # the AND part of weight 0.5 too
