"""The diagnostics picture, one per image, a panel per method and pass. Concept steering
(ConceptDiffusion, arXiv 2312.15964): each concept's similarity |cos(P, c)| over the steps with its
threshold, the steps where its guidance was added, and the warm-up/cool-down window outside which
nothing is steered. S-CFG: the region map of its last step. Attention regulation: each target
token's attention map with the plain softmax and with the optimised bias.

Each panel is drawn with PIL (both hosts ship it) from a plain record of numbers that converts to
and from JSON (`ConceptRecord`, `RegionRecord`, `AttentionMapRecord`). Nothing here runs unless a
record is drawn: PIL is imported by the render functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WIDTH = 640
PLOT_HEIGHT = 220
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP = 44, 16, 24
STRIP_ROW = 14  # one row of steered-step marks per concept
LEGEND_ROW = 16
BACKGROUND = (255, 255, 255)
OUTSIDE_WINDOW = (236, 236, 236)  # steps before the warm-up or from the cool-down on
AXIS = (90, 90, 90)
PALETTE = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207))
ABSTRACT_COLOR = (110, 110, 110)
# the six above, then four more distinct ones: regions are many more than concepts
REGION_PALETTE = (*PALETTE, (140, 86, 75), (227, 119, 194), (188, 189, 34), (255, 187, 120))
DOT_RADIUS = 2
DASH, DASH_PERIOD = 6, 9


@dataclass(frozen=True)
class ConceptTrace:
    """One concept of one image over the run: similarity per step (None: not computed), the
    threshold its windowed mean was compared with, and per step whether its guidance was added."""

    name: str
    similarity: tuple[float | None, ...]
    threshold: float
    steered: tuple[bool, ...]
    abstract: bool = False


@dataclass(frozen=True)
class ConceptRecord:
    """Every concept of one image. Steps s with warmup < s < cooldown may be steered (both strict,
    as `ConceptSchedule.in_window`)."""

    concepts: tuple[ConceptTrace, ...]
    warmup: int
    cooldown: int
    title: str = ""

    @property
    def total_steps(self) -> int:
        return max((max(len(c.similarity), len(c.steered)) for c in self.concepts), default=0)

    def as_dict(self) -> dict[str, Any]:
        concepts = [
            {"name": c.name, "similarity": list(c.similarity), "threshold": c.threshold}
            | {"steered": list(c.steered), "abstract": c.abstract}
            for c in self.concepts
        ]
        return {"title": self.title, "warmup": self.warmup, "cooldown": self.cooldown, "concepts": concepts}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ConceptRecord:
        concepts = tuple(
            ConceptTrace(
                name=str(c["name"]),
                similarity=tuple(None if v is None else float(v) for v in c["similarity"]),
                threshold=float(c["threshold"]),
                steered=tuple(bool(v) for v in c["steered"]),
                abstract=bool(c.get("abstract", False)),
            )
            for c in data["concepts"]
        )
        return cls(concepts, int(data["warmup"]), int(data["cooldown"]), str(data.get("title", "")))


# ---------------------------------------------------------------------------------------------
# Geometry: pure functions of the record, so a test can find every mark


@dataclass(frozen=True)
class Layout:
    """Pixel boxes (left, top, right, bottom) of the plot and of the steered-step strip."""

    plot: tuple[int, int, int, int]
    strip: tuple[int, int, int, int]
    height: int


def layout(record: ConceptRecord) -> Layout:
    """The picture's boxes: the plot, then one strip row and one legend row per concept."""
    count = len(record.concepts)
    plot = (MARGIN_LEFT, MARGIN_TOP, WIDTH - MARGIN_RIGHT, MARGIN_TOP + PLOT_HEIGHT)
    strip_top = plot[3] + 22  # room for the step numbers
    strip = (plot[0], strip_top, plot[2], strip_top + STRIP_ROW * count)
    return Layout(plot, strip, strip[3] + 8 + LEGEND_ROW * count + 8)


def step_x(step: int, total_steps: int, box: tuple[int, int, int, int]) -> int:
    """The x of step `step`: steps sit at the centres of equal columns."""
    left, _, right, _ = box
    column = (right - left) / max(total_steps, 1)
    return round(left + column * (step + 0.5))


def value_y(value: float, box: tuple[int, int, int, int]) -> int:
    """The y of a similarity (0 at the bottom, 1 at the top; values outside are clamped)."""
    _, top, _, bottom = box
    return round(bottom - (bottom - top) * min(max(value, 0.0), 1.0))


def strip_y(index: int, strip: tuple[int, int, int, int]) -> int:
    """The y of the centre of concept `index`'s row of steered-step marks."""
    return strip[1] + STRIP_ROW * index + STRIP_ROW // 2


def color_of(index: int, trace: ConceptTrace) -> tuple[int, int, int]:
    return ABSTRACT_COLOR if trace.abstract else PALETTE[index % len(PALETTE)]


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# Drawing


def render(record: ConceptRecord):
    """The diagnostics picture of one image's record, as a PIL RGB image."""
    from PIL import Image, ImageDraw

    shape = layout(record)
    image = Image.new("RGB", (WIDTH, shape.height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    total = record.total_steps
    _draw_window(draw, shape.plot, record, total)
    _draw_axes(draw, shape, record, total)
    for index, trace in enumerate(record.concepts):
        color = color_of(index, trace)
        _draw_threshold(draw, shape.plot, trace.threshold, color, index, len(record.concepts))
        _draw_similarity(draw, shape.plot, trace.similarity, total, color)
        _draw_steered(draw, shape.strip, index, trace.steered, total, color)
        _draw_legend_entry(draw, shape, index, trace, color)
    return image


def _draw_window(draw, box, record: ConceptRecord, total: int) -> None:
    """Shade the columns of steps that cannot be steered (step <= warm-up or >= cool-down)."""
    left, top, right, bottom = box
    column = (right - left) / max(total, 1)
    for step in range(total):
        if not record.warmup < step < record.cooldown:
            x0 = round(left + column * step)
            draw.rectangle((x0, top, round(left + column * (step + 1)) - 1, bottom), fill=OUTSIDE_WINDOW)


def _draw_axes(draw, shape: Layout, record: ConceptRecord, total: int) -> None:
    """Frame, similarity ticks 0 / 0.5 / 1, step numbers, the title and the strip's caption."""
    left, top, right, bottom = shape.plot
    draw.rectangle(shape.plot, outline=AXIS)
    for value in (0.0, 0.5, 1.0):
        y = value_y(value, shape.plot)
        draw.line((left - 4, y, left, y), fill=AXIS)
        draw.text((4, y - 6), f"{value:.1f}", fill=AXIS)
    every = max(1, math.ceil(total / 20))
    for step in range(0, total, every):
        x = step_x(step, total, shape.plot)
        draw.line((x, bottom, x, bottom + 3), fill=AXIS)
        draw.text((x - 3, bottom + 5), str(step), fill=AXIS)
    heading = "similarity |cos(P, c)| per step; dashed: threshold; shaded: not steered"
    draw.text((left, 6), f"{record.title}: {heading}" if record.title else heading, fill=AXIS)
    draw.text((4, shape.strip[1]), "steered", fill=AXIS)


def _draw_threshold(draw, box, threshold: float, color, index: int, count: int) -> None:
    """A dashed horizontal line at the threshold. Concepts share thresholds, so their dashes take
    turns: DASH px of concept `index` in every DASH_PERIOD x `count` px."""
    if not _finite(threshold):
        return
    left, _, right, _ = box
    y = value_y(threshold, box)
    for x in range(left + 1 + DASH_PERIOD * index, right - 1, DASH_PERIOD * max(count, 1)):
        draw.line((x, y, min(x + DASH - 1, right - 2), y), fill=color)


def _draw_similarity(draw, box, similarity: Sequence[float | None], total: int, color) -> None:
    """The similarity as a line through one dot per step; gaps where it was not computed."""
    points = [(step_x(s, total, box), value_y(v, box)) if _finite(v) else None for s, v in enumerate(similarity)]
    for a, b in zip(points, points[1:], strict=False):
        if a is not None and b is not None:
            draw.line((a, b), fill=color, width=1)
    for point in points:
        if point is not None:
            x, y = point
            draw.ellipse((x - DOT_RADIUS, y - DOT_RADIUS, x + DOT_RADIUS, y + DOT_RADIUS), fill=color)


def _draw_steered(draw, strip, index: int, steered: Sequence[bool], total: int, color) -> None:
    """One filled square per step where the concept's guidance was added, in the concept's row."""
    y = strip_y(index, strip)
    half = min(STRIP_ROW // 2 - 2, max(1, (strip[2] - strip[0]) // max(total, 1) // 2 - 1))
    for step, on in enumerate(steered):
        if on:
            x = step_x(step, total, strip)
            draw.rectangle((x - half, y - half, x + half, y + half), fill=color)


def _draw_legend_entry(draw, shape: Layout, index: int, trace: ConceptTrace, color) -> None:
    y = shape.strip[3] + 8 + LEGEND_ROW * index
    draw.rectangle((shape.plot[0], y + 3, shape.plot[0] + 10, y + 13), fill=color)
    kind = "abstract" if trace.abstract else "subject"
    steered = sum(bool(s) for s in trace.steered)
    label = f"{trace.name} ({kind}, threshold {trace.threshold:.2f}, steered {steered} of {len(trace.steered)} steps)"
    draw.text((shape.plot[0] + 16, y + 2), label, fill=AXIS)


# ---------------------------------------------------------------------------------------------
# One picture per image: its panels one below the other


def stack(panels: Sequence[Any]):
    """The panels (PIL images) one below the other on a white page as wide as the widest."""
    from PIL import Image

    width = max(panel.width for panel in panels)
    page = Image.new("RGB", (width, sum(panel.height for panel in panels)), BACKGROUND)
    top = 0
    for panel in panels:
        page.paste(panel.convert("RGB"), (0, top))
        top += panel.height
    return page


def panels_of(capture: Any, title: str) -> list:
    """The panels of one image's capture from one sampler run (`hosts.common.PassCapture`): concept
    steering's plot, S-CFG's regions, then attention regulation's maps, each with whatever the run
    recorded."""
    panels = []
    if capture.concepts is not None:
        panels.append(render(capture.concepts.record(title)))
    if capture.regions is not None:
        panels.append(render_regions(capture.regions.record(title)))
    if capture.attention is not None:
        panels.append(render_attention_maps(capture.attention.record(title)))
    return panels


def pictures_by_image(captures: Sequence[Any], title_of) -> dict[int, Any]:
    """{image index: its picture}, the panels of its first pass above those of its hires pass;
    `title_of(image)` names the image in every panel's title."""
    panels: dict[int, list] = {}
    for capture in captures:
        title = title_of(capture.image) + (", hires pass" if capture.hires else "")
        panels.setdefault(capture.image, []).extend(panels_of(capture, title))
    return {image: stack(found) for image, found in sorted(panels.items()) if found}


# ---------------------------------------------------------------------------------------------
# S-CFG's regions (arXiv 2404.05384): which token's attention map wins at each position, and the
# CFG factor each such region got

MAP_SIDE = 256  # the region map's longest side in pixels
LEGEND_LEFT = MAP_SIDE + 2 * MARGIN_RIGHT + MARGIN_LEFT


@dataclass(frozen=True)
class RegionRecord:
    """One image's S-CFG regions at one step: per position of the mask grid the winning token column,
    per present column its region's clamped rate and, where known, the phrase it belongs to."""

    title: str
    step: int
    total_steps: int
    regions: tuple[tuple[int, ...], ...]  # (hm, wm)
    rates: Mapping[int, float]
    labels: Mapping[int, str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "step": self.step,
            "total_steps": self.total_steps,
            "regions": [list(row) for row in self.regions],
            "rates": {str(k): v for k, v in self.rates.items()},
            "labels": {str(k): v for k, v in self.labels.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RegionRecord:
        return cls(
            title=str(data.get("title", "")),
            step=int(data["step"]),
            total_steps=int(data["total_steps"]),
            regions=tuple(tuple(int(v) for v in row) for row in data["regions"]),
            rates={int(k): float(v) for k, v in data["rates"].items()},
            labels={int(k): str(v) for k, v in data.get("labels", {}).items()},
        )


def region_order(record: RegionRecord) -> list[int]:
    """The present token columns, largest region first (ties: lower column first)."""
    area: dict[int, int] = {}
    for row in record.regions:
        for column in row:
            area[column] = area.get(column, 0) + 1
    return sorted(area, key=lambda column: (-area[column], column))


def region_color(rank: int) -> tuple[int, int, int]:
    """The colour of the `rank`-th largest region (the region palette, then greys)."""
    return REGION_PALETTE[rank] if rank < len(REGION_PALETTE) else (110 + 25 * (rank % 5),) * 3


def token_name(record: RegionRecord, column: int) -> str:
    """A region's name: its token column, with the concept it belongs to where known (a concept of
    several tokens has a region per token, each with its own rate)."""
    if column in record.labels:
        return f"{record.labels[column]} (token {column})"
    return "start of text" if column % 77 == 0 else f"token {column}"


def region_cell(record: RegionRecord) -> int:
    """Pixels per mask-grid position, so that the map's longest side is at most MAP_SIDE."""
    rows = len(record.regions)
    columns = max((len(row) for row in record.regions), default=0)
    return max(1, MAP_SIDE // max(rows, columns, 1))


def render_regions(record: RegionRecord):
    """S-CFG's panel of one image, as a PIL RGB image: the token-coloured region map on the left, each
    region's name, share of the image and CFG factor on the right."""
    from PIL import Image, ImageDraw

    order = region_order(record)
    height = MARGIN_TOP + max(MAP_SIDE, LEGEND_ROW * len(order)) + 8
    image = Image.new("RGB", (WIDTH, height), BACKGROUND)
    draw = ImageDraw.Draw(image)
    heading = f"S-CFG regions at step {record.step + 1} of {record.total_steps}: each region's CFG factor"
    draw.text((MARGIN_LEFT, 6), f"{record.title}: {heading}" if record.title else heading, fill=AXIS)
    _draw_region_map(draw, record, {column: region_color(rank) for rank, column in enumerate(order)})
    _draw_region_legend(draw, record, order)
    return image


def _draw_region_map(draw, record: RegionRecord, colors: Mapping[int, tuple[int, int, int]]) -> None:
    """One filled square per mask-grid position in its region's colour."""
    cell = region_cell(record)
    for y, row in enumerate(record.regions):
        for x, column in enumerate(row):
            left, top = MARGIN_LEFT + x * cell, MARGIN_TOP + y * cell
            draw.rectangle((left, top, left + cell - 1, top + cell - 1), fill=colors[column])


def _draw_region_legend(draw, record: RegionRecord, order: Sequence[int]) -> None:
    """Per region, largest first: its colour, name, share of the image and CFG factor."""
    cells = sum(len(row) for row in record.regions) or 1
    for rank, column in enumerate(order):
        y = MARGIN_TOP + LEGEND_ROW * rank
        draw.rectangle((LEGEND_LEFT, y + 3, LEGEND_LEFT + 10, y + 13), fill=region_color(rank))
        share = sum(row.count(column) for row in record.regions) / cells
        rate = record.rates.get(column, float("nan"))
        label = f"{token_name(record, column)}: {share:.0%} of the image, CFG x {rate:.2f}"
        draw.text((LEGEND_LEFT + 16, y + 2), label, fill=AXIS)


# ---------------------------------------------------------------------------------------------
# Attention regulation (arXiv 2403.06381): each target token's cross-attention map with the plain
# softmax and with the optimised bias, side by side on one colour scale

ATTENTION_TOP = 40  # two heading lines
ATTENTION_MAP_SIDE = 128  # each map's longest side in pixels
TARGET_HEADER = 16  # the captions above the maps
TARGET_ROW = TARGET_HEADER + ATTENTION_MAP_SIDE + 10
MAP_GAP = 12
AFTER_LEFT = MARGIN_LEFT + ATTENTION_MAP_SIDE + MAP_GAP
NUMBERS_LEFT = AFTER_LEFT + ATTENTION_MAP_SIDE + 16
SCALE_BAR = (160, 10)  # the colour scale's width and height
# the colour ramp from no attention to the target's largest value: dark blue, purple, red, orange, pale yellow
HEAT_RAMP = ((16, 16, 48), (84, 38, 138), (196, 58, 92), (247, 150, 48), (252, 246, 196))


@dataclass(frozen=True)
class TargetMaps:
    """One target token's attention map (h × w, row-major) before and after regulation."""

    column: int
    label: str  # the phrase the token belongs to; "" when unknown
    before: tuple[tuple[float, ...], ...]
    after: tuple[tuple[float, ...], ...]


@dataclass(frozen=True)
class AttentionMapRecord:
    """One image's regulation targets at one step: each target column's cross-attention, averaged
    over the heads and over `layers` regulated layers, with the plain softmax and with the bias."""

    title: str
    step: int
    total_steps: int
    layers: int
    targets: tuple[TargetMaps, ...]

    def as_dict(self) -> dict[str, Any]:
        targets = [
            {"column": t.column, "label": t.label, "before": [list(r) for r in t.before]}
            | {"after": [list(r) for r in t.after]}
            for t in self.targets
        ]
        return {"title": self.title, "step": self.step, "total_steps": self.total_steps, "layers": self.layers} | {
            "targets": targets
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AttentionMapRecord:
        targets = tuple(
            TargetMaps(int(t["column"]), str(t.get("label", "")), _grid(t["before"]), _grid(t["after"]))
            for t in data["targets"]
        )
        return cls(
            str(data.get("title", "")), int(data["step"]), int(data["total_steps"]), int(data["layers"]), targets
        )


def _grid(rows: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    return tuple(tuple(float(v) for v in row) for row in rows)


def map_values(grid: Sequence[Sequence[float]]) -> list[float]:
    """A map's values in row-major order."""
    return [value for row in grid for value in row]


def map_mean(grid: Sequence[Sequence[float]]) -> float:
    """The mean attention over the map's positions (the share the regulation's loss aims at)."""
    values = map_values(grid)
    return sum(values) / len(values) if values else float("nan")


def map_quantile(grid: Sequence[Sequence[float]], q: float) -> float:
    """The q-quantile of the map's values, interpolated linearly between ranks (as torch.quantile)."""
    values = sorted(map_values(grid))
    if not values:
        return float("nan")
    rank = q * (len(values) - 1)
    below = int(rank)
    above = min(below + 1, len(values) - 1)
    return values[below] + (values[above] - values[below]) * (rank - below)


def share_aim(targets: int) -> float:
    """The mean attention the regulation aims at for each of `targets` targets: min(1, 0.2·n)/n."""
    return min(1.0, 0.2 * targets) / targets if targets else float("nan")


def scale_top(maps: TargetMaps) -> float:
    """The top of a target's colour scale: the largest finite value of its two maps (1e-8 at least)."""
    values = [v for v in map_values(maps.before) + map_values(maps.after) if math.isfinite(v)]
    return max([1e-8, *values])


def heat_color(value: float, top: float) -> tuple[int, int, int]:
    """The ramp's colour of `value` on a scale from 0 to `top` (clamped; non-finite: the lowest)."""
    fraction = min(max(value / top, 0.0), 1.0) if math.isfinite(value) and top > 0 else 0.0
    position = fraction * (len(HEAT_RAMP) - 1)
    index = min(int(position), len(HEAT_RAMP) - 2)
    low, high, t = HEAT_RAMP[index], HEAT_RAMP[index + 1], position - index
    return tuple(round(a + (b - a) * t) for a, b in zip(low, high, strict=True))


def attention_cell(maps: TargetMaps) -> int:
    """Pixels per map position, so that the map's longest side is at most ATTENTION_MAP_SIDE."""
    rows = len(maps.before)
    columns = max((len(row) for row in maps.before), default=0)
    return max(1, ATTENTION_MAP_SIDE // max(rows, columns, 1))


def attention_panel_height(record: AttentionMapRecord) -> int:
    """The panel's height: the heading, then one row per target."""
    return ATTENTION_TOP + TARGET_ROW * len(record.targets) + 8


def target_top(index: int) -> int:
    """The y of the top of target `index`'s maps."""
    return ATTENTION_TOP + TARGET_ROW * index + TARGET_HEADER


def target_name(maps: TargetMaps) -> str:
    """A target's name: its phrase and token column, or its column alone."""
    return f"{maps.label} (token {maps.column})" if maps.label else f"token {maps.column}"


def render_attention_maps(record: AttentionMapRecord):
    """Attention regulation's panel of one image, as a PIL RGB image: per target its map with the
    plain softmax (left) and with the bias (right) on one colour scale, and their mean and 90th
    percentile with the values the regulation aims at."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (WIDTH, attention_panel_height(record)), BACKGROUND)
    draw = ImageDraw.Draw(image)
    heading = f"attention regulation at step {record.step + 1} of {record.total_steps}"
    draw.text((MARGIN_LEFT, 6), f"{record.title}: {heading}" if record.title else heading, fill=AXIS)
    detail = f"each target token's cross-attention, mean of the heads and of {record.layers} regulated layers"
    draw.text((MARGIN_LEFT, 22), detail, fill=AXIS)
    for index, maps in enumerate(record.targets):
        _draw_target(draw, record, index, maps)
    return image


def _draw_target(draw, record: AttentionMapRecord, index: int, maps: TargetMaps) -> None:
    """One target's row: captions, the two maps on its colour scale, its numbers and the scale."""
    top, top_value = target_top(index), scale_top(maps)
    draw.text((MARGIN_LEFT, top - TARGET_HEADER + 2), "before (plain softmax)", fill=AXIS)
    draw.text((AFTER_LEFT, top - TARGET_HEADER + 2), "after (with the bias)", fill=AXIS)
    _draw_heat_map(draw, maps.before, (MARGIN_LEFT, top), attention_cell(maps), top_value)
    _draw_heat_map(draw, maps.after, (AFTER_LEFT, top), attention_cell(maps), top_value)
    aim = share_aim(len(record.targets))
    lines = (
        target_name(maps),
        f"mean {map_mean(maps.before):.3f} -> {map_mean(maps.after):.3f} (aim {aim:.3f})",
        f"90th percentile {map_quantile(maps.before, 0.9):.3f} -> {map_quantile(maps.after, 0.9):.3f} (aim 0.9)",
    )
    for line_index, line in enumerate(lines):
        draw.text((NUMBERS_LEFT, top + 2 + LEGEND_ROW * line_index), line, fill=AXIS)
    _draw_scale(draw, (NUMBERS_LEFT, top + 2 + LEGEND_ROW * len(lines) + 4), top_value)


def _draw_heat_map(draw, grid, origin: tuple[int, int], cell: int, top_value: float) -> None:
    """One filled square per map position in the ramp's colour of its value."""
    left, top = origin
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            x0, y0 = left + x * cell, top + y * cell
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=heat_color(value, top_value))


def _draw_scale(draw, origin: tuple[int, int], top_value: float) -> None:
    """The colour scale from 0 (left) to the target's top value (right), labelled at both ends."""
    left, top = origin
    width, height = SCALE_BAR
    for x in range(width):
        draw.line((left + x, top, left + x, top + height - 1), fill=heat_color(top_value * x / (width - 1), top_value))
    draw.text((left, top + height + 2), "0", fill=AXIS)
    draw.text((left + width - 36, top + height + 2), f"{top_value:.3f}", fill=AXIS)
