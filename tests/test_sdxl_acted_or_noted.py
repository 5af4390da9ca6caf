"""S-CFG (R = 1, 2, 4, 8) and attention regulation on SD1.5 and SDXL at image sizes 64-1024 px:
each either acts or a note says why it cannot (the bar: the infotext never claims what did not
happen).

"Acted" is observed, not inferred: S-CFG acted when `region_rate` computed a rate map from captured
attention (without captures its rate is 1, plain CFG); regulation acted when `optimise_bias` ran on a
regulated layer (without a Gaussian bump on the map it returns the plain softmax). Both functions are
wrapped, not replaced.

- 64 and 128 px: whole generations through the Forge stand-in and the real adapter, so that a note
  from anywhere (planning, adapter, router) reaches the infotext's note key.
- 256, 512 and 1024 px: the router alone, fed q/k/v of each routed layer's real shape (layers, heads
  and downsampling factors read from the real tiny UNets), for the first transformer block of each
  attention block whose maps have at most 32×32 positions: finer S-CFG captures at R = 1, 2 would
  cost gigabytes, and every layout's coarsest attention level is within that bound, so whether
  anything is captured is decided there. There is no note channel at this level: a case that
  cannot act fails.

S-CFG with R = 8 on SDXL (no attention at factor 8) pools its coarsest maps (factor 4) to the R = 8
grid, with a note; regulation at 64 px (its layers' maps are 2×2, no Gaussian bump fits) leaves
those layers alone, with a note. The run's notes reach the infotext through `record_acted`, which
the adapter calls in its finish (wrapped here).
"""

from __future__ import annotations

import pytest
import torch

from guidance.attention_routing import AttentionRouter, CallRows, LayerKey
from guidance.engine import ImageStep
from guidance.hosts.common import NOTE_KEY, attach_state, record_acted
from guidance.hosts.forge import ForgeAdapter
from guidance.methods import attention_regulation, scfg
from guidance.methods.attention_regulation import AttentionRegulator
from guidance.methods.scfg import RegionScales
from guidance.params import build_settings
from tests.testbed.forge import ForgeDiffusionEngine, Processing, forge_modules, generate
from tests.testbed.unet import make_unet

LAYOUTS = {"sd15": "tiny", "sdxl": "tiny_sdxl"}
FACTORS = (1, 2, 4, 8)
HOST_SIZES = (64, 128)
ROUTER_SIZES = (256, 512, 1024)
PROMPT = "a photo of a red cat on a wooden table"
SCFG_FALLBACK_NOTE = "S-CFG: this model has no attention at R = 8 (its levels: 2, 4)"
REGULATION_SMALL_NOTE = "Attention regulation: some chosen layers have 2×2 attention maps"


@pytest.fixture(scope="module")
def unets():
    return {layout: make_unet(config, seed=0) for layout, config in LAYOUTS.items()}


@pytest.fixture(scope="module")
def layers(unets):
    return {layout: attention_layers(unet) for layout, unet in unets.items()}


@pytest.fixture(scope="module")
def engines(unets):
    with forge_modules():
        yield {layout: ForgeDiffusionEngine(unet, seed=0) for layout, unet in unets.items()}


@pytest.fixture
def acted(monkeypatch):
    """Counts of the calls that mean S-CFG / regulation acted, through wrappers of the real functions."""
    counts = {"scfg": 0, "regulation": 0}
    real_rate, real_optimise = scfg.region_rate, attention_regulation.optimise_bias

    def region_rate(*args, **kwargs):
        counts["scfg"] += 1
        return real_rate(*args, **kwargs)

    def optimise_bias(*args, **kwargs):
        counts["regulation"] += 1
        return real_optimise(*args, **kwargs)

    monkeypatch.setattr(scfg, "region_rate", region_rate)
    monkeypatch.setattr(attention_regulation, "optimise_bias", optimise_bias)
    return counts


def _host_note(engine, values: dict, size: int) -> str:
    """One 2-step generation at `size` px with the adapter, whose finish records what acted (as the
    lead wires it); the infotext's note ('' if none)."""
    p = Processing(engine, [PROMPT], [3], steps=2, width=size, height=size)
    state = attach_state(p, build_settings(values))
    adapter = ForgeAdapter()
    finish = adapter.finish

    def finish_and_record(p):
        if state.active is not None:
            record_acted(p, state.active.patches.planned)
        finish(p)

    adapter.finish = finish_and_record  # prepare's own call of finish takes it too
    generate(p, (lambda p: adapter.prepare(p, state),), (adapter.finish,))
    assert not state.failed, p.extra_generation_params
    return p.extra_generation_params.get(NOTE_KEY, "")


@pytest.mark.parametrize(
    "layout, factor, size", [(layout, r, size) for layout in LAYOUTS for r in FACTORS for size in HOST_SIZES]
)
def test_scfg_acts_or_notes_through_the_host(engines, acted, layout, factor, size):
    note = _host_note(engines[layout], dict(enable=True, scfg_enable=True, scfg_mask_factor=factor), size)
    assert acted["scfg"] > 0 or "S-CFG" in note, (acted, note)
    # R = 8 on SDXL acts from its coarsest level (2 steps × 1 image) and says so; elsewhere no note
    assert acted["scfg"] == 2, (acted, note)
    assert (SCFG_FALLBACK_NOTE in note) == (layout == "sdxl" and factor == 8), note


@pytest.mark.parametrize("layout, size", [(layout, size) for layout in LAYOUTS for size in HOST_SIZES])
def test_regulation_acts_or_notes_through_the_host(engines, acted, layout, size):
    values = dict(
        enable=True, regulation_enable=True, regulation_targets="red cat", regulation_iterations=2, regulation_end=1.0
    )
    note = _host_note(engines[layout], values, size)
    assert acted["regulation"] > 0 or "regulation" in note.lower(), (acted, note)
    # at 64 px every chosen layer's map is 2×2: nothing is optimised, one note says why
    assert (acted["regulation"] == 0) == (size == 64) == (REGULATION_SMALL_NOTE in note), (acted, note)


# ---------------------------------------------------------------------------------------------
# large images: the router alone


def attention_layers(unet) -> list[tuple[LayerKey, int, int, int]]:
    """(key, downsampling factor, heads, head width) of every attention layer in execution order,
    from one forward of the real UNet at a 16×16 latent."""
    seen: list[tuple[LayerKey, int, int, int]] = []
    hooks = []
    for name, module in unet.named_modules():
        key = LayerKey.from_module_name(name)
        if key is None:
            continue

        def record(module, args, output, key=key):
            side = int(args[0].shape[1] ** 0.5)
            seen.append((key, 16 // side, module.heads, module.to_q.out_features // module.heads))

        hooks.append(module.register_forward_hook(record))
    context_dim = unet.input_blocks[4][1].transformer_blocks[0].attn2.to_k.in_features
    kwargs = {"y": torch.zeros(1, unet.adm_in_channels)} if hasattr(unet, "adm_in_channels") else {}
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 4, 16, 16), torch.tensor([500.0]), context=torch.zeros(1, 77, context_dim), **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def _drive_router(router: AttentionRouter, layers, latent: int, max_side: int = 32) -> None:
    """One UNet call of one image (row 0 uncond, row 1 cond) through the first transformer of the
    router's routed blocks whose maps have at most max_side² positions; q/k/v of the real shape."""
    routed = router.routed_layers(key for key, *_ in layers)
    router.begin_call(CallRows(0, 2, (latent, latent), uncond=(0,), cond=(1,)))
    generator = torch.Generator().manual_seed(0)
    for key, factor, heads, width in layers:
        side = -(-latent // factor)
        if key not in routed or side > max_side or key.transformer > 0:
            continue
        q = torch.randn(2, side * side, heads * width, generator=generator)
        tokens = side * side if key.kind == "self" else 77
        k, v = (torch.randn(2, tokens, heads * width, generator=generator) for _ in range(2))
        out = router.forward(key, q, k, v, heads)
        assert out.shape == q.shape and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "layout, factor, size", [(layout, r, size) for layout in LAYOUTS for r in FACTORS for size in ROUTER_SIZES]
)
def test_scfg_acts_at_large_sizes(layers, layout, factor, size):
    region_scales = RegionScales(batch_size=1, mask_factor=factor)
    latent = size // 8
    _drive_router(AttentionRouter(region_scales=region_scales), layers[layout], latent)
    direction = torch.randn(4, latent, latent, generator=torch.Generator().manual_seed(1))
    step = ImageStep(0, 0, 2, 7.0, eps_uncond=torch.zeros_like(direction), direction=direction)
    rate = region_scales.rate(step)
    assert rate.shape[-2:] == (latent, latent), "no attention was captured: the rate is the plain-CFG 1"


@pytest.mark.parametrize("layout, size", [(layout, size) for layout in LAYOUTS for size in ROUTER_SIZES])
def test_regulation_acts_at_large_sizes(layers, acted, layout, size):
    regulator = AttentionRegulator(targets=[[5, 6]], seeds=[0], end=1.0, iterations=2)
    _drive_router(AttentionRouter(regulator=regulator), layers[layout], size // 8)
    assert acted["regulation"] > 0
