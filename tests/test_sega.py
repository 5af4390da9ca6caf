"""SEGA edits: schedules, activity, and properties on the real test-bed UNet through GuidanceRun."""

import pytest
import torch

from guidance.engine import GuidanceError, GuidanceRun, ImageInfo, ImageStep, StepInputs
from guidance.methods.sega import EditSpec, SegaEdits, sega_step
from guidance.methods.sparsify import FiniteCheck, NonFinitePrediction, quantile_tail
from guidance.params import Edit, build_settings
from tests.reference_cases import discover
from tests.testbed.unet import random_context

STEPS = 4
CFG = 7.5
EXTRA_PER_IMAGE = 2
_RECORDED: dict = {}


def unet_predictions(denoiser) -> list[dict]:
    """Real test-bed UNet predictions along a plain CFG trajectory of two images ("a cat", "a dog"),
    with EXTRA_PER_IMAGE extra prompts per image, one batched UNet call per step, recorded once per
    session; the guidance tests replay them. 8×8 latents and one thread: small convolutions only
    lose time to threads on a busy machine."""
    if "steps" not in _RECORDED:
        texts = ["a cat", "a dog", "", "", "hat", "blur", "sunglasses", "rain"]
        context = torch.cat([random_context(1, seed=100 + n) for n in range(len(texts))])
        x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * denoiser.sigma_max
        sigmas = denoiser.get_sigmas(STEPS)
        steps = []
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        with torch.no_grad():
            for step in range(STEPS):
                out = denoiser(x[[0, 1, 0, 1, 0, 0, 1, 1]], sigmas[step].repeat(len(texts)), {"c_crossattn": [context]})
                steps.append({"x": x, "sigma": sigmas[step].repeat(2), "cond": out[:2], "uncond": out[2:4],
                              "extra": out[4:].reshape(2, EXTRA_PER_IMAGE, *out.shape[1:])})  # fmt: skip
                denoised = out[2:4] + CFG * (out[:2] - out[2:4])
                x = x + (x - denoised) / sigmas[step] * (sigmas[step + 1] - sigmas[step])
        torch.set_num_threads(threads)
        _RECORDED["steps"] = steps
    return _RECORDED["steps"]


def replay_run(denoiser, run: GuidanceRun, corrupt_step=None) -> list[torch.Tensor]:
    """run.step on every recorded step; each image's extra rows take that image's recorded extra
    predictions in order. Returns the guided x0 of every step."""
    outputs = []
    for step, recorded in enumerate(unet_predictions(denoiser)):
        used = [0] * run.batch_size
        extra = []
        for row in run.extra_rows:
            extra.append(recorded["extra"][row.image, used[row.image]])
            used[row.image] += 1
        extra = torch.stack(extra) if extra else None
        if step == corrupt_step:
            extra = extra.clone()
            extra[-1, 0, 0, 0] = float("nan")
        inputs = StepInputs(recorded["uncond"][: run.batch_size], recorded["cond"][: run.batch_size],
                            [[(b, 1.0)] for b in range(run.batch_size)], recorded["x"][: run.batch_size],
                            recorded["sigma"][: run.batch_size], step, STEPS, CFG, extra)  # fmt: skip
        outputs.append(run.step(inputs))
    return outputs


def sega_settings(edits: str, momentum=0.0, beta=0.4):
    return build_settings({"enable": True, "sega_enable": True, "sega_edits": edits, "sega_momentum": momentum,
                           "sega_momentum_beta": beta})  # fmt: skip


def run_with(settings, prompts, per_image_terms):
    return GuidanceRun(settings, [ImageInfo(p) for p in prompts], terms=per_image_terms)


def test_quantile_tail_keeps_the_top_of_each_channel_of_each_image():
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    kept = quantile_tail(x, 0.75)
    for image in range(2):
        for channel in range(3):
            values = x[image, channel].abs().flatten()
            threshold = torch.quantile(values, 0.75)
            assert torch.equal(kept[image, channel] != 0, x[image, channel].abs() >= threshold)
    # position q·(35 − 1) = 25.5 → 9 of 35 values are at or above the interpolated quantile
    assert int((kept != 0).sum()) == 2 * 3 * 9


def test_schedules_are_fractions_of_the_run():
    edits = SegaEdits([Edit("hat"), Edit("blur", reverse=True, warmup=0.1, cooldown=0.5)], 0.1, 0.4)
    assert [(s.warmup, s.cooldown) for s in edits.specs(50)] == [(10, 50), (5, 25)]
    assert [(s.warmup, s.cooldown) for s in edits.specs(20)] == [(4, 20), (2, 10)]
    assert edits.extra_prompts() == ["hat", "blur"]


def test_activity_follows_what_can_still_contribute():
    with_momentum = SegaEdits([Edit("hat", warmup=0.4, cooldown=0.6)], 0.2, 0.4)
    assert [with_momentum.active(s, 10) for s in range(10)] == [True] * 6 + [False] * 4  # nothing built yet
    with_momentum.momentum = torch.zeros(4, 8, 8)  # once built, the momentum is added after cool-down
    assert with_momentum.active(8, 10)
    without = SegaEdits([Edit("hat", warmup=0.4, cooldown=0.6)], 0.0, 0.4)
    assert [without.active(s, 10) for s in range(10)] == [False] * 4 + [True] * 2 + [False] * 4
    silent = SegaEdits([Edit("hat", scale=0.0), Edit("cat", weight=0.0)], 0.5, 0.4)
    assert not any(silent.active(s, 10) for s in range(10))


def test_partial_warmup_with_every_warm_edit_cooled_adds_nothing_instead_of_nan():
    eps = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    edits = [EditSpec(5.0, 0.9, warmup=0, cooldown=2), EditSpec(5.0, 0.9, warmup=6)]
    result = sega_step(eps[0], eps[1:], edits, step=3, momentum_scale=0.3, momentum_beta=0.4)
    assert result.warm == [True, False] and result.weights == [0.0, 1.0]
    assert torch.equal(result.applied, torch.zeros_like(eps[0]))


def test_scale_zero_and_momentum_zero_change_nothing(eps_denoiser):
    settings = sega_settings("+ hat : 0 : 0.9 : 0 ; - blur : 0 : 0.8 : 0")
    plain = replay_run(eps_denoiser, run_with(settings, ["a cat"], [[]]))
    edited = replay_run(eps_denoiser, run_with(settings, ["a cat"], [[SegaEdits.from_settings(settings)]]))
    assert all(torch.equal(a, b) for a, b in zip(edited, plain, strict=True))
    # and the step function itself adds exactly zero on the real predictions
    specs = SegaEdits.from_settings(settings).specs(STEPS)
    for step, recorded in enumerate(unet_predictions(eps_denoiser)):
        result = sega_step(recorded["uncond"][0], recorded["extra"][0], specs, step, 0.0, 0.4)
        assert result.applied is not None and not result.applied.any()


def _image_steps(denoiser, image=0):
    """ImageSteps in eps space (x0 → eps with the recorded x and sigma) for one image."""
    for step, recorded in enumerate(unet_predictions(denoiser)):
        x, sigma = recorded["x"][image], recorded["sigma"][image]
        eps = {k: (x - recorded[k][image]) / sigma for k in ("uncond", "cond")}
        extra = (x - recorded["extra"][image]) / sigma
        yield ImageStep(image, step, STEPS, CFG, eps["uncond"], eps["cond"] - eps["uncond"], {"sega": extra})


def test_a_reversed_edit_is_the_negation(eps_denoiser):
    forward = SegaEdits.from_settings(sega_settings("+ hat : 6 : 0.85 : 0.25 ; + blur : 3", momentum=0.3))
    reverse = SegaEdits.from_settings(sega_settings("- hat : 6 : 0.85 : 0.25 ; - blur : 3", momentum=0.3))
    applied = 0
    for image_step in _image_steps(eps_denoiser):
        ahead, back = forward.term(image_step), reverse.term(image_step)
        assert (ahead is None) == (back is None)
        if ahead is not None:
            applied += 1
            assert ahead.abs().max() > 1e-3
            torch.testing.assert_close(back, -ahead, rtol=0, atol=1e-6)
    assert applied == STEPS - 1  # warm-up 0.25 of 4 steps = step 1


def test_edits_do_not_leak_between_images_of_a_batch(eps_denoiser):
    prompts = ["a cat", "a dog"]
    hat, blur = sega_settings("+ hat : 6", momentum=0.2), sega_settings("- blur : 3 : 0.8 : 0", momentum=0.5)
    first = replay_run(eps_denoiser, run_with(hat, prompts, [[SegaEdits.from_settings(hat)], []]))
    second = replay_run(eps_denoiser, run_with(blur, prompts, [[SegaEdits.from_settings(blur)], []]))
    plain = replay_run(eps_denoiser, run_with(hat, prompts, [[], []]))
    for a, b, c in zip(first, second, plain, strict=True):
        assert torch.equal(a[1], b[1])  # whatever image 0's edit is
        torch.testing.assert_close(a[1], c[1], rtol=1e-6, atol=1e-5)  # plain CFG, up to x0 ↔ eps rounding
    assert max(float((a[0] - b[0]).abs().max()) for a, b in zip(first, second, strict=True)) > 1e-2
    both = replay_run(
        eps_denoiser, run_with(hat, prompts, [[SegaEdits.from_settings(hat)], [SegaEdits.from_settings(blur)]])
    )
    for a, b in zip(both, first, strict=True):
        assert torch.equal(a[0], b[0])  # image 1's own edit and momentum leave image 0 alone
    assert max(float((a[1] - c[1]).abs().max()) for a, c in zip(both, plain, strict=True)) > 1e-2


def test_non_finite_predictions_raise_a_clear_error(eps_denoiser):
    settings = sega_settings("+ hat : 5", momentum=0.1)
    run = run_with(settings, ["a cat"], [[SegaEdits.from_settings(settings)]])
    with pytest.raises(NonFinitePrediction, match="SEGA edits: the predictions of step 2 are not finite"):
        replay_run(eps_denoiser, run, corrupt_step=2)
    assert issubclass(NonFinitePrediction, GuidanceError)


def test_the_adapter_per_image_reproduces_the_recorded_cases():
    """Each image's own SegaEdits, fed the recorded predictions, gives the recorded guided eps
    (warm-up and cool-down given as fractions that land on the recorded steps)."""
    cases = discover("sega")
    assert any(case.tensors()["eps_uncond"].shape[1] > 1 for case in cases), "no recorded batch to check"
    for case in cases:
        _check_adapter_on(case)


def _check_adapter_on(case):
    params, tensors = case.params(), case.tensors()
    steps = tensors["eps_uncond"].shape[0]
    count = len(params["editing_prompt"])

    def each(key, default=None):
        value = params[key] if params[key] is not None else default
        return value if isinstance(value, list) else [value] * count

    edits = [
        Edit(prompt, reverse, scale, threshold, warmup / steps, 1.0 if cooldown is None else min(cooldown / steps, 1.0),
             weight)
        for prompt, reverse, scale, threshold, warmup, cooldown, weight in zip(
            params["editing_prompt"], each("reverse_editing_direction"), each("edit_guidance_scale"),
            each("edit_threshold"), each("edit_warmup_steps"), each("edit_cooldown_steps"),
            each("edit_weights", 1.0), strict=True)
    ]  # fmt: skip
    batch = tensors["eps_uncond"].shape[1]
    images = [SegaEdits(edits, params["edit_momentum_scale"], params["edit_mom_beta"]) for _ in range(batch)]
    for step in range(steps):
        for image, edit_term in enumerate(images):
            uncond = tensors["eps_uncond"][step, image]
            direction = tensors["eps_text"][step, image] - uncond
            image_step = ImageStep(image, step, steps, params["guidance_scale"], uncond, direction,
                                   {"sega": tensors["eps_edit"][step, :, image]})  # fmt: skip
            eps = uncond + params["guidance_scale"] * direction
            if edit_term.active(step, steps):
                added = edit_term.term(image_step)
                eps = eps if added is None else eps + added
            expected = tensors["noise_pred"][step, image]
            torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5, msg=f"{case.id} step {step}")


def test_on_an_accelerator_the_finite_check_reads_each_flag_one_step_later():
    class AcceleratorCheck(FiniteCheck):
        @staticmethod
        def deferred(flag):
            return True  # as on a GPU: reading the flag at once would wait for the step's kernels

    good, bad = torch.zeros(3), torch.tensor([0.0, float("inf")])
    check = AcceleratorCheck("test")
    check.watch([good], 0, 5)
    check.watch([bad], 1, 5)  # not read yet
    with pytest.raises(NonFinitePrediction, match="step 1"):
        check.watch([good], 2, 5)
    with pytest.raises(NonFinitePrediction, match="step 4"):
        check.watch([bad], 4, 5)  # the last step is read at once
    assert check.pending is None
    ended_early = AcceleratorCheck("test")
    ended_early.watch([bad], 1, 5)
    with pytest.raises(NonFinitePrediction):
        ended_early.flush()  # what active() does once a method stops acting
