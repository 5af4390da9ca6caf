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


def test_capture_path_keeps_the_output_and_averages_heads():
    from guidance.attention import attention_capture, attention_scores

    q, k, v = torch.randn(3, 16, 32), torch.randn(3, 7, 32), torch.randn(3, 7, 32)
    out, probs = attention_capture(q, k, v, heads=4, rows=[2, 0])
    assert torch.equal(out, attention(q, k, v, 4))
    expected = attention_scores(q, k, 4).softmax(-1).mean(1)[[2, 0]]
    assert probs.dtype == torch.float32 and probs.shape == (2, 16, 7)
    torch.testing.assert_close(probs, expected)


def test_bias_path_equals_the_explicit_softmax():
    from guidance.attention import attention_from_probabilities, attention_scores, attention_with_bias

    q, k, v = torch.randn(2, 16, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    bias = torch.zeros(2, 1, 16, 7)
    bias[0, 0, :, 3] = 2.0
    explicit = attention_from_probabilities((attention_scores(q, k, 4) + bias).softmax(-1), v, q.dtype)
    torch.testing.assert_close(attention_with_bias(q, k, v, 4, bias), explicit, rtol=0, atol=1e-5)


def test_select_rows_avoids_device_indices():
    from guidance.attention import select_rows

    t = torch.arange(5)
    assert select_rows(t, [1, 2, 3]).data_ptr() == t[1:].data_ptr()
    assert select_rows(t, [3, 0]).tolist() == [3, 0]
    assert select_rows(t, []).numel() == 0
