"""Attention regulation's layer choice per model family: cost and effect.

"last down + first up" selects every transformer of the chosen blocks: 5 cross-attention layers on
SD1.5, 50 on SDXL (10 transformers per block). Optimising each of the 50 is ~10× the paper's work
per step; instead the first transformer of each chosen block optimises and the block's later
transformers apply its bias of the same step to their own scores (`regulation_bias_leaders`).
Here: the work (layers optimised × iterations) of both, and the effect, as the mean attention mass
on the target columns over every layer of the choice in one UNet call of the real tiny SDXL UNet,
after regulation vs before. Run with -s to see the numbers.
"""

from __future__ import annotations

import pytest
import torch

from guidance.attention import attention, attention_scores
from guidance.attention_routing import (
    AttentionRouter,
    CallRows,
    LayerKey,
    regulation_bias_leaders,
    regulation_layer_keys,
)
from guidance.methods.attention_regulation import AttentionRegulator
from tests.testbed.unet import make_unet

DEFAULT = "last down + first up"
LATENT = 48  # 384 px: the chosen layers (factor 4) have 12×12 maps


def layout_keys(depths: dict[tuple[str, int], int]) -> list[LayerKey]:
    """Self- and cross-attention keys of every transformer of the given blocks."""
    return [
        LayerKey(section, block, transformer, kind)
        for (section, block), depth in depths.items()
        for transformer in range(depth)
        for kind in ("self", "cross")
    ]


# the attention blocks (section, index) → transformers of SD1.5 and SDXL (sgm transformer_depth [0, 2, 10])
SD15 = {**{("input", b): 1 for b in (1, 2, 4, 5, 7, 8)}, ("middle", 0): 1, **{("output", b): 1 for b in range(3, 12)}}
SDXL = {
    **{("input", b): 2 for b in (4, 5)},
    **{("input", b): 10 for b in (7, 8)},
    ("middle", 0): 10,
    **{("output", b): 10 for b in (0, 1, 2)},
    **{("output", b): 2 for b in (3, 4, 5)},
}


@pytest.mark.parametrize("family, depths, chosen, optimised", [("SD1.5", SD15, 5, 5), ("SDXL", SDXL, 50, 5)])
def test_the_default_optimises_one_layer_per_chosen_block(family, depths, chosen, optimised):
    keys = regulation_layer_keys(DEFAULT, layout_keys(depths))
    leaders = regulation_bias_leaders(DEFAULT, keys)
    assert len(keys) == chosen and len(set(leaders.values())) == optimised
    assert all(leader.transformer == 0 and leader.block == key.block for key, leader in leaders.items())
    every = regulation_bias_leaders("all cross-attention", keys)
    assert all(leader == key for key, leader in every.items())
    iterations = 20
    print(
        f"\n{family} {DEFAULT}: {chosen} layers chosen; optimised per step: paper's every layer "
        f"{chosen} × {iterations} = {chosen * iterations} iterations, one per block {optimised} × {iterations} = "
        f"{optimised * iterations}; work ratio {chosen / optimised:.1f}"
    )


def _coverage(unet, modules, chosen, targets, seed: int, leaders=None) -> tuple[float, AttentionRegulator | None]:
    """Mean attention mass on the target columns over the `chosen` layers in one UNet call (the
    cond row of one image, step 0), regulated when `leaders` is given (layer → optimising layer)."""
    regulator = router = None
    if leaders is not None:
        regulator = AttentionRegulator(targets=[targets], seeds=[seed], end=1.0)
        regulator.record = {}
        router = AttentionRouter(regulator=regulator)
        router.routed_layers(modules)
        regulator.leaders = leaders
        router.begin_call(CallRows(0, 1, (LATENT, LATENT), uncond=(None,), cond=(0,)))
    mass: dict[LayerKey, float] = {}
    originals = {key: modules[key].forward for key in chosen}
    for key in chosen:
        modules[key].forward = _observed_forward(key, modules[key], router, regulator, targets, mass)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 4, LATENT, LATENT, generator=generator)
    context = torch.randn(1, 77, 2048, generator=generator)
    y = torch.randn(1, unet.adm_in_channels, generator=generator)
    try:
        with torch.no_grad():
            unet(x, torch.tensor([500.0]), context=context, y=y)
    finally:
        for key, forward in originals.items():
            modules[key].forward = forward
    assert set(mass) == set(chosen)
    return sum(mass.values()) / len(mass), regulator


def _observed_forward(key, module, router, regulator, targets, mass):
    """The ldm CrossAttention forward through the router; records the layer's target mass."""

    def forward(x, context=None, mask=None, **kwargs):
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        if router is None:
            out = attention(q, k, v, module.heads)
            probs = attention_scores(q, k, module.heads).softmax(-1)
        else:
            out = router.forward(key, q, k, v, module.heads)
            probs = regulator.record[(key, 0)]["probs"]
        mass[key] = float(sum(probs[..., t] for t in targets).mean())
        return module.to_out(out)

    return forward


def test_one_optimised_layer_per_block_keeps_the_effect_on_sdxl():
    unet = make_unet("tiny_sdxl", seed=0)
    modules = {}
    for name, module in unet.named_modules():
        key = LayerKey.from_module_name(name)
        if key is not None:
            modules[key] = module
    chosen = regulation_layer_keys(DEFAULT, modules)
    targets = [5, 6]
    before, _ = _coverage(unet, modules, chosen, targets, seed=0)
    every, full = _coverage(unet, modules, chosen, targets, seed=0, leaders={key: key for key in chosen})
    shared, ours = _coverage(unet, modules, chosen, targets, 0, regulation_bias_leaders(DEFAULT, chosen))
    ratio = (shared - before) / (every - before)
    print(
        f"\ntiny SDXL, {len(chosen)} layers chosen, target mass before {before:.4f}; every layer optimised "
        f"{every:.4f} ({len(full.layers_optimised)} layers, {full.iterations_run} iterations); one per block "
        f"{shared:.4f} ({len(ours.layers_optimised)} layers, {ours.iterations_run} iterations, "
        f"{len(ours.layers_shared)} sharing); gain ratio {ratio:.3f}"
    )
    assert len(full.layers_optimised) == 15 and full.iterations_run == 15 * 20
    assert len(ours.layers_optimised) == 5 and ours.iterations_run == 5 * 20 and len(ours.layers_shared) == 10
    assert every - before > 0.1  # regulation moves attention onto the targets
    assert ratio >= 0.8
