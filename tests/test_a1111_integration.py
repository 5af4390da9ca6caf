"""Whole txt2img and img2img runs through the A1111 stand-in with the real script, adapter and ldm
UNet: disabled ⇒ bit-identical to the host without the extension; every method acts; bad input and
errors inside hooks fall back to the host's CFG; nothing stays patched."""

import pytest
import torch

from tests.a1111_host import A1111StandIn, a1111_modules

SIZE = dict(width=128, height=128, steps=4, cfg_scale=7.0)
PROMPT = "a red book and a gold clock"


@pytest.fixture(scope="module")
def host(tiny_unet):
    with a1111_modules():
        yield A1111StandIn(tiny_unet)


def _images(processed):
    return torch.stack(processed.images)


def _assert_clean(host, processed):
    assert processed.errors == []
    assert host.leftover_patches() == []
    denoiser = processed.p.sampler.model_wrap_cfg
    assert "combine_denoised" not in denoiser.__dict__


@pytest.mark.parametrize(
    "fields",
    [
        dict(prompt=PROMPT, **SIZE),
        dict(prompt=[PROMPT, "a cat AND a dog:0.5"], batch_size=2, **SIZE),
        dict(prompt=PROMPT, s_min_uncond=100.0, **SIZE),
        dict(prompt=PROMPT, enable_hr=True, hr_second_pass_steps=2, **SIZE),
        dict(prompt=PROMPT, sampler_name="DDIM", **SIZE),
    ],
    ids=["batch1", "batch2-AND", "NGMS", "hires", "DDIM"],
)
def test_disabled_is_bit_identical_to_the_host_without_the_extension(host, fields):
    baseline = host.generate(extension=False, **fields)
    for args in (host.default_args(), host.args(concepts_enable=True, sega_enable=True)):
        processed = host.generate(args=args, **fields)  # master switch off
        assert torch.equal(_images(processed), _images(baseline))
        assert "Semantic Fidelity" not in processed.infotexts[0]
        _assert_clean(host, processed)


def test_enabled_without_methods_changes_nothing(host):
    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    processed = host.generate(args=host.args(enable=True), prompt=PROMPT, **SIZE)
    assert torch.equal(_images(processed), _images(baseline))


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
