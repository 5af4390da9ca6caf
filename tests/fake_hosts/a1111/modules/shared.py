"""`modules.shared`: options, progress state, the loaded model and hypernetworks."""

from dataclasses import dataclass, field


class OptionInfo:
    """A settings-page entry (modules/options.py): default, label, component and its arguments."""

    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None, section=None):
        self.default, self.label, self.component = default, label, component
        self.component_args, self.onchange, self.section = component_args, onchange, section
        self.comment_after = ""

    def info(self, info):
        self.comment_after += f"<span class='info'>({info})</span>"
        return self


@dataclass
class Options:
    batch_cond_uncond: bool = True
    skip_early_cond: float = 0.0
    s_min_uncond_all: bool = False
    upcast_attn: bool = False
    pad_cond_uncond: bool = False
    cross_attention_optimization: str = "Automatic"
    samples_save: bool = True  # "Always save all generated images"
    samples_format: str = "png"
    data: dict = field(default_factory=dict)
    data_labels: dict = field(default_factory=dict)

    def add_option(self, key, info):
        """Registered entries read as attributes: the saved value, else the entry's default."""
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        data = self.__dict__.get("data", {})
        if item in data:
            return data[item]
        raise AttributeError(item)


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
