"""Cost follows the schedule (issue 16): an extra prompt row goes to the UNet only on the steps where a
method reads it, in both hosts' stand-ins, and the guided result is the one the full batch would give."""

import pytest
import torch

from guidance.hosts.common import attach_state, state_of
from guidance.hosts.forge import ForgeAdapter
from guidance.params import build_settings
from tests.testbed.forge import ForgeDiffusionEngine, Processing, generate, record_unet_calls

STEPS = 8
CASES = {
    # SEGA with cool-down 0.25: its row on steps 0-1 of 8
    "sega cool-down 0.25": (dict(enable=True, sega_enable=True, sega_edits="+ sunglasses : 5 : 0.95 : 0 : 0.25"), 1, 2),
    # two concepts with cool-down 0.5: two rows on steps 0-3 of 8 (the abstract concept needs none)
    "concepts cool-down 0.5": (
        dict(
            enable=True, concepts_enable=True, concepts="red book; gold clock", concept_warmup=0, concept_cooldown=0.5
        ),
        2,
        4,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_forge_carries_extra_rows_only_while_read(case, monkeypatch):
    values, rows, active_steps = CASES[case]
    engine = ForgeDiffusionEngine(seed=0)
    calls = record_unet_calls(engine, monkeypatch)
    p = Processing(engine, ["a red book and a gold clock"], [7], steps=STEPS)
    state = attach_state(p, build_settings(values))
    adapter = ForgeAdapter()
    latent = generate(p, (lambda p: adapter.prepare(p, state),), (adapter.finish,))
    assert torch.isfinite(latent).all() and not state_of(p).failed, p.extra_generation_params
    assert calls == [2 + rows] * active_steps + [2] * (STEPS - active_steps)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a1111_carries_extra_rows_only_while_read(host, case):
    values, rows, active_steps = CASES[case]
    processed = host.generate(
        args=host.args(**values), prompt="a red book and a gold clock", steps=STEPS, width=64, height=64
    )
    assert processed.errors == [] and "Semantic Fidelity note" not in processed.infotexts[0]
    calls = processed.p.sampler.model_wrap_cfg.unet_calls
    assert calls == [2 + rows] * active_steps + [2] * (STEPS - active_steps)
