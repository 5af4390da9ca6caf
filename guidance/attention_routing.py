"""Routing of the UNet's attention layers through the kernel, shared by both host adapters.

The adapter names layers with `LayerKey` (from an ldm/sgm module name in A1111, from Forge's
`extra_options`), asks `AttentionRouter.routed_layers` which layers to patch for the run, calls
`begin_call` once before every UNet call with the rows of that call (`CallRows`) and sends every
patched layer's projected q, k, v through `AttentionRouter.forward`. Layers and calls no method
needs take the fast path (SDPA, numerically the hosts' own SDP attention).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .attention import (
    attention,
    capture_cap,
    head_averaged_maps,
    head_averaged_probabilities,
    layer_capture_budget,
    select_rows,
)

SECTIONS = ("input", "middle", "output")
KINDS = ("self", "cross")
MAX_LEVEL = 8

_MODULE_NAME = re.compile(
    r"(?:^|\.)(?:(input_blocks|output_blocks)\.(\d+)|(middle_block))\.\d+\.transformer_blocks\.(\d+)\.attn([12])$"
)
_KIND_ALIASES = {"self": "self", "cross": "cross", "attn1": "self", "attn2": "cross", 1: "self", 2: "cross"}


@dataclass(frozen=True, order=True)
class LayerKey:
    """One attention layer of the UNet: `input_blocks[block]` / `middle_block` (block 0) /
    `output_blocks[block]`, transformer `transformer` of its SpatialTransformer, self or cross."""

    section: str
    block: int
    transformer: int
    kind: str

    @classmethod
    def from_module_name(cls, name: str) -> LayerKey | None:
        """`[model.][diffusion_model.]input_blocks.7.1.transformer_blocks.0.attn2` and the like;
        None for any other name."""
        match = _MODULE_NAME.search(name)
        if match is None:
            return None
        blocks, index, middle, transformer, attn = match.groups()
        section = "middle" if middle else ("input" if blocks == "input_blocks" else "output")
        return cls(section, 0 if middle else int(index), int(transformer), "self" if attn == "1" else "cross")

    @classmethod
    def from_forge(cls, block: tuple[str, int], block_index: int, kind) -> LayerKey:
        """Forge's `extra_options["block"]` (e.g. ("input", 7)), `extra_options["block_index"]` and
        the patch kind ("self"/"cross" or "attn1"/"attn2")."""
        section, index = block
        if section not in SECTIONS:
            raise ValueError(f"unknown block section {section!r}")
        if kind not in _KIND_ALIASES:
            raise ValueError(f"unknown attention kind {kind!r}")
        return cls(str(section), int(index), int(block_index), _KIND_ALIASES[kind])


@dataclass(frozen=True)
class CallRows:
    """Rows of one UNet call: `uncond[i]` / `cond[i]` is the row holding image i's uncond / first
    cond prediction in this call, None when that row is not in this call."""

    step: int
    total_steps: int
    latent_size: tuple[int, int]  # (H, W) of the UNet input latent
    uncond: tuple[int | None, ...]
    cond: tuple[int | None, ...]


def map_size(latent_size: tuple[int, int], tokens: int) -> tuple[int, int, int] | None:
    """(h, w, r) of a layer with `tokens` spatial positions: the latent after k ceil-halvings
    (ldm's stride-2 downsampling), r = 2^k; None when no level matches (e.g. ToMe, Hypertile)."""
    h, w = latent_size
    factor = 1
    while factor <= 64:
        if h * w == tokens:
            return h, w, factor
        if h == 1 and w == 1:
            break
        h, w, factor = -(-h // 2), -(-w // 2), factor * 2
    return None


def _runs(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for index in sorted(set(indices)):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    return runs


def regulation_layer_keys(choice: str, cross_keys: Iterable[LayerKey]) -> set[LayerKey]:
    """The cross-attention layers a regulation layer choice selects, from the layers present.

    "last down": the input blocks of the last contiguous run of input blocks with attention (each
    down level with attention is such a run, levels are separated by downsampling blocks without
    attention): SD1/SD2 input 7, 8; SDXL input 7, 8. "first up": the first (run length + 1) output
    blocks with attention (an up level has one block more than its down level): SD1/SD2 output
    3, 4, 5; SDXL output 0, 1, 2. Every transformer of the chosen blocks is included (SDXL: 10 per
    block); `regulation_bias_leaders` says which of them optimise."""
    cross = {key for key in cross_keys if key.kind == "cross"}
    if choice == "all cross-attention":
        return cross
    inputs = _runs([key.block for key in cross if key.section == "input"])
    last_down = inputs[-1] if inputs else []
    outputs = sorted({key.block for key in cross if key.section == "output"})
    first_up = outputs[: len(last_down) + 1] if last_down else outputs[:1]
    chosen: set[LayerKey] = set()
    if choice in ("last down + first up", "last down"):
        chosen |= {key for key in cross if key.section == "input" and key.block in last_down}
    if choice in ("last down + first up", "first up"):
        chosen |= {key for key in cross if key.section == "output" and key.block in first_up}
    if choice not in ("last down + first up", "last down", "first up"):
        raise ValueError(f"unknown regulation layer choice {choice!r}")
    return chosen


def regulation_bias_leaders(choice: str, chosen: Iterable[LayerKey]) -> dict[LayerKey, LayerKey]:
    """Per chosen layer, the layer whose optimised bias it applies: for the block choices the first
    chosen transformer of its block (one per block on SD1/SD2, the paper's setting; SDXL's chosen
    blocks hold 10 each, optimising all would be ~10× the paper's work per step); for "all
    cross-attention", itself (every layer optimised)."""
    chosen = sorted(chosen)
    if choice == "all cross-attention":
        return {key: key for key in chosen}
    leaders: dict[tuple[str, int], LayerKey] = {}
    for key in chosen:  # sorted: the lowest transformer index of a block comes first
        leaders.setdefault((key.section, key.block), key)
    return {key: leaders[(key.section, key.block)] for key in chosen}


class AttentionRouter:
    """Decides per layer and UNet call which path the kernel takes and feeds the methods.

    `region_scales`: an S-CFG `RegionScales` (capture sink), or None. `regulator`: an
    `AttentionRegulator`, or None."""

    def __init__(self, region_scales=None, regulator=None):
        self.region_scales = region_scales
        self.regulator = regulator
        self.regulated: set[LayerKey] = set()
        self.rows: CallRows | None = None
        self._capture = False
        self._regulate = False
        self._capture_rows: list[int] = []
        self._capture_meta: list[tuple[int, str]] = []
        self._cond_rows: list[tuple[int, int]] = []
        self._sizes: dict[int, tuple[int, int, int] | None] = {}
        self._cap: int | None = None  # the device's cap on capture bytes, read once per UNet call
        self.stopped = False
        self.nonfinite: torch.Tensor | None = None  # device flag: a regulated output was not finite
        self.calls = 0  # UNet calls begun (counted on the Python side)

    # -- set-up -----------------------------------------------------------------------------------
    def routed_layers(self, keys: Iterable[LayerKey]) -> set[LayerKey]:
        """The layers the adapter must route through `forward` this run. S-CFG: every self- and
        cross-attention layer (which blocks sit at r ∈ {R, 2R, …} depends on the latent size, known
        per call; the others take the fast path). Regulation: its selected cross-attention layers."""
        keys = set(keys)
        routed: set[LayerKey] = set()
        if self.region_scales is not None:
            routed |= keys
        if self.regulator is not None:
            self.regulated = regulation_layer_keys(self.regulator.layers, keys)
            self.regulator.leaders = regulation_bias_leaders(self.regulator.layers, self.regulated)
            routed |= self.regulated
        return routed

    def active(self, step: int, total_steps: int) -> bool:
        """Whether any attention work (capture or bias) is needed at this step; adapters route no
        layer when it is not."""
        if self.stopped:
            return False
        return self._scfg_active(step, total_steps) or self._regulation_active(step, total_steps)

    def stop(self) -> None:
        """Ends every attention method for the rest of the run (after an error in the kernel):
        the region scales stop too, so that no step uses a partial capture."""
        self.stopped = True
        self.end()
        if self.region_scales is not None:
            self.region_scales.stop()

    def nonfinite_seen(self) -> bool:
        """Whether a regulated output had NaN/inf values (replaced by the plain attention). Reads a
        device flag: call once after the run, never per step."""
        flags = [self.nonfinite, getattr(self.region_scales, "nonfinite", None)]
        return any(flag is not None and bool(flag) for flag in flags)

    def _scfg_active(self, step: int, total_steps: int) -> bool:
        return self.region_scales is not None and self.region_scales.active(step, total_steps)

    def _regulation_active(self, step: int, total_steps: int) -> bool:
        return self.regulator is not None and bool(self.regulated) and self.regulator.active(step, total_steps)

    def begin_call(self, rows: CallRows) -> None:
        """Once before every UNet call, with the rows of that call."""
        self.rows = rows
        self.calls += 1
        self._sizes = {}
        self._cap = None
        if self.stopped:
            return
        self._capture = self._scfg_active(rows.step, rows.total_steps)
        self._regulate = self._regulation_active(rows.step, rows.total_steps)
        meta = [(row, image, "uncond") for image, row in enumerate(rows.uncond) if row is not None]
        meta += [(row, image, "cond") for image, row in enumerate(rows.cond) if row is not None]
        meta.sort()
        self._capture_rows = [row for row, _, _ in meta]
        self._capture_meta = [(image, half) for _, image, half in meta]
        self._cond_rows = sorted((row, image) for image, row in enumerate(rows.cond) if row is not None)
        if self._capture:
            self.region_scales.begin_call(rows)

    def end(self) -> None:
        """After the run (or between passes): no call is current any more."""
        self.rows = None
        self._capture = self._regulate = False

    def _size(self, tokens: int) -> tuple[int, int, int] | None:
        if tokens not in self._sizes:
            self._sizes[tokens] = map_size(self.rows.latent_size, tokens)
        return self._sizes[tokens]

    # -- the kernel -------------------------------------------------------------------------------
    def forward(
        self, key: LayerKey, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False
    ) -> torch.Tensor:
        """Attention of one routed layer: q (rows, N, h·d), k, v (rows, M, h·d) → (rows, N, h·d)."""
        if not (self._capture or self._regulate):
            return attention(q, k, v, heads, upcast)
        size = self._size(q.shape[1])
        if size is None:
            self._note_unmatched(key)
            return attention(q, k, v, heads, upcast)
        if self._capture_rows and self._capture_rows[-1] >= q.shape[0]:
            return attention(q, k, v, heads, upcast)
        h, w, factor = size
        capture = self._capture and self.region_scales.wants(factor) and bool(self._capture_rows)
        regulate = self._regulate and key.kind == "cross" and key in self.regulated and bool(self._cond_rows)
        if not (capture or regulate):
            return attention(q, k, v, heads, upcast)
        out = attention(q, k, v, heads, upcast)
        regulated_probs: dict[int, torch.Tensor] = {}
        if regulate:
            plain_out = out
            out, probs = self.regulator.forward(
                key, q, k, v, heads, self._cond_rows, (h, w), self.rows.step, upcast=upcast, out=out
            )
            out = self._finite_or_plain(out, plain_out)
            if probs is not None:
                rows = [row for row, image in self._cond_rows if self.regulator.targets[image]]
                regulated_probs = {row: probs[j] for j, row in enumerate(rows)}
        if capture:
            probs = self._captured(key, q, k, heads, regulated_probs, upcast)
            self.region_scales.record(key, probs, (h, w), factor, self._capture_meta)
        return out

    def _note_unmatched(self, key: LayerKey) -> None:
        """One note per method that wanted a layer whose positions match no downsampling of the
        latent (another extension reshapes the attention, e.g. ToMe or Hypertile)."""
        why = "some attention layers' maps match no level of the latent (an extension such as ToMe or Hypertile "
        if self._capture:
            self.region_scales.note(f"S-CFG: {why}reshapes them); they are not captured.")
        if self._regulate and key.kind == "cross" and key in self.regulated:
            self.regulator.note(f"Attention regulation: {why}reshapes them); they are not regulated.")

    def _captured(self, key: LayerKey, q, k, heads: int, regulated_probs: dict[int, torch.Tensor], upcast: bool):
        """The head-averaged probabilities of the capture rows, within the layer's capture budget:
        the regulated rows' own where regulation ran; a self-attention map too large for the budget
        as `HeadAveragedMaps` (S-CFG only multiplies by it, through the fused kernel)."""
        if self._cap is None:
            self._cap = capture_cap(q.device)
        budget = layer_capture_budget(self._cap, q)
        plain_rows = [row for row in self._capture_rows if row not in regulated_probs]
        q_rows, k_rows = select_rows(q, plain_rows), select_rows(k, plain_rows)
        if key.kind == "self":  # never regulated: every capture row is plain
            return head_averaged_maps(q_rows, k_rows, heads, budget, upcast)
        plain = head_averaged_probabilities(q_rows, k_rows, heads, budget)
        if not regulated_probs:
            return plain
        lookup = {row: plain[j] for j, row in enumerate(plain_rows)}
        lookup.update(regulated_probs)
        return torch.stack([lookup[row] for row in self._capture_rows])

    def _finite_or_plain(self, out: torch.Tensor, plain: torch.Tensor) -> torch.Tensor:
        """`out` where finite, else the plain attention; the flag stays on the device (no sync)."""
        bad = ~torch.isfinite(out)
        seen = bad.any()
        self.nonfinite = seen if self.nonfinite is None else self.nonfinite | seen
        return torch.where(bad, plain, out)
