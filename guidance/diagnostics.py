"""The diagnostics picture of concept steering (ConceptDiffusion, arXiv 2312.15964), one per image:
each concept's similarity |cos(P, c)| over the steps with its threshold, the steps where its
guidance was added, and the warm-up/cool-down window outside which nothing is steered.

It is drawn with PIL (both hosts ship it) from `ConceptRecord`, a plain record of numbers that
converts to and from JSON. Nothing here runs unless a record is drawn: PIL is imported by `render`.
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
    steering's plot, then S-CFG's regions, each with whatever the run recorded."""
    panels = []
    if capture.concepts is not None:
        panels.append(render(capture.concepts.record(title)))
    if capture.regions is not None:
        panels.append(render_regions(capture.regions.record(title)))
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
