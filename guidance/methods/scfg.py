"""S-CFG region scales (arXiv 2404.05384; authors' code SmilesDZgk/S-CFG), METHODS.md §3.

Per step, the attention router hands this object the head-averaged float32 probabilities of every
transformer block whose downsampling factor r is in {R, 2R, …} (r ≤ 8): first the block's
self-attention SA (rows, h·w, h·w), then its cross-attention CA (rows, h·w, T). Per block the
smoothed token maps are (SA + 3·SA²)/4 · CA (the authors' power-series quirk), computed as
(SA·CA + 3·SA·(SA·CA))/4 so that no h·w × h·w product is formed; SA is dropped as soon as the
block's CA is seen (an SA larger than the layer's capture budget arrives as `HeadAveragedMaps`, never
formed at all: its products run through the fused attention kernel with CA as the values). The
cond rows give the 77 token maps, the uncond rows only the foreground pair
[token 0, Σ other tokens] (the maps are linear in CA, so the pair is propagated instead of all
token maps). As each block's CA arrives its maps are upsampled to the R grid, smoothed, normalised
and added to the image's sum, so memory holds one block's maps at a time; `rate` turns the sums
into the per-position CFG factor and drops them.

Everything stays on the device; nothing in the per-step path reads a tensor value on the host.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..attention import HeadAveragedMaps, select_rows
from ..engine import ImageStep, schedule_index

UNCOND, COND = "uncond", "cond"
MAX_FACTOR = 8
EPS = 1e-8


def gaussian_kernel(kernel_size: int = 3, sigma: float = 0.5) -> torch.Tensor:
    """The authors' smoothing kernel (their `GaussianSmoothing`), float32 (k, k): per axis
    exp(−((x − mean)/(2σ))²) — 2σ inside the square, so the effective σ is σ·√2 — times the
    normalising constant, multiplied over both axes, then divided by its sum."""
    grids = torch.meshgrid(*[torch.arange(kernel_size, dtype=torch.float32)] * 2, indexing="ij")
    kernel = torch.ones((), dtype=torch.float32)
    mean = (kernel_size - 1) / 2
    for grid in grids:
        kernel = kernel * (1 / (sigma * math.sqrt(2 * math.pi)) * torch.exp(-(((grid - mean) / (2 * sigma)) ** 2)))
    return kernel / kernel.sum()


_KERNELS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def smooth(maps: torch.Tensor) -> torch.Tensor:
    """3×3 smoothing of every channel of (n, C, h, w), reflect padding (replicate where a side is
    too short to reflect)."""
    key = (maps.device, maps.dtype)
    kernel = _KERNELS.get(key)
    if kernel is None:
        kernel = _KERNELS[key] = gaussian_kernel().to(device=maps.device, dtype=maps.dtype)[None, None]
    n, channels, h, w = maps.shape
    flat = maps.reshape(n * channels, 1, h, w)
    mode = "reflect" if h > 1 and w > 1 else "replicate"
    return F.conv2d(F.pad(flat, (1, 1, 1, 1), mode=mode), kernel).reshape(n, channels, h, w)


def propagate(self_attention, cross_attention: torch.Tensor) -> torch.Tensor:
    """(SA + 3·SA·SA)/4 · CA as (SA·CA + 3·SA·(SA·CA))/4: (n, N, N), (n, N, T) → (n, N, T). SA is a
    tensor or `HeadAveragedMaps` (the products then through the fused kernel, the N×N map never formed)."""
    first = self_attention @ cross_attention
    return (first + 3 * (self_attention @ first)) / 4


def foreground_pair(cross_attention: torch.Tensor) -> torch.Tensor:
    """[token 0, Σ tokens 1..] columns of (n, N, T) → (n, N, 2)."""
    return torch.stack([cross_attention[..., 0], cross_attention[..., 1:].sum(-1)], dim=-1)


def to_grid(maps: torch.Tensor, map_size: tuple[int, int], grid_size: tuple[int, int]) -> torch.Tensor:
    """(n, h·w, C) → (n, C, h, w), upsampled bilinearly (align_corners=False) to `grid_size`."""
    h, w = map_size
    grid = maps.transpose(1, 2).reshape(maps.shape[0], maps.shape[2], h, w)
    if (h, w) != tuple(grid_size):
        grid = F.interpolate(grid, size=tuple(grid_size), mode="bilinear", align_corners=False)
    return grid


def normalize(maps: torch.Tensor, half: str) -> torch.Tensor:
    """Each smoothed map (n, C, h, w) over its mean; the cond maps with +1e-8 (the authors')."""
    if half == COND:
        return maps / (maps.mean(dim=(2, 3), keepdim=True) + EPS)
    return maps / maps.mean(dim=(2, 3), keepdim=True)


def region_rate(
    token_maps: torch.Tensor,
    fore_maps: torch.Tensor,
    direction: torch.Tensor,
    cfg_scale: float,
    rate_min: float = 0.8,
    rate_max: float = 3.0,
    rate_cap: float = 15.0,
) -> dict[str, torch.Tensor]:
    """One image's rate map from its layer-averaged normalised maps.

    token_maps (T, hm, wm): cond token maps; fore_maps (2, hm, wm): uncond [token 0, rest];
    direction (C, H, W): εp − ε∅. Returns every intermediate; `rate` is (1, H, W) float32."""
    height, width = direction.shape[-2:]
    ca_mask = (token_maps == token_maps.amax(0, keepdim=True)).float()
    fore_mask = 1.0 - (fore_maps == fore_maps.amax(0, keepdim=True)).float()[:1]
    mask_t = F.interpolate(ca_mask[None], size=(height, width), mode="nearest")[0]
    mask_f = F.interpolate(fore_mask[None], size=(height, width), mode="nearest")[0]
    norm = direction.float().norm(dim=0, keepdim=True)  # (1, H, W)
    area = mask_t.sum((1, 2))
    region_mean = (norm * mask_t).sum((1, 2)) / (area + EPS)
    fore_mean = (norm * mask_f).sum((1, 2)) / (mask_f.sum((1, 2)) + EPS)
    rate_per_token = fore_mean * (area > 0).float() / (region_mean + EPS)
    painted = torch.einsum("t,thw->hw", rate_per_token, mask_t)[None]
    clamped = painted.clamp(min=rate_min, max=rate_max).clamp_max(rate_cap / cfg_scale)
    rate = smooth(clamped[None])[0]
    return {
        "ca_normalized": token_maps,
        "fore_normalized_uncond": fore_maps,
        "ca_mask": ca_mask,
        "fore_mask": fore_mask,
        "region_mean_delta_norm": region_mean,
        "foreground_mean_delta_norm": fore_mean,
        "rate_per_token": rate_per_token,
        "rate_clamped_before_smoothing": clamped,
        "rate": rate,
    }


@dataclass(frozen=True)
class RegionCapture:
    """One image's regions at the last step S-CFG scaled, kept as device tensors only while
    diagnostics are on; read on the host once, when the picture is drawn (`record`)."""

    step: int
    total_steps: int
    regions: torch.Tensor  # (hm, wm): the token column whose map is largest at each position
    token_rates: torch.Tensor  # (T,): each token's region's CFG factor, clamped as applied
    labels: Mapping[int, str]  # token column → the phrase it belongs to (concepts), where known

    def record(self, title: str = ""):
        """The `diagnostics.RegionRecord` of this capture."""
        from ..diagnostics import RegionRecord

        regions = self.regions.tolist()
        rates = self.token_rates.tolist()
        present = sorted({column for row in regions for column in row})
        return RegionRecord(
            title=title,
            step=self.step,
            total_steps=self.total_steps,
            regions=tuple(tuple(row) for row in regions),
            rates={column: rates[column] for column in present},
            labels={column: self.labels[column] for column in present if column in self.labels},
        )


def region_capture(result: Mapping[str, torch.Tensor], image_step: ImageStep, scales, labels) -> RegionCapture:
    """The regions and the clamped per-token rates of one `region_rate` result (no host read)."""
    ceiling = min(scales.rate_max, scales.rate_cap / image_step.cfg_scale)
    rates = result["rate_per_token"].clamp(min=scales.rate_min).clamp_max(ceiling)
    regions = result["ca_mask"].argmax(0)
    return RegionCapture(image_step.step, image_step.total_steps, regions, rates, labels)


@dataclass
class _Accumulator:
    total: torch.Tensor | None = None
    count: int = 0


class RegionScales:
    """S-CFG as a `RegionScale` of the engine and the capture sink of the attention router."""

    def __init__(
        self,
        batch_size: int,
        mask_factor: int = 4,
        rate_min: float = 0.8,
        rate_max: float = 3.0,
        rate_cap: float = 15.0,
        start: float = 0.0,
        end: float = 1.0,
        keep_intermediates: bool = False,
    ):
        if mask_factor < 1 or mask_factor & (mask_factor - 1) or mask_factor > MAX_FACTOR:
            raise ValueError(f"mask factor R must be 1, 2, 4 or 8, not {mask_factor}")
        self.batch_size = batch_size
        self.mask_factor = mask_factor
        self.rate_min, self.rate_max, self.rate_cap = rate_min, rate_max, rate_cap
        self.start, self.end = start, end
        self.factors = tuple(2**e * mask_factor for e in range(4) if 2**e * mask_factor <= MAX_FACTOR)
        self.keep_intermediates = keep_intermediates
        self.intermediates: dict[int, dict[str, torch.Tensor]] = {}
        self._step: int | None = None
        self._latent_size: tuple[int, int] | None = None
        self._acc: dict[tuple[int, str], _Accumulator] = {}
        self._self_attention: dict[tuple, tuple[torch.Tensor, tuple]] = {}
        self.stopped = False
        self.notes: list[str] = []  # for the adapter's report, taken through GuidanceRun.take_notes
        self.nonfinite: torch.Tensor | None = None  # device flag: a rate map was not finite
        # the model's attention levels, learnt from the first capture call (shapes, no sync); until
        # then R = 8 also captures factor 4, the coarsest level of SDXL-like models (no factor 8)
        self.levels: tuple[int, ...] | None = None
        self._seen: set[int] = set()
        self._used: tuple[int, ...] = self.factors
        self._fallback: dict[tuple[int, str], _Accumulator] = {}
        self._fallback_blocks = 0
        self.blocks_captured = 0  # "acted" counters, counted on the Python side
        self.rate_steps: set[int] = set()
        # with diagnostics on ({} instead of None): per image its last step's regions, and per image
        # {token column: phrase} to name them
        self.region_log: dict[int, RegionCapture] | None = None
        self.token_labels: dict[int, Mapping[int, str]] = {}

    @classmethod
    def from_settings(cls, settings, batch_size: int) -> RegionScales:
        return cls(
            batch_size,
            mask_factor=int(settings.scfg_mask_factor),
            rate_min=float(settings.scfg_rate_min),
            rate_max=float(settings.scfg_rate_max),
            rate_cap=float(settings.scfg_rate_cap),
            start=float(settings.scfg_start),
            end=float(settings.scfg_end),
        )

    # -- schedule ---------------------------------------------------------------------------------
    def active(self, step: int, total_steps: int) -> bool:
        if self.stopped:
            return False
        return schedule_index(self.start, total_steps) <= step < schedule_index(self.end, total_steps)

    def stop(self) -> None:
        """No region scaling for the rest of the run (the attention capture failed); drops captures."""
        self.stopped = True
        self._acc.clear()
        self._fallback.clear()
        self._self_attention.clear()

    def _note(self, message: str) -> None:
        if message not in self.notes:
            self.notes.append(message)

    def note(self, message: str) -> None:
        """A note from the router (e.g. layers whose maps match no level of the latent), once."""
        self._note(message)

    def wants(self, factor: int) -> bool:
        """Whether blocks at downsampling factor r = H_latent/h are captured (the router asks for
        every layer of a capture call, so the levels the model has are learnt here)."""
        self._seen.add(factor)
        if self.levels is None:
            return factor in self.factors or factor == fallback_factor(self.mask_factor)
        return factor in self._used

    def _learn_levels(self) -> None:
        """After the first capture call: the factors the model has, the ones S-CFG uses, one note
        when R has no level of its own (a coarser R than the model has takes its coarsest level)."""
        if self.levels is not None or not self._seen:
            return
        self.levels = tuple(sorted(self._seen))
        self._used = used_factors(self.factors, self.levels, self.mask_factor)
        present = ", ".join(str(f) for f in self.levels)
        if not self._used:
            self._note(
                f"S-CFG: this model has no attention at R = {self.mask_factor} or coarser (its levels: {present}); "
                "it does not act."
            )
        elif not set(self._used) & set(self.factors):
            self._note(
                f"S-CFG: this model has no attention at R = {self.mask_factor} (its levels: {present}); the "
                f"R = {self.mask_factor} masks are pooled from its coarsest maps (factor {self._used[0]})."
            )
            self._acc.update(self._fallback)
            self.blocks_captured += self._fallback_blocks
        self._fallback.clear()

    # -- capture sink -----------------------------------------------------------------------------
    def begin_call(self, rows) -> None:
        """Before each UNet call (`CallRows`): a new step drops everything of earlier steps; the
        halves this call holds replace whatever the images had for them."""
        self._learn_levels()
        if rows.step != self._step or tuple(rows.latent_size) != self._latent_size:
            self._step = rows.step
            self._latent_size = tuple(rows.latent_size)
            self._acc.clear()
            self._fallback.clear()
        self._self_attention.clear()
        for half, per_image in ((UNCOND, rows.uncond), (COND, rows.cond)):
            for image, row in enumerate(per_image):
                if row is not None:
                    self._acc.pop((image, half), None)

    def grid_size(self) -> tuple[int, int]:
        """The R grid: the latent side after log2(R) ceil-halvings."""
        h, w = self._latent_size
        factor = 1
        while factor < self.mask_factor:
            h, w, factor = -(-h // 2), -(-w // 2), factor * 2
        return h, w

    def record(
        self,
        key,
        probs: torch.Tensor,
        map_size: tuple[int, int],
        factor: int,
        rows: Sequence[tuple[int, str]],
    ) -> None:
        """Head-averaged float32 probabilities (n, h·w, M) of one attention layer; `rows[j]` is
        (image, "uncond" | "cond") of probs[j]. Self-attention must come before the cross-attention
        of the same transformer block."""
        block = (key.section, key.block, key.transformer)
        rows = tuple(rows)
        if key.kind == "self":
            self._self_attention[block] = (probs, rows)
            return
        paired = self._self_attention.pop(block, None)
        if paired is None or paired[1] != rows:
            return
        self_attention = paired[0]
        if self.levels is None and factor not in self.factors:
            self._fallback_blocks += 1  # counted only if the fallback is taken
        else:
            self.blocks_captured += 1
        grid = self.grid_size()
        for half in (UNCOND, COND):
            picked = [j for j, (_, h) in enumerate(rows) if h == half]
            if not picked:
                continue
            sa = _take(self_attention, picked)
            ca = _take(probs, picked)
            if half == UNCOND:
                ca = foreground_pair(ca)
            maps = smooth(to_grid(propagate(sa, ca), map_size, grid))
            self._accumulate(half, normalize(maps, half), [rows[j][0] for j in picked], factor)

    def _accumulate(self, half: str, normalized: torch.Tensor, images: list[int], factor: int) -> None:
        """Adds one block's normalised maps to the images' sums at once (begin_call drops the sums
        of halves a later call holds again), so no block's maps wait for the step's end; a block at
        the fallback factor, while the levels are not known, goes to the fallback sums."""
        speculative = self.levels is None and factor not in self.factors
        sums = self._fallback if speculative else self._acc
        for j, image in enumerate(images):
            acc = sums.setdefault((image, half), _Accumulator())
            acc.total = normalized[j] if acc.total is None else acc.total + normalized[j]
            acc.count += 1

    # -- RegionScale ------------------------------------------------------------------------------
    def rate(self, image_step: ImageStep) -> torch.Tensor:
        """The rate map (1, H, W) of one image, from this step's captures (which are dropped).
        Without captures of both halves the rate is 1 (plain CFG)."""
        self._learn_levels()
        cond = self._acc.pop((image_step.image, COND), None)
        uncond = self._acc.pop((image_step.image, UNCOND), None)
        direction = image_step.direction
        if image_step.cfg_scale <= 0:
            scale = f"{image_step.cfg_scale:g}"
            self._note(f"S-CFG: at CFG scale {scale} there is no CFG direction to scale; it does not act.")
        if cond is None or uncond is None or self._step != image_step.step or image_step.cfg_scale <= 0:
            return torch.ones((1, 1, 1), dtype=direction.dtype, device=direction.device)
        token_maps, fore_maps = cond.total / cond.count, uncond.total / uncond.count
        self.rate_steps.add(image_step.step)
        result = region_rate(
            token_maps,
            fore_maps,
            direction,
            image_step.cfg_scale,
            self.rate_min,
            self.rate_max,
            self.rate_cap,
        )
        if self.keep_intermediates:
            self.intermediates[image_step.image] = result
        if self.region_log is not None:
            self._log_regions(result, image_step)
        return self._finite_or_one(result["rate"], (token_maps, fore_maps)).to(direction.dtype)

    def _log_regions(self, result: Mapping[str, torch.Tensor], image_step: ImageStep) -> None:
        """Keep this step's regions of the image for its picture; a failure stops the log, not S-CFG."""
        try:
            labels = self.token_labels.get(image_step.image, {})
            self.region_log[image_step.image] = region_capture(result, image_step, self, labels)
        except Exception as error:  # the picture is optional, the image is not
            self.region_log = None
            self._note(f"diagnostics: S-CFG's regions are not recorded ({type(error).__name__}: {error}).")

    def region_capture(self, image: int) -> RegionCapture | None:
        """What was recorded of image `image` for the diagnostics picture; None when nothing was."""
        return None if self.region_log is None else self.region_log.get(image)

    def _finite_or_one(self, rate: torch.Tensor, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """The rate, or 1 everywhere (plain CFG) when it or the maps it came from hold NaN/inf; the
        flag stays on the device (no sync)."""
        finite = torch.stack([torch.isfinite(t).all() for t in (rate, *maps)]).all()
        self.nonfinite = ~finite if self.nonfinite is None else self.nonfinite | ~finite
        return torch.where(finite, rate, torch.ones_like(rate))


def fallback_factor(mask_factor: int) -> int | None:
    """The level captured, while the model's levels are unknown, in case it has none at R: only for
    R = 8 (SDXL-like models stop at factor 4; every SD-family UNet has attention at 4)."""
    return MAX_FACTOR // 2 if mask_factor == MAX_FACTOR else None


def used_factors(factors: Sequence[int], levels: Sequence[int], mask_factor: int) -> tuple[int, ...]:
    """The captured factors: R, 2R, … that the model has, else its coarsest level below R when that
    is the fallback level (pooled to the R grid), else none."""
    used = tuple(f for f in factors if f in levels)
    if used:
        return used
    fallback = fallback_factor(mask_factor)
    return (fallback,) if fallback in levels else ()


def _take(maps, rows: list[int]):
    """Rows of a tensor or of `HeadAveragedMaps`, without a device index tensor."""
    if isinstance(maps, HeadAveragedMaps):
        return maps.take(rows)
    return select_rows(maps, rows)
