"""Timestep samplers (DDIM, eta 0): eps predictions with an integer timestep (a1111.md §3.4)."""

from __future__ import annotations

import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared
from tests.testbed.sampling import sd_alphas_cumprod, unet_kwargs


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, cond):
        return self.unet(x, timesteps, **unet_kwargs(cond))


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.mask_before_denoising = True

    @property
    def inner_model(self):
        if self.sampler.model_wrap is None:
            self.sampler.model_wrap = CompVisTimestepsDenoiser(shared.sd_model.model.diffusion_model)
        return self.sampler.model_wrap


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model
        self.alphas = sd_alphas_cumprod().float()

    def _ddim(self, x, timesteps, extra):
        s_in = x.new_ones([x.shape[0]])
        for index, t in enumerate(timesteps):
            a_t = self.alphas[t]
            a_prev = self.alphas[timesteps[index + 1]] if index + 1 < len(timesteps) else self.alphas.new_tensor(1.0)
            eps = self.model_wrap_cfg(x, s_in * int(t), **extra)
            pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
            self.callback_state({"x": x, "i": index})
        return x

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = list(range(999, -1, -(1000 // steps)))[:steps]
        extra = self.extra_args(p, conditioning, unconditional_conditioning, image_conditioning)
        self.initialize(p)
        return self.launch_sampling(steps, lambda: self._ddim(x, timesteps, extra))
