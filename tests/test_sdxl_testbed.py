"""The test bed's SDXL layout is SDXL's: the full configuration (built on the meta device) has the
real SDXL UNet's parameter count and key names; the tiny one keeps the block structure, the
attention factors and the pooled-vector conditioning; the text-encoder stand-in gives both hosts'
conditioning shapes."""

from __future__ import annotations

import pytest
import torch

from guidance.attention_routing import LayerKey
from tests.testbed.text_encoder import Conditioning, SdxlTextEncoderStandIn, size_embedding
from tests.testbed.unet import CONFIGS, SdxlUNetModel, make_unet


def _meta_unet(config: str):
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device("meta"):
        return SdxlUNetModel(**CONFIGS[config]) if config == "sdxl" else UNetModel(**CONFIGS[config])


@pytest.mark.parametrize("config, parameters, keys", [("sdxl", 2_567_463_684, 1680), ("sd15", 859_520_964, 686)])
def test_full_configurations_match_the_real_unets(config, parameters, keys):
    state = _meta_unet(config).state_dict()
    assert sum(t.numel() for t in state.values()) == parameters
    assert len(state) == keys


def test_full_sdxl_key_names_and_shapes():
    state = _meta_unet("sdxl").state_dict()
    assert state["label_emb.0.0.weight"].shape == (1280, 2816)
    assert state["label_emb.0.2.weight"].shape == (1280, 1280)
    assert state["input_blocks.4.1.proj_in.weight"].shape == (640, 640)  # linear, not a 1×1 conv
    assert state["input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"].shape == (640, 2048)
    assert state["input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    depths = {}
    for name in state:
        key = LayerKey.from_module_name(name.rsplit(".", 2)[0]) if ".attn2.to_q." in name else None
        if key is not None:
            depths[(key.section, key.block)] = depths.get((key.section, key.block), 0) + 1
    assert depths == {
        **{("input", b): 2 for b in (4, 5)},
        **{("input", b): 10 for b in (7, 8)},
        ("middle", 0): 10,
        **{("output", b): 10 for b in (0, 1, 2)},
        **{("output", b): 2 for b in (3, 4, 5)},
    }


@pytest.fixture(scope="module")
def tiny_sdxl():
    return make_unet("tiny_sdxl", seed=0)


def test_tiny_sdxl_attention_sits_at_factors_two_and_four(tiny_sdxl):
    seen = {}
    hooks = []

    def record(module, args, output, key):
        seen.setdefault(key, (args[0].shape[1], module.heads))

    for name, module in tiny_sdxl.named_modules():
        key = LayerKey.from_module_name(name)
        if key is not None:
            hooks.append(module.register_forward_hook(lambda m, a, o, key=key: record(m, a, o, key)))
    try:
        with torch.no_grad():
            x, t = torch.zeros(1, 4, 16, 16), torch.tensor([10.0])
            tiny_sdxl(x, t, context=torch.zeros(1, 77, 2048), y=torch.zeros(1, 2816))
    finally:
        for hook in hooks:
            hook.remove()
    factors = {16 // int(tokens**0.5) for tokens, _ in seen.values()}
    assert factors == {2, 4}
    transformers = {(key.section, key.block): set() for key in seen}
    for key in seen:
        transformers[(key.section, key.block)].add(key.transformer)
    depth = {block: len(found) for block, found in transformers.items()}
    assert depth == {
        **{("input", b): 2 for b in (4, 5)},
        **{("input", b): 3 for b in (7, 8)},
        ("middle", 0): 3,
        **{("output", b): 3 for b in (0, 1, 2)},
        **{("output", b): 2 for b in (3, 4, 5)},
    }
    assert {heads for _, heads in seen.values()} == {4, 8}  # 16-channel heads at widths 64 and 128


def test_tiny_sdxl_reads_context_and_pooled_vector(tiny_sdxl):
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 16, 16, generator=generator), torch.tensor([400.0])
    context, vector = torch.randn(1, 77, 2048, generator=generator), torch.randn(1, 2816, generator=generator)
    with torch.no_grad():
        out = tiny_sdxl(x, t, context=context, y=vector)
        # channels rolled, not tokens: attention does not see the order of its keys
        other_context = tiny_sdxl(x, t, context=context.roll(1, dims=2), y=vector)
        other_vector = tiny_sdxl(x, t, context=context, y=vector.roll(1, dims=1))
    assert (out - other_context).abs().mean() > 1e-3
    assert (out - other_vector).abs().mean() > 1e-3


def test_sdxl_text_encoder_stand_in():
    encoder = SdxlTextEncoderStandIn()
    encoded = encoder.encode(Conditioning(["a red cat", "a dog BREAK on grass"], width=832, height=1216))
    assert encoded["crossattn"].shape == (2, 154, 2048) and encoded["vector"].shape == (2, 2816)
    # the size embeddings: original (h, w), crop (0, 0), target (h, w)
    expected = size_embedding([1216, 832, 0, 0, 1216, 832])[0]
    assert torch.equal(encoded["vector"][0, 1280:], expected)
    # CLIP-L ⊕ CLIP-G on channels; the pooled part is CLIP-G at the first end-of-text position
    alone = encoder.encode(["a red cat"])
    assert torch.equal(alone["crossattn"][0], encoded["crossattn"][0, :77])
    assert torch.equal(alone["vector"][0, :1280], alone["crossattn"][0, 4, 768:])
    assert not torch.equal(alone["vector"][0, 1280:], expected)  # 1024 px when the list has no size
    empty = encoder.encode(Conditioning(["", ""], is_negative_prompt=True))
    assert not empty["crossattn"].any() and not empty["vector"][:, :1280].any()
    assert empty["vector"][:, 1280:].any()
    positive_empty = encoder.encode([""])
    assert positive_empty["crossattn"].any()
