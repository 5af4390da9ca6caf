"""Fitting extra conditionings to the host's batch (a1111.md pitfalls 2-4)."""

import pytest
import torch

from guidance.hosts.a1111_conds import append_rows, carry_marker, fit_tokens
from tests.a1111_host import a1111_modules


@pytest.fixture(scope="module")
def prompt_parser():
    with a1111_modules():
        from modules import prompt_parser

        yield prompt_parser


def test_short_extra_conds_get_whole_empty_chunks():
    extra = torch.randn(2, 77, 8)
    empty = torch.randn(1, 77, 8)
    fitted = fit_tokens(extra, 154, empty)
    assert fitted.shape == (2, 154, 8)
    assert torch.equal(fitted[:, :77], extra)
    assert torch.equal(fitted[1, 77:], empty[0])


def test_without_an_empty_chunk_the_last_vector_repeats_and_long_ones_are_cut():
    extra = torch.randn(1, 77, 8)
    fitted = fit_tokens(extra, 80, None)
    assert torch.equal(fitted[0, 77:], extra[0, -1:].expand(3, 8))
    assert torch.equal(fit_tokens(extra, 77, None), extra)
    assert fit_tokens(torch.randn(1, 154, 8), 77, None).shape == (1, 77, 8)


def test_controlnet_marker_is_carried_to_the_extra_rows():
    cond = torch.randn(3, 78, 8)
    cond[:, 0] = 1024.0
    extra = torch.randn(2, 77, 8)
    marked = carry_marker(extra, cond)
    assert marked.shape == (2, 78, 8)
    assert torch.equal(marked[:, 0], torch.full((2, 8), 1024.0))
    assert torch.equal(marked[:, 1:], extra)
    assert carry_marker(extra, torch.randn(3, 77, 8)) is extra  # no marker: unchanged
    joined = append_rows(cond, extra, torch.randn(1, 77, 8))
    assert joined.shape == (5, 78, 8) and torch.equal(joined[3:, 0], torch.full((2, 8), 1024.0))


def test_sdxl_dict_conds_join_both_keys_and_keep_a_shape(prompt_parser):
    cond = prompt_parser.DictWithShape({"crossattn": torch.randn(2, 154, 16), "vector": torch.randn(2, 6)})
    extra = prompt_parser.DictWithShape({"crossattn": torch.randn(3, 77, 16), "vector": torch.randn(3, 6)})
    joined = append_rows(cond, extra, torch.zeros(1, 77, 16))
    assert isinstance(joined, prompt_parser.DictWithShape)
    assert joined.shape == (5, 154, 16)
    assert joined["vector"].shape == (5, 6)
    assert torch.equal(joined["vector"][2:], extra["vector"])
    assert torch.equal(joined["crossattn"][2:, :77], extra["crossattn"])
    assert torch.equal(joined["crossattn"][2:, 77:], torch.zeros(3, 77, 16))
