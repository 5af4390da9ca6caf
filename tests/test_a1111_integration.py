"""Whole txt2img and img2img runs through the A1111 stand-in with the real script, adapter and ldm
UNet: disabled ⇒ bit-identical to the host without the extension; every method acts; bad input and
errors inside hooks fall back to the host's CFG; nothing stays patched. The whole-generation tests
run on both layouts (`layout_host`): SD1.5 and SDXL (dict conditioning, pooled vector, attention at
factors 2 and 4 only, transformer depths 2 and 3)."""

import pytest
import torch

from tests.a1111_host import model_loaded

SIZE = dict(width=128, height=128, steps=4, cfg_scale=7.0)
PROMPT = "a red book and a gold clock"


LAYOUTS = ["sd15", "sdxl"]


@pytest.fixture(params=LAYOUTS)
def layout_host(request, host, tiny_unet, sdxl_unet):
    """The host with an SD1.5 or an SDXL checkpoint loaded (SD1.5 again afterwards)."""
    with model_loaded(host, sdxl_unet if request.param == "sdxl" else tiny_unet, tiny_unet):
        assert host.shared.sd_model.is_sdxl == (request.param == "sdxl")
        yield host


def _on_layouts(cases: dict, sdxl: list[str]) -> list:
    """(layout, case) parameters for `layout_host` (indirect): every case on SD1.5, the `sdxl` ones on
    SDXL too (the suite's time)."""
    return [
        pytest.param(layout, case, id=f"{layout}-{name}")
        for layout in LAYOUTS
        for name, case in cases.items()
        if layout == "sd15" or name in sdxl
    ]


def _images(processed):
    return torch.stack(processed.images)


def _assert_clean(host, processed):
    assert processed.errors == []
    assert host.leftover_patches() == []
    denoiser = processed.p.sampler.model_wrap_cfg
    assert "combine_denoised" not in denoiser.__dict__


DISABLED_CASES = {
    "batch1": dict(prompt=PROMPT, **SIZE),
    "batch2-AND": dict(prompt=[PROMPT, "a cat AND a dog:0.5"], batch_size=2, **SIZE),
    "NGMS": dict(prompt=PROMPT, s_min_uncond=100.0, **SIZE),
    "hires": dict(prompt=PROMPT, enable_hr=True, hr_second_pass_steps=2, **SIZE),
    "DDIM": dict(prompt=PROMPT, sampler_name="DDIM", **SIZE),
}


@pytest.mark.parametrize(
    "layout_host, fields", _on_layouts(DISABLED_CASES, ["batch2-AND", "hires"]), indirect=["layout_host"]
)
def test_disabled_is_bit_identical_to_the_host_without_the_extension(layout_host, fields):
    host = layout_host
    baseline = host.generate(extension=False, **fields)
    for args in (host.default_args(), host.args(concepts_enable=True, sega_enable=True)):
        processed = host.generate(args=args, **fields)  # master switch off
        assert torch.equal(_images(processed), _images(baseline))
        assert "Semantic Fidelity" not in processed.infotexts[0]
        _assert_clean(host, processed)


def test_header_switch_alone_runs_the_preset_and_custom_alone_runs_nothing(host, capsys):
    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    processed = host.generate(args=host.args(enable=True, preset="Custom"), prompt=PROMPT, **SIZE)
    assert torch.equal(_images(processed), _images(baseline))
    assert "Semantic Fidelity note: no method on" in processed.infotexts[0]
    assert capsys.readouterr().err.count("Semantic Fidelity: no method on") == 1
    processed = host.generate(args=host.args(enable=True), prompt=PROMPT, **SIZE)  # the default preset
    assert (_images(processed) - _images(baseline)).abs().max() > 1e-3
    for key in ("preset: Balanced", "concept steering: True", "S-CFG: True", "detected concepts"):
        assert f"Semantic Fidelity {key}" in processed.infotexts[0]
    _assert_clean(host, processed)


@pytest.mark.parametrize(
    "args, message",
    [
        ([{"enable": True, "colour": 3}], "unknown setting 'colour'"),
        ([{"enable": True, "concept_scale": 100}], "is above the maximum"),
        ([{"enable": True, "sega_enable": True, "sega_edits": "+ : 5"}], "the prompt is empty"),
        ([{"enable": True, "concepts_enable": True, "concepts": "x" * 1000}], "Concept"),
    ],
    ids=["unknown-key", "out-of-range", "empty-edit", "long-concepts"],
)
def test_bad_input_gives_the_host_image_and_one_clear_message(host, args, message, capsys):
    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    args = args + host.default_args()[1:]  # the API pads with UI defaults
    processed = host.generate(args=args, prompt=PROMPT, **SIZE)
    assert torch.equal(_images(processed), _images(baseline))
    err = capsys.readouterr().err
    assert err.count("Semantic Fidelity:") == 1 and message in err
    assert "Semantic Fidelity note" in processed.infotexts[0]
    _assert_clean(host, processed)


def test_the_optimization_is_listed_below_the_hosts_own(host):
    titles = [o.title() for o in host.sd_hijack.optimizers]
    assert titles[0] == "sdp - scaled dot product"
    assert any(t.startswith("Semantic Fidelity SDP") for t in titles)
    assert host.sd_hijack.current_optimizer.name == "sdp"


# ---------------------------------------------------------------------------------------------
# every method through the whole host path

METHOD_ARGS = {
    "concepts": dict(concepts_enable=True),
    "sega": dict(sega_enable=True, sega_edits="+ gold clock : 6\n- red book : 3"),
    "scfg": dict(scfg_enable=True),
    "regulation": dict(regulation_enable=True),
}
METHOD_KEYS = {
    "concepts": "Semantic Fidelity concept steering",
    "sega": "Semantic Fidelity SEGA",
    "scfg": "Semantic Fidelity S-CFG",
    "regulation": "Semantic Fidelity regulation",
}


def _settings_args(host, *methods, **more):
    values = dict(enable=True)
    for method in methods:
        values.update(METHOD_ARGS[method])
    values.update(more)
    return host.args(**values)


def _infotext_keys(infotext):
    return [part.split(":")[0].strip() for part in infotext.splitlines()[-1].split(", ")]


@pytest.mark.parametrize(
    "methods", [("concepts",), ("sega",), ("scfg",), ("regulation",), tuple(METHOD_ARGS)], ids="-".join
)
def test_each_method_and_all_together_change_the_image(layout_host, methods):
    host = layout_host
    fields = dict(prompt=PROMPT, **SIZE)
    baseline = host.generate(extension=False, **fields)
    processed = host.generate(args=_settings_args(host, *methods), **fields)
    _assert_clean(host, processed)
    images = _images(processed)
    assert torch.isfinite(images).all()
    assert (images - _images(baseline)).abs().max() > 1e-3
    keys = _infotext_keys(processed.infotexts[0])
    assert "Semantic Fidelity" in keys
    for method in methods:
        assert any(key.startswith(METHOD_KEYS[method]) for key in keys), (method, keys)
    assert "Semantic Fidelity note" not in keys


VARIANT_CASES = {
    "batch2-AND": dict(prompt=[PROMPT, "a blue cat AND a green dog:0.5"], batch_size=2, **SIZE),
    "154-tokens-short-negative": dict(
        prompt=" ".join(["a red book and a gold clock on a wooden table"] * 12), negative_prompt="blurry", **SIZE
    ),
    "NGMS": dict(prompt=PROMPT, s_min_uncond=100.0, **SIZE),
    "DDIM-eps": dict(prompt=PROMPT, sampler_name="DDIM", **SIZE),
    "two-batches": dict(prompt=PROMPT, n_iter=2, **SIZE),
}


@pytest.mark.parametrize(
    "layout_host, fields",
    _on_layouts(VARIANT_CASES, ["batch2-AND", "154-tokens-short-negative", "DDIM-eps"]),
    indirect=["layout_host"],
)
def test_all_methods_through_host_variants(layout_host, fields):
    host = layout_host
    baseline = host.generate(extension=False, **fields)
    processed = host.generate(args=_settings_args(host, *METHOD_ARGS), **fields)
    _assert_clean(host, processed)
    images, plain = _images(processed), _images(baseline)
    assert images.shape == plain.shape and torch.isfinite(images).all()
    for index in range(images.shape[0]):  # every image of the batch is steered
        assert (images[index] - plain[index]).abs().max() > 1e-3


def test_batch_images_keep_their_own_concepts(host):
    prompts = [PROMPT, "a blue cat on a green sofa"]
    together = host.generate(args=_settings_args(host, "concepts"), prompt=prompts, batch_size=2, seed=5, **SIZE)
    alone = host.generate(args=_settings_args(host, "concepts"), prompt=prompts[1], seed=6, **SIZE)
    # image 1 of the batch (seed 6) is the same image as generated alone
    torch.testing.assert_close(together.images[1], alone.images[0], rtol=1e-4, atol=1e-4)


def test_hires_pass_follows_its_switch(layout_host):
    host = layout_host
    fields = dict(prompt=PROMPT, enable_hr=True, hr_second_pass_steps=2, **SIZE)
    with_hires = host.generate(args=_settings_args(host, "sega", apply_hires=True), **fields)
    without = host.generate(args=_settings_args(host, "sega", apply_hires=False), **fields)
    _assert_clean(host, with_hires)
    _assert_clean(host, without)
    assert with_hires.images[0].shape[-1] == 32
    assert (with_hires.images[0] - without.images[0]).abs().max() > 1e-3


def test_img2img_is_steered(layout_host):
    host = layout_host
    init = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    fields = dict(prompt=PROMPT, init_latent=init, denoising_strength=0.6, **SIZE)
    baseline = host.generate("img2img", extension=False, **fields)
    disabled = host.generate("img2img", **fields)
    assert torch.equal(_images(disabled), _images(baseline))
    processed = host.generate("img2img", args=_settings_args(host, *METHOD_ARGS), **fields)
    _assert_clean(host, processed)
    assert (_images(processed) - _images(baseline)).abs().max() > 1e-3


def test_api_dict_form_equals_the_positional_form(host):
    named = {"enable": True, "sega_enable": True, "sega_edits": "+ gold clock : 6"}
    by_dict = host.generate(args=[named] + host.default_args()[1:], prompt=PROMPT, **SIZE)
    by_position = host.generate(args=host.args(**named), prompt=PROMPT, **SIZE)
    assert torch.equal(_images(by_dict), _images(by_position))
    assert by_dict.infotexts == by_position.infotexts


def test_an_error_before_the_unet_call_gives_the_hosts_image_bit_for_bit(host, monkeypatch, capsys):
    from guidance.hosts import a1111

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(a1111, "conds_for_step", broken)  # inside on_cfg_denoiser, at step 0
    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    processed = host.generate(args=_settings_args(host, *METHOD_ARGS), prompt=PROMPT, **SIZE)
    _assert_clean(host, processed)
    assert torch.equal(_images(processed), _images(baseline))  # no row was added, no layer routed
    err = capsys.readouterr().err
    assert err.count("RuntimeError: boom") == 1
    assert "boom" in processed.infotexts[0]


def test_an_error_in_the_guidance_step_falls_back_to_host_cfg_once(host, monkeypatch, capsys):
    from guidance.engine import GuidanceRun

    def broken(self, inputs):
        raise RuntimeError("boom")

    monkeypatch.setattr(GuidanceRun, "step", broken)
    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    # CFG-level methods only: attention methods act inside the UNet before the step could fail
    processed = host.generate(args=_settings_args(host, "concepts", "sega"), prompt=PROMPT, **SIZE)
    _assert_clean(host, processed)
    # the first step's UNet call still held the extra rows; the host's rows are the same to rounding
    torch.testing.assert_close(_images(processed), _images(baseline), rtol=1e-4, atol=1e-4)
    err = capsys.readouterr().err
    assert err.count("RuntimeError: boom") == 1
    assert "boom" in processed.infotexts[0]


def test_the_infotext_names_the_concepts_detected_in_the_prompt(host):
    detected = host.generate(args=_settings_args(host, "concepts"), prompt=PROMPT, **SIZE)
    assert "Semantic Fidelity detected concepts: red book; gold clock" in detected.infotexts[0]
    regulation_only = host.generate(args=_settings_args(host, "regulation"), prompt=PROMPT, **SIZE)
    assert "Semantic Fidelity detected concepts: red book; gold clock" in regulation_only.infotexts[0]
    given = host.generate(args=_settings_args(host, "concepts", concepts="gold clock"), prompt=PROMPT, **SIZE)
    assert "detected concepts" not in given.infotexts[0]
    # the key describes one generation: the next one without detection does not inherit it
    sega = host.generate(args=_settings_args(host, "sega"), prompt=PROMPT, **SIZE)
    assert "detected concepts" not in sega.infotexts[0]


def test_infotext_round_trip(host):
    args = _settings_args(host, "concepts", "sega", "scfg", concept_scale=6.5, sega_momentum=0.3)
    processed = host.generate(args=args, prompt=PROMPT, **SIZE)
    fields = dict(part.split(": ", 1) for part in processed.infotexts[0].splitlines()[-1].split(", ") if ": " in part)
    fields = {key: value.strip('"') for key, value in fields.items()}
    restored = host.params.build_settings(host.params.values_from_infotext(fields))
    assert restored == host.params.settings_from_args(args)


def test_xyz_axes_override_the_ui_values(host):
    import types

    from modules import scripts

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.choices = label, type, apply, choices

    xyz = types.ModuleType("xyz_grid.py")
    xyz.AxisOption, xyz.axis_options = AxisOption, []
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    scripts.scripts_data.append(scripts.ScriptClassData(script_class, "xyz_grid.py", "", xyz))
    try:
        assert host.module._xyz.register_axes()
        assert host.module._xyz.register_axes()  # idempotent
        labels = [o.label for o in xyz.axis_options]
        assert len(labels) == len(set(labels)) == len(host.params.xyz_params())
        by_label = {o.label: o for o in xyz.axis_options}
        scale_axis = next(o for label, o in by_label.items() if "Concept scale" in label)
        edits_axis = next(o for label, o in by_label.items() if "Edits" in label)
    finally:
        scripts.scripts_data.pop()

    from modules import processing

    cells = []
    for scale, edits in ((4.0, "+ gold clock : 6"), (12.0, "- red book : 2")):
        p = processing.StableDiffusionProcessingTxt2Img(
            scripts=scripts.ScriptRunner([host.script]),
            script_args=host.default_args(),  # the UI has the extension off: the axes switch it on
            prompt=PROMPT,
            **SIZE,
        )
        scale_axis.apply(p, scale_axis.type(str(scale)), [])
        edits_axis.apply(p, edits, [])
        cells.append(processing.process_images(p))
    assert "Semantic Fidelity concept scale: 4" in cells[0].infotexts[0]
    assert "Semantic Fidelity concept scale: 12" in cells[1].infotexts[0]
    assert "gold clock" in cells[0].infotexts[0] and "red book" in cells[1].infotexts[0]
    assert (cells[0].images[0] - cells[1].images[0]).abs().max() > 1e-3


def test_a_generation_that_raises_leaves_nothing_for_the_next(host, monkeypatch):
    from modules import sd_samplers_cfg_denoiser

    original = sd_samplers_cfg_denoiser.CFGDenoiser.forward

    def fails_at_step_two(self, *args, **kwargs):
        if self.step == 2:
            raise ValueError("host failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", fails_at_step_two)
    with pytest.raises(ValueError, match="host failure"):
        host.generate(args=_settings_args(host, *METHOD_ARGS), prompt=PROMPT, **SIZE)
    assert host.leftover_patches() != []  # the host skipped postprocess
    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "forward", original)
    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    processed = host.generate(prompt=PROMPT, **SIZE)  # disabled: process() cleans up first
    assert host.leftover_patches() == []
    assert torch.equal(_images(processed), _images(baseline))


@pytest.mark.parametrize("model_change", ["edit", "alternative-unet"])
def test_unsupported_models_are_declined_with_a_message(host, model_change, capsys):
    from modules import sd_unet

    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    model = host.shared.sd_model
    try:
        if model_change == "edit":
            model.cond_stage_key = "edit"
        else:
            sd_unet.current_unet = object()
        processed = host.generate(args=_settings_args(host, *METHOD_ARGS), prompt=PROMPT, **SIZE)
    finally:
        model.__dict__.pop("cond_stage_key", None)
        sd_unet.current_unet = None
    assert torch.equal(_images(processed), _images(baseline))
    err = capsys.readouterr().err
    expected = "InstructPix2Pix" if model_change == "edit" else "alternative UNet"
    assert err.count("Semantic Fidelity:") == 1 and expected in err
    assert expected in processed.infotexts[0]
    _assert_clean(host, processed)
