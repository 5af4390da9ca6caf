"""The benchmark's CPU memory figure: peak bytes of the tensor storages a run creates."""

import torch

from tests.bench.harness import TensorBytes


def test_tensor_bytes_count_new_storages_until_freed_and_views_once():
    weights = torch.ones(2**20)  # existed before: never counted
    with TensorBytes() as tracker:
        a = torch.empty(2**20, dtype=torch.float32)  # 4 MiB
        view = a[: 2**19]  # a view: no new storage
        b = weights * 2  # 4 MiB: 8 MiB live
        del a, view, b  # both freed
        c = torch.zeros(2**19)  # 2 MiB
        weights.add_(1)  # in place on an old storage
    assert tracker.peak == 8 * 2**20
    assert tracker.now == 2 * 2**20  # c is still alive
    del c
    assert tracker.now == 0
