"""v-prediction and zero-terminal-SNR (ZTSNR) models (NoobAI-style SDXL checkpoints) on the test bed.

The maths: a v model and an eps model with the same underlying prediction give the same x0
(`VFromEps` turns the eps network into that v network), so every method, which works in eps space
from the host's x0 (eps = (x − x0)/σ), must give the same image under both, on SD's schedule and on
its ZTSNR rescaling, whose top sigma is the hosts' clamp (≈ 4519, not infinite). With a v network
on the ZTSNR schedule every method must act and stay finite.
"""

from __future__ import annotations

import pytest
import torch

from guidance.hosts.common import NOTE_KEY, attach_state
from guidance.hosts.forge import ForgeAdapter
from guidance.params import build_settings
from tests.testbed.forge import EpsPredictor, ForgeDiffusionEngine, Processing, VPredictor, forge_modules, generate
from tests.testbed.sampling import (
    ZTSNR_LAST_ALPHA_BAR,
    CompVisEpsDenoiser,
    CompVisVDenoiser,
    VFromEps,
    sd_alphas_cumprod,
    zero_terminal_snr,
)
from tests.testbed.unet import make_unet

PROMPT = "a photo of a red cat on a wooden table"
METHODS = {
    "scfg": dict(scfg_enable=True),
    "regulation": dict(
        regulation_enable=True, regulation_targets="red cat", regulation_iterations=3, regulation_end=1.0
    ),
    "sega": dict(sega_enable=True, sega_edits="+ sunglasses : 5"),
    "concepts": dict(concepts_enable=True, concepts="red cat; wooden table", concept_warmup=0.0),
}
ALL = "all four"
SIZE = dict(width=128, height=128)  # regulation's layers need maps of side ≥ 3 (factor 4)
# one step: the sampler returns the guided x0 of the first call, where both models see the same
# UNet input; later steps start from latents that differ by rounding, which flips near-tied argmax
# masks (S-CFG) and quantile orders (regulation) and says nothing about the maths
SAME_STEPS = 1
# concept steering's decisions read a similarity history: its term is small at the first call; its
# maths is smooth enough that three steps stay within rounding
SAME_STEPS_FOR = {"concepts": 3}


def schedule(name: str) -> torch.Tensor:
    alphas = sd_alphas_cumprod()
    return zero_terminal_snr(alphas) if name == "ztsnr" else alphas


def settings_for(method: str):
    values = dict(enable=True)
    for name in METHODS if method == ALL else [method]:
        values.update(METHODS[name])
    return build_settings(values)


def test_zero_terminal_snr_rescales_sqrt_alpha_bar_linearly():
    alphas = sd_alphas_cumprod()
    rescaled = zero_terminal_snr(alphas)
    assert rescaled.dtype == torch.float64 and torch.isclose(rescaled[0], alphas[0], rtol=1e-12)
    root, new_root = alphas.sqrt(), rescaled.sqrt()
    scale = root[0] / (root[0] - root[-1])
    torch.testing.assert_close(new_root[:-1], (root[:-1] - root[-1]) * scale, rtol=1e-12, atol=1e-15)
    assert rescaled[-1] == ZTSNR_LAST_ALPHA_BAR  # the hosts' clamp instead of 0
    sigmas = CompVisEpsDenoiser(torch.nn.Identity(), rescaled).sigmas
    assert torch.isfinite(sigmas).all() and (sigmas.diff() > 0).all()
    assert abs(sigmas[-1].item() - 4518.9) < 0.5 and abs(sigmas[0].item() - 0.0292) < 1e-4


@pytest.mark.parametrize("name", ["sd", "ztsnr"])
@pytest.mark.parametrize("config", ["tiny", "tiny_sdxl"])
def test_a_v_model_from_an_eps_model_gives_the_same_x0(config, name):
    unet = make_unet(config, seed=0)
    eps_denoiser = CompVisEpsDenoiser(unet, schedule(name))
    v_denoiser = CompVisVDenoiser(VFromEps(unet, eps_denoiser), schedule(name))
    generator = torch.Generator().manual_seed(0)
    context = torch.randn(2, 77, 2048 if config == "tiny_sdxl" else 768, generator=generator)
    cond = (
        {"crossattn": context, "vector": torch.randn(2, 2816)} if config == "tiny_sdxl" else {"c_crossattn": [context]}
    )
    with torch.no_grad():
        for sigma in eps_denoiser.get_sigmas(4)[:-1]:
            x = torch.randn(2, 4, 8, 8, generator=generator) * (sigma**2 + 1) ** 0.5
            sigmas = sigma.repeat(2)
            x0_eps, x0_v = eps_denoiser(x, sigmas, cond), v_denoiser(x, sigmas, cond)
            assert torch.isfinite(x0_v).all()
            # rounding grows with sigma: x0 is the difference of two terms of size ≈ sigma
            torch.testing.assert_close(x0_v, x0_eps, rtol=1e-4, atol=2e-6 * float(sigma) + 1e-5)


def _engines(name: str) -> tuple[ForgeDiffusionEngine, ForgeDiffusionEngine]:
    """An eps engine and a v engine (VFromEps) on identical UNets (KModel patches its UNet's layers)."""
    eps_engine = ForgeDiffusionEngine(make_unet("tiny", seed=0), seed=0, predictor=EpsPredictor(schedule(name)))
    v_predictor = VPredictor(schedule(name))
    v_unet = VFromEps(make_unet("tiny", seed=0), v_predictor.schedule)
    return eps_engine, ForgeDiffusionEngine(v_unet, seed=0, predictor=v_predictor)


@pytest.fixture(scope="module", autouse=True)
def _forge_prompt_parser():
    """The adapter encodes its extra prompts through Forge's SdConditioning."""
    with forge_modules():
        yield


@pytest.fixture(scope="module")
def engines():
    return {name: _engines(name) for name in ("sd", "ztsnr")}


def run(engine, settings=None, steps: int = 3) -> tuple[torch.Tensor, dict]:
    """A generation (`settings` None: the host alone); the final latent and the infotext fields."""
    p = Processing(engine, [PROMPT], [5], steps=steps, **SIZE)
    hooks, post = (), ()
    if settings is not None:
        state = attach_state(p, settings)
        adapter = ForgeAdapter()
        hooks, post = (lambda p: adapter.prepare(p, state),), (adapter.finish,)
    return generate(p, hooks, post), p.extra_generation_params


@pytest.mark.parametrize("name", ["sd", "ztsnr"])
@pytest.mark.parametrize("method", [*METHODS, ALL])
def test_every_method_gives_the_same_image_from_an_eps_and_a_v_model(engines, name, method):
    eps_engine, v_engine = engines[name]
    steps = SAME_STEPS_FOR.get(method, SAME_STEPS)
    plain_eps, _ = run(eps_engine, steps=steps)
    guided_eps, notes_eps = run(eps_engine, settings_for(method), steps=steps)
    guided_v, notes_v = run(v_engine, settings_for(method), steps=steps)
    assert NOTE_KEY not in notes_eps and NOTE_KEY not in notes_v, (notes_eps, notes_v)
    assert torch.isfinite(guided_v).all()
    assert (guided_eps - plain_eps).abs().mean() > 1e-3  # the method acts
    torch.testing.assert_close(guided_v, guided_eps, rtol=1e-3, atol=1e-3)


@pytest.fixture(scope="module")
def native_v_engine():
    """A v network on the ZTSNR schedule (its raw output read as v), SDXL layout."""
    return ForgeDiffusionEngine(make_unet("tiny_sdxl", seed=1), seed=0, predictor=VPredictor(schedule("ztsnr")))


@pytest.mark.parametrize("method", [*METHODS, ALL])
def test_every_method_acts_and_stays_finite_on_a_ztsnr_v_model(native_v_engine, method):
    plain, _ = run(native_v_engine)
    guided, notes = run(native_v_engine, settings_for(method))
    assert NOTE_KEY not in notes, notes
    assert torch.isfinite(plain).all() and torch.isfinite(guided).all()
    assert (guided - plain).abs().mean() > 1e-3
