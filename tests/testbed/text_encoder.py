"""A small deterministic stand-in for the WebUI's CLIP text-encoder wrapper (a1111.md §6.6): word-
level token ids, 75-token chunks wrapped as BOS + 75 + EOS (BREAK closes a chunk), and an embedding
per token id drawn from a generator seeded by the id, so a prompt always encodes to the same
(77·k, 768) context and different words to different ones. Used with the real ldm UNet."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import torch

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

    def __init__(self, seed: int = 0, scale: float = 1.0):
        self.seed = seed
        self.scale = scale
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
            self._vectors[token] = torch.randn(CONTEXT_DIM, generator=generator) * self.scale
        return self._vectors[token]

    def encode(self, texts: list[str]) -> torch.Tensor:
        """(N, 77·k, 768): every text padded with empty chunks to the longest, as the host does."""
        per_text = [self.tokenize_line(text)[0] for text in texts]
        chunk_count = max(len(chunks) for chunks in per_text)
        empty = self.tokenize_line("")[0][0]
        rows = []
        for chunks in per_text:
            chunks = chunks + [empty] * (chunk_count - len(chunks))
            ids = [token for chunk in chunks for token in chunk.tokens]
            vectors = torch.stack([self._vector(t) for t in ids])
            # a running mean mixes earlier tokens into later positions, as a causal encoder does
            mixed = vectors.cumsum(0) / torch.arange(1, len(ids) + 1).unsqueeze(1)
            rows.append(0.5 * vectors + 0.5 * mixed)
        return torch.stack(rows)
