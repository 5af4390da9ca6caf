"""Writes a random-weight SD1.5 ControlNet (the original ldm `control_model.*` layout) as safetensors.

    python -m tests.e2e.make_random_controlnet OUT.safetensors [--seed 0]

Both hosts' loaders recognise this layout as an SD1.5 ControlNet: sd-webui-controlnet
(scripts/controlnet_model_guess.py: `input_hint_block.0.weight` without `label_emb`, context_dim
768 from `input_blocks.5.1…attn2.to_k`) and Forge (modules_forge/supported_controlnet.py:
`control_model.zero_convs.0.0.weight`, then the UNet config guessed from the same keys).

The network is the SD1.5 UNet's encoder half (time_embed, input_blocks, middle_block; its names and
shapes taken from the real ldm UNetModel built on the meta device) plus what ControlNet adds: the
hint encoder (`input_hint_block`), one 1x1 conv per input block (`zero_convs`) and one after the
middle block (`middle_block_out`). The trained model's zero convs start at zero; here every weight is
N(0, 0.02) so that the ControlNet visibly changes the image (a zero net would prove nothing).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

SD15_UNET = dict(
    image_size=32,
    in_channels=4,
    out_channels=4,
    model_channels=320,
    attention_resolutions=[4, 2, 1],
    num_res_blocks=2,
    channel_mult=[1, 2, 4, 4],
    num_heads=8,
    use_spatial_transformer=True,
    transformer_depth=1,
    context_dim=768,
    legacy=False,
)
ENCODER_PARTS = ("time_embed.", "input_blocks.", "middle_block.")
# input_hint_block: (in, out, stride) of its eight 3x3 convs, at Sequential indices 0, 2, …, 14 (SiLU between)
HINT_CONVS = ((3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2), (256, 320, 1))


def encoder_shapes() -> dict[str, torch.Size]:
    """Names and shapes of the SD1.5 UNet's encoder half, from ldm's own UNetModel."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        unet = UNetModel(**SD15_UNET)
    return {k: v.shape for k, v in unet.state_dict().items() if k.startswith(ENCODER_PARTS)}


def input_block_channels(model_channels: int = 320, mult=(1, 2, 4, 4), res_blocks: int = 2) -> list[int]:
    """Output channels of each UNet input block, in order (ldm UNetModel's `input_block_chans`)."""
    channels = [model_channels]
    for level, factor in enumerate(mult):
        channels += [model_channels * factor] * res_blocks
        if level != len(mult) - 1:
            channels.append(model_channels * factor)  # the downsample block keeps the width
    return channels


def controlnet_shapes() -> dict[str, torch.Size]:
    """Every `control_model.*` tensor name of an SD1.5 ControlNet with its shape."""
    shapes = dict(encoder_shapes())
    for i, (c_in, c_out, _) in enumerate(HINT_CONVS):
        shapes[f"input_hint_block.{2 * i}.weight"] = torch.Size((c_out, c_in, 3, 3))
        shapes[f"input_hint_block.{2 * i}.bias"] = torch.Size((c_out,))
    for i, ch in enumerate(input_block_channels()):
        shapes[f"zero_convs.{i}.0.weight"] = torch.Size((ch, ch, 1, 1))
        shapes[f"zero_convs.{i}.0.bias"] = torch.Size((ch,))
    shapes["middle_block_out.0.weight"] = torch.Size((1280, 1280, 1, 1))
    shapes["middle_block_out.0.bias"] = torch.Size((1280,))
    return {f"control_model.{k}": v for k, v in shapes.items()}


def random_weights(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """fp16 tensors: norm scales 1, biases 0, the rest N(0, 0.02) (as the harnesses' checkpoints)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith(".bias"):
            value = torch.zeros(shape)
        elif name.endswith(".weight") and len(shape) == 1:
            value = torch.ones(shape)
        else:
            value = torch.randn(shape, generator=generator) * 0.02
        out[name] = value.half()
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    weights = random_weights(controlnet_shapes(), args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(args.out), metadata={"format": "pt"})
    count = sum(v.numel() for v in weights.values())
    print(f"{args.out}: {len(weights)} tensors, {count / 1e6:.0f} M parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
