"""Attention regulation units: analytic gradient against autograd, basis, seeds, state, schedule."""

import torch

from guidance.methods.attention_regulation import (
    AttentionRegulator,
    bump_basis,
    edited_probabilities,
    edited_scores,
    optimise_bias,
    other_logsumexp,
    target_columns,
)
from guidance.params import defaults


def autograd_loss(scores, targets, basis, theta, heads):
    bias = torch.einsum("rkt,kn->rnt", theta, basis)
    full = scores.clone()
    for i, t in enumerate(targets):
        full[..., t] = full[..., t] + bias[..., i]
    probs = full.softmax(-1)[..., targets]
    n_t = len(targets)
    quantile = torch.quantile(probs, 0.9, dim=1)
    mean = (probs / probs.shape[1]).sum(1)
    share = min(1.0, 0.2 * n_t) / n_t
    return ((quantile - 0.9) ** 2).mean() + 80 * ((mean - share) ** 2).mean() + 0.09 * (theta**2).mean()


def test_analytic_gradient_step_matches_autograd():
    torch.manual_seed(0)
    heads, positions, targets = 3, 64, [2, 5, 6]
    scores = torch.randn(heads, positions, 20) * 2
    basis = bump_basis((8, 8))
    theta0 = torch.rand(heads, basis.shape[0], len(targets))
    result = optimise_bias(
        target_columns(scores, targets), other_logsumexp(scores, targets), basis, theta0, heads, 2, 100.0, record=True
    )
    with torch.inference_mode(False), torch.enable_grad():
        theta = theta0.clone().requires_grad_(True)
        loss = autograd_loss(scores, targets, basis, theta, heads)
        (grad,) = torch.autograd.grad(loss, theta)
    # two different float32 computations of one loss (analytic vs autograd): README §7 allows 1e-5
    torch.testing.assert_close(result.losses[0][0], loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.weights[1], theta0 - heads * 100.0 * grad, rtol=1e-5, atol=1e-5)


def test_basis_matches_the_authors_grid():
    assert bump_basis((16, 16)).shape == (49, 256)
    assert bump_basis((32, 32)).shape == (49, 1024)  # σ 2
    assert bump_basis((16, 24)).shape == (7 * 11, 384)  # non-square: centres per axis
    basis = bump_basis((16, 16)).reshape(49, 16, 16)
    assert basis[1].argmax() == 4 * 16 + 2  # k = a·r + b: b (inner) moves the row (y) centre
    assert basis[7].argmax() == 2 * 16 + 4


def test_restored_columns_keep_the_unedited_probabilities():
    scores = torch.randn(2, 16, 10)
    bias = torch.full((2, 16, 1), 3.0)
    probs = edited_probabilities(edited_scores(scores, [3], bias), scores, [0, 7])
    plain = scores.softmax(-1)
    assert torch.equal(probs[..., 0], plain[..., 0]) and torch.equal(probs[..., 7], plain[..., 7])
    assert (probs[..., 3] > plain[..., 3]).all()


def test_from_settings_schedule_and_seeds():
    settings = defaults()
    regulator = AttentionRegulator.from_settings(settings, [[1, 2]], seeds=[7])
    assert regulator.active(0, 50) and regulator.active(24, 50) and not regulator.active(25, 50)
    assert not AttentionRegulator.from_settings(settings, [[]], seeds=[7]).active(0, 50)
    assert regulator.restore == [[0]]
    a = AttentionRegulator([[1, 2]], [7])._initial_theta("layer", 0, (2, 3, 2), "cpu")
    b = AttentionRegulator([[4], [1, 2]], [3, 7])._initial_theta("layer", 1, (2, 3, 2), "cpu")
    assert torch.equal(a, b)  # one seed → one image, whatever else is in the batch
    torch.manual_seed(7)
    assert torch.equal(a, torch.rand(2, 3, 2))


def test_state_blends_with_the_previous_step():
    torch.manual_seed(1)
    regulator = AttentionRegulator([[1, 2]], [5], iterations=3, eos_columns=[3])
    regulator.record = {}
    scores = torch.randn(2, 256, 8)
    regulator.regulate("L", scores, [0], 2, (16, 16), 0)
    first = regulator.record[("L", 0)]
    regulator.regulate("L", scores, [0], 2, (16, 16), 1)
    second = regulator.record[("L", 0)]
    assert torch.equal(second["ma_attn_used"], first["best_additive_raw"])
    torch.testing.assert_close(
        second["best_additive_blended"], 0.25 * first["best_additive_raw"] + 0.75 * second["best_additive_raw"]
    )
    # a second UNet call at the same step (second-order samplers) blends with the same partner
    regulator.regulate("L", scores, [0], 2, (16, 16), 1)
    assert torch.equal(regulator.record[("L", 0)]["ma_attn_used"], first["best_additive_raw"])
