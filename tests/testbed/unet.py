"""The real `ldm` UNetModel (PyPI stable-diffusion-sdkit) in SD1.5's and SDXL's layouts.

`tiny` keeps SD1.5's block layout (attention in input_blocks 1,2,4,5,7,8, the middle block and
output_blocks 3-11; 768-wide context of 77 tokens) with narrow channels, so a step at a 16×16
latent takes a few hundredths of a second on a CPU. `sd15` is SD1.5's exact configuration (random
weights) for the benchmark.

`tiny_sdxl` / `sdxl` have SDXL's layout (sgm's `openaimodel.UNetModel` with transformer_depth
[0, 2, 10], transformer_depth_middle 10, context_dim 2048, adm_in_channels 2816, num_classes
"sequential", linear transformer projections, 64-channel heads): three levels, attention only at
downsampling factors 2 and 4 (input_blocks 4,5,7,8, the middle block, output_blocks 0-5), and the
pooled `y` vector added to the timestep embedding through `label_emb.0.{0,2}`. stable-diffusion-sdkit
ships no `sgm` package, and its `ldm` UNetModel takes one transformer depth for every level and
rejects num_classes "sequential"; `SdxlUNetModel` therefore builds the ldm UNetModel with depth 1
and then gives it what sgm's constructor would have made: the per-level depths (real ldm
`BasicTransformerBlock`s in real `SpatialTransformer`s, one context for every block as sgm passes
it) and the `label_emb` MLP. `tiny_sdxl` is narrow (model_channels 32, 16-channel heads) and
reduces the depth-10 level and the middle block to depth 3 (depth 2 stays 2), so transformer
indices above 1 exist, as in SDXL, at a CPU-friendly cost.
"""

from __future__ import annotations

import torch
from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import linear

CONTEXT_DIM = 768
TOKENS = 77
SDXL_CONTEXT_DIM = 2048  # CLIP-L 768 ⊕ CLIP-G 1280
SDXL_ADM_CHANNELS = 2816  # CLIP-G pooled 1280 + 6 size embeddings of 256

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
_SDXL_LAYOUT = dict(
    in_channels=4,
    out_channels=4,
    num_res_blocks=2,
    attention_resolutions=[4, 2],
    channel_mult=[1, 2, 4],
    use_spatial_transformer=True,
    use_linear_in_transformer=True,
    context_dim=SDXL_CONTEXT_DIM,
    adm_in_channels=SDXL_ADM_CHANNELS,
    num_classes="sequential",
    legacy=False,
)
CONFIGS = {
    "tiny": dict(_SD1_LAYOUT, image_size=16, model_channels=32),
    "sd15": dict(_SD1_LAYOUT, image_size=64, model_channels=320),
    "tiny_sdxl": dict(
        _SDXL_LAYOUT,
        image_size=16,
        model_channels=32,
        num_head_channels=16,
        transformer_depth=[0, 2, 3],
        transformer_depth_middle=3,
    ),
    "sdxl": dict(
        _SDXL_LAYOUT,
        image_size=128,
        model_channels=320,
        num_head_channels=64,
        transformer_depth=[0, 2, 10],
        transformer_depth_middle=10,
    ),
}


class SharedContextSpatialTransformer(SpatialTransformer):
    """ldm's SpatialTransformer, with one context for all its blocks (sgm's behaviour for depth > 1:
    ldm's forward indexes a per-block context list that the UNet never passes)."""

    def forward(self, x, context=None):
        """Project in, run every transformer block with the same context, project out, add x."""
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        x = x.reshape(b, c, h * w).transpose(1, 2).contiguous()
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = self.proj_out(x)
        return x.transpose(1, 2).reshape(b, c, h, w).contiguous() + x_in


class SdxlUNetModel(UNetModel):
    """ldm's UNetModel with SDXL's per-level transformer depths and pooled-vector conditioning."""

    def __init__(self, transformer_depth, transformer_depth_middle, adm_in_channels, num_classes, **layout):
        if num_classes != "sequential" or not layout.get("use_linear_in_transformer"):
            raise ValueError("the SDXL layout has num_classes 'sequential' and linear transformer projections")
        levels = [level for level, depth in enumerate(transformer_depth) if depth > 0]
        layout["attention_resolutions"] = sorted(layout["attention_resolutions"])
        if sorted(2**level for level in levels) != layout["attention_resolutions"]:
            raise ValueError("attention_resolutions must be the factors of the levels with a transformer depth")
        super().__init__(transformer_depth=1, num_classes=None, **layout)
        self.num_classes = num_classes
        self.adm_in_channels = adm_in_channels
        self.transformer_depth = list(transformer_depth)
        self.transformer_depth_middle = transformer_depth_middle
        embed_dim = self.model_channels * 4
        self.label_emb = torch.nn.Sequential(
            torch.nn.Sequential(linear(adm_in_channels, embed_dim), torch.nn.SiLU(), linear(embed_dim, embed_dim))
        )
        widths = [self.model_channels * mult for mult in self.channel_mult]
        for blocks in (self.input_blocks, self.output_blocks):
            for block in blocks:
                for index, layer in enumerate(block):
                    if isinstance(layer, SpatialTransformer):
                        level = widths.index(layer.in_channels)
                        block[index] = _deepened(layer, self.transformer_depth[level])
        self.middle_block[1] = _deepened(self.middle_block[1], transformer_depth_middle)


def _deepened(layer: SpatialTransformer, depth: int) -> SharedContextSpatialTransformer:
    """A SharedContextSpatialTransformer of `depth` blocks shaped like `layer`'s first block."""
    first = layer.transformer_blocks[0]
    heads, dim_head = first.attn2.heads, first.attn2.to_q.out_features // first.attn2.heads
    context_dim = first.attn2.to_k.in_features
    deeper = SharedContextSpatialTransformer(
        layer.in_channels,
        heads,
        dim_head,
        depth=1,
        context_dim=context_dim,
        use_linear=True,
        use_checkpoint=False,
    )
    deeper.transformer_blocks.extend(
        BasicTransformerBlock(heads * dim_head, heads, dim_head, context_dim=context_dim, checkpoint=False)
        for _ in range(depth - 1)
    )
    return deeper


def is_sdxl(unet: torch.nn.Module) -> bool:
    """Whether `unet` takes SDXL's pooled `y` vector."""
    return getattr(unet, "num_classes", None) == "sequential"


def make_unet(
    config: str = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> UNetModel:
    """A UNet with reproducible random weights, in eval mode.

    ldm zero-initialises the last layer of every residual block, every SpatialTransformer's
    `proj_out` and the output convolution (`zero_module`), so a freshly built UNet ignores its
    context entirely and every prompt would predict the same noise. Those layers get PyTorch's
    default initialisation instead, which makes the prompt matter as in a trained model.
    """
    layout = dict(CONFIGS[config])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = SdxlUNetModel(**layout) if layout.get("num_classes") == "sequential" else UNetModel(**layout)
        for module in unet.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not module.weight.any():
                module.reset_parameters()
    return unet.eval().to(device=device, dtype=dtype)


def random_context(rows: int, seed: int, chunks: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Conditioning of the real shape (rows, 77·chunks, 768), scaled like CLIP outputs."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, TOKENS * chunks, CONTEXT_DIM, generator=generator, dtype=dtype)
