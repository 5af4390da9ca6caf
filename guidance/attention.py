"""The attention kernel that both host adapters route the selected layers through.

Inputs are what a CrossAttention forward has after its q/k/v projections: (batch, tokens,
heads·dim) tensors and the head count (Forge's attention replace patches receive exactly these;
the A1111 adapter computes them with the module's own Linear layers so LoRA stays active). The fast
path is `torch.nn.functional.scaled_dot_product_attention`, numerically what the hosts' SDP
optimisation computes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, h·d) → (B, h, N, d)"""
    batch, tokens, width = tensor.shape
    return tensor.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(tensor: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) → (B, N, h·d)"""
    batch, heads, tokens, dim = tensor.shape
    return tensor.transpose(1, 2).reshape(batch, tokens, heads * dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """Softmax(q·kᵀ/√d)·v per head, via SDPA. `upcast` computes in float32 (A1111's upcast_attn)
    and returns the input dtype."""
    dtype = q.dtype
    q, k, v = (split_heads(t, heads) for t in (q, k, v))
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    return merge_heads(out).to(dtype)


def cross_attention_forward(
    module: torch.nn.Module, x: torch.Tensor, context: torch.Tensor | None = None
) -> torch.Tensor:
    """A CrossAttention forward (ldm or sgm module: `to_q`, `to_k`, `to_v`, `to_out`, `heads`)
    computed through `attention`. Self-attention when `context` is None."""
    context = x if context is None else context
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    return module.to_out(attention(q, k, v, module.heads))


def select_rows(tensor: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`tensor[rows]` without building an index tensor on the device (that would be a host-to-device
    copy and a synchronisation per call): a view for a contiguous ascending run, else a cat of views."""
    if not rows:
        return tensor[:0]
    first = rows[0]
    if rows == list(range(first, first + len(rows))):
        return tensor[first : first + len(rows)]
    return torch.cat([tensor[r : r + 1] for r in rows])


def attention_scores(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-softmax scores q·kᵀ/√d per head in float32: (B, N, h·d), (B, M, h·d) → (B, h, N, M)."""
    q, k = split_heads(q, heads).float(), split_heads(k, heads).float()
    return torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)


CPU_CAPTURE_BUDGET = 64 * 2**20  # bytes of capture intermediates off CUDA
CUDA_BUDGET_SHARE = 0.05  # of the memory the device can still give
MIN_CAPTURE_BUDGET = 16 * 2**20
MAX_CAPTURE_BUDGET = 256 * 2**20  # enough for full-width kernels; more would only raise the peak


def capture_budget(device: torch.device) -> int:
    """Bytes the capture's intermediates may take: on CUDA a share of what is free (the driver's
    free memory plus the caching allocator's unused reserve), elsewhere a fixed budget."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_CAPTURE_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(min(max(free * CUDA_BUDGET_SHARE, MIN_CAPTURE_BUDGET), MAX_CAPTURE_BUDGET))


def capture_chunk_rows(rows: int, heads: int, queries: int, keys: int, budget: int) -> int:
    """Query rows per chunk so that the chunk's float32 scores and probabilities (rows, heads,
    chunk, keys), two tensors alive at once, fit in `budget` bytes; at least 1."""
    per_query = 2 * rows * heads * keys * 4
    return max(1, min(queries, budget // per_query))


def head_averaged_chunks(q: torch.Tensor, k: torch.Tensor, heads: int, budget: int):
    """Yields (start, softmax(q·kᵀ/√d) averaged over the heads for query rows start…, float32
    (B, chunk, M)), chunk by chunk, so that one chunk's per-head intermediates fit in `budget`."""
    batch, queries, _ = q.shape
    keys = k.shape[1]
    k_heads = split_heads(k, heads).float().transpose(-1, -2).contiguous()  # (B, h, d, M), copied once
    scale = (q.shape[-1] // heads) ** -0.5
    chunk = capture_chunk_rows(batch, heads, queries, keys, budget)
    for start in range(0, queries, chunk):
        q_chunk = split_heads(q[:, start : start + chunk], heads).float()
        yield start, torch.matmul(q_chunk, k_heads).mul_(scale).softmax(dim=-1).mean(dim=1)


def head_averaged_probabilities(
    q: torch.Tensor, k: torch.Tensor, heads: int, budget: int = CPU_CAPTURE_BUDGET
) -> torch.Tensor:
    """softmax(q·kᵀ/√d) averaged over the heads, float32 (B, N, M), built chunk by chunk over the
    query rows so that the per-head float32 intermediates of one chunk stay within `budget` bytes."""
    result = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32, device=q.device)
    for start, averaged in head_averaged_chunks(q, k, heads, budget):
        result[:, start : start + averaged.shape[1]] = averaged
    return result


class HeadAveragedMaps:
    """The head-averaged probabilities (B, N, M) of q and k, kept as q and k: `maps @ x` is
    computed chunk by chunk over the query rows, and the (B, N, M) map is never formed."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, heads: int, budget: int):
        self.q, self.k, self.heads, self.budget = q, k, heads, budget
        self.shape = (q.shape[0], q.shape[1], k.shape[1])

    def take(self, rows: list[int]) -> HeadAveragedMaps:
        """The maps of `rows` of the batch."""
        return HeadAveragedMaps(select_rows(self.q, rows), select_rows(self.k, rows), self.heads, self.budget)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """maps (B, N, M) @ x (B, M, T) → (B, N, T) float32."""
        x = x.float()
        out = x.new_empty(self.shape[0], self.shape[1], x.shape[-1])
        for start, averaged in head_averaged_chunks(self.q, self.k, self.heads, self.budget):
            out[:, start : start + averaged.shape[1]] = averaged @ x
        return out


def head_averaged_maps(q: torch.Tensor, k: torch.Tensor, heads: int, budget: int) -> torch.Tensor | HeadAveragedMaps:
    """The head-averaged probabilities as a tensor when (B, N, M) float32 fits in `budget`, else as
    `HeadAveragedMaps` (products computed chunk by chunk: for self-attention at high resolution)."""
    if q.shape[0] * q.shape[1] * k.shape[1] * 4 <= budget:
        return head_averaged_probabilities(q, k, heads, budget)
    return HeadAveragedMaps(q, k, heads, budget)


def attention_from_probabilities(probs: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """probs (B, h, N, M) float32 times v (B, M, h·d) → (B, N, h·d) in `dtype`."""
    heads = probs.shape[1]
    out = torch.matmul(probs, split_heads(v, heads).to(probs.dtype))
    return merge_heads(out).to(dtype)


def attention_with_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, bias: torch.Tensor, upcast: bool = False
) -> torch.Tensor:
    """Softmax(q·kᵀ/√d + bias)·v via SDPA with a float mask; `bias` broadcastable to (B, h, N, M),
    added after the 1/√d scaling."""
    dtype = q.dtype
    q, k, v = (split_heads(t, heads) for t in (q, k, v))
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), dropout_p=0.0, is_causal=False)
    return merge_heads(out).to(dtype)


def attention_capture(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, rows: list[int], upcast: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast-path output of every row (numerically the stock forward) plus the head-averaged
    float32 probabilities (len(rows), N, M) of the chosen rows."""
    out = attention(q, k, v, heads, upcast)
    probs = head_averaged_probabilities(select_rows(q, rows), select_rows(k, rows), heads)
    return out, probs
