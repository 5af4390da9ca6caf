"""The loaded model object (`shared.sd_model`): an SD1-style LatentDiffusion with the real ldm UNet
as `model.diffusion_model`, the text-encoder stand-in as `cond_stage_model`, and `apply_model`."""

from __future__ import annotations

import torch

from tests.testbed.text_encoder import TextEncoderStandIn


class _DiffusionWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c_crossattn=None, c_concat=None):
        return self.diffusion_model(x, t, context=torch.cat(c_crossattn, 1))


class StandInSdModel(torch.nn.Module):
    cond_stage_key = "txt"
    is_sd3 = False
    is_sdxl = False
    is_sd1 = True
    parameterization = "eps"

    def __init__(self, unet: torch.nn.Module, encoder: TextEncoderStandIn | None = None):
        super().__init__()
        self.model = _DiffusionWrapper(unet)
        self.cond_stage_model = encoder or TextEncoderStandIn()
        self.cond_stage_model_empty_prompt = self.cond_stage_model.encode([""])

    def get_learned_conditioning(self, texts):
        return self.cond_stage_model.encode(list(texts))

    def apply_model(self, x, t, cond):
        return self.model(x, t, **cond)
