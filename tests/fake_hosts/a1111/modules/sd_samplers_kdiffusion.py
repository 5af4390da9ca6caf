"""k-diffusion samplers (Euler): x0 predictions with sigma (a1111.md §3.4), from k-diffusion's
CompVisDenoiser or, for v models, CompVisVDenoiser on the model's `alphas_cumprod`."""

from __future__ import annotations

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared
from tests.testbed.sampling import CompVisEpsDenoiser, CompVisVDenoiser, sample_euler


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.sampler.model_wrap is None:
            model = shared.sd_model
            denoiser = CompVisVDenoiser if model.parameterization == "v" else CompVisEpsDenoiser
            self.sampler.model_wrap = denoiser(model.model.diffusion_model, model.alphas_cumprod)
        return self.sampler.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.model_wrap.get_sigmas(steps)
        x = x * sigmas[0]
        extra = self.extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        self.initialize(p)
        return self.launch_sampling(
            steps, lambda: sample_euler(self.model_wrap_cfg, x, sigmas, extra, callback=self.callback_state)
        )

    def sample_img2img(
        self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None
    ):
        steps = steps or p.steps
        t_enc = int(min(p.denoising_strength, 0.999) * steps)
        sigmas = self.model_wrap.get_sigmas(steps)[steps - t_enc - 1 :]
        xi = x + noise * sigmas[0]
        extra = self.extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        self.initialize(p)
        return self.launch_sampling(
            t_enc + 1, lambda: sample_euler(self.model_wrap_cfg, xi, sigmas, extra, callback=self.callback_state)
        )
