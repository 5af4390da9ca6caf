"""Layer keys, map sizes, layer selection and the router on the real ldm UNet test bed."""

import types
from contextlib import contextmanager

import pytest
import torch
from ldm.modules.attention import CrossAttention

from guidance.attention import attention
from guidance.attention_routing import AttentionRouter, CallRows, LayerKey, map_size, regulation_layer_keys
from guidance.methods.attention_regulation import AttentionRegulator
from guidance.methods.scfg import RegionScales
from tests.testbed.unet import random_context


def test_layer_key_from_module_names():
    key = LayerKey.from_module_name("input_blocks.7.1.transformer_blocks.0.attn2")
    assert key == LayerKey("input", 7, 0, "cross")
    assert LayerKey.from_module_name("model.diffusion_model.middle_block.1.transformer_blocks.3.attn1") == LayerKey(
        "middle", 0, 3, "self"
    )
    assert LayerKey.from_module_name("diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2") == LayerKey(
        "output", 11, 0, "cross"
    )
    for name in ("input_blocks.1.0.in_layers.0", "middle_block.1.proj_in", "output_blocks.3.1.attn2", "attn2", ""):
        assert LayerKey.from_module_name(name) is None
    assert LayerKey.from_forge(("input", 7), 0, "attn2") == key
    assert LayerKey.from_forge(("middle", 0), 2, "self") == LayerKey("middle", 0, 2, "self")
    with pytest.raises(ValueError):
        LayerKey.from_forge(("sideways", 1), 0, "cross")


def test_map_size_follows_ldm_ceil_downsampling():
    assert map_size((64, 64), 64 * 64) == (64, 64, 1)
    assert map_size((64, 64), 256) == (16, 16, 4)
    assert map_size((64, 96), 8 * 12) == (8, 12, 8)
    assert map_size((60, 44), 15 * 11) == (15, 11, 4)  # 60→30→15, 44→22→11
    assert map_size((60, 44), 8 * 6) == (8, 6, 8)  # ceil: 15→8, 11→6
    assert map_size((64, 64), 100) is None


def unet_keys(unet):
    return {LayerKey.from_module_name(name) for name, m in unet.named_modules() if isinstance(m, CrossAttention)}


def sdxl_keys():
    depth = {("input", 4): 2, ("input", 5): 2, ("input", 7): 10, ("input", 8): 10, ("middle", 0): 10}
    depth.update({("output", i): 10 for i in (0, 1, 2)})
    depth.update({("output", i): 2 for i in (3, 4, 5)})
    return {LayerKey(s, b, t, kind) for (s, b), d in depth.items() for t in range(d) for kind in ("self", "cross")}


def blocks(keys):
    return sorted({(k.section, k.block) for k in keys})


def test_regulation_layers_sd1_and_sdxl(tiny_unet):
    sd1 = unet_keys(tiny_unet)
    assert blocks(regulation_layer_keys("last down", sd1)) == [("input", 7), ("input", 8)]
    assert blocks(regulation_layer_keys("first up", sd1)) == [("output", 3), ("output", 4), ("output", 5)]
    both = regulation_layer_keys("last down + first up", sd1)
    assert len(both) == 5 and all(k.kind == "cross" for k in both)
    assert len(regulation_layer_keys("all cross-attention", sd1)) == 16
    xl = sdxl_keys()
    assert blocks(regulation_layer_keys("last down", xl)) == [("input", 7), ("input", 8)]
    assert blocks(regulation_layer_keys("first up", xl)) == [("output", 0), ("output", 1), ("output", 2)]
    assert len(regulation_layer_keys("last down + first up", xl)) == 50
    with pytest.raises(ValueError):
        regulation_layer_keys("sideways", sd1)


@contextmanager
def routed(unet, router):
    """Instance forwards on the routed CrossAttention modules (as the A1111 adapter does), removed after."""
    modules = {LayerKey.from_module_name(n): m for n, m in unet.named_modules() if isinstance(m, CrossAttention)}
    chosen = router.routed_layers(modules)

    def make(key):
        def forward(self, x, context=None, mask=None, **kwargs):
            context = x if context is None else context
            out = router.forward(key, self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
            return self.to_out(out)

        return forward

    for key in chosen:
        modules[key].forward = types.MethodType(make(key), modules[key])
    try:
        yield chosen
    finally:
        for key in chosen:
            del modules[key].forward


def two_image_call(step=0, total=10, size=16):
    # rows [cond 0, cond 1, uncond 0, uncond 1], A1111's order
    return CallRows(step, total, (size, size), uncond=(2, 3), cond=(0, 1))


def contexts(seeds=(1, 2), uncond_seed=9):
    conds = [random_context(1, s) for s in seeds]
    return torch.cat(conds + [random_context(1, uncond_seed)] * len(seeds))


@pytest.mark.parametrize("methods", ["none", "scfg"])
def test_routed_unet_equals_the_stock_unet(tiny_unet, methods):
    x = torch.randn(4, 4, 16, 16)
    t = torch.full((4,), 500.0)
    context = contexts()
    with torch.no_grad():
        stock = tiny_unet(x, t, context=context)
        scales = RegionScales(2, keep_intermediates=True) if methods == "scfg" else None
        router = AttentionRouter(region_scales=scales)
        with routed(tiny_unet, router) as chosen:
            router.begin_call(two_image_call())
            out = tiny_unet(x, t, context=context)
    assert len(chosen) == (32 if methods == "scfg" else 0)
    assert all("forward" not in vars(m) for m in tiny_unet.modules() if isinstance(m, CrossAttention))
    torch.testing.assert_close(out, stock, rtol=0, atol=1e-5)


def scfg_masks(unet, x, context, rows, batch, size):
    scales = RegionScales(batch, keep_intermediates=True)
    router = AttentionRouter(region_scales=scales)
    with torch.no_grad(), routed(unet, router):
        calls = rows if isinstance(rows, list) else [(rows, slice(None))]
        for call, part in calls:
            router.begin_call(call)
            unet(x[part], torch.full((x[part].shape[0],), 500.0), context=context[part])
    direction = torch.randn(batch, 4, size, size, generator=torch.Generator().manual_seed(5))
    from guidance.engine import ImageStep

    rates = [scales.rate(ImageStep(i, 0, 10, 7.5, torch.zeros(4, size, size), direction[i])) for i in range(batch)]
    return scales.intermediates, rates


def test_scfg_masks_are_per_image(tiny_unet):
    size = 16
    x = torch.randn(1, 4, size, size).repeat(4, 1, 1, 1)
    found, rates = scfg_masks(tiny_unet, x, contexts((1, 2)), two_image_call(size=size), 2, size)
    assert found[0]["ca_mask"].shape == (77, 4, 4)
    assert not torch.equal(found[0]["ca_mask"], found[1]["ca_mask"])
    assert all(r.shape == (1, size, size) for r in rates)
    # the same image alone, and with its uncond and cond rows in separate UNet calls, gets the same maps
    single = torch.cat([contexts((1,))])
    alone, _ = scfg_masks(tiny_unet, x[:2], single, CallRows(0, 10, (size, size), (1,), (0,)), 1, size)
    split_rows = [
        (CallRows(0, 10, (size, size), (None,), (0,)), slice(0, 1)),
        (CallRows(0, 10, (size, size), (0,), (None,)), slice(1, 2)),
    ]
    split, _ = scfg_masks(tiny_unet, x[:2], single, split_rows, 1, size)
    for other in (alone, split):
        assert torch.equal(other[0]["ca_mask"], found[0]["ca_mask"])
        torch.testing.assert_close(other[0]["ca_normalized"], found[0]["ca_normalized"], rtol=1e-5, atol=1e-5)


def regulation_run(unet, context, mode, dtype=torch.float32):
    size = 16
    x = torch.randn(4, 4, size, size, generator=torch.Generator().manual_seed(3)).to(dtype)
    regulator = AttentionRegulator([[2, 5], [3]], seeds=[11, 12], eos_columns=[6, 4])
    seen = []
    original = regulator.regulate

    def spy(layer, scores, images, heads, size_, step):
        probs = original(layer, scores, images, heads, size_, step)
        seen.append((scores.softmax(-1), probs, list(images)))
        return probs

    regulator.regulate = spy
    router = AttentionRouter(regulator=regulator)
    unet = unet.to(dtype)
    try:
        t = torch.full((4,), 500.0, dtype=dtype)
        with mode():
            with routed(unet, router) as chosen:
                router.begin_call(CallRows(0, 10, (size, size), uncond=(2, 3), cond=(0, 1)))
                assert router.active(0, 10) and not router.active(5, 10)
                out = unet(x, t, context=context.to(dtype))
            stock = unet(x, t, context=context.to(dtype))
    finally:
        unet.float()
    return chosen, seen, out, stock, regulator


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_regulation_raises_target_attention(tiny_unet, mode):
    chosen, seen, out, stock, regulator = regulation_run(tiny_unet, contexts(), mode)
    assert len(chosen) == 5 and len(seen) == 5
    heads = 8
    for plain, edited, images in seen:
        for slot, image in enumerate(images):
            rows = slice(slot * heads, (slot + 1) * heads)
            targets = regulator.targets[image]
            before = plain[rows][..., targets].sum(-1).mean()
            after = edited[rows][..., targets].sum(-1).mean()
            assert after > before
    # only the cond rows change; the uncond rows are the stock forward
    torch.testing.assert_close(out[2:], stock[2:], rtol=0, atol=1e-5)
    assert (out[:2] - stock[:2]).abs().max() > 1e-4


def half_dtype():
    try:
        torch.nn.functional.scaled_dot_product_attention(*(torch.randn(1, 1, 4, 8, dtype=torch.float16),) * 3)
        return torch.float16
    except RuntimeError:
        return torch.bfloat16


def test_half_precision_inputs_are_accepted():
    dtype = half_dtype()
    regulator = AttentionRegulator([[2, 5]], seeds=[1], eos_columns=[6])
    scales = RegionScales(1)
    router = AttentionRouter(region_scales=scales, regulator=regulator)
    keys = {LayerKey("input", 7, 0, kind) for kind in ("self", "cross")}
    assert router.routed_layers(keys) == keys
    router.begin_call(CallRows(0, 10, (64, 64), uncond=(1,), cond=(0,)))
    q = torch.randn(2, 256, 64, dtype=dtype)
    with torch.inference_mode():
        self_out = router.forward(LayerKey("input", 7, 0, "self"), q, q, q, 8)
        k, v = torch.randn(2, 77, 64, dtype=dtype), torch.randn(2, 77, 64, dtype=dtype)
        out = router.forward(LayerKey("input", 7, 0, "cross"), q, k, v, 8)
    assert self_out.dtype == out.dtype == dtype and torch.isfinite(out).all()
    from guidance.attention import attention

    assert torch.equal(out[1], attention(q, k, v, 8)[1])  # uncond row untouched
    assert not torch.allclose(out[0].float(), attention(q, k, v, 8)[0].float(), atol=1e-3)
    from guidance.engine import ImageStep

    rate = scales.rate(ImageStep(0, 0, 10, 7.5, torch.zeros(4, 64, 64), torch.randn(4, 64, 64).to(dtype)))
    assert rate.shape == (1, 64, 64) and rate.dtype == dtype


def test_router_fast_paths_without_work():
    router = AttentionRouter(region_scales=RegionScales(1))
    router.begin_call(CallRows(0, 10, (16, 16), (1,), (0,)))
    q, k, v = torch.randn(2, 37, 16), torch.randn(2, 37, 16), torch.randn(2, 37, 16)  # N matches no level
    from guidance.attention import attention

    torch.testing.assert_close(router.forward(LayerKey("input", 1, 0, "self"), q, k, v, 2), attention(q, k, v, 2))
    assert not AttentionRouter().active(0, 10)


def test_a_layer_matching_no_level_of_the_latent_is_noted_once_per_method():
    region_scales = RegionScales(batch_size=1)
    regulator = AttentionRegulator(targets=[[5]], seeds=[0], end=1.0, iterations=2)
    router = AttentionRouter(region_scales=region_scales, regulator=regulator)
    key = LayerKey("input", 7, 0, "cross")
    router.routed_layers([key, LayerKey("input", 7, 0, "self")])
    router.begin_call(CallRows(0, 2, (16, 16), uncond=(0,), cond=(1,)))
    q = torch.randn(2, 50, 32)  # 50 positions: no ceil-halving of 16×16 (e.g. a merged-token layer)
    k = v = torch.randn(2, 77, 32)
    for _ in range(2):
        out = router.forward(key, q, k, v, 2)
        torch.testing.assert_close(out, attention(q, k, v, 2))
    assert [len(region_scales.notes), len(regulator.notes)] == [1, 1]
    assert region_scales.notes[0].startswith("S-CFG: some attention layers' maps match no level of the latent")
    assert regulator.notes[0].endswith("they are not regulated.")
