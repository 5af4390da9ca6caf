"""Concept steering against the authors' recorded numbers (shared/reference/README.md §4), one test
per case. Steps, concepts and shapes come from each case's JSON and tensors (SF_REFERENCE_DIR)."""

import pytest
import torch

from guidance.methods.concept_steering import ConceptSchedule, concept_step
from tests.reference_cases import assert_close, case_params, check_on_copied_folder, discover

CONTINUOUS = {"atol": 1e-5, "rtol": 1e-5}  # README §7
SIMILARITY = {"atol": 1e-6}


def schedule_of(params: dict) -> ConceptSchedule:
    return ConceptSchedule(
        percentile=params["subject_percentile"],
        subject_threshold=params["subject_th"],
        abstract_threshold=params["abstract_th"],
        momentum_scale=params["edit_momentum_scale"],
        momentum_beta=params["edit_mom_beta"],
        warmup=params["warmup"],
        cooldown=params["cooldown"],
        window=params["window"],
    )


def replay(case, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """concept_step over every step and image; outputs stacked (N, B, …) like the recording."""
    params, tensors = case.params(), case.tensors()
    eps_uncond, eps_prompt, eps_concepts = (tensors[k].to(dtype) for k in ("eps_uncond", "eps_prompt", "eps_concepts"))
    schedule = schedule_of(params)
    steps, batch = eps_uncond.shape[:2]
    per_image = []
    for image in range(batch):
        momentum, history = None, {}
        rows: dict[str, list] = {k: [] for k in ("concept_scores", "sim", "edit_momentum", "gate")}
        rows |= {"concept_guidance": [], "noise_pred": []}
        for step in range(steps):
            uncond = eps_uncond[step, image]
            prompt_score = eps_prompt[step, image] - uncond
            result = concept_step(
                prompt_score, eps_concepts[step, :, image] - uncond, schedule, step, momentum, history
            )
            momentum, history[step] = result.momentum, result.similarity
            guidance = torch.zeros_like(result.scores[0]) if result.guidance is None else result.guidance
            rows["concept_scores"].append(result.scores)
            rows["sim"].append(result.similarity)
            rows["edit_momentum"].append(result.momentum)
            rows["gate"].append(result.gate.to(torch.uint8))
            rows["concept_guidance"].append(guidance)
            rows["noise_pred"].append(
                uncond + params["guidance_scale"] * prompt_score + params["concept_guidance_scale"] * guidance
            )
        per_image.append({k: torch.stack(v) for k, v in rows.items()})
    return {k: torch.stack([image[k] for image in per_image], dim=1) for k in per_image[0]}


def _as_recorded(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """Tensors recorded without a batch axis (the authors' code has batch 1) drop ours."""
    if actual.dim() == expected.dim() + 1:
        assert actual.shape[1] == 1, "a per-image tensor recorded without a batch axis needs batch 1"
        return actual[:, 0]
    return actual


def check_case(case) -> dict[str, float]:
    expected = case.tensors()
    actual = {k: _as_recorded(v, expected[k]) for k, v in replay(case).items()}
    assert torch.equal(actual["gate"], expected["gate"]), f"gates differ: {actual['gate']} vs {expected['gate']}"
    assert_close(f"{case.id} sim", actual["sim"], expected["sim"], **SIMILARITY)
    errors = {"sim": float((actual["sim"].double() - expected["sim"]).abs().max())}
    for name in ("concept_scores", "edit_momentum", "concept_guidance", "noise_pred"):
        assert_close(f"{case.id} {name}", actual[name], expected[name], **CONTINUOUS)
        errors[name] = float((actual[name].double() - expected[name].double()).abs().max())
    return errors


@pytest.mark.parametrize("case", case_params("concept_diffusion"))
def test_concept_steering_reproduces_the_recorded_case(case):
    errors = check_case(case)  # every comparison is asserted inside, element by element
    assert set(errors) == {"sim", "concept_scores", "edit_momentum", "concept_guidance", "noise_pred"}


def test_cases_run_from_another_folder_and_a_missing_folder_raises(tmp_path, monkeypatch):
    check_on_copied_folder("concept_diffusion", check_case, tmp_path, monkeypatch)


def test_float16_inputs_are_accepted_and_close_to_float32():
    case = discover("concept_diffusion")[0]
    full, half = replay(case, torch.float32), replay(case, torch.float16)
    assert half["noise_pred"].dtype == torch.float32  # computed in float32 whatever comes in
    assert (half["sim"] - full["sim"]).abs().max() < 1e-2
    difference = (half["noise_pred"] - full["noise_pred"]).norm() / full["noise_pred"].norm()
    assert difference < 5e-2
