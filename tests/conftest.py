import pytest
import torch

from tests.testbed.sampling import CompVisEpsDenoiser
from tests.testbed.unet import make_unet


@pytest.fixture(scope="session")
def tiny_unet():
    return make_unet("tiny", seed=0)


@pytest.fixture(scope="session")
def eps_denoiser(tiny_unet):
    return CompVisEpsDenoiser(tiny_unet)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
