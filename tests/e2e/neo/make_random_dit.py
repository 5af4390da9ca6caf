"""Write a random-weight single-file checkpoint of a non-UNet model family that Forge Neo detects.

    anima  Neo's `circlestone-labs/Anima`: the Cosmos DiT (Neo's detection fixes it at 2048 x 28
           blocks), the LLM adapter, Qwen3-0.6B, the Wan 2.1 VAE.
    flux   Neo's `black-forest-labs/FLUX.1-*`: a Flux DiT of 1 double and 1 single block at width
           128 (Neo reads width and depth from the shapes), CLIP-L, T5-XXL (fixed by Neo's config).

Every module is Neo's own class, built on the meta device from the config Neo itself would use, so
the key names and shapes are the ones Neo's loader expects; the file layout is Neo's
`process_*_state_dict_for_saving` one (`model.diffusion_model.`, `vae.`, `text_encoders.<name>.`).
The big parts are stored as float8_e4m3fn, which Neo keeps as its storage dtype ("Using Detected
... Data Type"), so a 2B DiT costs 2 GB of RAM. Values: 1-D `*.weight` (norm scales) 1, biases 0,
everything else N(0, 0.02). Tensors are streamed to disk one at a time.

Usage (Neo's venv):  python make_random_dit.py --neo /tmp/neo --family anima --out X.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time

import torch

BIG = torch.float8_e4m3fn
SAFETENSORS_DTYPES = {BIG: "F8_E4M3", torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
SAFETENSORS_DTYPES[torch.int64] = "I64"


def meta_state_dict(build) -> dict[str, torch.Tensor]:
    """The state dict of the module `build()` makes, on the meta device (no memory, no init), with
    Neo's operations swapped in as its loader does (they define e.g. RMSNorm's extra arguments)."""
    from backend.operations import using_forge_operations

    with torch.device("meta"), using_forge_operations(device=torch.device("meta"), dtype=torch.bfloat16):
        return dict(build().state_dict())


def detected_config(keys: dict[str, torch.Tensor]):
    """Neo's own model guess (huggingface_guess.guess) for a state dict of these keys and shapes."""
    import huggingface_guess

    return huggingface_guess.guess(keys)


def read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def anima_parts(neo: str) -> list[tuple[str, dict[str, torch.Tensor], torch.dtype]]:
    """(file prefix, meta state dict, dtype) of each part of an Anima checkpoint."""
    from backend.nn.anima import Anima
    from backend.nn.llm.llama import Qwen3_06B
    from backend.nn.wan_vae import WanVAE
    from huggingface_guess.detection import detect_unet_config

    probe_prefix = "model.diffusion_model."
    probe = {
        probe_prefix + "blocks.0.mlp.layer1.weight": torch.empty(1, device="meta"),
        probe_prefix + "llm_adapter.blocks.0.cross_attn.q_proj.weight": torch.empty(1, device="meta"),
        probe_prefix + "x_embedder.proj.1.weight": torch.empty(2048, 68, device="meta"),
    }
    config = detect_unet_config(probe, probe_prefix)
    config.pop("image_model")
    repo = os.path.join(neo, "backend/huggingface/circlestone-labs/Anima")
    te = meta_state_dict(lambda: Qwen3_06B(read_json(os.path.join(repo, "text_encoder/config.json"))))
    adapter = {k: v for k, v in te.items() if k.startswith("llm_adapter.")}
    qwen = {k: v for k, v in te.items() if not k.startswith("llm_adapter.")}
    vae = meta_state_dict(lambda: WanVAE.from_config(WanVAE.load_config(os.path.join(repo, "vae"))))
    return [
        ("model.diffusion_model.", meta_state_dict(lambda: Anima(**config)), BIG),
        ("model.diffusion_model.", adapter, torch.bfloat16),
        ("text_encoders.qwen3_06b.transformer.", qwen, BIG),
        ("vae.", vae, torch.bfloat16),
    ]


def flux_parts(neo: str) -> list[tuple[str, dict[str, torch.Tensor], torch.dtype]]:
    """(file prefix, meta state dict, dtype) of each part of a small-DiT Flux.1 checkpoint."""
    from backend.nn.clip import IntegratedCLIP
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.nn.t5 import IntegratedT5
    from backend.nn.vae import IntegratedAutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    repo = os.path.join(neo, "backend/huggingface/black-forest-labs/FLUX.1-schnell")
    dit = dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=128,
               mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56],
               theta=10000, patch_size=2, qkv_bias=True, guidance_embed=False)  # fmt: skip
    clip_config = CLIPTextConfig.from_pretrained(os.path.join(repo, "text_encoder"))
    t5_config = read_json(os.path.join(repo, "text_encoder_2/config.json"))
    vae_config = IntegratedAutoencoderKL.load_config(os.path.join(repo, "vae"))
    return [
        ("model.diffusion_model.", meta_state_dict(lambda: IntegratedFluxTransformer2DModel(**dit)), torch.bfloat16),
        ("text_encoders.clip_l.", meta_state_dict(lambda: IntegratedCLIP(CLIPTextModel, clip_config)), torch.float16),
        ("text_encoders.t5xxl.", meta_state_dict(lambda: IntegratedT5(t5_config)), BIG),
        ("vae.", meta_state_dict(lambda: IntegratedAutoencoderKL.from_config(vae_config)), torch.bfloat16),
    ]


def stored_dtype(meta: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor is written in: its own for integer buffers and scalars (fp32), else `dtype`."""
    if not meta.dtype.is_floating_point:
        return meta.dtype
    return torch.float32 if meta.dim() == 0 else dtype


def random_like(name: str, meta: torch.Tensor, dtype: torch.dtype, std: float) -> torch.Tensor:
    """Norm scales and scalars 1, biases and integer buffers 0, the rest N(0, std)."""
    dtype = stored_dtype(meta, dtype)
    if not meta.dtype.is_floating_point or name.endswith(".bias"):
        return torch.zeros(meta.shape, dtype=dtype)
    if meta.dim() <= 1:
        return torch.ones(meta.shape, dtype=dtype)
    return (torch.randn(meta.shape) * std).to(dtype)


def safetensors_header(entries: list[tuple[str, torch.Tensor, torch.dtype]]) -> tuple[bytes, int]:
    """The safetensors header (8-byte length + JSON, padded to 8) and the data size it announces."""
    header, offset = {}, 0
    for name, meta, dtype in entries:
        dt = stored_dtype(meta, dtype)
        size = meta.numel() * torch.empty(0, dtype=dt).element_size()
        span = [offset, offset + size]
        header[name] = {"dtype": SAFETENSORS_DTYPES[dt], "shape": list(meta.shape), "data_offsets": span}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def write_streaming(path: str, entries: list[tuple[str, torch.Tensor, torch.dtype]], std: float) -> int:
    """Writes a safetensors file one tensor at a time, so memory holds one tensor, not the model."""
    header, size = safetensors_header(entries)
    with open(path, "wb") as f:
        f.write(header)
        for name, meta, dtype in entries:
            f.write(random_like(name, meta, dtype, std).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return size


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neo", default="/tmp/neo")
    ap.add_argument("--family", choices=("anima", "flux"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--std", type=float, default=0.02)
    a = ap.parse_args()
    sys.argv = sys.argv[:1] + ["--cpu"]  # Neo's backend parses the command line at import
    sys.path[:0] = [a.neo, os.path.join(a.neo, "modules_forge/packages")]
    t0 = time.time()
    parts = {"anima": anima_parts, "flux": flux_parts}[a.family](a.neo)
    entries = [(prefix + k, v, dtype) for prefix, sd, dtype in parts for k, v in sd.items()]
    guess = detected_config({k: v for k, v, _ in entries})
    print(f"Neo detects: {type(guess).__name__} ({guess.huggingface_repo}); {len(entries)} tensors")
    tmp = a.out + ".part"
    size = write_streaming(tmp, entries, a.std)
    os.replace(tmp, a.out)
    print(f"wrote {a.out}: {size / 2**30:.2f} GiB in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
