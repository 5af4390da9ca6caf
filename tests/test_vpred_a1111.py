"""v-prediction and zero-terminal-SNR SDXL models through the A1111 stand-in (k-diffusion's
CompVisVDenoiser on the model's rescaled `alphas_cumprod`, as A1111 1.10 runs a `parameterization: v`
checkpoint with the "Zero Terminal SNR" noise schedule): all four methods give the same image from
an eps and a v model with the same prediction, and act and stay finite on a v network."""

from __future__ import annotations

import pytest
import torch

from tests.a1111_host import A1111StandIn, a1111_modules
from tests.testbed.sampling import CompVisEpsDenoiser, VFromEps, sd_alphas_cumprod, zero_terminal_snr
from tests.testbed.unet import make_unet

PROMPT = "a red book and a gold clock"
SIZE = dict(width=128, height=128, cfg_scale=7.0)
ALL_METHODS = dict(
    enable=True,
    concepts_enable=True,
    sega_enable=True,
    sega_edits="+ gold clock : 6",
    scfg_enable=True,
    regulation_enable=True,
)
ZTSNR = zero_terminal_snr(sd_alphas_cumprod())


@pytest.fixture(scope="module")
def host():
    with a1111_modules():
        host = A1111StandIn(make_unet("tiny_sdxl", seed=0))
        yield host


def _generate(host, unet, parameterization: str, extension: bool, steps: int):
    host.load_model(unet, parameterization=parameterization, alphas_cumprod=ZTSNR)
    args = host.args(**ALL_METHODS) if extension else None
    processed = host.generate(args=args, extension=extension, prompt=PROMPT, steps=steps, **SIZE)
    assert processed.errors == [] and host.leftover_patches() == []
    assert "Semantic Fidelity note" not in processed.infotexts[0]
    return torch.stack(processed.images)


def test_all_methods_give_the_same_image_from_an_eps_and_a_v_model(host):
    eps_unet = host.unet
    v_unet = VFromEps(make_unet("tiny_sdxl", seed=0), CompVisEpsDenoiser(torch.nn.Identity(), ZTSNR))
    # one step: the image is the guided x0 of the first call, where both models see the same input
    plain = _generate(host, eps_unet, "eps", extension=False, steps=1)
    guided_eps = _generate(host, eps_unet, "eps", extension=True, steps=1)
    guided_v = _generate(host, v_unet, "v", extension=True, steps=1)
    assert (guided_eps - plain).abs().mean() > 1e-3
    # at the top sigma (≈ 4519) x0 = x − σ·eps is of size ≈ σ: float32 rounding scales with it
    scale = float(guided_eps.abs().max())
    assert scale > 1000
    torch.testing.assert_close(guided_v, guided_eps, rtol=1e-4, atol=1e-5 * scale)


def test_all_methods_act_and_stay_finite_on_a_v_network(host):
    v_unet = make_unet("tiny_sdxl", seed=1)  # its raw output read as v
    plain = _generate(host, v_unet, "v", extension=False, steps=4)
    guided = _generate(host, v_unet, "v", extension=True, steps=4)
    assert torch.isfinite(plain).all() and torch.isfinite(guided).all()
    assert (guided - plain).abs().mean() > 1e-3
