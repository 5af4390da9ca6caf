"""`modules.sd_samplers_common.Sampler` bookkeeping (a1111.md §3.1, §3.5, §5.4)."""

from __future__ import annotations

from modules import shared


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.model_wrap = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = {}
        self.p = None
        self.last_latent = None

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = steps
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedError:
            return self.last_latent

    def callback_state(self, d):
        shared.state.sampling_step = d["i"]
        self.last_latent = d["x"]

    def extra_args(self, p, conditioning, unconditional_conditioning, image_conditioning):
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": getattr(p, "s_min_uncond", 0.0),
        }
        return self.sampler_extra_args
