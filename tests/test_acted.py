"""The "acted" summary: counters kept on the Python side by the run objects, `PlannedRun.acted_summary`
and `record_acted` (the infotext key `Semantic Fidelity acted`), through whole generations of the
Forge stand-in over the real tiny UNets, with `record_acted` called where the adapter's finish runs
(the lead wires it there)."""

from __future__ import annotations

import pytest

from guidance.hosts.common import ACTED_KEY, NOTE_KEY, attach_state, record_acted
from guidance.hosts.forge import ForgeAdapter
from guidance.params import build_settings
from tests.test_sdxl_acted_or_noted import attention_layers
from tests.testbed.forge import ForgeDiffusionEngine, Processing, forge_modules, generate
from tests.testbed.unet import make_unet

PROMPT = "a photo of a red cat on a wooden table"
REGULATION = dict(regulation_enable=True, regulation_targets="red cat", regulation_iterations=2, regulation_end=0.5)


@pytest.fixture(scope="module")
def unets():
    return {config: make_unet(config, seed=0) for config in ("tiny", "tiny_sdxl")}


@pytest.fixture(scope="module")
def engines(unets):
    with forge_modules():
        yield {config: ForgeDiffusionEngine(unet, seed=0) for config, unet in unets.items()}


def _generate(engine, values: dict, size: int = 128, steps: int = 4, hires: bool = False):
    """One generation with the adapter, whose finish calls record_acted. Returns the
    processing object and the planned runs that sampled."""
    p = Processing(engine, [PROMPT], [3], steps=steps, width=size, height=size, hr_steps=3)
    state = attach_state(p, build_settings(dict(enable=True, **values)))
    adapter, planned = ForgeAdapter(), []
    finish = adapter.finish

    def finish_and_keep(p):  # the adapter's finish records what acted; keep the plans to inspect
        if state.active is not None:
            planned.append(state.active.patches.planned)
        finish(p)

    adapter.finish = finish_and_keep  # prepare's own call of finish takes it too
    generate(p, (lambda p: adapter.prepare(p, state),), (adapter.finish,), hires=hires)
    assert not state.failed, p.extra_generation_params
    return p, planned


def test_every_method_counts_what_it_did(engines):
    values = dict(concepts_enable=True, concepts="cat", scfg_enable=True, **REGULATION)
    p, (planned,) = _generate(engines["tiny"], values)
    # SD1.5 at R = 4 captures factors 4 and 8: input 7, 8, the middle block, output 3, 4, 5 = 6
    # blocks per UNet call, one call (uncond and cond rows together) per step, 4 steps; regulation
    # until 0.5 of 4 steps (2 steps) on input 7, 8 and output 3, 4, 5 (one transformer each)
    # concept steering is active at every step (its history builds from step 0) and adds guidance
    # when warm-up < step < cool-down: warm-up 0.1 of 4 steps is step 0, so at steps 1, 2, 3
    (steering,) = planned.run.terms[0]
    assert [steering.active(step, 4) for step in range(4)] == [True] * 4
    concept_steps = sum(steering.schedule(4).warmup < step < steering.schedule(4).cooldown for step in range(4))
    assert planned.run.term_steps["concepts"] == concept_steps == 3
    expected = f"concepts {concept_steps}/4 steps; S-CFG 24 blocks, 4 steps; regulation 2 steps × 5 layers"
    assert p.extra_generation_params[ACTED_KEY] == expected
    assert planned.router.regulator.iterations_run == 2 * 5 * 2  # steps × layers × iterations


def test_sdxl_regulation_optimises_one_layer_per_block(engines):
    p, (planned,) = _generate(engines["tiny_sdxl"], REGULATION)
    # input 7, 8 and output 0, 1, 2 hold 3 transformers each in tiny_sdxl: the first optimises,
    # the other two apply its bias; 2 of 4 steps (end 0.5)
    expected = "regulation 2 steps × 5 layers (+10 sharing their block's bias)"
    assert p.extra_generation_params[ACTED_KEY] == expected
    assert planned.router.regulator.iterations_run == 2 * 5 * 2


def test_a_method_that_was_on_but_did_nothing_says_so(engines):
    # 64 px: every regulated map is 2×2; S-CFG from 0.9 of 4 steps: step 4, after the run's end
    values = dict(scfg_enable=True, scfg_start=0.9, **REGULATION)
    p, _ = _generate(engines["tiny"], values, size=64)
    assert p.extra_generation_params[ACTED_KEY] == "S-CFG did not act; regulation did not act"
    assert "2×2 attention maps" in p.extra_generation_params[NOTE_KEY]


def test_the_hires_pass_is_appended(engines, unets):
    values = dict(scfg_enable=True, scfg_mask_factor=8, apply_hires=True)
    p, planned = _generate(engines["tiny_sdxl"], values, size=64, hires=True)
    assert [run.hires for run in planned] == [False, True]
    # SDXL at R = 8 pools its coarsest level (factor 4): every transformer block of input 7, 8, the
    # middle block and output 0, 1, 2 (3 each in tiny_sdxl), read from the real UNet
    blocks = sum(key.kind == "cross" and factor == 4 for key, factor, *_ in attention_layers(unets["tiny_sdxl"]))
    assert blocks == 18
    assert p.extra_generation_params[ACTED_KEY] == (
        f"S-CFG {4 * blocks} blocks, 4 steps; hires: S-CFG {2 * blocks} blocks, 2 steps"
    )
    assert "S-CFG: this model has no attention at R = 8 (its levels: 2, 4)" in p.extra_generation_params[NOTE_KEY]


def test_a_run_that_never_sampled_records_nothing(engines):
    p, planned = _generate(engines["tiny"], dict(scfg_enable=True), steps=1)
    assert ACTED_KEY in p.extra_generation_params
    planned[0].run.steps_seen, planned[0].router.calls = 0, 0
    del p.extra_generation_params[ACTED_KEY]
    record_acted(p, planned[0])
    assert ACTED_KEY not in p.extra_generation_params
