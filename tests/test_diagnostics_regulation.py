"""'Show diagnostics' for attention regulation: each target token's cross-attention map before (plain
softmax) and after (with the optimised bias), recorded by the regulator and drawn as one panel.

The numbers are checked against the regulator's own intermediates (`AttentionRegulator.record`) and
against the softmax recomputed from the scores; whole generations run through the A1111 stand-in
and the Forge stand-in with the test-bed UNet; the drawing is checked on a recorded run
(tests/data/regulation_maps_record.json, written by tests/record_regulation_maps.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guidance import diagnostics
from guidance.attention import attention_scores
from guidance.attention_routing import AttentionRouter, CallRows, LayerKey, regulation_layer_keys
from guidance.diagnostics import AttentionMapRecord, attention_panel_height
from guidance.methods.attention_regulation import AttentionRegulator, representative_maps, target_columns
from guidance.params import build_settings
from guidance.planning import RunSteps, plan_run
from guidance.prompt_model import Tokenizer
from tests.testbed.text_encoder import TextEncoderStandIn

PROMPTS = ["a red book and a gold clock", "a cat on a gold clock"]
FIELDS = dict(prompt=PROMPTS, batch_size=2, steps=6, width=128, height=128)
REGULATION = dict(
    enable=True, regulation_enable=True, regulation_targets="red book; gold clock", regulation_iterations=3
)
TOKENIZER = Tokenizer.of(TextEncoderStandIn())  # one id per word or mark
RECORDED = json.loads((Path(__file__).parent / "data" / "regulation_maps_record.json").read_text())


def _state(processed):
    from guidance.hosts.common import state_of

    return state_of(processed.p)


def _is_picture(image) -> bool:
    return hasattr(image, "getpixel")


def _images():
    from guidance.engine import ImageInfo

    return [ImageInfo(prompt, seed) for seed, prompt in enumerate(PROMPTS, 1)]


# ---------------------------------------------------------------------------------------------
# switch off: nothing kept, images identical


def test_switch_off_keeps_no_maps_and_the_images_are_identical(host):
    off = host.generate(args=host.args(**REGULATION), **FIELDS)
    on = host.generate(args=host.args(**REGULATION, show_diagnostics=True), **FIELDS)
    assert off.errors == [] and on.errors == []
    assert len(off.images) == 2 and not any(_is_picture(i) for i in off.images)
    assert _state(off).diagnostics == []
    assert torch.equal(torch.stack(on.images[:2]), torch.stack(off.images))


def test_switch_off_plans_no_map_log():
    settings = build_settings(REGULATION)
    planned = plan_run(settings, _images(), RunSteps(6), tokenizer=TOKENIZER)
    assert planned.router.regulator.map_log is None and planned.router.regulator.target_labels is None
    shown = plan_run(settings.replace(show_diagnostics=True), _images(), RunSteps(6), tokenizer=TOKENIZER)
    regulator = shown.router.regulator
    assert regulator.map_log == {}
    # per image and prompt segment, the targets' columns named by their phrase
    assert regulator.target_labels == [
        [{2: "red book", 3: "red book", 6: "gold clock", 7: "gold clock"}],
        [{5: "gold clock", 6: "gold clock"}],
    ]
    assert [list(span.columns) for spans in regulator.spans for span in spans] == [[2, 3, 6, 7], [5, 6]]


# ---------------------------------------------------------------------------------------------
# switch on: one panel per image, its numbers the regulator's


def test_each_image_gets_the_panel_of_its_targets(host):
    processed = host.generate(args=host.args(**REGULATION, show_diagnostics=True), **FIELDS)
    assert processed.errors == [] and len(processed.images) == len(processed.infotexts) == 4
    pictures = processed.images[2:]
    assert all(_is_picture(p) and p.width == diagnostics.WIDTH for p in pictures)
    four, two = (AttentionMapRecord("", 0, 1, 1, (None,) * n) for n in (4, 2))
    # image 1 regulates "red book" and "gold clock" (4 tokens), image 2 only "gold clock" (2 tokens)
    assert [p.height for p in pictures] == [attention_panel_height(four), attention_panel_height(two)]
    assert (attention_panel_height(four), attention_panel_height(two)) == (664, 356)
    assert processed.infotexts[2:] == processed.infotexts[:2]


def _regulate_steps(regulator, layers, steps: int, heads: int, size, images=(0, 1)):
    """Random float32 scores (images·heads, N, M) regulated per step and layer; {(step, layer): scores}."""
    generator = torch.Generator().manual_seed(3)
    scores = {}
    for step in range(steps):
        regulator.active(step, 10)
        for layer in layers:
            scores[step, layer] = torch.randn(len(images) * heads, size[0] * size[1], 12, generator=generator) * 3
            regulator.regulate(layer, scores[step, layer], list(images), heads, size, step)
    return scores


def _softmax_with_bias(scores, targets, bias):
    """softmax(S + B) on the target columns, the edited scores cast to float16 as the regulator does."""
    edited = scores.clone()
    for i, t in enumerate(targets):
        edited[..., t] += bias[..., i]
    return target_columns(edited.half().float().softmax(dim=-1), targets)


def test_recorded_maps_are_the_regulators_softmax_before_and_after():
    heads, size, steps = 2, (6, 5), 3
    regulator = AttentionRegulator([[2, 5], [7]], [1, 2], end=1.0, iterations=4)
    regulator.record, regulator.map_log = {}, {}
    regulator.leaders = {"down": "down", "up": "up", "up.1": "up"}  # "up.1" applies the bias "up" found
    scores = _regulate_steps(regulator, ["down", "up", "up.1"], steps, heads, size)
    assert regulator.layers_shared == {"up.1"}
    last, decay = steps - 1, regulator.decay ** (steps - 1)
    for image, targets in enumerate(regulator.targets):
        capture = regulator.map_capture(image)
        assert (capture.step, capture.total_steps, capture.map_size, capture.layers) == (last, 10, size, 3)
        assert capture.columns == tuple(targets)
        rows = slice(image * heads, (image + 1) * heads)
        befores, afters = [], []
        for layer in ("down", "up", "up.1"):
            plain = scores[last, layer][rows]
            befores.append(target_columns(plain.softmax(dim=-1), targets).mean(0))
            leader = regulator.record[(layer, image)].get("shared_from", layer)
            bias = decay * regulator.record[(leader, image)]["best_additive_blended"]
            after = _softmax_with_bias(plain, targets, bias)
            torch.testing.assert_close(after, target_columns(regulator.record[(layer, image)]["probs"], targets))
            afters.append(after.mean(0))
        torch.testing.assert_close(capture.before, torch.stack(befores).mean(0), rtol=0, atol=1e-7)
        torch.testing.assert_close(capture.after, torch.stack(afters).mean(0), rtol=0, atol=1e-7)
        record = capture.record("image")
        h, w = size
        for i, maps in enumerate(record.targets):
            assert maps.column == targets[i] and len(maps.before) == h and len(maps.after[0]) == w
            assert [v for row in maps.after for v in row] == capture.after[:, i].tolist()
            assert [v for row in maps.before for v in row] == capture.before[:, i].tolist()
            assert diagnostics.map_mean(maps.after) > diagnostics.map_mean(maps.before)  # attention was raised


def test_the_kept_step_is_the_last_regulated_one():
    regulator = AttentionRegulator([[3]], [1], end=1.0, iterations=2)
    regulator.map_log = {}
    _regulate_steps(regulator, ["a"], 2, 2, (4, 4), images=(0,))
    first = regulator.map_capture(0)
    _regulate_steps(regulator, ["b"], 1, 2, (4, 4), images=(0,))  # step 0 again, another layer: a new step
    assert first.step == 1 and regulator.map_capture(0).step == 0 and regulator.map_capture(0).layers == 1
    assert regulator.map_capture(1) is None


def test_layers_of_the_most_common_map_size_are_averaged():
    small, large = torch.ones(16, 1), torch.full((64, 1), 3.0)
    layers = {
        "a": ((4, 4), small, 2 * small),
        "b": ((4, 4), 3 * small, 4 * small),
        "c": ((8, 8), large, large),
    }
    size, before, after, count = representative_maps(layers)
    assert (size, count) == ((4, 4), 2)
    assert torch.equal(before, 2 * small) and torch.equal(after, 3 * small)
    layers["d"] = ((8, 8), large, large)  # a tie: the larger map
    assert representative_maps(layers)[0] == (8, 8)


def test_maps_through_the_testbed_unet_are_each_layers_softmax(tiny_unet):
    """A real UNet call through the router: the 'before' maps are the softmax of each regulated
    layer's own q·k scores, the 'after' maps that layer's regulated probabilities."""
    targets, heads_of = [2, 3], {}
    regulator = AttentionRegulator([targets], [5], end=1.0, iterations=3)
    regulator.record, regulator.map_log = {}, {}
    router = AttentionRouter(regulator=regulator)
    modules = {key: m for name, m in tiny_unet.named_modules() if (key := LayerKey.from_module_name(name)) is not None}
    regulated = router.routed_layers(modules)
    assert regulated == regulation_layer_keys(regulator.layers, modules) and len(regulated) == 5
    router.begin_call(CallRows(0, 10, (16, 16), uncond=(1,), cond=(0,)))
    scores, originals = {}, {key: modules[key].forward for key in regulated}

    def observed(key, module):
        def forward(x, context=None, mask=None, **kwargs):
            q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
            scores[key], heads_of[key] = attention_scores(q[:1], k[:1], module.heads)[0], module.heads
            return module.to_out(router.forward(key, q, k, v, module.heads))

        return forward

    for key in regulated:
        modules[key].forward = observed(key, modules[key])
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.no_grad():
            tiny_unet(
                torch.randn(2, 4, 16, 16, generator=generator),
                torch.tensor([500.0] * 2),
                context=torch.randn(2, 77, 768, generator=generator),
            )
    finally:
        for key, forward in originals.items():
            modules[key].forward = forward
    capture = regulator.map_capture(0)
    assert capture.map_size == (4, 4) and capture.layers == 5
    before = torch.stack([target_columns(scores[key].softmax(-1), targets).mean(0) for key in sorted(regulated)]).mean(
        0
    )
    after = torch.stack(
        [target_columns(regulator.record[(key, 0)]["probs"], targets).mean(0) for key in sorted(regulated)]
    ).mean(0)
    torch.testing.assert_close(capture.before, before, rtol=0, atol=1e-6)
    torch.testing.assert_close(capture.after, after, rtol=0, atol=1e-7)
    assert (capture.after.mean(0) > capture.before.mean(0)).all()


def test_a_failure_in_recording_stops_the_log_not_the_regulation():
    heads, size = 2, (4, 4)
    plain = AttentionRegulator([[2]], [1], end=1.0, iterations=3)
    broken = AttentionRegulator([[2]], [1], end=1.0, iterations=3)
    broken.map_log = {0: "not a step's maps"}  # a log in a state no step leaves it in
    scores = torch.randn(heads, 16, 8, generator=torch.Generator().manual_seed(1))
    expected = plain.regulate("a", scores, [0], heads, size, 0)
    assert torch.equal(broken.regulate("a", scores, [0], heads, size, 0), expected)
    assert broken.map_log is None and broken.map_capture(0) is None
    assert broken.notes == [
        "diagnostics: attention regulation's maps are not recorded "
        "(AttributeError: 'str' object has no attribute 'step')."
    ]


# ---------------------------------------------------------------------------------------------
# the drawing, on a recorded run


def _is(pixel, color) -> bool:
    return tuple(pixel[:3]) == tuple(color)


def test_recorded_maps_convert_to_json_and_back():
    record = AttentionMapRecord.from_dict(RECORDED["attention_maps"])
    assert AttentionMapRecord.from_dict(json.loads(json.dumps(record.as_dict()))) == record
    assert (record.step, record.total_steps, record.layers) == (5, 12, 5)  # regulation ends at half the steps
    assert [(t.column, t.label) for t in record.targets] == [
        (2, "red book"),
        (3, "red book"),
        (6, "gold clock"),
        (7, "gold clock"),
    ]
    assert all(len(t.before) == len(t.after) == 8 and len(t.before[0]) == 8 for t in record.targets)


def test_recorded_maps_are_drawn_on_one_scale_per_target():
    record = AttentionMapRecord.from_dict(RECORDED["attention_maps"])
    image = diagnostics.render_attention_maps(record)
    assert image.size == (diagnostics.WIDTH, attention_panel_height(record))
    pixels = image.load()
    for index, maps in enumerate(record.targets):
        top_value, cell = diagnostics.scale_top(maps), diagnostics.attention_cell(maps)
        assert cell == 16 and top_value == max(v for grid in (maps.before, maps.after) for row in grid for v in row)
        for left, grid in ((diagnostics.MARGIN_LEFT, maps.before), (diagnostics.AFTER_LEFT, maps.after)):
            for y, row in enumerate(grid):
                for x, value in enumerate(row):
                    centre = (left + x * cell + cell // 2, diagnostics.target_top(index) + y * cell + cell // 2)
                    assert _is(pixels[centre], diagnostics.heat_color(value, top_value)), (index, x, y)
        # the brightest cell of the two maps takes the ramp's top colour
        assert any(
            _is(pixels[diagnostics.AFTER_LEFT + x, diagnostics.target_top(index) + y], diagnostics.HEAT_RAMP[-1])
            for x in range(128)
            for y in range(128)
        )
        assert diagnostics.map_mean(maps.after) > 5 * diagnostics.map_mean(maps.before)


def test_the_numbers_beside_the_maps():
    record = AttentionMapRecord.from_dict(RECORDED["attention_maps"])
    maps = record.targets[0]
    values = torch.tensor(maps.after, dtype=torch.float64).flatten()
    assert diagnostics.map_mean(maps.after) == pytest.approx(float(values.mean()), rel=1e-12)
    assert diagnostics.map_quantile(maps.after, 0.9) == pytest.approx(float(values.quantile(0.9)), rel=1e-12)
    assert diagnostics.share_aim(4) == pytest.approx(0.2) and diagnostics.share_aim(10) == pytest.approx(0.1)
    assert diagnostics.target_name(maps) == "red book (token 2)"
    assert diagnostics.target_name(diagnostics.TargetMaps(9, "", (), ())) == "token 9"


def test_the_colour_ramp_runs_from_nothing_to_the_targets_top():
    ramp = diagnostics.HEAT_RAMP
    assert diagnostics.heat_color(0.0, 0.4) == ramp[0] and diagnostics.heat_color(0.4, 0.4) == ramp[-1]
    assert diagnostics.heat_color(0.1, 0.4) == ramp[1] and diagnostics.heat_color(9.0, 0.4) == ramp[-1]
    assert diagnostics.heat_color(float("nan"), 0.4) == ramp[0] and diagnostics.heat_color(-1.0, 0.4) == ramp[0]


def test_the_panel_stacks_below_the_other_methods_panels():
    from types import SimpleNamespace

    record = AttentionMapRecord.from_dict(RECORDED["attention_maps"])
    maps = SimpleNamespace(record=lambda title: record)
    regions = SimpleNamespace(
        record=lambda title: diagnostics.RegionRecord(title, 0, 1, ((0, 2), (2, 2)), {0: 1.0, 2: 2.0}, {})
    )
    captures = [SimpleNamespace(image=0, hires=False, concepts=None, regions=regions, attention=maps)]
    (picture,) = diagnostics.pictures_by_image(captures, lambda image: "image 1").values()
    region_panel = diagnostics.MARGIN_TOP + diagnostics.MAP_SIDE + 8
    assert picture.size == (diagnostics.WIDTH, region_panel + attention_panel_height(record))
    assert _is(
        picture.getpixel((diagnostics.AFTER_LEFT + 64, region_panel + diagnostics.target_top(0) + 64)),
        diagnostics.heat_color(record.targets[0].after[4][4], diagnostics.scale_top(record.targets[0])),
    )


# ---------------------------------------------------------------------------------------------
# failures and the Forge adapter


def test_a_failure_in_drawing_is_one_note_and_the_images_stay(host, monkeypatch, capsys):
    import PIL.ImageDraw

    plain = host.generate(args=host.args(**REGULATION), **FIELDS)
    capsys.readouterr()

    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(PIL.ImageDraw, "Draw", broken)  # PIL's, not ours: drawing fails inside PIL
    processed = host.generate(args=host.args(**REGULATION, show_diagnostics=True), **FIELDS)
    assert len(processed.images) == len(processed.infotexts) == 2 and processed.errors == []
    assert torch.equal(torch.stack(processed.images), torch.stack(plain.images))
    notes = [line for line in capsys.readouterr().err.splitlines() if "diagnostics" in line]
    assert notes == [
        "Semantic Fidelity: diagnostics: RuntimeError: no ink; the images are unchanged, without their "
        "diagnostics picture."
    ]


def test_forge_adapter_keeps_the_maps_of_each_image():
    from guidance.hosts.common import state_of
    from tests.test_forge_adapter import METHOD_SIZE, METHODS, run
    from tests.testbed.forge import ForgeDiffusionEngine

    engine = ForgeDiffusionEngine(seed=0)
    values = dict(METHODS["regulation"], show_diagnostics=True)
    prompts = ("a red cat on a wooden table", "a red cat")
    shown, p = run(engine, build_settings(values), prompts=prompts, **METHOD_SIZE["regulation"])
    captures = state_of(p).diagnostics
    assert [(c.image, c.concepts, c.regions) for c in captures] == [(0, None, None), (1, None, None)]
    record = captures[0].attention.record()
    assert [t.label for t in record.targets] == ["red cat", "red cat"] and record.layers > 0
    assert all(diagnostics.map_mean(t.after) > diagnostics.map_mean(t.before) for t in record.targets)
    off = build_settings(dict(values, show_diagnostics=False))
    plain, p_off = run(engine, off, prompts=prompts, **METHOD_SIZE["regulation"])
    assert state_of(p_off).diagnostics == [] and torch.equal(plain, shown)
