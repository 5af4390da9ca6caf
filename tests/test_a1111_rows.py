"""The A1111 batch layout with the adapter in place (a1111.md §3, pitfalls 1, 5, 6, 24): the host's
counters, the engine's bit-identical path when no method acts, extra rows in the shared UNet call
(on SD1.5 and, where marked, on SDXL: dict conditioning whose pooled vector rides along)."""

import pytest
import torch

from tests.a1111_host import model_loaded

SIZE = dict(width=128, height=128, steps=6, cfg_scale=7.5)
PROMPT = "a red book and a gold clock"
LONG = " ".join(["a red book and a gold clock on a wooden table"] * 12)  # 2 chunks: 154 tokens


LAYOUTS = ["sd15", "sdxl"]


@pytest.fixture(params=LAYOUTS)
def layout_host(request, host, tiny_unet, sdxl_unet):
    """The host with an SD1.5 or an SDXL checkpoint loaded (SD1.5 again afterwards)."""
    with model_loaded(host, sdxl_unet if request.param == "sdxl" else tiny_unet, tiny_unet):
        yield host


def _record(host, fields, args=None):
    seen = []

    def on_cfg_denoiser(params):
        seen.append((params.sampling_step, params.denoiser.step, params.x.shape[0], params.text_cond.shape[1]))

    host.callbacks.on_cfg_denoiser(on_cfg_denoiser)
    try:
        processed = host.generate(args=args, **fields)
    finally:
        host.callbacks.callbacks["cfg_denoiser"].remove(on_cfg_denoiser)
    return processed, seen


def test_the_stand_in_keeps_the_hosts_counters_and_layout(host):
    processed, seen = _record(host, dict(prompt=[PROMPT, "a cat AND a dog:0.5"], batch_size=2, **SIZE))
    assert [s[0] for s in seen] == [0, 0, 1, 2, 3, 4]  # state.sampling_step lags denoiser.step
    assert [s[1] for s in seen] == list(range(6))
    assert {s[2] for s in seen} == {5}  # 3 cond rows + 2 uncond rows
    assert processed.p.sampler.model_wrap_cfg.unet_calls == [5] * 6
    processed, _ = _record(host, dict(prompt=LONG, **SIZE))
    assert processed.p.sampler.model_wrap_cfg.unet_calls == [1, 1] * 6  # 154 vs 77 tokens: split calls


SCENARIOS = {
    "batch 1": dict(prompt=PROMPT),
    "batch 2 with AND": dict(prompt=[PROMPT, "a cat AND a dog:0.5"], batch_size=2),
    "NGMS skipped uncond": dict(prompt=PROMPT, s_min_uncond=100.0),
    "154-token prompt, short negative": dict(prompt=LONG),
}


@pytest.mark.parametrize(
    "layout_host, name",
    [pytest.param("sd15", name, id=f"sd15-{name}") for name in SCENARIOS]
    + [
        pytest.param("sdxl", name, id=f"sdxl-{name}")
        for name in ("batch 2 with AND", "154-token prompt, short negative")
    ],
    indirect=["layout_host"],
)
def test_routed_run_where_no_method_acts_is_bit_identical(layout_host, name):
    host = layout_host
    fields = dict(SCENARIOS[name], **SIZE)
    baseline = host.generate(extension=False, **fields)
    # regulation with end 0 installs every patch (combine override, UNet and attention forwards)
    # but never acts: the engine's host path and the kernel's fast path must give the host's bits
    args = host.args(enable=True, regulation_enable=True, regulation_end=0.0)
    processed = host.generate(args=args, **fields)
    assert processed.errors == []
    assert torch.equal(torch.stack(processed.images), torch.stack(baseline.images))
    assert processed.p.sampler.model_wrap_cfg.unet_calls == baseline.p.sampler.model_wrap_cfg.unet_calls


def test_batch_cond_uncond_off_is_bit_identical(host):
    host.shared.opts.batch_cond_uncond = False
    try:
        test_routed_run_where_no_method_acts_is_bit_identical(host, "batch 2 with AND")
    finally:
        host.shared.opts.batch_cond_uncond = True


def test_extra_rows_join_the_unet_call_and_match_separate_calls(layout_host):
    host = layout_host
    captured = {}

    def on_cfg_denoised(params):
        captured.setdefault("x_out", params.x.clone())

    def on_cfg_denoiser(params):
        captured.setdefault("x", params.x.clone())
        captured.setdefault("sigma", params.sigma.clone())

    host.callbacks.on_cfg_denoiser(on_cfg_denoiser)  # registered after the adapter's: sees the extra rows
    host.callbacks.on_cfg_denoised(on_cfg_denoised)
    try:
        args = host.args(enable=True, sega_enable=True, sega_edits="+ gold clock : 6\n- blurry : 2")
        processed = host.generate(args=args, prompt=[PROMPT, "a cat"], batch_size=2, **SIZE)
    finally:
        host.callbacks.callbacks["cfg_denoiser"].remove(on_cfg_denoiser)
        host.callbacks.callbacks["cfg_denoised"].remove(on_cfg_denoised)
    # 2 cond rows + 2 edits × 2 images + 2 uncond rows, in one UNet call per step
    assert processed.p.sampler.model_wrap_cfg.unet_calls == [8] * 6
    inner = processed.p.sampler.model_wrap
    x, sigma, x_out = captured["x"], captured["sigma"], captured["x_out"]
    for row, (image, text) in enumerate([(0, "gold clock"), (0, "blurry"), (1, "gold clock"), (1, "blurry")]):
        torch.testing.assert_close(x[2 + row], x[6 + image])  # the image's own latent
        alone = inner(x[2 + row : 3 + row], sigma[2 + row : 3 + row], cond=_condition(host, text))
        torch.testing.assert_close(x_out[2 + row], alone[0], rtol=1e-4, atol=1e-4)
    # the prompt matters in the test bed: the edit rows differ from the uncond rows
    assert (x_out[2] - x_out[6]).abs().mean() > 1e-3


def _condition(host, text: str) -> dict:
    """The condition dict the host's denoiser gives the model for `text` alone at the run's size."""
    from modules import prompt_parser

    model = host.shared.sd_model
    encoded = model.get_learned_conditioning(prompt_parser.SdConditioning([text], width=128, height=128))
    return dict(encoded) if isinstance(encoded, dict) else {"c_crossattn": [encoded]}


def test_sdxl_extra_rows_carry_each_pass_size_embedding(host, tiny_unet, sdxl_unet):
    """SDXL's pooled vector holds the image size: the extra rows get the pass's own size, like the
    host's rows (the hires pass encodes at the upscaled size)."""
    from tests.testbed.text_encoder import size_embedding

    seen = []

    def on_cfg_denoiser(params):
        cond = params.text_cond  # pitfall 3: a DictWithShape whose shape is the crossattn's
        assert type(cond).__name__ == "DictWithShape" and cond.shape == cond["crossattn"].shape
        seen.append((params.denoiser.p.is_hr_pass, cond["vector"][:, 1280:].clone()))

    host.callbacks.on_cfg_denoiser(on_cfg_denoiser)  # registered after the adapter's: sees the extra rows
    try:
        with model_loaded(host, sdxl_unet, tiny_unet):
            args = host.args(enable=True, sega_enable=True, sega_edits="+ gold clock : 6", apply_hires=True)
            fields = dict(SIZE, steps=2, enable_hr=True, hr_second_pass_steps=2)
            processed = host.generate(args=args, prompt=PROMPT, **fields)
    finally:
        host.callbacks.callbacks["cfg_denoiser"].remove(on_cfg_denoiser)
    assert processed.errors == []
    assert [hires for hires, _ in seen] == [False, False, True, True]
    for hires, sizes in seen:
        side = 256 if hires else 128
        assert sizes.shape[0] == 2  # the prompt's row and the edit's row
        assert torch.equal(sizes, size_embedding([side, side, 0, 0, side, side]).expand(2, -1))
