"""A stand-in for the Forge 2.x pieces the Forge adapter touches, written from
../shared/hosts/forge.md §1-§4 (no Forge code), around the real ldm UNet of `unet.py`.

- `UnetPatcher`: `clone()` (deep copy of `model_options`, same model), the setters the adapter uses
  and the `model_options` layout they write;
- `KModel.apply_model(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs)`:
  sigma in, x0 out (eps or v model with k-diffusion scaling, on the SD schedule or its zero-terminal-
  SNR rescaling); SDXL's pooled vector arrives as the `y` keyword and goes to the UNet;
- conditions: SD1 tensors, or SDXL's dict `crossattn` + `vector` compiled to `c_crossattn` + `y`;
- attention replace patches: every ldm CrossAttention gets an instance forward that looks the layer
  up in `transformer_options["patches_replace"]["attn1"|"attn2"]` under (block, id, index), then
  (block, id), and calls `fn(q, k, v, extra_options)` with projected q/k/v, like Forge's
  BasicTransformerBlock;
- `sampling_function`: conditions → conditioning modifiers → CFG-1 shortcut → pre-CFG →
  `calc_cond_uncond_batch` (chunks of B rows, uncond chunk first, wrapper `fn(apply_model, args)`)
  → CFG function `fn(args)` returning "x minus x0" (or the default formula with the AND strength)
  → post-CFG functions;
- `CFGDenoiser` (`step`, `total_steps`, `p`), `ForgeDiffusionEngine` with `forge_objects` reset before
  every sampler run, and `generate()`, which drives a whole txt2img / hires / img2img run with the
  script hooks in Forge's order (the hires pass calls the hook before and after the reset).
"""

from __future__ import annotations

import copy
import inspect
import math
import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from .sampling import CompVisEpsDenoiser, sample_euler, x0_from_v
from .text_encoder import Conditioning, SdxlTextEncoderStandIn, TextEncoderStandIn
from .unet import is_sdxl, make_unet

# ---------------------------------------------------------------------------------------------
# conditions (backend/sampling/condition.py behaviour)


class Condition:
    def __init__(self, cond: torch.Tensor):
        self.cond = cond

    def process_cond(self, batch_size: int) -> Condition:
        c = self.cond
        if c.shape[0] < batch_size:
            c = c.repeat(math.ceil(batch_size / c.shape[0]), *([1] * (c.dim() - 1)))
        return type(self)(c[:batch_size])

    def can_concat(self, other: Condition) -> bool:
        return self.cond.shape == other.cond.shape

    def concat(self, others: list[Condition]) -> torch.Tensor:
        return torch.cat([self.cond] + [o.cond for o in others])


class ConditionCrossAttn(Condition):
    def can_concat(self, other: Condition) -> bool:
        a, b = self.cond.shape, other.cond.shape
        if a == b:
            return True
        if a[0] != b[0] or a[2] != b[2]:
            return False
        return math.lcm(a[1], b[1]) // min(a[1], b[1]) <= 4

    def concat(self, others: list[Condition]) -> torch.Tensor:
        conds = [self.cond] + [o.cond for o in others]
        tokens = 1
        for c in conds:
            tokens = math.lcm(tokens, c.shape[1])
        return torch.cat([c.repeat(1, tokens // c.shape[1], 1) for c in conds])


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, dict):  # SDXL: the pooled vector becomes the `y` model condition
        crossattn, vector = cond["crossattn"], cond["vector"]
        model_conds = {"c_crossattn": ConditionCrossAttn(crossattn), "y": Condition(vector)}
        return [{"cross_attn": crossattn, "pooled_output": vector, "model_conds": model_conds}]
    return [{"cross_attn": cond, "model_conds": {"c_crossattn": ConditionCrossAttn(cond)}}]


def _cond_rows(cond, rows: list[int]):
    return {key: value[rows] for key, value in cond.items()} if isinstance(cond, dict) else cond[rows]


def compile_weighted_conditions(cond: torch.Tensor, composition):
    """One condition per AND position across the images (the composition transposed), with the
    strength of that position's weight."""
    results = []
    for parts in zip(*composition, strict=False):
        compiled = compile_conditions(_cond_rows(cond, [index for index, _ in parts]))
        compiled[0]["strength"] = parts[-1][1]
        results += compiled
    return results


# ---------------------------------------------------------------------------------------------
# the model and its patcher


class EpsPredictor:
    """Forge's `Prediction` for eps models: the discrete schedule's sigmas and timesteps."""

    def __init__(self, alphas_cumprod: torch.Tensor | None = None):
        self.schedule = CompVisEpsDenoiser(torch.nn.Identity(), alphas_cumprod)

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma)

    def calculate_input(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x / (sigma.view(-1, 1, 1, 1) ** 2 + 1) ** 0.5

    def calculate_denoised(self, sigma: torch.Tensor, eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x - eps * sigma.view(-1, 1, 1, 1)


class VPredictor(EpsPredictor):
    """Forge's `Prediction` for v models (sigma_data 1)."""

    def calculate_denoised(self, sigma: torch.Tensor, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x0_from_v(x, v, sigma)


def _layer_positions(unet) -> dict[str, tuple[tuple[str, int], int, int]]:
    """module name → (block, block_index, transformer_index) of every BasicTransformerBlock."""
    names = []
    for name, module in unet.named_modules():
        if type(module).__name__ == "BasicTransformerBlock":
            names.append(name)
    positions, transformer_index, last = {}, -1, None
    for name in names:
        parts = name.split(".")
        while parts[0] not in ("input_blocks", "middle_block", "output_blocks"):
            parts = parts[1:]  # a wrapper's prefix (VFromEps.eps_unet)
        if parts[0] == "middle_block":
            block, container = ("middle", 0), "middle_block"
        else:
            block = ("input" if parts[0] == "input_blocks" else "output", int(parts[1]))
            container = ".".join(parts[:3])
        if container != last:
            transformer_index, last = transformer_index + 1, container
        positions[name] = (block, int(parts[-1]), transformer_index)
    return positions


class KModel:
    """`apply_model` of Forge's KModel around an ldm UNet; attention replace patches are honoured."""

    def __init__(self, diffusion_model: torch.nn.Module, config: dict | None = None, predictor=None):
        self.diffusion_model = diffusion_model
        if config is not None:
            diffusion_model.config = config
        self.predictor = predictor or EpsPredictor()
        self._options: dict | None = None
        self._shape = None
        for name, (block, block_index, transformer_index) in _layer_positions(diffusion_model).items():
            transformer = diffusion_model.get_submodule(name)
            for kind in ("attn1", "attn2"):
                module = getattr(transformer, kind)
                module.forward = self._patched_forward(module, kind, block, block_index, transformer_index)

    def _patched_forward(self, module, kind, block, block_index, transformer_index):
        plain = module.forward

        def forward(x, context=None, mask=None):
            options = self._options or {}
            replace = options.get("patches_replace", {}).get(kind, {})
            fn = replace.get((block[0], block[1], block_index), replace.get(block))
            if fn is None:
                return plain(x, context=context, mask=mask)
            extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
            extra.update(
                block=block,
                block_index=block_index,
                transformer_index=transformer_index,
                original_shape=list(self._shape),
                n_heads=module.heads,
                dim_head=module.to_q.out_features // module.heads,
            )
            source = x if context is None else context
            out = fn(module.to_q(x), module.to_k(source), module.to_v(source), extra)
            return module.to_out(out)

        return forward

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        sigma = t
        xc = self.predictor.calculate_input(sigma, x)
        if c_concat is not None:
            xc = torch.cat([xc, c_concat], dim=1)
        self._options, self._shape = transformer_options, x.shape
        extra = {"y": kwargs["y"]} if kwargs.get("y") is not None else {}
        try:
            eps = self.diffusion_model(xc, self.predictor.timestep(sigma), context=c_crossattn, **extra)
        finally:
            self._options = None
        if control is not None:  # the UNet adds a ControlNet's residuals row by row (one "middle" here)
            eps = eps + control["middle"][0].to(eps)
        return self.predictor.calculate_denoised(sigma, eps.float(), x)

    def memory_required(self, input_shape) -> float:
        return 0.0


class UnetPatcher:
    def __init__(self, model: KModel):
        self.model = model
        self.model_options: dict = {"transformer_options": {}}
        self.controlnet_linked_list = None
        self.extra_concat_condition = None

    def clone(self) -> UnetPatcher:
        n = UnetPatcher(self.model)
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_concat_condition = self.extra_concat_condition
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def set_model_sampler_cfg_function(self, fn, disable_cfg1_optimization=False):
        if len(inspect.signature(fn).parameters) == 3:
            self.model_options["sampler_cfg_function"] = lambda a: fn(a["cond"], a["uncond"], a["cond_scale"])
        else:
            self.model_options["sampler_cfg_function"] = fn
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def _append(self, name, fn, disable_cfg1_optimization):
        self.model_options[name] = self.model_options.get(name, []) + [fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self._append("sampler_post_cfg_function", fn, disable_cfg1_optimization)

    def set_model_sampler_pre_cfg_function(self, fn, disable_cfg1_optimization=False):
        self._append("sampler_pre_cfg_function", fn, disable_cfg1_optimization)

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn

    def add_conditioning_modifier(self, fn):
        self._append("conditioning_modifiers", fn, False)

    def set_model_patch_replace(self, fn, name, block_name, number, transformer_index=None):
        options = self.model_options["transformer_options"].copy()
        replace = dict(options.get("patches_replace", {}))
        replace[name] = dict(replace.get(name, {}))
        key = (block_name, number, transformer_index) if transformer_index is not None else (block_name, number)
        replace[name][key] = fn
        options["patches_replace"] = replace
        self.model_options["transformer_options"] = options

    def set_model_attn1_replace(self, fn, block_name, number, transformer_index=None):
        self.set_model_patch_replace(fn, "attn1", block_name, number, transformer_index)

    def set_model_attn2_replace(self, fn, block_name, number, transformer_index=None):
        self.set_model_patch_replace(fn, "attn2", block_name, number, transformer_index)


# ---------------------------------------------------------------------------------------------
# sampling_function.py behaviour


def _cond_cat(conditionings: list[dict]) -> dict:
    return {key: conditionings[0][key].concat([c[key] for c in conditionings[1:]]) for key in conditionings[0]}


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    to_run = [(entry, 0) for entry in cond]
    if uncond is not None:
        to_run += [(entry, 1) for entry in uncond]
    out_cond, out_uncond = torch.zeros_like(x_in), torch.zeros_like(x_in)
    count_cond, count_uncond = torch.ones_like(x_in) * 1e-37, torch.ones_like(x_in) * 1e-37
    batch = x_in.shape[0]
    prepared = [
        ({k: v.process_cond(batch) for k, v in entry["model_conds"].items()}, entry.get("strength", 1.0), label)
        for entry, label in to_run
    ]
    control = next((entry.get("control") for entry, _ in to_run), None)
    while prepared:
        first = prepared[0][0]
        together = [
            i
            for i, (c, _, _) in enumerate(prepared)
            if c.keys() == first.keys() and all(c[k].can_concat(first[k]) for k in c)
        ]
        together.reverse()  # Forge runs the candidates in reverse order: uncond chunk first
        chunk = [prepared.pop(i) for i in together]
        labels = [label for _, _, label in chunk]
        input_x = torch.cat([x_in] * len(chunk))
        c = _cond_cat([conds for conds, _, _ in chunk])
        timestep_ = torch.cat([timestep] * len(chunk))
        options = model_options.get("transformer_options", {}).copy()
        options["cond_or_uncond"] = labels[:]
        options["sigmas"] = timestep
        options["cond_mark"] = torch.tensor([lab for lab in labels for _ in range(batch)]).to(timestep)
        options["cond_indices"] = [i * batch + r for i, lab in enumerate(labels) if lab == 0 for r in range(batch)]
        options["uncond_indices"] = [i * batch + r for i, lab in enumerate(labels) if lab == 1 for r in range(batch)]
        c["transformer_options"] = options
        if control is not None:  # residuals for exactly this call's rows, from a copy of its conds
            control.transformer_options = options
            c["control"] = control.get_control(input_x, timestep_, c.copy(), len(chunk))
            c["control_model"] = control
        if "model_function_wrapper" in model_options:
            args = {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": labels}
            output = model_options["model_function_wrapper"](model.apply_model, args).chunk(len(chunk))
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(len(chunk))
        for o, (_, strength, label) in enumerate(chunk):
            mult = torch.ones_like(x_in) * strength
            if label == 0:
                out_cond += output[o] * mult
                count_cond += mult
            else:
                out_uncond += output[o] * mult
                count_uncond += mult
    return out_cond / count_cond, out_uncond / count_uncond


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if "sampler_cfg_function" in model_options:
        args = {
            "cond": x - cond_pred,
            "uncond": x - uncond_pred,
            "cond_scale": cond_scale,
            "timestep": timestep,
            "input": x,
            "sigma": timestep,
            "cond_denoised": cond_pred,
            "uncond_denoised": uncond_pred,
            "model": model,
            "model_options": model_options,
        }
        result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {
            "denoised": result,
            "cond": cond,
            "uncond": uncond,
            "model": model,
            "uncond_denoised": uncond_pred,
            "cond_denoised": cond_pred,
            "sigma": timestep,
            "model_options": model_options,
            "input": x,
        }
        result = fn(args)
    return result, cond_pred, uncond_pred


def join_dicts(base: dict, update: dict | None) -> dict:
    """Forge Neo's `backend.utils.join_dicts`: a copy of `base` with `update` merged in, dict by dict."""
    result = dict(base or {})
    for key, value in (update or {}).items():
        if isinstance(result.get(key), dict) and isinstance(value, dict):
            result[key] = join_dicts(result[key], value)
        else:
            result[key] = value
    return result


def sampling_function(denoiser, x, sigma, text_uncond, text_cond, composition, cond_scale, extra_model_options=None):
    """Forge 2's, and with `extra_model_options` Forge Neo's (per-call options joined on)."""
    unet = denoiser.p.sd_model.forge_objects.unet  # read on every call
    model = unet.model
    options = join_dicts(unet.model_options, extra_model_options) if extra_model_options else unet.model_options
    uncond = compile_conditions(text_uncond)
    cond = compile_weighted_conditions(text_cond, composition)
    if unet.controlnet_linked_list is not None:
        for entry in cond + (uncond or []):
            entry["control"] = unet.controlnet_linked_list
    seed = denoiser.p.seeds[0]
    for modifier in options.get("conditioning_modifiers", []):
        model, x, sigma, uncond, cond, cond_scale, options, seed = modifier(
            model, x, sigma, uncond, cond, cond_scale, options, seed
        )
    return sampling_function_inner(model, x, sigma, uncond, cond, cond_scale, options)


# ---------------------------------------------------------------------------------------------
# engine, processing and the generation driver


@dataclass
class ForgeObjects:
    unet: UnetPatcher

    def shallow_copy(self) -> ForgeObjects:
        return ForgeObjects(self.unet)


class TextProcessingEngine:
    """`tokenize` / `tokenize_line` of Forge's classic engine, from the text-encoder stand-in."""

    def __init__(self, encoder: TextEncoderStandIn):
        self.encoder = encoder

    def tokenize(self, texts):
        return self.encoder.tokenize(texts)

    def tokenize_line(self, line):
        return self.encoder.tokenize_line(line)


class ForgeDiffusionEngine:
    """SD1.5 (`StableDiffusion`) or, for an SDXL-layout UNet, `StableDiffusionXL`: dict conditioning
    sized from the prompt list's width/height (1024 when it has none), `text_processing_engine_l`
    and `_g` instead of `text_processing_engine`, `is_sdxl`."""

    def __init__(self, unet: torch.nn.Module | None = None, config: dict | None = None, seed: int = 0, predictor=None):
        unet = unet if unet is not None else make_unet("tiny", seed=seed)
        self.is_sdxl = is_sdxl(unet)
        self.is_sd1 = not self.is_sdxl
        if config is None:
            config = {"model_channels": unet.model_channels, "context_dim": 768, "in_channels": 4}
            if self.is_sdxl:
                config.update(context_dim=2048, adm_in_channels=unet.adm_in_channels)
        self.kmodel = KModel(unet, config, predictor)
        self.forge_objects_after_applying_lora = ForgeObjects(UnetPatcher(self.kmodel))
        self.forge_objects = self.forge_objects_after_applying_lora.shallow_copy()
        if self.is_sdxl:
            self.encoder = SdxlTextEncoderStandIn(seed=seed)
            self.text_processing_engine_l = TextProcessingEngine(self.encoder.clip_l)
            self.text_processing_engine_g = TextProcessingEngine(self.encoder.clip_g)
        else:
            self.encoder = TextEncoderStandIn(seed=seed)
            self.text_processing_engine = TextProcessingEngine(self.encoder)

    def get_learned_conditioning(self, texts):
        return self.encoder.encode(texts if hasattr(texts, "width") else list(texts))


class FluxLikeEngine(ForgeDiffusionEngine):
    """A model Forge loads without a classic UNet config (Flux, Chroma): `model_channels` missing."""

    def __init__(self, seed: int = 0):
        super().__init__(config={"in_channels": 4, "context_in_dim": 768}, seed=seed)
        self.is_sd1 = False
        del self.text_processing_engine


class CFGDenoiser:
    def __init__(self, p):
        self.p = p
        self.step = 0
        self.total_steps = 0

    def forward(self, x, sigma, uncond, cond, composition, cond_scale):
        refiner = self.p.refiner_model  # apply_refiner: another model past the switch, no script hook
        if refiner is not None and self.step / self.total_steps > self.p.refiner_switch_at:
            self.p.sd_model = refiner
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        options = self.p.extra_model_options
        denoised, _, _ = sampling_function(self, x, sigma, uncond, cond, composition, cond_scale, options)
        self.step += 1
        return denoised


@dataclass
class Sampler:
    model_wrap_cfg: CFGDenoiser


@dataclass
class Processing:
    sd_model: ForgeDiffusionEngine
    prompts: list[str]
    seeds: list[int]
    negative_prompt: str = ""
    cfg_scale: float = 7.0
    steps: int = 4
    width: int = 64
    height: int = 64
    hr_cfg: float = 7.0
    hr_steps: int = 3
    hr_upscale_to_x: int = 0
    hr_upscale_to_y: int = 0
    denoising_strength: float = 0.6
    is_hr_pass: bool = False
    extra_generation_params: dict = field(default_factory=dict)
    sampler: Sampler | None = None
    uc: torch.Tensor | None = None
    hr_uc: torch.Tensor | None = None
    zero_negative: bool = False  # Forge Neo's opts.sdxl_zero_neg
    extra_model_options: dict | None = None  # Forge Neo: the sampler's per-call model_options
    refiner_model: object | None = None  # the refiner checkpoint's engine (apply_refiner)
    refiner_switch_at: float = 1.0

    @property
    def prompt(self) -> str:
        return self.prompts[0]

    @property
    def hr_prompts(self) -> list[str]:
        return self.prompts


def _composition(prompts: list[str], encode) -> tuple[list, torch.Tensor]:
    """Prompts with AND parts → (composition per image, stacked cond rows), like Forge's
    reconstruct_multicond_batch (weights ':w' after a part are not parsed; every part weighs 1)."""
    rows, composition = [], []
    for prompt in prompts:
        parts = [part.strip() for part in prompt.split(" AND ")]
        composition.append([(len(rows) + j, 1.0) for j in range(len(parts))])
        rows += parts
    return composition, encode(rows)


def _sample(p, hooks, x, sigmas):
    """One sampler run: reset forge_objects, call the hook, sample with Euler."""
    width, height = (p.hr_upscale_to_x, p.hr_upscale_to_y) if p.is_hr_pass else (p.width, p.height)

    def encode(texts, negative=False):
        return p.sd_model.get_learned_conditioning(Conditioning(texts, width, height, is_negative_prompt=negative))

    composition, cond = _composition(p.prompts, encode)
    uc_scale = p.hr_cfg if p.is_hr_pass else p.cfg_scale
    # setup_conds: no uncond at all when the pass's CFG scale is 1
    uncond = encode([p.negative_prompt] * len(p.prompts), negative=True) if uc_scale != 1 else None
    if uncond is not None and p.zero_negative and not p.negative_prompt:  # Forge Neo's opts.sdxl_zero_neg
        uncond = (
            {k: torch.zeros_like(v) for k, v in uncond.items()}
            if isinstance(uncond, dict)
            else torch.zeros_like(uncond)
        )
    if p.is_hr_pass:
        p.hr_uc = uncond
    else:
        p.uc = uncond
    p.sampler = Sampler(CFGDenoiser(p))
    p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
    for hook in hooks:
        hook(p)
    denoiser = p.sampler.model_wrap_cfg
    denoiser.total_steps = len(sigmas) - 1

    def model(x, sigma):
        return denoiser.forward(x, sigma, uncond, cond, composition, p.cfg_scale)

    return sample_euler(model, x, sigmas, {})


def generate(p: Processing, before_sampling=(), postprocess=(), hires: bool = False, init_latent=None):
    """A whole generation with the script hooks in Forge's order, under inference mode as Forge
    runs it. Returns the final latent."""
    with torch.inference_mode():
        return _generate(p, before_sampling, postprocess, hires, init_latent)


def _generate(p, before_sampling, postprocess, hires, init_latent):
    schedule = p.sd_model.kmodel.predictor.schedule
    latent_size = (p.height // 8, p.width // 8)
    noise = torch.stack(
        [torch.randn(4, *latent_size, generator=torch.Generator().manual_seed(seed)) for seed in p.seeds]
    )
    sigmas = schedule.get_sigmas(p.steps)
    p.is_hr_pass = False
    if init_latent is None:
        x = _sample(p, before_sampling, noise * sigmas[0], sigmas)
    else:  # img2img: start part-way down the schedule from the init latent
        start = int(p.steps * (1 - p.denoising_strength))
        x = _sample(p, before_sampling, init_latent + noise * sigmas[start], sigmas[start:])
    if hires:
        p.is_hr_pass = True
        p.hr_upscale_to_x, p.hr_upscale_to_y = p.width * 2, p.height * 2
        upscaled = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        hr_sigmas = schedule.get_sigmas(p.hr_steps)[1:]
        hr_noise = torch.stack(
            [torch.randn(upscaled.shape[1:], generator=torch.Generator().manual_seed(s + 1)) for s in p.seeds]
        )
        # Forge calls the hook before the reset of forge_objects, and again after it
        for hook in before_sampling:
            hook(p)
        x = _sample(p, before_sampling, upscaled + hr_noise * hr_sigmas[0], hr_sigmas)
    for hook in postprocess:
        hook(p)
    return x


class SdConditioning(Conditioning):
    """Forge's `modules.prompt_parser.SdConditioning` (forge.md §3.5): a prompt list with size,
    negativity and the distilled CFG scale."""

    def __init__(
        self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None, distilled_cfg_scale=None
    ):
        copy_from = prompts if copy_from is None else copy_from
        super().__init__(
            prompts,
            width or getattr(copy_from, "width", None),
            height or getattr(copy_from, "height", None),
            is_negative_prompt or getattr(copy_from, "is_negative_prompt", False),
        )
        self.distilled_cfg_scale = distilled_cfg_scale or getattr(copy_from, "distilled_cfg_scale", None)


@contextmanager
def forge_modules():
    """`modules.prompt_parser` importable as in Forge, for the duration (nothing else of `modules`)."""
    if "modules" in sys.modules:
        raise RuntimeError("another host's `modules` is loaded")
    package, parser = types.ModuleType("modules"), types.ModuleType("modules.prompt_parser")
    parser.SdConditioning = SdConditioning
    package.prompt_parser = parser
    sys.modules.update({"modules": package, "modules.prompt_parser": parser})
    try:
        yield parser
    finally:
        del sys.modules["modules"], sys.modules["modules.prompt_parser"]


def record_unet_calls(engine: ForgeDiffusionEngine, monkeypatch, describe=lambda x, c: x.shape[0]) -> list:
    """For one test (`monkeypatch` undoes it): `describe(x, c)` of every UNet call the engine makes,
    in order (by default its row count)."""
    calls = []
    real = engine.kmodel.apply_model

    def recording(x, t, **c):
        calls.append(describe(x, c))
        return real(x, t, **c)

    monkeypatch.setattr(engine.kmodel, "apply_model", recording)
    return calls
