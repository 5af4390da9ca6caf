"""SEGA against the authors' recorded numbers (shared/reference/README.md §3), one test per case.

Everything (steps, batch, edits, shapes) comes from each case's JSON and tensors, so another
folder of the same layout (SF_REFERENCE_DIR) runs through the same tests."""

import pytest
import torch

from guidance.methods.sega import EditSpec, sega_step
from tests.reference_cases import assert_close, case_params, check_on_copied_folder, discover

CONTINUOUS = {"atol": 1e-5, "rtol": 1e-5}  # README §7


def _per_edit(value, count, default=None):
    """A pipeline argument given per edit or as one scalar (None: the default)."""
    if value is None:
        value = default
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def edit_specs(params: dict) -> list[EditSpec]:
    count = len(params["editing_prompt"])
    columns = zip(
        _per_edit(params["edit_guidance_scale"], count),
        _per_edit(params["edit_threshold"], count),
        _per_edit(params["edit_warmup_steps"], count),
        _per_edit(params["edit_cooldown_steps"], count),
        _per_edit(params["reverse_editing_direction"], count),
        _per_edit(params["edit_weights"], count, default=1.0),
        strict=True,
    )
    return [EditSpec(s, t, int(w), None if c is None else int(c), bool(r), float(g)) for s, t, w, c, r, g in columns]


def replay(case, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Run sega_step over every recorded step; returns the outputs stacked like the recording."""
    params, tensors = case.params(), case.tensors()
    eps_uncond, eps_text, eps_edit = (tensors[k].to(dtype) for k in ("eps_uncond", "eps_text", "eps_edit"))
    specs = edit_specs(params)
    batch = eps_uncond.shape[1]
    outputs: dict[str, list] = {k: [] for k in ("concept_guidance", "concept_weights", "warmup_passed")}
    outputs |= {k: [] for k in ("edit_momentum", "edit_guidance", "noise_pred")}
    momentum = None
    for step in range(eps_uncond.shape[0]):
        result = sega_step(
            eps_uncond[step],
            eps_edit[step],
            specs,
            step,
            params["edit_momentum_scale"],
            params["edit_mom_beta"],
            momentum,
        )
        momentum = result.momentum
        applied = torch.zeros_like(eps_uncond[step]) if result.applied is None else result.applied
        outputs["concept_guidance"].append(result.directions)
        outputs["concept_weights"].append(torch.tensor(result.weights)[:, None].expand(-1, batch))
        outputs["warmup_passed"].append(torch.tensor(result.warm, dtype=torch.uint8))
        outputs["edit_momentum"].append(momentum)
        outputs["edit_guidance"].append(applied)
        cfg = eps_uncond[step] + params["guidance_scale"] * (eps_text[step] - eps_uncond[step])
        outputs["noise_pred"].append(cfg + applied)
    return {k: torch.stack(v) for k, v in outputs.items()}


def check_case(case) -> dict[str, float]:
    """Compare every recorded intermediate; returns the largest absolute error per tensor."""
    expected = case.tensors()
    actual = replay(case)
    assert torch.equal(actual["warmup_passed"], expected["warmup_passed"]), "warm-up flags differ"
    errors = {}
    for name in ("concept_guidance", "concept_weights", "edit_momentum", "edit_guidance", "noise_pred"):
        assert_close(f"{case.id} {name}", actual[name], expected[name], **CONTINUOUS)
        errors[name] = float((actual[name].double() - expected[name].double()).abs().max())
    return errors


@pytest.mark.parametrize("case", case_params("sega"))
def test_sega_reproduces_the_recorded_case(case):
    errors = check_case(case)  # every comparison is asserted inside, element by element
    assert set(errors) == {"concept_guidance", "concept_weights", "edit_momentum", "edit_guidance", "noise_pred"}


def test_cases_run_from_another_folder_and_a_missing_folder_raises(tmp_path, monkeypatch):
    check_on_copied_folder("sega", check_case, tmp_path, monkeypatch)


def test_float16_inputs_are_accepted_and_close_to_float32():
    case = discover("sega")[-1]
    full = replay(case, torch.float32)
    half = replay(case, torch.float16)
    assert half["edit_momentum"].dtype == torch.float32  # computed in float32 whatever comes in
    # fp16 rounding moves a few elements across their quantile threshold; everything else agrees
    kept_full, kept_half = full["concept_guidance"] != 0, half["concept_guidance"] != 0
    assert (kept_full != kept_half).float().mean() < 0.01
    for name in ("edit_guidance", "noise_pred"):
        difference = (half[name] - full[name]).norm() / full[name].norm()
        assert difference < 5e-2, f"{name}: relative difference {difference:.3g}"
    assert torch.equal(half["warmup_passed"], full["warmup_passed"])
