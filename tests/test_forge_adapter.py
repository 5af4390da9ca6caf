"""The Forge adapter on the Forge stand-in (tests/testbed/forge.py) around the real ldm UNet:
whole generations through Forge's sampling function order, with the hooks called the way Forge
calls them (twice more for the hires pass). The whole-generation tests run on both layouts
(`layout_engine`): SD1.5 and SDXL (`c_crossattn` + pooled `y`, attention at factors 2 and 4 only)."""

import pytest
import torch

from guidance.hosts.common import NOTE_KEY, attach_state, state_of
from guidance.hosts.forge import ForgeAdapter, host_tokenizer
from guidance.params import build_settings
from guidance.prompt_model import phrase_columns
from guidance.prompts import extract_concepts
from tests.testbed.forge import (
    FluxLikeEngine,
    ForgeDiffusionEngine,
    Processing,
    forge_modules,
    generate,
    record_unet_calls,
)
from tests.testbed.text_encoder import size_embedding
from tests.testbed.unet import make_unet

PROMPT = "a photo of a red cat on a wooden table"


LAYOUTS = ["sd15", "sdxl"]


@pytest.fixture(scope="module", autouse=True)
def _forge_prompt_parser():
    """The adapter encodes its extra prompts through Forge's SdConditioning (size, negativity)."""
    with forge_modules():
        yield


@pytest.fixture(scope="module")
def engine():
    return ForgeDiffusionEngine(seed=0)


@pytest.fixture(scope="module")
def sdxl_engine():
    return ForgeDiffusionEngine(make_unet("tiny_sdxl", seed=0), seed=0)


@pytest.fixture(params=LAYOUTS)
def layout_engine(request, engine, sdxl_engine):
    """An SD1.5 or an SDXL model loaded in the Forge stand-in."""
    chosen = sdxl_engine if request.param == "sdxl" else engine
    assert chosen.is_sdxl == (request.param == "sdxl")
    return chosen


def run(engine, settings=None, prompts=(PROMPT,), hires=False, cfg=7.0, adapter=None, init_latent=None, **kw):
    """One generation; `settings` None ⇒ no extension at all (the host alone)."""
    p = Processing(engine, list(prompts), [11 + i for i in range(len(prompts))], cfg_scale=cfg, hr_cfg=cfg, **kw)
    adapter = adapter or ForgeAdapter()
    hooks, post = (), ()
    if settings is not None:
        state = attach_state(p, settings)

        def before(p):  # the script: no prepare when the settings are off or a hook failed
            if state.settings is not None and not state.failed:
                adapter.prepare(p, state)

        hooks, post = (before,), (adapter.finish,)
    original = engine.forge_objects_after_applying_lora.unet
    latent = generate(p, hooks, post, hires=hires, init_latent=init_latent)
    assert engine.forge_objects.unet is original  # nothing stays patched
    return latent, p


METHODS = {
    "scfg": dict(enable=True, scfg_enable=True),
    "regulation": dict(
        enable=True, regulation_enable=True, regulation_targets="red cat", regulation_iterations=3, regulation_end=1.0
    ),
    "sega": dict(enable=True, sega_enable=True, sega_edits="+ sunglasses : 5"),
    "concepts": dict(enable=True, concepts_enable=True, concepts="red cat; wooden table", concept_warmup=0.0),
}


# regulation's Gaussian bumps need maps of side 3 or more: at 64 px its layers (factor 4) are 2×2
METHOD_SIZE = {"regulation": dict(width=128, height=128)}


def _settings(method):
    return build_settings(METHODS[method])


def test_disabled_is_bit_identical_to_the_host(layout_engine):
    engine = layout_engine
    plain, _ = run(engine)
    off, _ = run(engine, build_settings({"enable": False, "sega_enable": True, "sega_edits": "+ hat"}))
    assert torch.equal(plain, off)
    hires_plain, _ = run(engine, hires=True)
    hires_off, _ = run(engine, build_settings({}), hires=True)
    assert torch.equal(hires_plain, hires_off)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_changes_the_image(layout_engine, method):
    engine = layout_engine
    settings = _settings(method)
    size = METHOD_SIZE.get(method, {})
    plain, _ = run(engine, **size)
    guided, p = run(engine, settings, **size)
    assert torch.isfinite(guided).all()
    change = (guided - plain).abs().mean().item()
    assert change > 1e-3, change
    assert not state_of(p).failed, p.extra_generation_params
    assert NOTE_KEY not in p.extra_generation_params


def test_all_methods_together_batch_two(layout_engine):
    engine = layout_engine
    values = {}
    for method in METHODS:
        values.update(METHODS[method])
    prompts = (PROMPT, "a red cat in a garden")
    plain, _ = run(engine, prompts=prompts, **METHOD_SIZE["regulation"])
    guided, p = run(engine, build_settings(values), prompts=prompts, **METHOD_SIZE["regulation"])
    assert guided.shape == plain.shape == (2, 4, 16, 16)
    assert not state_of(p).failed, p.extra_generation_params
    per_image = (guided - plain).abs().flatten(1).mean(1)
    assert (per_image > 1e-3).all(), per_image


def test_batch_two_matches_two_single_runs(engine):
    """Rows of one image never leak into the other: image 2 of a batch equals its own run."""
    # concept steering: per-image extra rows and state; S-CFG's argmax masks could flip on the
    # rounding differences between a batch of 2 and a batch of 1, which says nothing about leaks
    settings = build_settings(METHODS["concepts"])
    both, _ = run(engine, settings, prompts=(PROMPT, "a blue bird"))
    p = Processing(engine, ["a blue bird"], [12])
    state = attach_state(p, settings)
    adapter = ForgeAdapter()
    alone = generate(p, (lambda p: adapter.prepare(p, state),), (adapter.finish,))
    torch.testing.assert_close(both[1], alone[0], atol=1e-4, rtol=1e-4)


def test_extra_rows_ride_in_the_main_unet_call(engine, monkeypatch):
    """Extra prompts add rows to the one cond/uncond call per step (no separate call), and their
    predictions equal a separate evaluation of the extra prompt."""
    calls = record_unet_calls(engine, monkeypatch)
    guided, p = run(engine, _settings("sega"), prompts=(PROMPT, "a dog"))
    assert calls == [2 + 2 + 2] * p.steps  # uncond chunk, cond chunk, one block of extra rows


def test_hires_pass_prepares_idempotently(engine):
    settings = _settings("scfg")
    latent, p = run(engine, settings, hires=True)
    assert latent.shape == (1, 4, 16, 16)
    assert not state_of(p).failed
    _check_prepares_idempotently(engine, settings)


def test_hires_pass_sdxl(sdxl_engine):
    """Both passes guided on SDXL: the hires pass encodes its extra rows at its own size."""
    settings = build_settings(dict(METHODS["scfg"], **METHODS["sega"]))
    plain, _ = run(sdxl_engine, hires=True)
    latent, p = run(sdxl_engine, settings, hires=True)
    assert latent.shape == (1, 4, 16, 16) and torch.isfinite(latent).all()
    assert not state_of(p).failed, p.extra_generation_params
    assert (latent - plain).abs().mean() > 1e-3
    encoded = state_of(p).forge_encoded
    assert sorted({key[1:] for key in encoded}) == [(64, 64), (128, 128)]
    for (_, width, height), cond in encoded.items():  # SDXL's size embedding of that pass
        expected = size_embedding([height, width, 0, 0, height, width])[0]
        torch.testing.assert_close(cond["vector"][1280:], expected)


def _check_prepares_idempotently(engine, settings):
    """Preparing twice in a row leaves exactly one set of functions on one clone."""
    p = Processing(engine, [PROMPT], [1], is_hr_pass=True, hr_uc=torch.zeros(1))
    state = attach_state(p, settings)
    adapter = ForgeAdapter()
    original = engine.forge_objects.unet
    adapter.prepare(p, state)
    first = engine.forge_objects.unet
    adapter.prepare(p, state)
    second = engine.forge_objects.unet
    assert first is not original and second is not original and second is not first
    assert len(second.model_options["sampler_pre_cfg_function"]) == 1
    # the uncond rows are kept per call by our conditioning modifier, not on every call of the patcher
    assert "disable_cfg1_optimization" not in second.model_options
    assert len(second.model_options["conditioning_modifiers"]) == 1
    assert "sampler_pre_cfg_function" not in original.model_options
    adapter.finish(p)
    adapter.finish(p)
    assert engine.forge_objects.unet is original


def test_hires_pass_off_when_not_wanted(engine):
    settings = build_settings(dict(METHODS["scfg"], apply_hires=False))
    guided, _ = run(engine, settings, hires=True)
    plain, _ = run(engine, hires=True)
    assert not torch.equal(guided, plain)  # the first pass was guided


def test_img2img(layout_engine):
    engine = layout_engine
    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    plain, _ = run(engine, init_latent=init)
    guided, p = run(engine, _settings("scfg"), init_latent=init)
    assert (guided - plain).abs().mean() > 1e-4
    assert not state_of(p).failed


@pytest.mark.parametrize("where", ["cfg", "wrapper", "attention"])
def test_error_in_a_hook_falls_back_to_forge_cfg(engine, monkeypatch, where):
    plain, _ = run(engine)
    adapter = ForgeAdapter()
    original_prepare = adapter.prepare

    def prepare(p, state):
        original_prepare(p, state)
        patches = state.active.patches

        def boom(*args, **kwargs):
            raise RuntimeError("hook exploded")

        if where == "cfg":
            monkeypatch.setattr(patches.run, "step", boom)
        elif where == "wrapper":
            monkeypatch.setattr(patches, "_with_attention", boom)
        else:
            monkeypatch.setattr(patches.router, "forward", boom)

    adapter.prepare = prepare
    guided, p = run(engine, _settings("scfg"), adapter=adapter)
    state = state_of(p)
    assert state.failed and state.active is None
    note = p.extra_generation_params[NOTE_KEY]
    assert "hook exploded" in note and "Forge's own CFG" in note
    # the failing call returns the host's formula, every later call is the unpatched host
    torch.testing.assert_close(guided, plain, atol=1e-4, rtol=1e-4)


def test_finish_restores_the_original_unet(engine):
    p = Processing(engine, [PROMPT], [1], uc=torch.zeros(1))
    state = attach_state(p, _settings("scfg"))
    original = engine.forge_objects.unet
    adapter = ForgeAdapter()
    adapter.prepare(p, state)
    clone = engine.forge_objects.unet
    assert clone is not original and len(clone.model_options["sampler_pre_cfg_function"]) == 1
    # attention patches live only in the options of the calls they act in, never on the clone
    assert "patches_replace" not in clone.model_options["transformer_options"]
    adapter.finish(p)
    assert engine.forge_objects.unet is original
    assert original.model_options == {"transformer_options": {}}
    assert state.active is None


def test_reset_removes_a_run_that_never_finished(engine):
    """A generation that raised skips postprocess; the next one's `process` calls reset()."""
    p = Processing(engine, [PROMPT], [1], uc=torch.zeros(1))
    state = attach_state(p, _settings("scfg"))
    original = engine.forge_objects.unet
    adapter = ForgeAdapter()
    adapter.register_callbacks()
    adapter.prepare(p, state)
    patches = state.active.patches
    adapter.reset()
    assert engine.forge_objects.unet is original and not patches.enabled
    adapter.reset()


def test_model_gating_declines_with_a_message():
    flux = FluxLikeEngine(seed=0)
    plain, _ = run(flux)
    guided, p = run(flux, _settings("scfg"))
    assert torch.equal(plain, guided)
    note = p.extra_generation_params[NOTE_KEY]
    assert "no classic CFG" in note and "generated normally" in note


def test_cfg_one_declines_uncond_methods(engine):
    plain, _ = run(engine, cfg=1.0)
    guided, p = run(engine, _settings("scfg"), cfg=1.0)
    assert torch.equal(plain, guided)
    assert "CFG scale 1" in p.extra_generation_params[NOTE_KEY]


def test_find_columns_through_the_tokenizer(engine):
    columns = phrase_columns("a photo of a red cat, BREAK a dog", ["red cat", "dog", "horse"], host_tokenizer(engine))
    assert columns == {"red cat": [5, 6], "dog": [79], "horse": []}


def test_the_infotext_names_the_concepts_detected_in_the_prompt(engine):
    _, p = run(engine, build_settings(dict(enable=True, concepts_enable=True)))
    detected = p.extra_generation_params["Semantic Fidelity detected concepts"]
    assert detected.split("; ") == extract_concepts(PROMPT) and detected
    _, given = run(engine, _settings("concepts"))
    assert "Semantic Fidelity detected concepts" not in given.extra_generation_params
