"""The attention fast path against the real ldm CrossAttention, layer by layer and through a UNet."""

import types

import torch
from ldm.modules.attention import CrossAttention

from guidance.attention import attention, cross_attention_forward, merge_heads, split_heads
from tests.testbed.unet import random_context


def test_heads_round_trip():
    t = torch.randn(2, 10, 24)
    assert split_heads(t, 3).shape == (2, 3, 10, 8)
    assert torch.equal(merge_heads(split_heads(t, 3)), t)


def test_fast_path_matches_ldm_cross_and_self_attention():
    torch.manual_seed(0)
    layer = CrossAttention(query_dim=64, context_dim=768, heads=8, dim_head=8).eval()
    x, context = torch.randn(3, 256, 64), random_context(3, 5)
    with torch.no_grad():
        torch.testing.assert_close(cross_attention_forward(layer, x, context), layer(x, context), rtol=0, atol=1e-5)
        self_layer = CrossAttention(query_dim=64, heads=8, dim_head=8).eval()
        torch.testing.assert_close(cross_attention_forward(self_layer, x), self_layer(x), rtol=0, atol=1e-5)


def test_upcast_returns_the_input_dtype():
    q, k, v = (torch.randn(1, 16, 32, dtype=torch.bfloat16) for _ in range(3))
    out = attention(q, k, v, heads=4, upcast=True)
    assert out.dtype == torch.bfloat16
    reference = attention(q.float(), k.float(), v.float(), heads=4)
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=2e-2)


def test_unet_through_the_kernel_equals_the_stock_unet(tiny_unet):
    x = torch.randn(2, 4, 16, 16)
    t = torch.tensor([999.0, 10.0])
    context = random_context(2, 3)
    with torch.no_grad():
        stock = tiny_unet(x, t, context=context)
        layers = [m for m in tiny_unet.modules() if isinstance(m, CrossAttention)]
        assert len(layers) == 32  # attn1 and attn2 of 16 transformer blocks (SD1 layout)
        for layer in layers:
            layer.forward = types.MethodType(cross_attention_forward, layer)
        try:
            routed = tiny_unet(x, t, context=context)
        finally:
            for layer in layers:
                del layer.forward
    assert all("forward" not in vars(layer) for layer in layers)
    torch.testing.assert_close(routed, stock, rtol=0, atol=1e-5)
