"""The attention fast path against the real ldm CrossAttention, layer by layer and through a UNet."""

import types

import pytest
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


# ---------------------------------------------------------------------------------------------
# S-CFG's capture in bounded memory


class LargestIntermediate:
    """A TorchDispatchMode that records the bytes of every tensor an operation returns."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        sizes = self.sizes = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else [out]:
                    if isinstance(t, torch.Tensor) and t._base is None:  # a view allocates nothing
                        sizes.append(t.numel() * t.element_size())
                return out

        self.mode = Mode()


def test_chunked_head_average_equals_the_unchunked_one():
    from guidance.attention import attention_scores, head_averaged_probabilities

    q, k = torch.randn(3, 300, 64), torch.randn(3, 300, 64)
    reference = attention_scores(q, k, 8).softmax(-1).mean(1)
    for budget in (1, 3 * 8 * 300 * 4 * 2 * 7, 10**6, 2**30):  # 1 row, 7 rows, a few dozen, all
        torch.testing.assert_close(head_averaged_probabilities(q, k, 8, budget), reference, rtol=0, atol=1e-6)
    half_q = q.to(torch.bfloat16)
    torch.testing.assert_close(
        head_averaged_probabilities(half_q, k.to(torch.bfloat16), 8, 10**5),
        attention_scores(half_q, k.to(torch.bfloat16), 8).softmax(-1).mean(1),
        rtol=0,
        atol=1e-6,
    )


@pytest.mark.parametrize("budget", [8 * 2**20, 32 * 2**20])
def test_the_capture_never_holds_more_per_head_memory_than_its_budget(budget):
    """Self-attention of a 64×64 latent (N = M = 4096, 8 heads, 2 rows): unchunked, the per-head
    float32 scores alone are 2·8·4096²·4 B = 1 GiB; chunked, every tensor larger than the inputs
    (the per-head ones) fits, the four a chunk holds at once together within the budget."""
    from guidance.attention import head_averaged_probabilities

    q, k = torch.randn(2, 4096, 32), torch.randn(2, 4096, 32)
    tracker = LargestIntermediate()
    with tracker.mode:
        result = head_averaged_probabilities(q, k, 8, budget)
    result_bytes, input_bytes = result.numel() * 4, q.numel() * 4
    per_head = [size for size in tracker.sizes if input_bytes < size != result_bytes]
    assert tracker.sizes.count(result_bytes) == 1  # the (B, N, M) average is made once
    # one head's scores, probabilities, head sum and running total of a chunk: four alike
    assert per_head and 4 * max(per_head) <= budget
    assert 4 * max(per_head) > budget / 2  # and chunks are not needlessly small


def test_the_chunks_follow_the_budget():
    from guidance.attention import CPU_CAPTURE_CAP, capture_cap, capture_chunks

    # scores, probabilities, head sum and total: 4·rows·chunk·keys·4 bytes with one head
    assert capture_chunks(rows=2, heads=8, queries=4096, keys=4096, budget=2**20) == (1, 8)
    assert capture_chunks(rows=2, heads=8, queries=4096, keys=77, budget=2**30) == (8, 4096)
    per_head = 2 * 4096 * 77 * 4  # one head, every query row
    assert capture_chunks(rows=2, heads=8, queries=4096, keys=77, budget=6 * per_head) == (2, 4096)
    assert capture_chunks(rows=8, heads=20, queries=16384, keys=16384, budget=1) == (1, 1)
    assert capture_cap(torch.device("cpu")) == CPU_CAPTURE_CAP


def test_a_layer_budget_is_its_queries_bytes_within_the_floor_and_the_cap():
    from guidance.attention import MIN_CAPTURE_BUDGET, layer_capture_budget

    sd15_hires = torch.empty(2, 16384, 320, dtype=torch.float16)  # 20 MiB
    assert layer_capture_budget(2**30, sd15_hires) == 2 * 16384 * 320 * 2
    assert layer_capture_budget(2**20 * 8, sd15_hires) == 2**20 * 8
    assert layer_capture_budget(2**30, torch.empty(2, 64, 32)) == MIN_CAPTURE_BUDGET


def test_products_with_the_unformed_maps_equal_those_with_the_formed_ones():
    from guidance.attention import HeadAveragedMaps, head_averaged_maps, head_averaged_probabilities

    q, k, x = torch.randn(3, 300, 64), torch.randn(3, 300, 64), torch.rand(3, 300, 77)
    formed = head_averaged_probabilities(q, k, 8)
    maps = head_averaged_maps(q, k, 8, budget=3 * 8 * 300 * 4 * 2 * 5)  # 5 query rows per chunk
    assert isinstance(maps, HeadAveragedMaps) and maps.shape == formed.shape
    torch.testing.assert_close(maps @ x, formed @ x, rtol=0, atol=1e-6)
    torch.testing.assert_close(maps.take([2, 0]) @ x[[2, 0]], (formed @ x)[[2, 0]], rtol=0, atol=1e-6)
    assert isinstance(head_averaged_maps(q, k, 8, budget=2**30), torch.Tensor)  # small enough: formed


def test_a_product_with_the_unformed_maps_never_holds_an_n_by_n_tensor():
    from guidance.attention import HeadAveragedMaps

    q, k, x = torch.randn(2, 4096, 32), torch.randn(2, 4096, 32), torch.rand(2, 4096, 77)
    budget = 8 * 2**20
    tracker = LargestIntermediate()
    with tracker.mode:
        HeadAveragedMaps(q, k, 8, budget) @ x
    assert 2 * max(tracker.sizes) <= budget  # the formed map would be 2·4096²·4 B = 128 MiB


@pytest.mark.parametrize(
    "channels, heads, columns, budget",
    [
        (32, 8, 77, 2**20),  # head width 4 (the test bed): queries and keys padded to the values' 80
        (32, 8, 77, 1),  # the same within a tiny budget: ten column blocks of width 8, one head a call
        (320, 8, 2, 2**30),  # SD1.5's width 40 against S-CFG's foreground pair: values padded to 40
        (640, 10, 154, 2**30),  # SDXL's width 64, a two-chunk prompt: two value groups, all heads at once
        (640, 10, 300, 3 * 2**20),  # three value groups, a few heads per call
    ],
)
def test_the_fused_product_equals_the_product_with_the_formed_maps(channels, heads, columns, budget):
    from guidance.attention import attention_scores, head_averaged_product

    generator = torch.Generator().manual_seed(channels + columns)
    q, k = (torch.randn(2, 256, channels, generator=generator) for _ in range(2))
    x = torch.rand(2, 256, columns, generator=generator)
    formed = attention_scores(q, k, heads).softmax(-1).mean(1)
    product = head_averaged_product(q, k, heads, x, budget)
    assert product.dtype == torch.float32 and product.shape == (2, 256, columns)
    torch.testing.assert_close(product, formed @ x, rtol=0, atol=2e-6)


def test_the_fused_product_computes_in_the_layers_dtype_unless_upcast():
    from guidance.attention import attention_scores, head_averaged_product

    generator = torch.Generator().manual_seed(1)
    q, k = (torch.randn(2, 256, 320, generator=generator).to(torch.bfloat16) for _ in range(2))
    x = torch.rand(2, 256, 77, generator=generator)
    exact = attention_scores(q, k, 8).softmax(-1).mean(1) @ x  # float32 scores of the bf16 inputs
    upcast = head_averaged_product(q, k, 8, x, 2**30, upcast=True)
    native = head_averaged_product(q, k, 8, x, 2**30)
    torch.testing.assert_close(upcast, exact, rtol=0, atol=2e-6)
    assert native.dtype == torch.float32
    assert 1e-5 < (native - exact).abs().max() < 2e-2  # bf16 values and output: visibly rounded, still close


def test_the_fused_width_is_wide_when_a_head_fits_the_budget_else_the_heads_own():
    from guidance.attention import fused_width

    one_head_at_80 = 2 * 2 * (4096 + 4096) * 80 * 4
    assert fused_width(2, 4096, 4096, 4, 77, 4, one_head_at_80) == 80  # all 77 columns in one call
    assert fused_width(2, 4096, 4096, 4, 77, 4, one_head_at_80 - 1) == 8  # the test bed's head width 4
    assert fused_width(2, 4096, 4096, 40, 2, 4, 1) == 40  # the foreground pair: the head's width
    assert fused_width(2, 16384, 16384, 40, 77, 2, 20 * 2**20) == 80  # SD1.5 hires, fp16, its query bytes
    assert fused_width(2, 64, 64, 64, 300, 4, 2**30) == 128  # at most VALUE_COLUMNS a call


def test_without_a_fused_kernel_the_product_is_chunked_instead(monkeypatch):
    """Where SDPA has no fused kernel (MPS, DirectML; the CPU before torch 2.3) it would form the
    maps itself: there they are built a chunk at a time within the budget and multiplied."""
    from guidance import attention

    generator = torch.Generator().manual_seed(2)
    q, k = (torch.randn(2, 300, 64, generator=generator) for _ in range(2))
    x = torch.rand(2, 300, 77, generator=generator)
    formed = attention.attention_scores(q, k, 8).softmax(-1).mean(1) @ x
    torch.testing.assert_close(attention.chunked_product(q, k, 8, x, 2**16), formed, rtol=0, atol=2e-6)
    fused = []
    monkeypatch.setattr(attention, "head_averaged_product", lambda *a, **kw: fused.append(1))
    attention.HeadAveragedMaps(q, k, 8, 2**16) @ x
    assert fused == [1]
    assert attention.fused_available(torch.device("cuda")) and not attention.fused_available(torch.device("mps"))
    monkeypatch.setattr(attention, "TORCH_VERSION", (2, 1))  # A1111 1.10's own torch: no CPU flash kernel
    torch.testing.assert_close(attention.HeadAveragedMaps(q, k, 8, 2**16) @ x, formed, rtol=0, atol=2e-6)
    assert fused == [1]
