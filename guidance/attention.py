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


CPU_CAPTURE_CAP = 64 * 2**20  # most bytes of capture intermediates at one layer off CUDA
CUDA_CAP_SHARE = 0.05  # of the memory the device can still give
MIN_CAPTURE_CAP = 16 * 2**20
MAX_CAPTURE_CAP = 256 * 2**20  # enough for full-width kernels; more would only raise the peak
MIN_CAPTURE_BUDGET = 2**18  # below this a layer's chunk loop costs more launches than it saves bytes
VALUE_COLUMNS = 128  # value columns per fused call: flash kernels take head widths up to 256
TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def fused_available(device: torch.device) -> bool:
    """Whether SDPA runs a fused kernel on `device`, never forming the N×M maps: on CUDA, and on the
    CPU from torch 2.3 (its flash kernel); elsewhere (MPS, DirectML) it may form them itself."""
    return device.type == "cuda" or (device.type == "cpu" and TORCH_VERSION >= (2, 3))


def capture_cap(device: torch.device) -> int:
    """The most bytes the capture's intermediates may take at any layer: on CUDA a share of what is
    free (the driver's free memory plus the caching allocator's unused reserve), elsewhere fixed."""
    device = torch.device(device)
    if device.type != "cuda":
        return CPU_CAPTURE_CAP
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(min(max(free * CUDA_CAP_SHARE, MIN_CAPTURE_CAP), MAX_CAPTURE_CAP))


def layer_capture_budget(cap: int, q: torch.Tensor) -> int:
    """Bytes the capture may take at one layer: what the layer's own queries take, so that the
    capture at most doubles what the layer holds at any size, within [MIN_CAPTURE_BUDGET, cap]."""
    return int(min(cap, max(q.numel() * q.element_size(), MIN_CAPTURE_BUDGET)))


def capture_chunks(rows: int, heads: int, queries: int, keys: int, budget: int) -> tuple[int, int]:
    """(heads, query rows) per chunk so that a chunk's float32 scores and probabilities (rows, heads,
    chunk, keys) plus the head sum and its running total fit in `budget` bytes: whole heads first,
    then fewer query rows; at least (1, 1)."""
    per_head = rows * queries * keys * 4
    if 4 * per_head <= budget:
        return min(heads, (budget - 2 * per_head) // (2 * per_head)), queries
    return 1, max(1, min(queries, budget // (4 * rows * keys * 4)))


def head_averaged_chunks(q: torch.Tensor, k: torch.Tensor, heads: int, budget: int):
    """Yields (start, softmax(q·kᵀ/√d) averaged over the heads for query rows start…, float32
    (B, chunk, M)), chunk by chunk over heads and query rows, within `budget` bytes."""
    batch, queries, _ = q.shape
    k_heads = split_heads(k, heads).float().transpose(-1, -2).contiguous()  # (B, h, d, M), copied once
    scale = (q.shape[-1] // heads) ** -0.5
    group, chunk = capture_chunks(batch, heads, queries, k.shape[1], budget)
    for start in range(0, queries, chunk):
        q_chunk = split_heads(q[:, start : start + chunk], heads).float()
        total = None
        for first in range(0, heads, group):
            heads_k = k_heads[:, first : first + group]
            part = torch.matmul(q_chunk[:, first : first + group], heads_k).mul_(scale).softmax(-1).sum(1)
            total = part if total is None else total.add_(part)
        yield start, total.div_(heads)


def head_averaged_probabilities(
    q: torch.Tensor, k: torch.Tensor, heads: int, budget: int = CPU_CAPTURE_CAP
) -> torch.Tensor:
    """softmax(q·kᵀ/√d) averaged over the heads, float32 (B, N, M), built chunk by chunk over the
    heads and query rows so that the per-head float32 intermediates stay within `budget` bytes."""
    result = torch.empty(q.shape[0], q.shape[1], k.shape[1], dtype=torch.float32, device=q.device)
    for start, averaged in head_averaged_chunks(q, k, heads, budget):
        result[:, start : start + averaged.shape[1]] = averaged
    return result


def _padded_heads(tensor: torch.Tensor, heads: int, first: int, count: int, width: int, dtype) -> torch.Tensor:
    """Heads first…first+count of (B, N, h·d) as (B, count, N, width) in `dtype`, zero-padded."""
    part = split_heads(tensor, heads)[:, first : first + count].to(dtype)
    return F.pad(part, (0, width - part.shape[-1])) if width > part.shape[-1] else part


def _round8(n: int) -> int:
    return -(-n // 8) * 8


def fused_head_bytes(batch: int, queries: int, keys: int, width: int, item: int) -> int:
    """Bytes of one head's queries, keys, values and output in a fused call, padded to `width`."""
    return 2 * batch * (queries + keys) * width * item


def fused_width(batch: int, queries: int, keys: int, dim: int, columns: int, item: int, budget: int) -> int:
    """The head width of a fused call: wide enough for up to VALUE_COLUMNS value columns when one
    head's queries, keys, values and output fit in `budget`, else the head's own width rounded up
    to 8: more calls, each computing the scores and softmax again for its block of columns (SD's
    heads, 40 or 64 wide, fit wide within their queries' bytes unless upcast or the cap binds)."""
    wide = _round8(max(dim, min(columns, VALUE_COLUMNS)))
    return wide if fused_head_bytes(batch, queries, keys, wide, item) <= budget else _round8(dim)


def fused_head_group(batch: int, queries: int, keys: int, width: int, heads: int, item: int, budget: int) -> int:
    """Heads per fused call so that its queries, keys, values and output fit in `budget`; at least 1."""
    return max(1, min(heads, budget // fused_head_bytes(batch, queries, keys, width, item)))


def head_averaged_product(
    q: torch.Tensor, k: torch.Tensor, heads: int, x: torch.Tensor, budget: int, upcast: bool = False
) -> torch.Tensor:
    """(mean over heads of softmax(q_h·k_hᵀ/√d)) @ x, float32 (B, N, T): the fused attention kernel
    with x as the values (S-CFG's SA·CA, arXiv 2404.05384 §3.2), so the N×M maps are never formed.
    Fused kernels want one width for queries, keys and values: q and k are zero-padded to it (zeros
    add nothing to the scores; the scale stays 1/√d), x is cut into column blocks of that width."""
    batch, queries, channels = q.shape
    dim = channels // heads
    dtype = torch.float32 if upcast else q.dtype
    item = torch.finfo(dtype).bits // 8
    width = fused_width(batch, queries, k.shape[1], dim, x.shape[-1], item, budget)
    group = fused_head_group(batch, queries, k.shape[1], width, heads, item, budget)
    block = min(width, VALUE_COLUMNS)
    out = torch.zeros(batch, queries, x.shape[-1], dtype=torch.float32, device=q.device)
    for first_column in range(0, x.shape[-1], block):
        columns = x[..., first_column : first_column + block]
        count = columns.shape[-1]
        values = F.pad(columns.to(dtype), (0, width - count))[:, None]
        values = values.expand(-1, group, -1, -1).contiguous() if group > 1 else values  # once per block
        for first in range(0, heads, group):
            n = min(group, heads - first)
            qh, kh = (_padded_heads(t, heads, first, n, width, dtype) for t in (q, k))
            part = F.scaled_dot_product_attention(qh, kh, values[:, :n], dropout_p=0.0, scale=dim**-0.5)
            out[..., first_column : first_column + count] += part[..., :count].sum(1, dtype=torch.float32)
    return out.div_(heads)


class HeadAveragedMaps:
    """The head-averaged probabilities (B, N, M) of q and k, kept as q and k: `maps @ x` goes
    through the fused attention kernel (`head_averaged_product`); the (B, N, M) map is never formed."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, heads: int, budget: int, upcast: bool = False):
        self.q, self.k, self.heads, self.budget, self.upcast = q, k, heads, budget, upcast
        self.shape = (q.shape[0], q.shape[1], k.shape[1])

    def take(self, rows: list[int]) -> HeadAveragedMaps:
        """The maps of `rows` of the batch."""
        q, k = select_rows(self.q, rows), select_rows(self.k, rows)
        return HeadAveragedMaps(q, k, self.heads, self.budget, self.upcast)

    def __matmul__(self, x: torch.Tensor) -> torch.Tensor:
        """maps (B, N, M) @ x (B, M, T) → (B, N, T) float32."""
        if fused_available(self.q.device):
            return head_averaged_product(self.q, self.k, self.heads, x, self.budget, self.upcast)
        return chunked_product(self.q, self.k, self.heads, x, self.budget)


def chunked_product(q: torch.Tensor, k: torch.Tensor, heads: int, x: torch.Tensor, budget: int) -> torch.Tensor:
    """`head_averaged_product` without the fused kernel: the head-averaged maps chunk by chunk
    (within `budget`), each chunk times x."""
    x = x.float()
    out = x.new_empty(q.shape[0], q.shape[1], x.shape[-1])
    for start, averaged in head_averaged_chunks(q, k, heads, budget):
        out[:, start : start + averaged.shape[1]] = averaged @ x
    return out


def head_averaged_maps(
    q: torch.Tensor, k: torch.Tensor, heads: int, budget: int, upcast: bool = False
) -> torch.Tensor | HeadAveragedMaps:
    """The head-averaged probabilities as a tensor when (B, N, M) float32 fits in `budget`, else as
    `HeadAveragedMaps` (products through the fused kernel: self-attention at high resolution)."""
    if q.shape[0] * q.shape[1] * k.shape[1] * 4 <= budget:
        return head_averaged_probabilities(q, k, heads, budget)
    return HeadAveragedMaps(q, k, heads, budget, upcast)


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
