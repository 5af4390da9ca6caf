"""Attention regulation against the authors' recorded numbers (reference/attention_regulation,
README §6 and §7). Shapes, batch, heads, targets and steps all come from the case files."""

import pytest
import torch

from guidance.attention_routing import LayerKey
from guidance.methods.attention_regulation import AttentionRegulator, bump_basis, edited_probabilities
from tests.reference_cases import assert_close, case_params, check_on_copied_folder

LAYER = LayerKey("input", 7, 0, "cross")


def run_case(case):
    params, tensors = case.params(), case.tensors()
    batch, heads = int(params["batch_size"]), int(params["heads"])
    scores = tensors["scores"].float()
    n = batch * heads
    rows, positions, columns = scores.shape
    assert rows == 2 * n
    width = int(params["map_width"])
    size = (positions // width, width)
    targets = [int(t) for t in tensors["target_ids"].tolist()]
    eos = int(tensors["eos_id"])
    step = int(tensors["current_step"])
    regulator = AttentionRegulator([targets] * batch, seeds=[0] * batch, eos_columns=[eos] * batch)
    theta0 = tensors["initial_weights"]
    regulator.initial_weights = {(LAYER, i): theta0[i * heads : (i + 1) * heads] for i in range(batch)}
    if "ma_attn_in" in tensors:
        previous = tensors["ma_attn_in"].reshape(n, positions, len(targets))
        for i in range(batch):
            regulator.remember(LAYER, i, step - 1, previous[i * heads : (i + 1) * heads])
    regulator.record = {}
    cond_probs = regulator.regulate(LAYER, scores[n:], list(range(batch)), heads, size, step)
    records = [regulator.record[(LAYER, i)] for i in range(batch)]
    uncond_probs = scores[:n].softmax(-1)
    return params, tensors, records, torch.cat([uncond_probs, cond_probs]), size


def check_case(case):
    params, tensors, records, probs, size = run_case(case)
    n, positions = tensors["edited_scores_cond_fp16"].shape[:2]
    worst = {}

    def cat(name):
        return (
            torch.cat([r[name] for r in records]) if records[0][name].dim() else torch.stack([r[name] for r in records])
        )

    if "gaussian_basis" in tensors:
        expected = tensors["gaussian_basis"]
        # exp rounds differently from one CPU to the next; 1e-6 is the README's tightest float32 tolerance
        assert_close("gaussian_basis", bump_basis(size).reshape(expected.shape), expected, atol=1e-6)
    loss = torch.stack([r["loss_per_iter"] for r in records]).mean(0)  # the authors' loss is the batch mean
    assert_close("loss_per_iter", loss, tensors["loss_per_iter"], atol=1e-5)
    assert_close("best_loss", loss.min(), tensors["best_loss"], atol=1e-5)
    weights = torch.cat([r["weights_per_iter"] for r in records], dim=1)
    assert_close("weights_per_iter", weights, tensors["weights_per_iter"], atol=5e-4)
    for name in ("best_additive_raw", "ma_attn_used", "best_additive_blended"):
        expected = tensors[name]
        got = cat(name).reshape(expected.shape)
        assert_close(name, got, expected, atol=5e-4)
        worst[name] = float((got - expected).abs().max())
    worst["loss_per_iter"] = float((loss - tensors["loss_per_iter"]).abs().max())
    worst["weights_per_iter"] = float((weights - tensors["weights_per_iter"]).abs().max())
    edited = cat("edited_scores").reshape(tensors["edited_scores_cond_fp16"].shape)
    expected = tensors["edited_scores_cond_fp16"]
    off = edited != expected
    ulp = (edited.float() - expected.float()).abs() <= (expected.float().abs() * 2**-10).clamp_min(2**-24) * 1.01
    assert bool(ulp.all()), "an edited score is more than one float16 ulp off"
    assert int(off.sum()) <= max(1, expected.numel() // 1000), f"{int(off.sum())} edited scores off by one ulp"
    worst["edited_scores_off_by_one_ulp"] = int(off.sum())
    out = tensors["attention_probs_out"]
    assert_close("attention_probs_out", probs, out, atol=2e-3)
    # README §7: a plain float32 softmax of the stored scores, within 1e-6 (kernels round by machine)
    assert_close("uncond half", probs[: out.shape[0] // 2], out[: out.shape[0] // 2], atol=1e-6)
    eos = int(tensors["eos_id"])
    scores = tensors["scores"].float()
    restore = [0, eos]
    recomputed = edited_probabilities(expected, scores[out.shape[0] // 2 :], restore)
    assert_close("cond half from the stored edited scores", recomputed, out[out.shape[0] // 2 :], atol=1e-6)
    worst["attention_probs_out"] = float((probs - out).abs().max())
    return worst


@pytest.mark.parametrize("case", case_params("attention_regulation"))
def test_regulation_reproduces_the_authors(case):
    worst = check_case(case)
    print(case.id, worst)


def test_regulation_runs_on_a_copied_reference_folder(tmp_path, monkeypatch):
    check_on_copied_folder("attention_regulation", check_case, tmp_path, monkeypatch)
