"""Whole sampling runs on the real ldm UNet through the A1111 CFGDenoiser stand-in, with the engine
installed the way the A1111 adapter installs it: rows captured in `on_cfg_denoiser`, extra rows
inserted before the uncond block, CFG replaced by overriding `combine_denoised` on the instance."""

from dataclasses import dataclass, field

import pytest
import torch

from guidance.engine import GuidanceRun, ImageInfo
from guidance.hosts.a1111_rows import step_inputs
from guidance.params import build_settings
from tests.testbed.a1111 import CFGDenoiser, Options, ScriptCallbacks, State, multicond, plain_conds, sample_txt2img
from tests.testbed.unet import random_context

STEPS = 10
CFG = 7.5


@dataclass
class EngineGlue:
    """Test-side wiring of a GuidanceRun into the stand-in (what guidance/hosts/a1111.py does)."""

    run: GuidanceRun
    extra_contexts: torch.Tensor | None = None  # (len(run.extra_rows), T, C)
    captured: dict = field(default_factory=dict)
    step_inputs_seen: list = field(default_factory=list)

    def install(self, denoiser: CFGDenoiser, callbacks: ScriptCallbacks) -> None:
        callbacks.cfg_denoiser.append(self.on_cfg_denoiser)
        denoiser.combine_denoised = self.combine_denoised
        self.denoiser = denoiser

    def on_cfg_denoiser(self, params) -> None:
        extra = len(self.run.extra_rows)
        batch = params.text_uncond.shape[0]
        if extra:
            rows = [row.image for row in self.run.extra_rows]
            n_cond = params.text_cond.shape[0]
            x, sigma, image_cond = params.x, params.sigma, params.image_cond
            # an image's latent is the one of its uncond row (the last B rows)
            params.x = torch.cat([x[:n_cond], x[n_cond:][rows], x[n_cond:]])
            params.sigma = torch.cat([sigma[:n_cond], sigma[n_cond:][rows], sigma[n_cond:]])
            params.image_cond = torch.cat([image_cond[:n_cond], image_cond[n_cond:][rows], image_cond[n_cond:]])
            params.text_cond = torch.cat([params.text_cond, self.extra_contexts])
        self.captured = {"x": params.x, "sigma": params.sigma, "batch": batch}

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        inputs = step_inputs(
            x_out,
            self.captured["x"],
            self.captured["sigma"],
            conds_list,
            len(self.run.extra_rows),
            self.denoiser.step,
            self.denoiser.total_steps,
            cond_scale,
            uncond_skipped=cond_scale != CFG,
        )
        self.step_inputs_seen.append(inputs)
        return self.run.step(inputs)


def _sample(eps_denoiser, conds, uncond, *, batch, glue=None, opts=None, s_min_uncond=0.0, record=None):
    callbacks, state = ScriptCallbacks(), State()
    denoiser = CFGDenoiser(eps_denoiser, callbacks, opts or Options(), state)
    if record is not None:
        callbacks.cfg_denoiser.append(lambda p: record.append((p.sampling_step, p.denoiser.step, p.x.shape[0])))
    if glue is not None:
        glue.install(denoiser, callbacks)
    noise = torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(42))
    result = sample_txt2img(denoiser, noise, STEPS, conds, uncond, CFG, s_min_uncond=s_min_uncond)
    assert callbacks.reported == []
    return result, denoiser


def _scenario(name):
    if name == "batch 1":
        return multicond([[(random_context(1, 1)[0], 1.0)]]), plain_conds(random_context(1, 9)), 1
    if name in ("batch 2 with AND", "NGMS skipped uncond", "no batch_cond_uncond"):
        c = random_context(3, 2)
        return multicond([[(c[0], 1.0)], [(c[1], 0.7), (c[2], 0.3)]]), plain_conds(random_context(2, 9)), 2
    if name == "154-token prompt, short negative":
        return multicond([[(random_context(1, 3, chunks=2)[0], 1.0)]]), plain_conds(random_context(1, 9)), 1
    raise KeyError(name)


SCENARIOS = {
    "batch 1": {},
    "batch 2 with AND": {},
    "NGMS skipped uncond": {"s_min_uncond": 100.0},
    "no batch_cond_uncond": {"opts": Options(batch_cond_uncond=False)},
    "154-token prompt, short negative": {},
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_ten_step_run_with_the_engine_in_place_is_bit_identical(eps_denoiser, name):
    conds, uncond, batch = _scenario(name)
    kwargs = SCENARIOS[name]
    plain, plain_denoiser = _sample(eps_denoiser, conds, uncond, batch=batch, **kwargs)

    run = GuidanceRun(build_settings({"enable": True}), [ImageInfo("prompt", seed=i) for i in range(batch)])
    glue = EngineGlue(run)
    guided, denoiser = _sample(eps_denoiser, conds, uncond, batch=batch, glue=glue, **kwargs)

    assert torch.equal(plain, guided)
    assert torch.isfinite(plain).all() and plain.abs().max() > 0.1
    assert run.steps_seen == STEPS
    assert denoiser.unet_calls == plain_denoiser.unet_calls
    skipped = [inputs.uncond_skipped for inputs in glue.step_inputs_seen]
    if name == "NGMS skipped uncond":
        assert skipped == [bool(step % 2) for step in range(STEPS)]
    else:
        assert not any(skipped)


def test_stand_in_keeps_the_host_layout_and_counters(eps_denoiser):
    conds, uncond, batch = _scenario("batch 2 with AND")
    record = []
    _, denoiser = _sample(eps_denoiser, conds, uncond, batch=batch, record=record)
    # state.sampling_step lags denoiser.step by one (a1111.md §3.5, pitfall 24)
    assert [r[0] for r in record] == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]
    assert [r[1] for r in record] == list(range(STEPS))
    # 3 cond rows (image 0, then image 1's two AND sub-prompts) + 2 uncond rows, in one UNet call
    assert {r[2] for r in record} == {5}
    assert denoiser.unet_calls == [5] * STEPS

    long_conds, short_uncond, _ = _scenario("154-token prompt, short negative")
    _, split = _sample(eps_denoiser, long_conds, short_uncond, batch=1)
    assert split.unet_calls == [1, 1] * STEPS  # cond and uncond of different lengths: two calls


class ExtraOffsetTerm:
    """Adds scale·(eps_extra − eps_uncond): a SEGA-like direction without thresholds, to check that
    extra rows travel through the host layout to the right image."""

    source = "test"

    def __init__(self, scale):
        self.scale = scale

    def extra_prompts(self):
        return ["extra prompt"]

    def active(self, step, total_steps):
        return True

    def term(self, image_step):
        return self.scale * (image_step.extra["test"][0] - image_step.eps_uncond)


def test_extra_rows_reach_the_unet_batch_and_the_right_image(eps_denoiser):
    conds, uncond, batch = _scenario("batch 2 with AND")
    extra_contexts = random_context(2, 77)
    run = GuidanceRun(
        build_settings({"enable": True}),
        [ImageInfo("a"), ImageInfo("b AND c")],
        terms=[[ExtraOffsetTerm(2.0)], [ExtraOffsetTerm(-1.0)]],
    )
    glue = EngineGlue(run, extra_contexts)
    guided, denoiser = _sample(eps_denoiser, conds, uncond, batch=batch, glue=glue)
    plain, _ = _sample(eps_denoiser, conds, uncond, batch=batch)
    assert denoiser.unet_calls == [7] * STEPS  # 3 cond + 2 extra + 2 uncond rows in one call
    assert (guided - plain).abs().max() > 1e-2

    first = glue.step_inputs_seen[0]
    # the prompt matters in the test bed: cond, extra and uncond predictions differ
    assert (first.cond[0] - first.uncond[0]).abs().mean() > 1e-3
    assert (first.extra[0] - first.uncond[0]).abs().mean() > 1e-3
    # the extra rows' predictions equal separate UNet calls with their own prompts
    for image in range(batch):
        alone = eps_denoiser(
            first.x[image : image + 1],
            first.sigma[image : image + 1],
            {"c_crossattn": [extra_contexts[image : image + 1]]},
        )
        torch.testing.assert_close(first.extra[image], alone[0], rtol=1e-4, atol=1e-4)
    # and the guided x0 is the host's CFG minus sigma times the eps-space term (the terms are
    # stateless, so a fresh run replays the first step)
    replay = GuidanceRun(run.settings, run.images, terms=run.terms).step(first)
    rows = torch.cat([first.cond, first.extra, first.uncond])
    plain_cfg = CFGDenoiser.combine_denoised(denoiser, rows, first.conds_list, first.uncond, CFG)
    for image, scale in enumerate((2.0, -1.0)):
        eps_term = scale * (first.uncond[image] - first.extra[image]) / first.sigma[image]
        torch.testing.assert_close(
            replay[image], plain_cfg[image] - first.sigma[image] * eps_term, rtol=1e-5, atol=1e-4
        )
