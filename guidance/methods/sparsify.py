"""Tensor helpers shared by SEGA and concept steering: the per-image, per-channel quantile tail,
the compute dtype, and a finiteness check that does not stall the GPU every step."""

from __future__ import annotations

import torch

from ..engine import GuidanceError


class NonFinitePrediction(GuidanceError):
    """The UNet gave NaN or infinite predictions; the image falls back to the host's CFG."""


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float32 for half precision (torch.quantile rejects fp16/bf16), otherwise the tensor's own."""
    return torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else tensor.dtype


def quantile_tail(x: torch.Tensor, q: float) -> torch.Tensor:
    """Keep the elements of x (…, H, W) with |x| ≥ the q-quantile of |x| over H·W, separately for
    every leading index (image, channel); zero the rest. Linear interpolation, ties kept."""
    magnitude = x.abs()
    threshold = torch.quantile(magnitude.flatten(start_dim=-2).to(compute_dtype(x)), q, dim=-1)
    return torch.where(magnitude >= threshold[..., None, None].to(x.dtype), x, torch.zeros_like(x))


class FiniteCheck:
    """Raises NonFinitePrediction when a watched tensor holds NaN or inf.

    On the CPU it checks at once. On an accelerator, reading a flag forces a sync, so the flag of
    step t is read at the next `watch` (its kernels finished long ago) or at `flush`; the last step
    of the run is checked at once."""

    def __init__(self, source: str):
        self.source = source
        self.pending: tuple[torch.Tensor, int] | None = None

    def watch(self, tensors: list[torch.Tensor], step: int, total_steps: int) -> None:
        finite = torch.stack([torch.isfinite(t).all() for t in tensors]).all()
        self.flush()
        self.pending = (finite, step)
        if not self.deferred(finite) or step >= total_steps - 1:
            self.flush()

    @staticmethod
    def deferred(flag: torch.Tensor) -> bool:
        return flag.device.type != "cpu"

    def flush(self) -> None:
        if self.pending is None:
            return
        finite, step = self.pending
        self.pending = None
        if not bool(finite):
            raise NonFinitePrediction(f"{self.source}: the predictions of step {step} are not finite (NaN or inf)")
