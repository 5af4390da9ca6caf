"""S-CFG against the authors' recorded numbers (reference/s_cfg, README §5 and §7).

Every shape and count comes from the case files, so other recorded cases of the same layout (other
sizes, batch 2, non-square latents, more objects) run through the same checks."""

import pytest
import torch

from guidance.attention_routing import CallRows, LayerKey, map_size
from guidance.engine import ImageStep
from guidance.methods.scfg import RegionScales
from tests.reference_cases import assert_close, case_params, check_on_copied_folder

CONTINUOUS = (
    "ca_normalized",
    "fore_normalized_uncond",
    "region_mean_delta_norm",
    "foreground_mean_delta_norm",
    "rate_per_token",
    "rate_clamped_before_smoothing",
    "rate",
)
EXACT = ("ca_mask", "fore_mask")


def run_case(case):
    params, tensors = case.params(), case.tensors()
    eps_uncond, eps_text = tensors["eps_uncond"], tensors["eps_text"]
    batch, _, height, width = eps_text.shape
    scales = RegionScales(batch, mask_factor=int(params["R"]), keep_intermediates=True)
    layers = len(params["layers"])
    scales.begin_call(CallRows(0, 1, (height, width), tuple(range(batch)), tuple(range(batch, 2 * batch))))
    meta = [(i, "uncond") for i in range(batch)] + [(i, "cond") for i in range(batch)]
    for j in range(layers):
        sa, ca = tensors[f"self_attn_{j}"].float(), tensors[f"cross_attn_{j}"].float()
        h, w, factor = map_size((height, width), sa.shape[1])
        assert factor == params["layers"][j][1]
        assert scales.wants(factor)
        scales.record(LayerKey("input", j, 0, "self"), sa, (h, w), factor, meta)
        scales.record(LayerKey("input", j, 0, "cross"), ca, (h, w), factor, meta)
    gs = float(params["guidance_scale"])
    outputs = {name: [] for name in (*CONTINUOUS, *EXACT, "noise_pred")}
    for image in range(batch):
        direction = eps_text[image] - eps_uncond[image]
        step = ImageStep(image, 0, 1, gs, eps_uncond[image], direction)
        rate = scales.rate(step)
        found = scales.intermediates[image]
        for name in (*CONTINUOUS, *EXACT):
            outputs[name].append(found[name])
        outputs["noise_pred"].append(eps_uncond[image] + gs * rate * direction)
    return tensors, {name: torch.stack(values) for name, values in outputs.items()}


def check_case(case):
    tensors, actual = run_case(case)
    worst = {}
    for name in EXACT:
        expected = tensors[name]
        assert torch.equal(actual[name].reshape(expected.shape).to(torch.uint8), expected), name
    for name in (*CONTINUOUS, "noise_pred"):
        expected = tensors[name]
        got = actual[name].reshape(expected.shape)
        assert_close(name, got, expected, atol=1e-5, rtol=1e-5)
        worst[name] = float((got.double() - expected.double()).abs().max())
    return worst


@pytest.mark.parametrize("case", case_params("s_cfg"))
def test_scfg_reproduces_the_authors(case):
    worst = check_case(case)
    print(case.id, {k: f"{v:.2g}" for k, v in worst.items()})


def test_scfg_runs_on_a_copied_reference_folder(tmp_path, monkeypatch):
    check_on_copied_folder("s_cfg", check_case, tmp_path, monkeypatch)
