"""S-CFG units: kernel, propagation identity, schedule, per-call bookkeeping."""

import torch

from guidance.attention_routing import CallRows, LayerKey
from guidance.engine import ImageStep
from guidance.methods.scfg import RegionScales, gaussian_kernel, propagate, region_rate
from guidance.params import defaults


def test_kernel_is_the_authors():
    kernel = gaussian_kernel()
    edge = torch.exp(torch.tensor(-1.0))
    expected = torch.outer(torch.stack([edge, torch.tensor(1.0), edge]), torch.stack([edge, torch.tensor(1.0), edge]))
    torch.testing.assert_close(kernel, expected / expected.sum())


def test_propagation_equals_the_power_series_quirk():
    sa = torch.rand(2, 16, 16).softmax(-1)
    ca = torch.rand(2, 16, 77).softmax(-1)
    torch.testing.assert_close(propagate(sa, ca), ((sa + 3 * sa @ sa) / 4) @ ca)


def test_schedule_and_factors():
    scales = RegionScales.from_settings(defaults().replace(scfg_start=0.2, scfg_end=0.6), batch_size=1)
    assert not scales.active(1, 10) and scales.active(2, 10) and not scales.active(6, 10)
    assert scales.factors == (4, 8)
    assert RegionScales(1, mask_factor=2).factors == (2, 4, 8)


def test_rate_clamps_and_caps():
    tokens = torch.zeros(77, 4, 4)
    tokens[1, :, :2] = 5
    tokens[2, :, 2:] = 5
    fore = torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])
    direction = torch.ones(4, 16, 16)
    direction[:, :, 8:] = 100  # token 2's region: tiny rate, clamped at the minimum
    out = region_rate(tokens, fore, direction, cfg_scale=7.5)
    assert out["rate_clamped_before_smoothing"].min() == 0.8
    assert out["rate_clamped_before_smoothing"].max() <= 15 / 7.5


def test_missing_captures_give_plain_cfg_and_captures_are_dropped():
    scales = RegionScales(2)
    step = ImageStep(0, 0, 10, 7.5, torch.zeros(4, 16, 16), torch.randn(4, 16, 16))
    assert torch.equal(scales.rate(step), torch.ones(1, 1, 1))
    scales.begin_call(CallRows(0, 10, (16, 16), (1, None), (0, None)))
    meta = [(0, "cond"), (0, "uncond")]
    sa, ca = torch.rand(2, 16, 16).softmax(-1), torch.rand(2, 16, 77).softmax(-1)
    scales.record(LayerKey("input", 7, 0, "self"), sa, (4, 4), 4, meta)
    scales.record(LayerKey("input", 7, 0, "cross"), ca, (4, 4), 4, meta)
    assert scales.rate(step).shape == (1, 16, 16)
    assert torch.equal(scales.rate(step), torch.ones(1, 1, 1))  # consumed
    other = ImageStep(1, 0, 10, 7.5, torch.zeros(4, 16, 16), torch.randn(4, 16, 16))
    assert torch.equal(scales.rate(other), torch.ones(1, 1, 1))  # image 1 was never in a call


def test_a_whole_run_with_the_capture_chunked_and_unformed_equals_the_formed_one(tiny_unet, monkeypatch):
    """S-CFG at R=1 (every level captured) through the A1111 stand-in: with a 64 KiB capture budget
    (cross-attention one head and a few query rows per chunk; no self-attention map formed, its
    products through the fused kernel) the layer-averaged maps equal
    those of an unlimited budget. (The images are not compared: the token masks are an argmax over
    77 columns whose padding columns tie to rounding, so 1e-7 differences flip rates.)"""
    from guidance import attention_routing
    from guidance.methods import scfg
    from tests.a1111_host import A1111StandIn, a1111_modules

    seen: dict[int, list] = {}
    region_rate = scfg.region_rate

    def recording(token_maps, fore_maps, *args):
        seen[budget].append((token_maps, fore_maps))
        return region_rate(token_maps, fore_maps, *args)

    monkeypatch.setattr(scfg, "region_rate", recording)
    # one step: after it the images may differ (see above), and so would later steps' inputs
    prompts = ["a red book and a gold clock", "a blue cat AND a green dog:0.5"]
    fields = dict(prompt=prompts, batch_size=2, width=128, height=128, steps=1, cfg_scale=7.0)
    with a1111_modules():
        host = A1111StandIn(tiny_unet)
        args = host.args(enable=True, scfg_enable=True, scfg_mask_factor=1)
        for budget in (2**40, 64 * 2**10):
            seen[budget] = []
            monkeypatch.setattr(attention_routing, "layer_capture_budget", lambda cap, q, budget=budget: budget)
            host.generate(args=args, **fields)
    assert len(seen[2**40]) == len(seen[64 * 2**10]) == 2  # one step, two images
    for formed, chunked in zip(seen[2**40], seen[64 * 2**10], strict=True):
        for a, b in zip(formed, chunked, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# the model's attention levels: R = 8 on a model without factor 8 (SDXL)


def _feed_block(scales: RegionScales, block: int, side: int, factor: int, generator) -> None:
    """Self- then cross-attention probabilities of one block (rows: image 0 uncond, cond)."""
    rows = [(0, "uncond"), (0, "cond")]
    if not scales.wants(factor):
        return
    sa = torch.rand(2, side * side, side * side, generator=generator).softmax(-1)
    ca = torch.rand(2, side * side, 77, generator=generator).softmax(-1)
    scales.record(LayerKey("input", block, 0, "self"), sa, (side, side), factor, rows)
    scales.record(LayerKey("input", block, 0, "cross"), ca, (side, side), factor, rows)


def _rate_after(scales: RegionScales, factors_and_sides, latent: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    scales.begin_call(CallRows(0, 1, (latent, latent), uncond=(0,), cond=(1,)))
    for block, (factor, side) in enumerate(factors_and_sides):
        _feed_block(scales, block, side, factor, generator)
    direction = torch.randn(4, latent, latent, generator=torch.Generator().manual_seed(1))
    return scales.rate(ImageStep(0, 0, 1, 7.0, eps_uncond=torch.zeros_like(direction), direction=direction))


def test_r8_without_factor_8_pools_the_coarsest_level_with_a_note():
    scales = RegionScales(1, mask_factor=8)
    rate = _rate_after(scales, [(2, 8), (4, 4), (4, 4)])  # SDXL-like: factors 2 and 4 only
    assert scales.levels == (2, 4) and scales._used == (4,)
    assert rate.shape == (1, 16, 16) and scales.blocks_captured == 2 and scales.rate_steps == {0}
    assert scales.notes == [
        "S-CFG: this model has no attention at R = 8 (its levels: 2, 4); the R = 8 masks are pooled from its "
        "coarsest maps (factor 4)."
    ]


def test_r8_with_factor_8_discards_the_speculative_capture():
    # SD1.5-like: the first call also captures factor 4 until the levels are known; that capture
    # must not change the rate, which comes from the factor-8 block alone
    first = RegionScales(1, mask_factor=8)
    rate = _rate_after(first, [(4, 4), (8, 2)])
    known = RegionScales(1, mask_factor=8)
    known.levels, known._used = (4, 8), (8,)
    generator = torch.Generator().manual_seed(0)
    torch.rand(2, 16, 16, generator=generator), torch.rand(2, 16, 77, generator=generator)  # the factor-4 draws
    known.begin_call(CallRows(0, 1, (16, 16), uncond=(0,), cond=(1,)))
    _feed_block(known, 1, 2, 8, generator)
    direction = torch.randn(4, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = known.rate(ImageStep(0, 0, 1, 7.0, eps_uncond=torch.zeros_like(direction), direction=direction))
    torch.testing.assert_close(rate, expected)
    assert first.blocks_captured == 1 and first.notes == [] and not first._fallback


def test_no_level_at_r_or_coarser_is_noted():
    scales = RegionScales(1, mask_factor=8)
    rate = _rate_after(scales, [(1, 16), (2, 8)])
    assert rate.shape == (1, 1, 1) and float(rate) == 1.0 and scales.blocks_captured == 0
    assert scales.notes == [
        "S-CFG: this model has no attention at R = 8 or coarser (its levels: 1, 2); it does not act."
    ]
