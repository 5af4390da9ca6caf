"""`modules.processing` (a1111.md §5): processing objects with the fields extensions use and
`process_images` with the host's order of events (§5.2), txt2img with hires fix (§5.3), img2img
(§5.4) and `create_infotext` (§1.6)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from modules import prompt_parser, sd_samplers, shared


def _quote(text: str) -> str:
    text = str(text)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


@dataclass
class Processed:
    images: list
    infotexts: list
    extra_generation_params: dict = field(default_factory=dict)
    index_of_first_image: int = 0  # 1 when the host puts the grid first
    info: str = ""  # the first infotext


class StableDiffusionProcessing:
    cached_c = [None, None]
    cached_uc = [None, None]

    def __init__(
        self,
        prompt="",
        negative_prompt="",
        seed=1,
        steps=4,
        cfg_scale=7.0,
        width=128,
        height=128,
        batch_size=1,
        n_iter=1,
        sampler_name="Euler",
        s_min_uncond=0.0,
        scripts=None,
        script_args=(),
        outpath_samples=None,
        do_not_save_samples=False,
    ):
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.seed, self.steps, self.cfg_scale = seed, steps, cfg_scale
        self.width, self.height = width, height
        self.batch_size, self.n_iter = batch_size, n_iter
        self.sampler_name, self.s_min_uncond = sampler_name, s_min_uncond
        self.scripts, self.script_args = scripts, list(script_args)
        self.extra_generation_params: dict = {}
        self.override_settings: dict = {}
        self.is_api = False
        self.is_hr_pass = False
        self.extra_network_data = {}
        self.cached_c, self.cached_uc = [None, None], [None, None]
        self.sampler = None
        self.c = self.uc = None
        self.iteration = 0
        self.outpath_samples, self.do_not_save_samples = outpath_samples, do_not_save_samples

    def save_samples(self) -> bool:
        """Whether the generation's images are written to disk (the host also checks interruption)."""
        return shared.opts.samples_save and not self.do_not_save_samples

    @property
    def sd_model(self):
        return shared.sd_model

    @property
    def firstpass_steps(self):
        return sd_samplers.find_sampler_config(self.sampler_name).total_steps(self.steps)

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        key = (
            tuple(required_prompts),
            steps,
            hires_steps,
            id(shared.sd_model),
            required_prompts.width,
            required_prompts.height,
            getattr(required_prompts, "is_negative_prompt", False),
        )
        for cache in caches:
            if cache[0] is not None and cache[0] == key:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, False)
        cache[0] = key
        return cache[1]

    def setup_conds(self):
        negative = prompt_parser.SdConditioning(
            self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True
        )
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        steps = self.firstpass_steps
        self.uc = self.get_conds_with_caching(
            prompt_parser.get_learned_conditioning, negative, steps, [self.cached_uc], self.extra_network_data
        )
        self.c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning, prompts, steps, [self.cached_c], self.extra_network_data
        )

    def noise(self, seeds, offset=0, size=None):
        height, width = size or (self.height // 8, self.width // 8)
        return torch.stack(
            [torch.randn(4, height, width, generator=torch.Generator().manual_seed(s + offset)) for s in seeds]
        )

    def txt2img_image_conditioning(self, x):
        return x.new_zeros(x.shape[0], 5, 1, 1)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, enable_hr=False, hr_scale=2.0, hr_second_pass_steps=0, denoising_strength=0.7, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr, self.hr_scale = enable_hr, hr_scale
        self.hr_second_pass_steps, self.denoising_strength = hr_second_pass_steps, denoising_strength
        self.hr_sampler_name = None
        self.hr_c = self.hr_uc = None
        self.cached_hr_c, self.cached_hr_uc = [None, None], [None, None]
        self.hr_extra_network_data = {}

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.hr_upscale_to_x = int(self.width * self.hr_scale)
        self.hr_upscale_to_y = int(self.height * self.hr_scale)
        if self.enable_hr:
            self.extra_generation_params["Hires upscale"] = self.hr_scale

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.noise(seeds)
        self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(
            self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x)
        )
        if not self.enable_hr:
            return samples
        self.is_hr_pass = True
        try:
            return self.sample_hr_pass(samples, seeds)
        finally:
            self.is_hr_pass = False

    def calculate_hr_conds(self):
        hr_prompts = prompt_parser.SdConditioning(
            self.hr_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y
        )
        hr_negative = prompt_parser.SdConditioning(
            self.hr_negative_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y, is_negative_prompt=True
        )
        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        total_steps = config.total_steps(self.hr_second_pass_steps or self.steps)
        self.hr_uc = self.get_conds_with_caching(
            prompt_parser.get_learned_conditioning,
            hr_negative,
            self.firstpass_steps,
            [self.cached_hr_uc, self.cached_uc],
            self.hr_extra_network_data,
            total_steps,
        )
        self.hr_c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            hr_prompts,
            self.firstpass_steps,
            [self.cached_hr_c, self.cached_c],
            self.hr_extra_network_data,
            total_steps,
        )

    def sample_hr_pass(self, samples, seeds):
        size = (self.hr_upscale_to_y // 8, self.hr_upscale_to_x // 8)
        samples = torch.nn.functional.interpolate(samples, size=size, mode="nearest")
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        noise = self.noise(seeds, offset=1000, size=size)
        self.calculate_hr_conds()
        self.scripts.before_hr(self)
        self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        return self.sampler.sample_img2img(
            self,
            samples,
            noise,
            self.hr_c,
            self.hr_uc,
            steps=self.hr_second_pass_steps or self.steps,
            image_conditioning=self.txt2img_image_conditioning(samples),
        )


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_latent=None, denoising_strength=0.75, mask=None, **kwargs):
        super().__init__(**kwargs)
        self.init_latent, self.denoising_strength = init_latent, denoising_strength
        self.image_mask = mask
        self.mask = self.nmask = None
        self.image_cfg_scale = None

    def init(self, all_prompts, all_seeds, all_subseeds):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        if self.image_mask is not None:
            self.mask = 1 - self.image_mask  # 1 = keep the original
            self.nmask = self.image_mask

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        x = self.noise(seeds)
        init = self.init_latent.expand(len(seeds), -1, -1, -1)
        self.scripts.process_before_every_sampling(self, x=init, noise=x, c=conditioning, uc=unconditional_conditioning)
        self.init_latent_batch = init
        self.sampler.model_wrap_cfg.init_latent = init
        samples = self.sampler.sample_img2img(
            self,
            init,
            x,
            conditioning,
            unconditional_conditioning,
            image_conditioning=self.txt2img_image_conditioning(x),
        )
        if self.mask is not None:
            samples = samples * self.nmask + init * self.mask
        return samples


def _per_image(value, count):
    return list(value) if isinstance(value, list) else [value] * count


def create_infotext(p, index):
    generation = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "CFG scale": p.cfg_scale,
        "Seed": p.seeds[index],
        "Size": f"{p.width}x{p.height}",
        **p.extra_generation_params,
    }
    parts = []
    for key, value in generation.items():
        if callable(value):
            value = value(p=p, index=index)
        elif isinstance(value, list):
            value = value[index]
        if value is None:
            continue
        parts.append(key if key == value else f"{key}: {_quote(value)}")
    return f"{p.prompts[index]}\nNegative prompt: {p.negative_prompts[index]}\n" + ", ".join(parts)


def process_images(p) -> Processed:
    count = p.batch_size * p.n_iter
    p.all_prompts = _per_image(p.prompt, count)
    p.all_negative_prompts = _per_image(p.negative_prompt, count)
    p.all_seeds = [p.seed + i for i in range(count)]
    p.all_hr_prompts, p.all_hr_negative_prompts = p.all_prompts, p.all_negative_prompts
    if p.scripts is not None:
        p.scripts.process(p)
    p.init(p.all_prompts, p.all_seeds, p.all_seeds)
    images, infotexts = [], []
    for n in range(p.n_iter):
        p.iteration = n
        batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
        p.hr_prompts, p.hr_negative_prompts = p.all_hr_prompts[batch], p.all_hr_negative_prompts[batch]
        p.seeds = p.all_seeds[batch]
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.seeds)
        p.setup_conds()
        with torch.no_grad():
            samples = p.sample(p.c, p.uc, p.seeds, p.seeds, 0.0, p.prompts)
        if p.scripts is not None:
            p.scripts.postprocess_batch(p, batch_number=n, images=samples)
        for index in range(samples.shape[0]):
            images.append(samples[index])
            infotexts.append(create_infotext(p, index))
    processed = Processed(images, infotexts, dict(p.extra_generation_params), info=infotexts[0] if infotexts else "")
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed
