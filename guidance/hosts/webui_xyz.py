"""X/Y/Z plot axes for every XYZ-enabled parameter of params.py (both hosts share xyz_grid.py's
`AxisOption`, ../shared/hosts/a1111.md §7, forge.md §6).

An axis writes its value into a per-cell override dict on `p`; the script reads it in `process()`.
XYZ copies `p` shallowly per cell, so the dict is replaced, never mutated (pitfall 17)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import params

OVERRIDES_ATTRIBUTE = "semantic_fidelity_overrides"


def overrides_of(p) -> Mapping[str, Any]:
    return getattr(p, OVERRIDES_ATTRIBUTE, None) or {}


def set_override(p, key: str, value: Any) -> None:
    setattr(p, OVERRIDES_ATTRIBUTE, {**overrides_of(p), key: value})


def _axis_type(param: params.Param):
    if param.kind == "int":
        return int
    if param.kind == "float":
        return float
    return str


def _apply_for(param: params.Param):
    def apply(p, value, values):
        set_override(p, param.key, value)
        # an axis on one method's control switches the extension and that method on for the cell
        set_override(p, "enable", True)
        switch = params.METHOD_SWITCHES.get(param.section)
        if switch is not None:
            set_override(p, switch, True)

    return apply


def axis_options(xyz_module) -> list:
    """One `AxisOption` per XYZ parameter, built with the host's own class."""
    options = []
    for param in params.xyz_params():
        kwargs = {}
        if param.kind == "choice":
            kwargs["choices"] = lambda param=param: list(param.choices)
        options.append(xyz_module.AxisOption(param.xyz_label, _axis_type(param), _apply_for(param), **kwargs))
    return options


def find_xyz_module():
    from modules import scripts

    for entry in scripts.scripts_data:
        if entry.script_class.__module__ == "xyz_grid.py" and hasattr(entry.module, "axis_options"):
            return entry.module
    return None


def register_axes() -> bool:
    """Add the axes once (the module survives UI reloads only as a new object, so labels are the
    guard). Returns whether xyz_grid was found."""
    module = find_xyz_module()
    if module is None:
        return False
    present = {option.label for option in module.axis_options}
    module.axis_options.extend(o for o in axis_options(module) if o.label not in present)
    return True
