"""Forge Neo: host detection, the Neo adapter on the Forge stand-in with Neo's differences (per-call
`extra_model_options` joined onto the patcher's options, `opts.sdxl_zero_neg`'s zeroed empty negative),
and Neo's model families declined with a note."""

import pytest
import torch

from guidance.hosts import host_of_version, make_adapter
from guidance.hosts.common import NOTE_KEY, attach_state, state_of
from guidance.hosts.forge_neo import NeoAdapter
from guidance.params import build_settings
from tests.testbed.forge import ForgeDiffusionEngine, Processing, generate

PROMPT = "a photo of a red cat on a wooden table"
METHODS = {
    "concepts": dict(enable=True, concepts_enable=True, concepts="red cat; wooden table", concept_warmup=0.0),
    "sega": dict(enable=True, sega_enable=True, sega_edits="+ sunglasses : 5"),
    "scfg": dict(enable=True, scfg_enable=True),
    "regulation": dict(
        enable=True, regulation_enable=True, regulation_targets="red cat", regulation_iterations=3, regulation_end=1.0
    ),
}


@pytest.mark.parametrize(
    "version, host",
    [("2.0.1v1.10.1", "forge"), ("neo", "neo"), ("Neo", "neo"), ("f0.0.17v1.8.0rc", "a1111"), ("", "a1111")],
)
def test_the_version_string_picks_the_adapter(version, host):
    assert host_of_version(version) == host


def test_neo_gets_the_neo_adapter():
    adapter = make_adapter("neo")
    assert isinstance(adapter, NeoAdapter) and adapter.host == "neo"


@pytest.fixture(scope="module")
def engine():
    return ForgeDiffusionEngine(seed=0)


def _run(engine, method=None, **fields):
    p = Processing(engine, [PROMPT], [3], **fields)
    adapter = NeoAdapter()
    hooks, post = (), ()
    if method:
        state = attach_state(p, build_settings(METHODS[method]))
        hooks, post = (lambda p: adapter.prepare(p, state),), (adapter.finish,)
    return generate(p, hooks, post), p


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_acts_with_per_call_options_and_a_zeroed_negative(engine, method):
    """A per-call option (a UNet wrapper passed through the sampler's model_options) and the zeroed empty
    negative of sdxl_zero_neg: each method still acts, the per-call wrapper still runs, nothing is NaN."""
    calls = []

    def wrapper(apply_model, args):
        calls.append(args["input"].shape[0])
        return apply_model(args["input"], args["timestep"], **args["c"])

    fields = dict(zero_negative=True, width=128, height=128)  # regulation needs maps of one bump or more
    plain, _ = _run(engine, **fields)
    guided, p = _run(engine, method, **fields)
    assert torch.isfinite(guided).all() and not state_of(p).failed
    assert NOTE_KEY not in p.extra_generation_params, p.extra_generation_params
    assert (guided - plain).abs().mean() > (1e-6 if method == "regulation" else 1e-3)
    with_options = Processing(engine, [PROMPT], [3], extra_model_options={"model_function_wrapper": wrapper}, **fields)
    state = attach_state(with_options, build_settings(METHODS[method]))
    adapter = NeoAdapter()
    chained = generate(with_options, (lambda p: adapter.prepare(p, state),), (adapter.finish,))
    assert len(calls) >= with_options.steps and not state.failed
    torch.testing.assert_close(chained, guided, rtol=0, atol=0)  # the per-call wrapper changes nothing here


def test_models_neo_declines_are_generated_normally(engine, monkeypatch):
    """A Neo engine that says it is not an SD1/SDXL model (Wan, Qwen-Image, Lumina…) is left alone."""
    monkeypatch.setattr(engine, "is_webui_legacy_model", lambda: False, raising=False)
    plain, _ = _run(engine)
    guided, p = _run(engine, "scfg")
    assert torch.equal(plain, guided)
    assert "not an SD1/SDXL UNet model" in p.extra_generation_params[NOTE_KEY]
