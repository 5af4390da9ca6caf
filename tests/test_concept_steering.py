"""Concept steering: schedules, gates, options, and composition with SEGA in one GuidanceRun."""

import pytest
import torch

from guidance.engine import GuidanceError, GuidanceRun, ImageInfo, ImageStep
from guidance.methods.concept_steering import ConceptSchedule, ConceptSteering, concept_scores, concept_step
from guidance.methods.sega import SegaEdits
from guidance.methods.sparsify import NonFinitePrediction
from guidance.params import build_settings
from tests.reference_cases import discover
from tests.test_sega import CFG, STEPS, replay_run, unet_predictions


def concept_settings(**values):
    return build_settings({"enable": True, "concepts_enable": True, **values})


def _noise(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_schedule_from_settings_and_activity():
    steering = ConceptSteering.from_settings(concept_settings(concept_cooldown=0.8), ["red book", "clock"])
    schedule = steering.schedule(50)
    assert (schedule.warmup, schedule.cooldown, schedule.window) == (5, 40, 5)
    assert (schedule.subject_threshold, schedule.abstract_threshold, schedule.abstract) == (0.5, 0.5, True)
    assert steering.extra_prompts() == ["red book", "clock"]
    # history and momentum build from step 0; nothing can be added from the cool-down on
    assert [steering.active(s, 50) for s in (0, 5, 39, 40, 49)] == [True, True, True, False, False]
    assert not ConceptSteering.from_settings(concept_settings(concept_scale=0.0), ["cat"]).active(0, 50)


def test_auto_threshold_and_abstract_switch():
    auto = ConceptSteering.from_settings(concept_settings(concept_auto_threshold=True), ["a", "b", "c"])
    assert auto.schedule(20).subject_threshold == auto.schedule(20).abstract_threshold == 0.25
    subjects_only = ConceptSteering.from_settings(concept_settings(concept_abstract=False), ["a", "b"])
    assert not subjects_only.schedule(20).abstract
    prompt, subjects = _noise(4, 8, 8), _noise(2, 4, 8, 8, seed=1)
    assert concept_scores(prompt, subjects, 0.9, abstract=False).shape == (2, 4, 8, 8)
    scores = concept_scores(prompt, subjects, 0.9, abstract=True)
    assert scores.shape == (3, 4, 8, 8)
    # the last removal leaves the abstract score orthogonal to the last subject
    assert abs(float((scores[2] * scores[1]).sum())) < 1e-4 * float(scores[2].norm() * scores[1].norm())


def test_the_gate_reads_previous_steps_only():
    prompt, subjects = _noise(4, 8, 8), _noise(1, 4, 8, 8, seed=1)
    schedule = ConceptSchedule(warmup=0, cooldown=10, window=2, subject_threshold=0.5, abstract_threshold=0.5)
    low, high = torch.tensor([0.1, 0.1]), torch.tensor([0.9, 0.9])
    # steps 1 and 2 low: gated, whatever this step's own similarity is
    gated = concept_step(prompt, subjects, schedule, 3, None, {0: high, 1: low, 2: low})
    assert gated.gate.tolist() == [1.0, 1.0] and gated.guidance is not None
    # the window of 2 ends at step 2: step 0's low value is outside it
    held = concept_step(prompt, subjects, schedule, 3, None, {0: low, 1: high, 2: high})
    assert held.gate.tolist() == [0.0, 0.0] and not held.guidance.any()
    # no previous step at all: never gated (the authors' mean of nothing is NaN)
    assert concept_step(prompt, subjects, schedule, 1, None, {}).gate.tolist() == [0.0, 0.0]
    # outside warmup < step < cooldown: nothing, but the momentum still moves
    outside = concept_step(prompt, subjects, schedule, 0, None, {})
    assert outside.guidance is None and outside.momentum.abs().max() > 0


def test_a_zero_subject_gives_no_nan():
    prompt = _noise(4, 8, 8)
    result = concept_step(
        prompt, torch.zeros(1, 4, 8, 8), ConceptSchedule(warmup=0, window=1), 2, None, {1: torch.zeros(2)}
    )
    assert torch.isfinite(result.similarity).all() and torch.isfinite(result.guidance).all()
    assert result.similarity[0] == 0


def _run(settings, prompts, terms):
    return GuidanceRun(settings, [ImageInfo(p) for p in prompts], terms=terms)


def test_concept_scale_zero_changes_nothing(eps_denoiser):
    settings = concept_settings(concept_scale=0.0)
    plain = replay_run(eps_denoiser, _run(settings, ["a cat"], [[]]))
    steered = replay_run(eps_denoiser, _run(settings, ["a cat"], [[ConceptSteering.from_settings(settings, ["cat"])]]))
    assert all(torch.equal(a, b) for a, b in zip(steered, plain, strict=True))


def test_concepts_and_edits_together_on_one_image_in_one_run(eps_denoiser):
    """The run's eps is uncond + cfg·direction + the concept term + the SEGA term, each computed by
    its own standalone object from the same predictions."""
    settings = concept_settings(sega_enable=True, sega_edits="+ hat : 6 : 0.8 : 0", sega_momentum=0.3,
                                concept_warmup=0.0, concept_window=1, concept_subject_threshold=1.0,
                                concept_abstract_threshold=1.0)  # fmt: skip
    concepts, edits = ConceptSteering.from_settings(settings, ["cat"]), SegaEdits.from_settings(settings)
    run = _run(settings, ["a cat"], [[concepts, edits]])
    assert [(r.source, r.text) for r in run.extra_rows] == [("concepts", "cat"), ("sega", "hat")]
    alone_concepts, alone_edits = ConceptSteering.from_settings(settings, ["cat"]), SegaEdits.from_settings(settings)
    guided = replay_run(eps_denoiser, run)
    both_added = 0
    for step, recorded in enumerate(unet_predictions(eps_denoiser)):
        x, sigma = recorded["x"][0], recorded["sigma"][0]
        uncond, cond = (x - recorded["uncond"][0]) / sigma, (x - recorded["cond"][0]) / sigma
        extra = (x - recorded["extra"][0]) / sigma  # rows: the concept, then the edit
        image_step = ImageStep(0, step, STEPS, CFG, uncond, cond - uncond,
                               {"concepts": extra[:1], "sega": extra[1:]})  # fmt: skip
        expected = uncond + CFG * (cond - uncond)
        added = [t.term(image_step) for t in (alone_concepts, alone_edits)]
        for term in added:
            expected = expected if term is None else expected + term
        both_added += all(term is not None and term.abs().max() > 1e-3 for term in added)
        torch.testing.assert_close((x - guided[step][0]) / sigma, expected, rtol=1e-5, atol=1e-4)
    assert both_added >= 2


def test_each_image_keeps_its_own_history(eps_denoiser):
    settings = concept_settings(concept_warmup=0.0, concept_window=2)
    prompts = ["a cat", "a dog"]
    alone = replay_run(eps_denoiser, _run(settings, prompts, [[], [ConceptSteering.from_settings(settings, ["dog"])]]))
    terms = [
        [ConceptSteering.from_settings(settings, ["cat", "hat"])],
        [ConceptSteering.from_settings(settings, ["dog"])],
    ]
    together = replay_run(eps_denoiser, _run(settings, prompts, terms))
    for a, b in zip(alone, together, strict=True):
        assert torch.equal(a[1], b[1])
    assert max(float((a[0] - b[0]).abs().max()) for a, b in zip(alone, together, strict=True)) > 1e-3


def test_non_finite_predictions_raise_a_clear_error(eps_denoiser):
    settings = concept_settings()
    run = _run(settings, ["a cat"], [[ConceptSteering.from_settings(settings, ["cat", "hat"])]])
    with pytest.raises(NonFinitePrediction, match="concept steering: the predictions of step 1 are not finite"):
        replay_run(eps_denoiser, run, corrupt_step=1)


def test_missing_concept_rows_are_reported():
    steering = ConceptSteering.from_settings(concept_settings(), ["cat", "hat"])
    image_step = ImageStep(0, 0, 10, CFG, _noise(4, 8, 8), _noise(4, 8, 8), {"concepts": _noise(1, 4, 8, 8)})
    with pytest.raises(GuidanceError, match="concept steering: expected 2 predictions, got 1"):
        steering.term(image_step)


def test_the_adapter_reproduces_the_recorded_cases():
    """ConceptSteering fed each recorded case step by step (schedules given as fractions that land
    on the recorded steps) gives the recorded guided eps: history pruning and state included."""
    for case in discover("concept_diffusion"):
        params, tensors = case.params(), case.tensors()
        steps = tensors["eps_uncond"].shape[0]
        settings = concept_settings(
            concept_scale=params["concept_guidance_scale"], concept_percentile=params["subject_percentile"],
            concept_subject_threshold=params["subject_th"], concept_abstract_threshold=params["abstract_th"],
            concept_momentum=params["edit_momentum_scale"], concept_momentum_beta=params["edit_mom_beta"],
            concept_warmup=params["warmup"] / steps, concept_cooldown=min(params["cooldown"] / steps, 1.0),
            concept_window=params["window"],
        )  # fmt: skip
        for image in range(tensors["eps_uncond"].shape[1]):
            steering = ConceptSteering.from_settings(settings, params["noun_phrases"])
            assert steering.schedule(steps).warmup == params["warmup"]
            for step in range(steps):
                uncond = tensors["eps_uncond"][step, image]
                direction = tensors["eps_prompt"][step, image] - uncond
                image_step = ImageStep(image, step, steps, params["guidance_scale"], uncond, direction,
                                       {"concepts": tensors["eps_concepts"][step, :, image]})  # fmt: skip
                eps = uncond + params["guidance_scale"] * direction
                if steering.active(step, steps):
                    added = steering.term(image_step)
                    eps = eps if added is None else eps + added
                expected = tensors["noise_pred"][step, image]
                torch.testing.assert_close(eps, expected, rtol=1e-5, atol=1e-5, msg=f"{case.id} step {step}")
                assert len(steering.state.history) <= params["window"]


# ---------------------------------------------------------------------------------------------
# Concepts the prompt's rows hold only at some steps (issue 15)


def test_an_absent_subject_acts_as_if_it_were_not_in_the_list():
    """present = [1, 0]: the guidance, the first subject's and the abstract rows are those of a run
    with the first subject alone; the absent one is never gated and loses its momentum."""
    prompt, subjects = _noise(4, 8, 8), _noise(2, 4, 8, 8, seed=1)
    schedule = ConceptSchedule(warmup=0, cooldown=10, window=2, subject_threshold=0.5, abstract_threshold=0.5)
    momentum = _noise(3, 4, 8, 8, seed=2)
    history = {1: torch.tensor([0.1, 0.1, 0.1]), 2: torch.tensor([0.2, 0.2, 0.2])}
    masked = concept_step(prompt, subjects, schedule, 3, momentum, history, torch.tensor([1.0, 0.0]))
    alone = concept_step(
        prompt, subjects[:1], schedule, 3, momentum[[0, 2]], {s: h[[0, 2]] for s, h in history.items()}
    )
    assert masked.gate.tolist() == [1.0, 0.0, 1.0] and alone.gate.tolist() == [1.0, 1.0]
    torch.testing.assert_close(masked.guidance, alone.guidance, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(masked.momentum[[0, 2]], alone.momentum, rtol=1e-6, atol=1e-6)
    assert not masked.momentum[1].any() and masked.similarity[1] == 0
    everyone = concept_step(prompt, subjects, schedule, 3, momentum, history, torch.tensor([1.0, 1.0]))
    plain = concept_step(prompt, subjects, schedule, 3, momentum, history)
    assert torch.equal(everyone.guidance, plain.guidance) and torch.equal(everyone.momentum, plain.momentum)


def test_presence_masks_are_made_once_per_pattern():
    held = {0: (True, False), 1: (False, True), 2: (True, True)}
    steering = ConceptSteering.from_settings(concept_settings(), ["dog", "cat"], presence=held.__getitem__)
    first = steering.present_mask(0, torch.device("cpu"))
    assert first.tolist() == [1.0, 0.0] and steering.present_mask(1, "cpu").tolist() == [0.0, 1.0]
    assert steering.present_mask(0, torch.device("cpu")) is first
    assert steering.present_mask(2, "cpu") is None  # all held: the unmasked step, bit for bit


def test_a_concept_the_rows_never_hold_adds_nothing(eps_denoiser):
    settings = concept_settings(concept_abstract=False, concept_warmup=0.0, concept_window=1,
                                concept_subject_threshold=1.0)  # fmt: skip
    plain = torch.stack(replay_run(eps_denoiser, _run(settings, ["a cat"], [[]])))
    never = ConceptSteering.from_settings(settings, ["dragon"], presence=lambda step: (False,))
    assert torch.equal(torch.stack(replay_run(eps_denoiser, _run(settings, ["a cat"], [[never]]))), plain)
    always = ConceptSteering.from_settings(settings, ["dragon"], presence=lambda step: (True,))
    steered = torch.stack(replay_run(eps_denoiser, _run(settings, ["a cat"], [[always]])))
    assert (steered - plain)[2:].abs().amax(dim=(1, 2, 3, 4)).min() > 1e-4  # from the first gated step on
