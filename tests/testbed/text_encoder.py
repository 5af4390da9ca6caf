"""A small deterministic stand-in for the WebUI's CLIP text-encoder wrapper (a1111.md §6.6): word-
level token ids, 75-token chunks wrapped as BOS + 75 + EOS (BREAK closes a chunk), and an embedding
per token id drawn from a generator seeded by the id, so a prompt always encodes to the same
(77·k, 768) context and different words to different ones. Used with the real ldm UNet.

`SdxlTextEncoderStandIn` is SDXL's pair (a1111.md §8, forge.md §3.3): a CLIP-L-like (768) and a
CLIP-G-like (1280) encoder over the same tokens, concatenated on the channel axis into the
(N, 77·k, 2048) `crossattn`, and the (N, 2816) `vector`: CLIP-G's pooled output (its first chunk's
end-of-text position) followed by the sinusoidal embeddings (256 each) of the original size (h, w),
the crop's top-left corner and the target size (h, w). An all-empty negative batch encodes to zero
text (crossattn and pooled part), as both hosts do."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch
from ldm.modules.diffusionmodules.util import timestep_embedding

from .unet import CONTEXT_DIM

BOS, EOS = 49406, 49407
CHUNK_TOKENS = 75
_WORDS = re.compile(r"\w+|[^\w\s]")


@dataclass
class PromptChunk:
    tokens: list[int]
    multipliers: list[float]


def token_id(word: str) -> int:
    return zlib.crc32(word.lower().encode()) % 49000 + 1


class TextEncoderStandIn:
    """`tokenize`, `tokenize_line` and the encoding of whole prompts."""

    def __init__(self, seed: int = 0, scale: float = 1.0, width: int = CONTEXT_DIM, pad_after_end: bool = False):
        self.seed = seed
        self.scale = scale
        self.width = width
        self.pad_after_end = pad_after_end  # OpenCLIP: ids after the first end-of-text become 0
        self._vectors: dict[int, torch.Tensor] = {}

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[token_id(w) for w in _WORDS.findall(text)] for text in texts]

    def tokenize_line(self, line: str) -> tuple[list[PromptChunk], int]:
        chunks, current, count = [], [], 0
        for part_index, part in enumerate(re.split(r"\bBREAK\b", line)):
            if part_index > 0:
                chunks.append(current)
                current = []
            for token in self.tokenize([part])[0]:
                if len(current) == CHUNK_TOKENS:
                    chunks.append(current)
                    current = []
                current.append(token)
                count += 1
        if current or not chunks:
            chunks.append(current)
        wrapped = [
            PromptChunk([BOS] + c + [EOS] * (CHUNK_TOKENS + 1 - len(c)), [1.0] * (CHUNK_TOKENS + 2)) for c in chunks
        ]
        return wrapped, count

    def _vector(self, token: int) -> torch.Tensor:
        if token not in self._vectors:
            generator = torch.Generator().manual_seed(self.seed * 100003 + token)
            self._vectors[token] = torch.randn(self.width, generator=generator) * self.scale
        return self._vectors[token]

    def _chunk_ids(self, tokens: list[int]) -> list[int]:
        if not self.pad_after_end:
            return tokens
        end = tokens.index(EOS)
        return tokens[: end + 1] + [0] * (len(tokens) - end - 1)

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, 77·k, width): every text padded with empty chunks to the longest, as the host does."""
        per_text = [self.tokenize_line(text)[0] for text in texts]
        chunk_count = max(len(chunks) for chunks in per_text)
        empty = self.tokenize_line("")[0][0]
        rows = []
        for chunks in per_text:
            chunks = chunks + [empty] * (chunk_count - len(chunks))
            ids = [token for chunk in chunks for token in self._chunk_ids(chunk.tokens)]
            vectors = torch.stack([self._vector(t) for t in ids])
            # a running mean mixes earlier tokens into later positions, as a causal encoder does
            mixed = vectors.cumsum(0) / torch.arange(1, len(ids) + 1).unsqueeze(1)
            rows.append(0.5 * vectors + 0.5 * mixed)
        return torch.stack(rows)


SIZE_EMBEDDING = 256
SDXL_DEFAULT_SIZE = 1024


class SdxlTextEncoderStandIn:
    """SDXL's two text encoders and size conditioning; `embedders` as A1111's GeneralConditioner
    holds them (both with `tokenize_line`), `tokenize` delegating to the first."""

    def __init__(self, seed: int = 0):
        self.clip_l = TextEncoderStandIn(seed=seed, width=768)
        self.clip_g = TextEncoderStandIn(seed=seed + 7919, width=1280, pad_after_end=True)
        self.embedders = [self.clip_l, self.clip_g]

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return self.clip_l.tokenize(texts)

    def tokenize_line(self, line: str):
        return self.clip_l.tokenize_line(line)

    def encode(self, texts) -> dict[str, torch.Tensor]:
        """{'crossattn': (N, 77·k, 2048), 'vector': (N, 2816)} for a list of texts; width, height and
        is_negative_prompt are read from it when it carries them (the hosts' SdConditioning)."""
        width = getattr(texts, "width", None) or SDXL_DEFAULT_SIZE
        height = getattr(texts, "height", None) or SDXL_DEFAULT_SIZE
        zero_text = bool(getattr(texts, "is_negative_prompt", False)) and all(text == "" for text in texts)
        texts = list(texts)
        g_context = self.clip_g.encode(texts)
        crossattn = torch.cat([self.clip_l.encode(texts), g_context], dim=-1)
        # the pooled output is CLIP-G's first chunk at its end-of-text position
        ends = [self.clip_g.tokenize_line(text)[0][0].tokens.index(EOS) for text in texts]
        pooled = torch.stack([g_context[row, end] for row, end in enumerate(ends)])
        if zero_text:
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        sizes = size_embedding([height, width, 0, 0, height, width]).expand(len(texts), -1)
        return {"crossattn": crossattn, "vector": torch.cat([pooled, sizes], dim=1)}


def size_embedding(values: list[float]) -> torch.Tensor:
    """(1, 256·len(values)): each value's sinusoidal embedding (sgm's ConcatTimestepEmbedderND)."""
    embedded = timestep_embedding(torch.tensor(values, dtype=torch.float32), SIZE_EMBEDDING)
    return embedded.reshape(1, -1)


class Conditioning(list):
    """A prompt list with the size and negativity the hosts' `SdConditioning` carries."""

    def __init__(self, texts, width: int | None = None, height: int | None = None, is_negative_prompt=False):
        super().__init__(texts)
        self.width, self.height, self.is_negative_prompt = width, height, is_negative_prompt
