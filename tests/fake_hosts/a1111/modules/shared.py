"""`modules.shared`: options, progress state, the loaded model and hypernetworks."""

from dataclasses import dataclass


@dataclass
class Options:
    batch_cond_uncond: bool = True
    skip_early_cond: float = 0.0
    s_min_uncond_all: bool = False
    upcast_attn: bool = False
    pad_cond_uncond: bool = False
    cross_attention_optimization: str = "Automatic"


@dataclass
class State:
    sampling_step: int = 0
    sampling_steps: int = 0
    interrupted: bool = False
    skipped: bool = False


opts = Options()
state = State()
sd_model = None
loaded_hypernetworks: list = []


def reset() -> None:
    """Fresh options and state between tests."""
    global opts, state, sd_model
    opts = Options()
    state = State()
    sd_model = None
    loaded_hypernetworks.clear()
