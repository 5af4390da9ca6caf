"""The diagnostics picture drawn from recorded data: the similarities and gates that the authors'
ConceptDiffusion code recorded (shared/reference/concept_diffusion), every mark found where the
record puts it."""

import json
import sys
from pathlib import Path

import pytest

from guidance import diagnostics
from guidance.diagnostics import ConceptRecord, ConceptTrace, layout, render, step_x, strip_y, value_y
from tests.reference_cases import case_params


def record_of(case) -> ConceptRecord:
    """The record a run of the authors' code makes: subjects, then the abstract concept last."""
    params, tensors = case.params(), case.tensors()
    sim, gate = tensors["sim"].tolist(), tensors["gate"].tolist()
    names = [*params["noun_phrases"], "abstract"]
    traces = tuple(
        ConceptTrace(
            name=name,
            similarity=tuple(row[k] for row in sim),
            threshold=params["abstract_th" if k == len(names) - 1 else "subject_th"],
            steered=tuple(bool(row[k]) for row in gate),
            abstract=k == len(names) - 1,
        )
        for k, name in enumerate(names)
    )
    return ConceptRecord(traces, params["warmup"], params["cooldown"], title=params["prompt"])


def _is(pixel, color) -> bool:
    return tuple(pixel[:3]) == tuple(color)


@pytest.mark.parametrize("case", case_params("concept_diffusion"))
def test_every_similarity_threshold_and_steered_step_is_drawn_where_recorded(case):
    record = record_of(case)
    image = render(record)
    shape = layout(record)
    total = record.total_steps
    assert image.mode == "RGB" and image.size == (diagnostics.WIDTH, shape.height)
    pixels = image.load()
    dots = [
        (k, step_x(s, total, shape.plot), value_y(v, shape.plot))
        for k, c in enumerate(record.concepts)
        for s, v in enumerate(c.similarity)
    ]
    for k, x, y in dots:
        # a dot of a later concept within reach may cover it; every other dot shows its own colour
        covered = any(j > k and abs(x - xj) <= 2 and abs(y - yj) <= 2 for j, xj, yj in dots)
        if not covered:
            assert _is(pixels[x, y], diagnostics.color_of(k, record.concepts[k])), (k, x, y)
    for k, trace in enumerate(record.concepts):
        color = diagnostics.color_of(k, trace)
        marks = [_is(pixels[step_x(s, total, shape.strip), strip_y(k, shape.strip)], color) for s in range(total)]
        assert marks == list(trace.steered), trace.name
        y = value_y(trace.threshold, shape.plot)
        row = [_is(pixels[x, y], color) for x in range(shape.plot[0] + 1, shape.plot[2] - 1)]
        # dashed, the concepts taking turns: DASH px in every DASH_PERIOD x count (dots may cover some)
        share = diagnostics.DASH / (diagnostics.DASH_PERIOD * len(record.concepts))
        assert sum(row) >= 0.8 * share * len(row), trace.name  # its line may add pixels, never hide its dashes
    # steps that cannot be steered are shaded, the others not (the top of the plot has no line)
    top = shape.plot[1] + 3
    for step in range(total):
        inside = record.warmup < step < record.cooldown
        expected = diagnostics.BACKGROUND if inside else diagnostics.OUTSIDE_WINDOW
        assert _is(pixels[step_x(step, total, shape.plot), top], expected), step


def test_the_recorded_gates_lie_inside_the_window_and_the_picture_shows_them():
    (case, *_) = [p.values[0] for p in case_params("concept_diffusion")]
    record = record_of(case)
    assert record.warmup == 1 and record.cooldown == 12 and record.total_steps == 12
    steered_steps = [[s for s, on in enumerate(c.steered) if on] for c in record.concepts]
    assert steered_steps == [[5, 6, 7, 8, 9, 10, 11], [2, 3, 4, 5, 6, 7], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


def test_record_converts_to_json_and_back():
    (case, *_) = [p.values[0] for p in case_params("concept_diffusion")]
    record = record_of(case)
    assert ConceptRecord.from_dict(json.loads(json.dumps(record.as_dict()))) == record


def test_missing_and_broken_values_leave_gaps_instead_of_failing():
    trace = ConceptTrace("cat", (0.2, None, float("nan"), 0.4, 1.7), 0.3, (False, False, True, True, False))
    record = ConceptRecord((trace,), warmup=0, cooldown=5)
    image = render(record)
    shape = layout(record)
    pixels = image.load()
    color = diagnostics.color_of(0, trace)
    assert _is(pixels[step_x(0, 5, shape.plot), value_y(0.2, shape.plot)], color)
    assert _is(pixels[step_x(4, 5, shape.plot), shape.plot[1]], color)  # 1.7 clamped to the top
    # nothing drawn at steps 1 and 2 between the threshold and the top (no line crosses the gap)
    for step in (1, 2):
        x = step_x(step, 5, shape.plot)
        column = [pixels[x, y] for y in range(shape.plot[1] + 2, value_y(0.3, shape.plot) - 2)]
        assert all(_is(p, diagnostics.BACKGROUND) for p in column), step
    empty = render(ConceptRecord((), 0, 0))
    assert empty.size == (diagnostics.WIDTH, layout(ConceptRecord((), 0, 0)).height)


def test_importing_costs_nothing_until_a_picture_is_drawn():
    import subprocess

    code = "import guidance.diagnostics, sys; print('PIL' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# ---------------------------------------------------------------------------------------------
# Recorded by a whole run (tests/data/diagnostics_record.json: the A1111 stand-in with concept
# steering and S-CFG, 12 steps): the concept plot, S-CFG's regions, the picture of one image

RECORDED = json.loads((Path(__file__).parent / "data" / "diagnostics_record.json").read_text())


def test_recorded_concept_plot_marks_every_step_where_recorded():
    record = ConceptRecord.from_dict(RECORDED["concepts"])
    assert [c.name for c in record.concepts] == ["red book", "gold clock", "abstract"]
    assert (record.warmup, record.cooldown, record.total_steps) == (2, 12, 12)
    image, shape = render(record), layout(record)
    pixels = image.load()
    for k, trace in enumerate(record.concepts):
        color = diagnostics.color_of(k, trace)
        marks = [_is(pixels[step_x(s, 12, shape.strip), strip_y(k, shape.strip)], color) for s in range(12)]
        assert marks == list(trace.steered), trace.name
    assert ConceptRecord.from_dict(json.loads(json.dumps(record.as_dict()))) == record


def test_recorded_regions_are_drawn_in_their_tokens_colours():
    record = diagnostics.RegionRecord.from_dict(RECORDED["regions"])
    assert diagnostics.RegionRecord.from_dict(json.loads(json.dumps(record.as_dict()))) == record
    order = diagnostics.region_order(record)
    assert set(order) == set(record.rates) and 0 in order  # the start-of-text token holds a region
    image = diagnostics.render_regions(record)
    assert image.size == (diagnostics.WIDTH, diagnostics.MARGIN_TOP + diagnostics.MAP_SIDE + 8)
    cell = diagnostics.region_cell(record)
    assert cell * len(record.regions) <= diagnostics.MAP_SIDE
    pixels = image.load()
    for y, row in enumerate(record.regions):
        for x, column in enumerate(row):
            centre = (diagnostics.MARGIN_LEFT + x * cell + cell // 2, diagnostics.MARGIN_TOP + y * cell + cell // 2)
            assert _is(pixels[centre], diagnostics.region_color(order.index(column))), (x, y)
    for rank in range(len(order)):  # one legend swatch per region, largest first
        swatch = (diagnostics.LEGEND_LEFT + 5, diagnostics.MARGIN_TOP + diagnostics.LEGEND_ROW * rank + 8)
        assert _is(pixels[swatch], diagnostics.region_color(rank)), rank
    assert diagnostics.token_name(record, 2) == "red book (token 2)"
    assert diagnostics.token_name(record, 0) == "start of text"


def test_one_picture_per_image_stacks_its_passes():
    from types import SimpleNamespace

    concepts = SimpleNamespace(record=lambda title: ConceptRecord.from_dict({**RECORDED["concepts"], "title": title}))
    regions = SimpleNamespace(record=lambda title: diagnostics.RegionRecord.from_dict(RECORDED["regions"]))
    captures = [
        SimpleNamespace(image=0, hires=False, concepts=concepts, regions=regions, attention=None),
        SimpleNamespace(image=1, hires=False, concepts=None, regions=regions, attention=None),
        SimpleNamespace(image=0, hires=True, concepts=concepts, regions=None, attention=None),
    ]
    pictures = diagnostics.pictures_by_image(captures, lambda image: f"image {image + 1}")
    plot = layout(ConceptRecord.from_dict(RECORDED["concepts"])).height
    region_panel = diagnostics.MARGIN_TOP + diagnostics.MAP_SIDE + 8
    assert list(pictures) == [0, 1]
    assert pictures[0].size == (diagnostics.WIDTH, plot + region_panel + plot)
    assert pictures[1].size == (diagnostics.WIDTH, region_panel)
