"""The benchmark's UNet cache: safetensors (no pickle), the same weights back, no random init on load."""

import torch

from tests.bench import harness


def test_cached_unet_round_trips_through_safetensors(tmp_path, monkeypatch):
    monkeypatch.setenv("SF_BENCH_CACHE", str(tmp_path / "cache"))
    built = harness.load_unet("tiny_sdxl", seed=3)
    path = tmp_path / "cache" / "semantic-fidelity-bench-tiny_sdxl-seed3.safetensors"
    assert path.read_bytes()[8:9] == b"{"  # a safetensors header (8-byte length, then JSON), not a pickle
    loaded = harness.load_unet("tiny_sdxl", seed=3)
    expected, actual = built.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys() and len(actual) > 800
    assert all(torch.equal(expected[name], actual[name]) for name in expected)
    assert type(loaded).__name__ == "SdxlUNetModel" and not loaded.training
