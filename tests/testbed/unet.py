"""The real `ldm` UNetModel (PyPI stable-diffusion-sdkit) in two configurations.

`tiny` keeps SD1.5's block layout (attention in input_blocks 1,2,4,5,7,8, the middle block and
output_blocks 3-11; 768-wide context of 77 tokens) with narrow channels, so a step at a 16×16
latent takes a few hundredths of a second on a CPU. `sd15` is SD1.5's exact configuration (random
weights) for the benchmark.
"""

from __future__ import annotations

import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel

CONTEXT_DIM = 768
TOKENS = 77

_SD1_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    num_res_blocks=2,
    attention_resolutions=[4, 2, 1],
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=CONTEXT_DIM,
    legacy=False,
)
CONFIGS = {
    "tiny": dict(_SD1_LAYOUT, image_size=16, model_channels=32),
    "sd15": dict(_SD1_LAYOUT, image_size=64, model_channels=320),
}


def make_unet(
    config: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> UNetModel:
    """A UNet with reproducible random weights, in eval mode.

    ldm zero-initialises the last layer of every residual block, every SpatialTransformer's
    `proj_out` and the output convolution (`zero_module`), so a freshly built UNet ignores its
    context entirely and every prompt would predict the same noise. Those layers get PyTorch's
    default initialisation instead, which makes the prompt matter as in a trained model.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNetModel(**CONFIGS[config])
        for module in unet.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
                module.reset_parameters()
    return unet.eval().to(device=device, dtype=dtype)


def random_context(rows: int, seed: int, chunks: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Conditioning of the real shape (rows, 77·chunks, 768), scaled like CLIP outputs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, TOKENS * chunks, CONTEXT_DIM, generator=generator, dtype=dtype)
