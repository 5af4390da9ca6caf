import pytest
import torch

from tests.testbed.sampling import CompVisEpsDenoiser
from tests.testbed.unet import make_unet

# The test bed's tensors are tiny: intra-op threads only add synchronisation, and on a loaded
# machine their spin-waits make whole runs tens of times slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_unet():
    return make_unet("tiny", seed=0)


@pytest.fixture(scope="session")
def sdxl_unet():
    return make_unet("tiny_sdxl", seed=0)


@pytest.fixture(scope="module")
def host(tiny_unet):
    """The A1111 stand-in host around the test-bed UNet, its `modules` importable for one test module
    (a module that needs another host defines a `host` of its own)."""
    from tests.a1111_host import A1111StandIn, a1111_modules

    with a1111_modules():
        yield A1111StandIn(tiny_unet)


@pytest.fixture(scope="session")
def eps_denoiser(tiny_unet):
    return CompVisEpsDenoiser(tiny_unet)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
