"""Semantic Fidelity together with the other tools of a Forge generation, on the Forge stand-in.

Each stand-in tool below uses the Forge mechanism a real one uses (forge.md §1.3, §2.3, §3.4), in its
own minimal form: a CFG function of its own (DynamicThresholding, LatentModifier), a UNet function
wrapper that splits the call into tiles (MultiDiffusion), a recording self-attention patch that needs
the uncond rows plus a post-CFG function (SAG), a post-CFG function that reruns the model with a
2-part-key attention patch (PAG), a batch-sharing self-attention patch on every layer that reads
`cond_indices` (StyleAlign), a ControlNet whose residuals are computed per call for exactly its
rows (Forge's ControlNet patcher), and a conditioning modifier that runs a sampling pass of its own at
CFG scale 1 to record self-attention keys, which the host's cond rows then attend over too
(reference_only, forge_preprocessor_reference). Pass: the combined result differs from each tool alone, nothing
fell back or left a note, and the other tool still did its work."""

from functools import cache

import pytest
import torch

from guidance.hosts.common import NOTE_KEY, attach_state, state_of
from guidance.hosts.forge import ForgeAdapter
from guidance.hosts.forge_patches import TILED_NOTE, UNSEEN_LATENT_NOTE
from guidance.params import build_settings
from tests.testbed.forge import (
    ForgeDiffusionEngine,
    Processing,
    calc_cond_uncond_batch,
    generate,
    record_unet_calls,
    sampling_function_inner,
)

PROMPTS = ("a photo of a red cat on a wooden table", "a red cat in a garden")
METHODS = {
    "concepts": dict(enable=True, concepts_enable=True, concepts="red cat", concept_warmup=0.0),
    "sega": dict(enable=True, sega_enable=True, sega_edits="+ sunglasses : 5"),
    "scfg": dict(enable=True, scfg_enable=True),
    "regulation": dict(
        enable=True, regulation_enable=True, regulation_targets="red cat", regulation_iterations=3, regulation_end=1.0
    ),
}
ENGINE = ForgeDiffusionEngine(seed=0)


def _attention(q, k, v, heads):
    from guidance.attention import attention

    return attention(q, k, v, heads)


class Tool:
    """A stand-in tool: `install(unet)` patches a clone the way its Forge counterpart does; `calls`
    counts its work so a test can see it still acted."""

    def __init__(self):
        self.calls = 0

    def hook(self, p):
        unet = p.sd_model.forge_objects.unet.clone()
        self.install(unet, p)
        p.sd_model.forge_objects.unet = unet


class OwnCfgFunction(Tool):
    def install(self, unet, p):
        def cfg(args):  # CFG with the outliers pulled in (a thresholding of its own)
            self.calls += 1
            u, c = args["uncond_denoised"], args["cond_denoised"]
            d = u + (c - u) * args["cond_scale"]
            return args["input"] - (0.8 * d + 0.2 * d.clamp(-1, 1))

        unet.set_model_sampler_cfg_function(cfg)


class TiledWrapper(Tool):
    def install(self, unet, p):
        def wrapper(apply_model, args):  # two tiles side by side, any number of rows
            self.calls += 1
            x, t, c = args["input"], args["timestep"], args["c"]
            half = x.shape[-1] // 2
            return torch.cat([apply_model(x[..., :half], t, **c), apply_model(x[..., half:], t, **c)], dim=-1)

        unet.set_model_unet_function_wrapper(wrapper)


class RecordingSelfAttention(Tool):
    def install(self, unet, p):
        recorded = {}

        def record(q, k, v, extra):  # keeps the uncond chunk's maps, as SAG does
            labels = extra["cond_or_uncond"]
            if 1 in labels:
                rows = q.shape[0] // len(labels)
                start = labels.index(1) * rows
                recorded["maps"] = (q[start : start + rows] @ k[start : start + rows].transpose(1, 2)).softmax(-1)
            return _attention(q, k, v, extra["n_heads"])

        def post(args):
            self.calls += 1
            maps = recorded.pop("maps")  # raises when the main call did not record
            assert maps.shape[0] == args["input"].shape[0]
            return args["denoised"] + 0.3 * (args["denoised"] - args["uncond_denoised"]) * maps.mean()

        unet.set_model_attn1_replace(record, "middle", 0, 0)
        unet.set_model_sampler_post_cfg_function(post, disable_cfg1_optimization=True)


class PerturbedRerun(Tool):
    def install(self, unet, p):
        def identity(q, k, v, extra):
            return v

        def post(args):  # reruns the cond with one self-attention replaced under a 2-part key
            self.calls += 1
            options = dict(args["model_options"])
            transformer = dict(options.get("transformer_options", {}))
            replace = {kind: dict(table) for kind, table in transformer.get("patches_replace", {}).items()}
            replace.setdefault("attn1", {})[("input", 1)] = identity
            transformer["patches_replace"] = replace
            options["transformer_options"] = transformer
            degraded, _ = calc_cond_uncond_batch(
                args["model"], args["cond"], None, args["input"], args["sigma"], options
            )
            return args["denoised"] + 2.0 * (args["cond_denoised"] - degraded)

        unet.set_model_sampler_post_cfg_function(post)


class SharedBatchAttention(Tool):
    def install(self, unet, p):
        def shared(q, k, v, extra):  # every chunk attends over all rows of its label, as StyleAlign
            self.calls += 1
            heads, out = extra["n_heads"], []
            for label in extra["cond_or_uncond"]:
                rows = extra["cond_indices"] if label == 0 else extra["uncond_indices"]
                joined = [t[rows].reshape(1, -1, t.shape[-1]) for t in (q, k, v)]
                out.append(_attention(*joined, heads).reshape(len(rows), q.shape[1], -1))
            return torch.cat(out)

        for section, blocks in (("input", (1, 2, 4, 5, 7, 8)), ("middle", (0,)), ("output", range(3, 12))):
            for block in blocks:
                unet.set_model_attn1_replace(shared, section, block, 0)


class ReferenceAttention(Tool):
    """reference_only: before each step its conditioning modifier runs the host's sampling function on
    a noised reference latent at CFG scale 1, recording every self-attention's keys and values; in the
    host's own pass the cond rows attend over their keys joined with the recorded ones (torch.cat along
    the tokens: the same number of rows) and the uncond rows half-way (its Style Fidelity 0.5)."""

    def __init__(self):
        super().__init__()
        self.recording_rows = []  # rows of each call of its own pass

    def install(self, unet, p):
        recorded, recording = {}, [False]

        def attn1(q, k, v, extra):
            key, heads = (extra["block"], extra["block_index"]), extra["n_heads"]
            if recording[0]:
                recorded[key] = (k, v)
                self.recording_rows.append(q.shape[0])
                return _attention(q, k, v, heads)
            k_r, v_r = recorded[key]
            c, u = extra["cond_indices"], extra["uncond_indices"]
            o_c = _attention(q[c], torch.cat([k[c], k_r], 1), torch.cat([v[c], v_r], 1), heads)
            strong = _attention(q[u], k[u], v[u], heads)
            weak = _attention(q[u], torch.cat([k[u], k_r], 1), torch.cat([v[u], v_r], 1), heads) if u else strong
            o_u = weak + (strong - weak) * 0.5
            return torch.cat([o_c if label == 0 else o_u for label in extra["cond_or_uncond"]])

        generator = torch.Generator().manual_seed(7)
        latent = []  # the reference image's latent (its VAE encoding there), made at the first step

        def modifier(model, x, timestep, uncond, cond, cond_scale, options, seed):
            self.calls += 1
            latent[:] = latent or [torch.randn(x.shape, generator=generator)]
            noised = latent[0] + torch.randn(x.shape, generator=generator) * timestep.view(-1, 1, 1, 1)
            recording[0] = True
            sampling_function_inner(model, noised, timestep, uncond, cond, 1, options)
            recording[0] = False
            return model, x, timestep, uncond, cond, cond_scale, options, seed

        for section, blocks in (("input", (1, 2, 4, 5, 7, 8)), ("middle", (0,)), ("output", range(3, 12))):
            for block in blocks:
                unet.set_model_attn1_replace(attn1, section, block, 0)
        unet.add_conditioning_modifier(modifier)


class ControlNetStandIn(Tool):
    """Residuals from a hint and each row's own context, computed per call for that call's rows."""

    def __init__(self):
        super().__init__()
        self.rows_seen = []
        self.previous_controlnet = None
        self.transformer_options = {}

    def install(self, unet, p):
        unet.controlnet_linked_list = self

    def get_control(self, x, t, cond, batched_number):
        self.calls += 1
        context = cond["c_crossattn"]
        assert context.shape[0] == x.shape[0] and x.shape[0] % batched_number == 0
        self.rows_seen.append(x.shape[0])
        hint = torch.linspace(-1, 1, x.shape[-1]).expand(x.shape[-2], -1)
        strength = context.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return {"middle": [0.5 * hint * (1 + strength) + 0 * x]}


TOOLS = {
    "own CFG function": OwnCfgFunction,
    "tiled UNet wrapper": TiledWrapper,
    "recording self-attention": RecordingSelfAttention,
    "perturbed rerun": PerturbedRerun,
    "shared batch attention": SharedBatchAttention,
    "ControlNet": ControlNetStandIn,
    "reference attention": ReferenceAttention,
}


SIZES = {"tiled UNet wrapper": 128}  # two tiles of 8 latent columns: the test UNet downsamples 3 times


def _generate(tool_name, method, ours_first=True, size=64):
    tool = TOOLS[tool_name]() if tool_name else None
    p = Processing(ENGINE, list(PROMPTS), [11, 12], width=size, height=size)
    adapter = ForgeAdapter()
    hooks = []
    if method:
        state = attach_state(p, build_settings(METHODS[method]))
        hooks.append(lambda p: adapter.prepare(p, state))
    if tool is not None:
        hooks.insert(len(hooks) if ours_first else 0, tool.hook)
    latent = generate(p, tuple(hooks), (adapter.finish,) if method else ())
    return latent, p, tool


@cache
def _alone(tool_name, method, size):
    return _generate(tool_name, method, size=size)[0]


def _differs(a, b):
    """The smallest per-image mean change."""
    return (a - b).abs().flatten(1).mean(1).min().item()


# combinations that cannot compose, with the note that says so
IMPOSSIBLE = {("tiled UNet wrapper", "scfg"): TILED_NOTE, ("tiled UNet wrapper", "regulation"): TILED_NOTE}
# the share of our method's own effect that must survive the tool (default 0.3): the recorded reference
# dominates both the prompt's and the concept's score against the uncond (which gets half of it), so
# their similarity rises over concept steering's threshold and it adds less in the first image (12 %)
OUR_SHARE = {("reference attention", "concepts"): 0.1}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("tool_name", sorted(TOOLS))
def test_each_tool_composes_with_each_method(tool_name, method):
    # regulation needs maps of 3x3 or more at its layers (factor 4): 128 px (at 64 px it says it cannot act)
    size = SIZES.get(tool_name, 128 if method == "regulation" else 64)
    both, p, tool = _generate(tool_name, method, size=size)
    assert torch.isfinite(both).all() and not state_of(p).failed
    assert tool.calls >= p.steps, f"{tool_name} acted in {tool.calls} of {p.steps} steps"
    plain, theirs, ours = _alone(None, None, size), _alone(tool_name, None, size), _alone(None, method, size)
    their_effect, our_effect = _differs(theirs, plain), _differs(ours, plain)
    assert their_effect > 1e-3, f"{tool_name} alone does nothing here: the cell proves nothing"
    assert _differs(both, ours) > 0.3 * their_effect, f"{tool_name} was lost"
    if (tool_name, method) in IMPOSSIBLE:
        assert p.extra_generation_params[NOTE_KEY] == IMPOSSIBLE[(tool_name, method)]
        return
    assert NOTE_KEY not in p.extra_generation_params, p.extra_generation_params
    assert _differs(both, theirs) > OUR_SHARE.get((tool_name, method), 0.3) * our_effect, "our method was lost"


@pytest.mark.parametrize("tool_name", ["own CFG function", "tiled UNet wrapper", "reference attention"])
def test_order_of_the_scripts_does_not_matter(tool_name):
    """A tool that installs after us keeps our functions, and the other way round."""
    size = SIZES.get(tool_name, 64)
    first, _, _ = _generate(tool_name, "scfg", ours_first=True, size=size)
    second, p, tool = _generate(tool_name, "scfg", ours_first=False, size=size)
    assert not state_of(p).failed and tool.calls >= p.steps
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_extra_rows_get_controlnet_residuals_of_their_own():
    """With ControlNet the extra rows run in a call of their own and ControlNet computes residuals for
    exactly those rows: 2 images x 2 chunks in the main call, 2 images x 1 edit block in the extra one."""
    _, p, tool = _generate("ControlNet", "sega")
    assert tool.rows_seen == [4, 2] * p.steps


@pytest.mark.parametrize("method", ["concepts", "scfg"])
def test_another_tools_own_sampling_pass_is_left_to_the_host(method, monkeypatch):
    """reference_only's recording pass (CFG scale 1, inside its conditioning modifier) holds the host's
    cond rows only: 2 images x 16 self-attention layers per step, no uncond or extra rows; our run
    steps once per denoiser call."""
    from guidance.engine import GuidanceRun

    steps, step = [], GuidanceRun.step
    monkeypatch.setattr(GuidanceRun, "step", lambda run, inputs: steps.append(inputs.step) or step(run, inputs))
    _, p, tool = _generate("reference attention", method)
    assert tool.recording_rows == [2] * 16 * p.steps
    assert steps == list(range(p.steps))
    assert NOTE_KEY not in p.extra_generation_params


LONG_PROMPT = " BREAK ".join(
    ["a red cat on a wooden table", "a gold clock", "a garden", "blue sky", "soft light", "grass"]
)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_prompts_of_six_chunks_keep_every_method(method, monkeypatch):
    """Five BREAKs: 6 chunks (462 tokens) against 1-chunk extra prompts and uncond, more than Forge tiles
    into one call (4x): the extra rows take a call of their own instead of switching the methods off."""
    p = Processing(ENGINE, [LONG_PROMPT], [5], width=128, height=128)
    plain = generate(p, ())
    rows = record_unet_calls(ENGINE, monkeypatch, lambda x, c: (x.shape[0], c["c_crossattn"].shape[1]))
    p = Processing(ENGINE, [LONG_PROMPT], [5], width=128, height=128)
    state = attach_state(p, build_settings(METHODS[method]))
    adapter = ForgeAdapter()
    guided = generate(p, (lambda p: adapter.prepare(p, state),), (adapter.finish,))
    assert not state.failed and NOTE_KEY not in p.extra_generation_params, p.extra_generation_params
    assert (guided - plain).abs().mean() > (1e-6 if method == "regulation" else 1e-3)
    assert (1, 6 * 77) in rows and (1, 77) in rows  # Forge's own split: the cond and uncond calls
    # per step Forge's cond call (462 tokens) and uncond call (77), plus one call of the extra rows
    assert len(rows) == (3 if method in ("concepts", "sega") else 2) * p.steps


def test_the_refiner_switch_is_reported():
    """Forge's refiner switch loads another model mid-run and calls no script hook: the steps before it
    are steered, the note says where it stopped, and the first model is left unpatched."""
    refiner = ForgeDiffusionEngine(seed=4)

    def run(method):
        p = Processing(ENGINE, [PROMPTS[0]], [3], steps=6, refiner_model=refiner, refiner_switch_at=0.5)
        adapter = ForgeAdapter()
        hooks, post = (), ()
        if method:
            state = attach_state(p, build_settings(METHODS[method]))
            hooks, post = (lambda p: adapter.prepare(p, state),), (adapter.finish,)
        original = ENGINE.forge_objects_after_applying_lora.unet
        latent = generate(p, hooks, post)
        assert ENGINE.forge_objects.unet is original and refiner.forge_objects.unet.model_options == {
            "transformer_options": {}
        }
        return latent, p

    plain, _ = run(None)
    guided, p = run("scfg")
    assert (guided - plain).abs().mean() > 1e-3
    assert p.extra_generation_params[NOTE_KEY] == (
        "the refiner took over at step 5 of 6; Semantic Fidelity steered the steps before it only "
        "(its extra prompts and attention routing belong to the first model)."
    )


class LatentReplacingPreCfg(Tool):
    """A pre-CFG function that hands the UNet a new latent (ControlNet's inpaint_only blends the noised
    image in, forge_preprocessor_inpaint)."""

    def install(self, unet, p):
        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            self.calls += 1
            return model, cond, uncond, x * 0.9, timestep, model_options

        unet.set_model_sampler_pre_cfg_function(pre_cfg)


def test_a_latent_replaced_before_our_pre_cfg_function_is_said():
    """Installed before ours, it replaces the latent our conditioning modifier noted: the host's
    sampling pass is then not recognised, each step is left to the host, and one note says so."""
    TOOLS["latent-replacing pre-CFG"] = LatentReplacingPreCfg
    try:
        both, p, tool = _generate("latent-replacing pre-CFG", "sega", ours_first=False)
        theirs = _generate("latent-replacing pre-CFG", None)[0]
    finally:
        del TOOLS["latent-replacing pre-CFG"]
    assert tool.calls == p.steps
    assert p.extra_generation_params[NOTE_KEY] == UNSEEN_LATENT_NOTE
    torch.testing.assert_close(both, theirs, rtol=0, atol=0)
