"""The loaded model object (`shared.sd_model`): an SD1-style LatentDiffusion with the real ldm UNet
as `model.diffusion_model`, the text-encoder stand-in as `cond_stage_model`, and `apply_model`;
or an SDXL DiffusionEngine as A1111 patches it (a1111.md §8): `conditioner` with two embedders (also
`cond_stage_model`), dict conditioning `{crossattn, vector}` sized from the prompt list's
width/height, `model` an OpenAIWrapper passing `context=c["crossattn"], y=c["vector"]`."""

from __future__ import annotations

import torch

from tests.testbed.sampling import sd_alphas_cumprod
from tests.testbed.text_encoder import SdxlTextEncoderStandIn, TextEncoderStandIn
from tests.testbed.unet import is_sdxl


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


class _OpenAIWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.diffusion_model = unet

    def forward(self, x, t, c, **kwargs):
        return self.diffusion_model(x, timesteps=t, context=c["crossattn"], y=c["vector"], **kwargs)


class StandInSdxlModel(torch.nn.Module):
    cond_stage_key = "txt"
    conditioning_key = "crossattn"
    is_sd3 = False
    is_sdxl = True
    is_sd1 = False
    parameterization = "eps"

    def __init__(self, unet: torch.nn.Module, encoder: SdxlTextEncoderStandIn | None = None):
        super().__init__()
        self.model = _OpenAIWrapper(unet)
        self.conditioner = encoder or SdxlTextEncoderStandIn()
        self.cond_stage_model = self.conditioner
        # sd_models.get_empty_cond: the crossattn part of the empty prompt's conditioning
        self.cond_stage_model_empty_prompt = self.conditioner.encode([""])["crossattn"]

    def get_learned_conditioning(self, batch):
        return self.conditioner.encode(batch)

    def apply_model(self, x, t, cond):
        return self.model(x, t, cond)


def make_sd_model(unet: torch.nn.Module, parameterization: str = "eps", alphas_cumprod=None) -> torch.nn.Module:
    """The model object A1111 builds around `unet`: SDXL when it takes the pooled vector; a v model
    when its config says `parameterization: v`; `alphas_cumprod` as the model holds it (after the
    "Zero Terminal SNR" noise-schedule setting, when that is given)."""
    model = StandInSdxlModel(unet) if is_sdxl(unet) else StandInSdModel(unet)
    model.parameterization = parameterization
    model.alphas_cumprod = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
    return model
