"""Semantic Fidelity together with other CFG tools on the A1111 stand-in, one per way A1111 extensions
change the CFG combination (a1111.md §3):

- a sampler subclass with its own `combine_denoised` that reads every row before the uncond block as
  a cond row (sd-dynamic-thresholding's CustomCFGDenoiser): it must never see our extra rows;
- an instance wrapper set before us that calls the method it wrapped;
- an `on_cfg_denoiser` callback that puts its own `combine_denoised` on the denoiser at every step and
  never calls the one it replaced (sd-webui-incantations' S-CFG and PAG).

Pass: the combined image differs from each alone by at least 30 % of the other's own effect, the
other tool ran at every step, no note, no error, nothing left patched."""

import pytest
import torch

# 128 px: regulation acts (its layers need 3×3 maps at least; at 64 px they are 2×2)
SIZE = dict(width=128, height=128, steps=4, cfg_scale=7.0)
PROMPTS = ["a red book and a gold clock", "a red book on a wooden table"]
METHODS = {
    "concepts": dict(enable=True, concepts_enable=True, concepts="red book", concept_warmup=0.0),
    "sega": dict(enable=True, sega_enable=True, sega_edits="+ sunglasses : 5"),
    "scfg": dict(enable=True, scfg_enable=True),
    "regulation": dict(
        enable=True, regulation_enable=True, regulation_targets="red book", regulation_iterations=3, regulation_end=1.0
    ),
}
NOTE = "Semantic Fidelity note"
ALONE = {}  # (tool, method) → images, shared by the cells


def _squash(denoised):
    """What every stand-in tool does to the CFG result: outliers pulled in."""
    return 0.8 * denoised + 0.2 * denoised.clamp(-1, 1)


def _tool_script(base):
    class ToolScript(base):
        args_from = args_to = 0
        alwayson = True

        def __init__(self):
            self.calls = 0

        def title(self):
            return type(self).__name__

    return ToolScript


def make_tools():
    from modules import script_callbacks, scripts

    Tool = _tool_script(scripts.Script)

    class SamplerSubclass(Tool):
        def process_before_every_sampling(self, p, *args, **kwargs):
            tool, denoiser = self, p.sampler.model_wrap_cfg

            class Thresholding(type(denoiser)):
                def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
                    tool.calls += 1
                    conds = x_out[: -uncond.shape[0]]  # every row before the uncond block
                    assert conds.shape[0] == sum(len(c) for c in conds_list), "extra rows reached the tool"
                    return _squash(super().combine_denoised(x_out, conds_list, uncond, cond_scale))

            denoiser.__class__ = Thresholding

    class InstanceWrapper(Tool):
        def process_before_every_sampling(self, p, *args, **kwargs):
            denoiser = p.sampler.model_wrap_cfg
            wrapped = denoiser.combine_denoised

            def combine_denoised(*args):
                self.calls += 1
                return _squash(wrapped(*args))

            denoiser.combine_denoised = combine_denoised

    class ReplacesEveryStep(Tool):
        def process(self, p, *args):
            def own(x_out, conds_list, uncond, cond_scale):  # never calls what it replaced
                self.calls += 1
                uncond_rows = x_out[-uncond.shape[0] :]
                denoised = uncond_rows.clone()
                for i, conds in enumerate(conds_list):
                    for row, weight in conds:
                        denoised[i] += (x_out[row] - uncond_rows[i]) * (weight * cond_scale)
                return _squash(denoised)

            def patch(params):
                params.denoiser.combine_denoised = own

            self.callback = patch
            script_callbacks.on_cfg_denoiser(patch)

        def postprocess(self, p, processed, *args):
            script_callbacks.callbacks["cfg_denoiser"].remove(self.callback)

    return {"sampler subclass": SamplerSubclass, "instance wrapper": InstanceWrapper, "replaces": ReplacesEveryStep}


def _generate(host, tool_name, method):
    from modules import processing, scripts

    tool = make_tools()[tool_name]() if tool_name else None
    args = host.args(**METHODS[method]) if method else host.default_args()
    runner = scripts.ScriptRunner(([tool] if tool else []) + [host.script])
    p = processing.StableDiffusionProcessingTxt2Img(
        scripts=runner, script_args=args, prompt=PROMPTS, batch_size=2, **SIZE
    )
    processed = processing.process_images(p)
    errors = runner.errors + list(host.callbacks.reported)
    host.callbacks.reported.clear()
    return torch.stack(processed.images), p, tool, errors


def _differs(a, b):
    return (a - b).abs().flatten(1).mean(1).min().item()


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("tool_name", ["sampler subclass", "instance wrapper", "replaces"])
def test_each_cfg_tool_composes_with_each_method(host, tool_name, method):
    def alone(tool, m):
        if (tool, m) not in ALONE:
            ALONE[(tool, m)] = _generate(host, tool, m)[0]
        return ALONE[(tool, m)]

    both, p, tool, errors = _generate(host, tool_name, method)
    assert errors == [] and torch.isfinite(both).all()
    assert tool.calls >= p.steps, f"{tool_name} ran in {tool.calls} of {p.steps} steps"
    assert NOTE not in p.extra_generation_params, p.extra_generation_params
    plain, theirs, ours = alone(None, None), alone(tool_name, None), alone(None, method)
    their_effect, our_effect = _differs(theirs, plain), _differs(ours, plain)
    assert their_effect > 1e-3 and our_effect > 0
    assert _differs(both, ours) > 0.3 * their_effect, f"{tool_name} was lost"
    assert _differs(both, theirs) > 0.3 * our_effect, "our method was lost"
    assert host.leftover_patches() == []
    attributes = p.sampler.model_wrap_cfg.__dict__
    if tool_name == "instance wrapper":  # theirs is back in place, ours is gone
        assert attributes["combine_denoised"].__name__ == "combine_denoised"
        assert attributes["combine_denoised"].__qualname__.startswith("make_tools")
    elif tool_name == "sampler subclass":
        assert "combine_denoised" not in attributes


def _detailer_pass(host, args, prompt="a detailed face with blue eyes"):
    """An inpainting pass the way ADetailer runs one: its own img2img processing object with our script's
    arguments copied, marked `_ad_inner`, with the pass's own prompt."""
    from modules import processing, scripts

    init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    runner = scripts.ScriptRunner([host.script])
    size = dict(SIZE, width=64, height=64)  # the 8×8 init latent
    p = processing.StableDiffusionProcessingImg2Img(
        scripts=runner, script_args=list(args), prompt=prompt, init_latent=init, mask=mask, **size
    )
    p._ad_inner = True
    processed = processing.process_images(p)
    return torch.stack(processed.images), p, runner.errors + list(host.callbacks.reported)


def test_detailer_passes_follow_their_switch(host):
    """Off by default (the pass is the host's own, bit for bit); on, the methods act and detect their
    concepts from the pass's own prompt, not from the list typed for the main image."""
    plain, _, _ = _detailer_pass(host, host.default_args())
    values = dict(enable=True, concepts_enable=True, concepts="red book; gold clock", concept_warmup=0.0)
    off, p_off, errors = _detailer_pass(host, host.args(**values))
    assert errors == [] and torch.equal(off, plain)
    on, p_on, errors = _detailer_pass(host, host.args(apply_detailer=True, **values))
    assert errors == [] and _differs(on, plain) > 1e-3
    detected = p_on.extra_generation_params["Semantic Fidelity detected concepts"]
    assert "face" in detected and "book" not in detected


def test_the_refiner_switch_stops_the_methods_with_a_note(host, tiny_unet):
    """A1111's refiner switch replaces the model mid-run (pitfall 3): the methods act before it, stop at
    it with one note, and leave nothing patched on either model."""
    from modules import processing, scripts, shared
    from modules.sd_models import make_sd_model

    from tests.testbed.unet import make_unet

    base = shared.sd_model
    refiner = make_sd_model(make_unet("tiny", seed=9))

    def run(args):
        shared.sd_model = base
        runner = scripts.ScriptRunner([host.script])
        p = processing.StableDiffusionProcessingTxt2Img(
            scripts=runner, script_args=args, prompt=PROMPTS[0], steps=6, width=64, height=64, cfg_scale=7.0
        )
        p.refiner_model, p.refiner_switch_at = refiner, 0.5
        try:
            processed = processing.process_images(p)
        finally:
            shared.sd_model = base
        return torch.stack(processed.images), p, runner.errors + list(host.callbacks.reported)

    plain, _, _ = run(host.default_args())
    guided, p, errors = run(host.args(**METHODS["scfg"], **{"sega_enable": True, "sega_edits": "+ hat : 5"}))
    assert errors == [] and _differs(guided, plain) > 1e-3
    assert p.extra_generation_params[NOTE] == (
        "the refiner took over at step 5 of 6; Semantic Fidelity steered the steps before it only "
        "(its extra prompts and attention routing belong to the first model)."
    )
    assert host.leftover_patches() == [] and "forward" not in refiner.model.diffusion_model.__dict__
    assert "combine_denoised" not in p.sampler.model_wrap_cfg.__dict__
