"""`modules.sd_hijack` (a1111.md §4.2): list the optimizations (extension callbacks first, then the
builtins), sort by priority, apply the selected one ("Automatic": the highest priority)."""

from __future__ import annotations

from modules import script_callbacks, sd_hijack_optimizations, shared

optimizers: list = []
current_optimizer = None


def list_optimizers() -> None:
    found = script_callbacks.list_optimizers_callback()
    sd_hijack_optimizations.list_optimizers(found)
    optimizers[:] = sorted((o for o in found if o.is_available()), key=lambda o: o.priority, reverse=True)


def apply_optimizations(option: str | None = None) -> str:
    global current_optimizer
    if current_optimizer is not None:
        current_optimizer.undo()
    else:
        sd_hijack_optimizations.SdOptimization().undo()
    selection = option or shared.opts.cross_attention_optimization
    if selection == "None":
        current_optimizer = None
        return ""
    chosen = next((o for o in optimizers if o.title() == selection), None)
    if chosen is None:
        chosen = optimizers[0] if optimizers else None
    current_optimizer = chosen
    if chosen is not None:
        chosen.apply()
    return chosen.name if chosen else ""
