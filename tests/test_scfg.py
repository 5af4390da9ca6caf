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
    (two query rows per chunk, no self-attention map formed) the layer-averaged maps equal
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
            monkeypatch.setattr(attention_routing, "capture_budget", lambda device, budget=budget: budget)
            host.generate(args=args, **fields)
    assert len(seen[2**40]) == len(seen[64 * 2**10]) == 2  # one step, two images
    for formed, chunked in zip(seen[2**40], seen[64 * 2**10], strict=True):
        for a, b in zip(formed, chunked, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
