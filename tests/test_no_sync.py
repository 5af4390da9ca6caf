"""No host–device synchronisation in the per-step path, checked at run time.

Whole generations (each method alone and all four together) run through the A1111 stand-in and the
Forge stand-in under a TorchFunctionMode that records every operation that reads a tensor on the
host or copies host data to the device: `.item()`, `.tolist()`, `.cpu()`, `.numpy()`, `bool()` /
`float()` / `int()` of a tensor, a tensor indexed with a Python list, `torch.tensor(..., device=)`,
a 0-dim tensor moved to a device. The tests run on the CPU, where such a copy costs nothing, so the
operations themselves are checked. Only calls made directly by the extension's code (a frame under
guidance/) while one of its per-step hooks runs count; the stand-in hosts may do what they like.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from tests.a1111_host import A1111StandIn, a1111_modules

GUIDANCE = str(Path(__file__).resolve().parent.parent / "guidance")
# (file under guidance/, function name): the per-step entry points of both adapters
PER_STEP_HOOKS = {
    ("hosts/a1111.py", "_on_cfg_denoiser"),
    ("hosts/a1111.py", "combine_denoised"),
    ("hosts/a1111_attention.py", "forward"),  # the UNet's and the routed layers' instance forwards
    ("hosts/forge_patches.py", "pre_cfg"),
    ("hosts/forge_patches.py", "wrapper"),
    ("hosts/forge_patches.py", "cfg_function"),
    ("hosts/forge_patches.py", "patch"),
}
# (file under guidance/, function name): why a read there is not a stall of the device queue
ALLOWED = {
    ("methods/sparsify.py", "flush"): "FiniteCheck reads the previous step's flag on an accelerator "
    "(computed a whole UNet call ago), and the last step's once, where the host waits for the image anyway",
    ("hosts/a1111.py", "source_rows"): "the extra rows' index tensor, built at the first step and cached for the run",
}
HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.cpu,
    torch.Tensor.numpy,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
DEVICE_COPIES = {torch.Tensor.to, torch.Tensor.cuda}
CREATION = {torch.tensor, torch.as_tensor}


def _holds_list(index) -> bool:
    return isinstance(index, list) or (isinstance(index, tuple) and any(isinstance(i, list) for i in index))


def _names_device(args, kwargs) -> bool:
    return "device" in kwargs or any(isinstance(a, (torch.device, str)) for a in args)


def offence(func, args, kwargs) -> str | None:
    """Why one torch call is a host read or a host-to-device copy, or None."""
    if func in HOST_READS:
        return f"host read {func.__name__}"
    if func in INDEXING and len(args) > 1 and _holds_list(args[1]):
        return "index with a Python list (an index tensor copied to the device)"
    scalar = func in DEVICE_COPIES and isinstance(args[0], torch.Tensor) and args[0].dim() == 0
    if scalar and (func is torch.Tensor.cuda or _names_device(args[1:], kwargs)):
        return "0-dim tensor copied to a device"
    if func in CREATION and kwargs.get("device") is not None:
        return f"{func.__name__}(..., device=) from host data"
    return None


def _guidance_name(frame) -> tuple[str, str] | None:
    filename = frame.f_code.co_filename
    if not filename.startswith(GUIDANCE):
        return None
    return Path(filename).relative_to(GUIDANCE).as_posix(), frame.f_code.co_name


class SyncRecorder(TorchFunctionMode):
    """Records the offending calls made directly by guidance/ code inside a per-step hook."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = offence(func, args, kwargs)
        if why is not None:
            self._check(why)
        return func(*args, **kwargs)

    def _check(self, why: str) -> None:
        caller = sys._getframe(2)  # __torch_function__ ← _check; the frame that made the call
        name = _guidance_name(caller)
        if name is None or name in ALLOWED:
            return
        frame = caller
        while frame is not None:
            if _guidance_name(frame) in PER_STEP_HOOKS:
                self.found.append(f"{name[0]}:{caller.f_lineno} in {name[1]}: {why}")
                return
            frame = frame.f_back


def test_the_recorder_sees_each_kind_of_offence():
    t = torch.arange(4.0)
    cases = [
        (torch.Tensor.item, (t[0],), {}),
        (torch.Tensor.__bool__, (t[0],), {}),
        (torch.Tensor.__float__, (t[0],), {}),
        (torch.Tensor.tolist, (t,), {}),
        (torch.Tensor.__getitem__, (t, [0, 2]), {}),
        (torch.Tensor.__getitem__, (t, (slice(None), [1])), {}),
        (torch.Tensor.to, (t[0], t.device), {}),
        (torch.tensor, ([1.0],), {"device": "cpu"}),
    ]
    for func, args, kwargs in cases:
        assert offence(func, args, kwargs) is not None, func
    for func, args, kwargs in [
        (torch.Tensor.__getitem__, (t, slice(0, 2)), {}),
        (torch.Tensor.__getitem__, (t, 1), {}),
        (torch.Tensor.to, (t, torch.float16), {}),
        (torch.Tensor.to, (t[0], torch.float16), {}),
        (torch.tensor, ([1.0],), {}),
    ]:
        assert offence(func, args, kwargs) is None, func


def test_the_recorder_is_scoped_to_guidance_code_inside_hooks():
    from guidance.attention import select_rows

    with SyncRecorder() as recorder:
        torch.arange(3)[[0, 1]].tolist()  # test code: not the extension's
        select_rows(torch.arange(3), [2, 0])  # the extension's, but not inside a per-step hook
    assert recorder.found == []


# ---------------------------------------------------------------------------------------------
# whole generations

A1111_METHODS = {
    "concepts": dict(concepts_enable=True, concept_warmup=0.0),
    "sega": dict(sega_enable=True, sega_edits="+ gold clock : 6\n- red book : 3"),
    "scfg": dict(scfg_enable=True),
    # targets in each image's first row: regulation acts on the first cond row (a note otherwise)
    "regulation": dict(regulation_enable=True, regulation_iterations=3, regulation_targets="red book"),
}
A1111_CASES = {**{name: (name,) for name in A1111_METHODS}, "all": tuple(A1111_METHODS)}
PROMPT = "a red book and a gold clock"


@pytest.fixture(scope="module")
def a1111(tiny_unet):
    with a1111_modules():
        yield A1111StandIn(tiny_unet)


@pytest.mark.parametrize("case", sorted(A1111_CASES))
def test_a1111_generation_has_no_sync_in_the_per_step_hooks(a1111, case):
    values = dict(enable=True)
    for method in A1111_CASES[case]:
        values.update(A1111_METHODS[method])
    fields = dict(prompt=[PROMPT, "a red book AND a green dog:0.5"], batch_size=2, steps=4, width=128, height=128)
    with SyncRecorder() as recorder:
        processed = a1111.generate(args=a1111.args(**values), **fields)
    assert "Semantic Fidelity note" not in processed.infotexts[0]  # every method acted
    assert recorder.found == [], "\n".join(recorder.found)


def test_a1111_generation_with_the_capture_chunked_and_fused_has_no_sync(a1111, monkeypatch):
    """S-CFG at R = 1 with a 1-byte layer budget: every cross-attention map built a head and a
    query row at a time, every self-attention product through the fused kernel."""
    from guidance import attention, attention_routing

    monkeypatch.setattr(attention_routing, "layer_capture_budget", lambda cap, q: 1)
    product = attention.head_averaged_product
    unformed = []
    monkeypatch.setattr(attention, "head_averaged_product", lambda *a, **k: unformed.append(1) or product(*a, **k))
    values = dict(enable=True, scfg_enable=True, scfg_mask_factor=1)
    fields = dict(prompt=[PROMPT, "a red book AND a green dog:0.5"], batch_size=2, steps=2, width=128, height=128)
    with SyncRecorder() as recorder:
        processed = a1111.generate(args=a1111.args(**values), **fields)
    assert unformed and "Semantic Fidelity note" not in processed.infotexts[0]
    assert recorder.found == [], "\n".join(recorder.found)


def test_a1111_generation_with_diagnostics_records_without_sync(a1111):
    """'Show diagnostics' keeps the numbers on the device per step; they are read once per image
    after the run (postprocess), outside the per-step hooks."""
    values = dict(enable=True, show_diagnostics=True)
    for method in A1111_METHODS.values():
        values.update(method)
    fields = dict(prompt=[PROMPT, "a red book AND a green dog:0.5"], batch_size=2, steps=4, width=128, height=128)
    with SyncRecorder() as recorder:
        processed = a1111.generate(args=a1111.args(**values), **fields)
    assert len(processed.images) == 4  # the two pictures were drawn
    assert recorder.found == [], "\n".join(recorder.found)


FORGE_CASES = ("concepts", "sega", "scfg", "regulation", "all")


@pytest.fixture(scope="module")
def forge():
    from tests.testbed.forge import ForgeDiffusionEngine

    return ForgeDiffusionEngine(seed=0)


@pytest.mark.parametrize("case", FORGE_CASES)
def test_forge_generation_has_no_sync_in_the_per_step_hooks(forge, case):
    from guidance.hosts.common import state_of
    from guidance.params import build_settings
    from tests.test_forge_adapter import METHODS, run

    values = {}
    for method in METHODS if case == "all" else (case,):
        values.update(METHODS[method])
    with SyncRecorder() as recorder:
        _, p = run(forge, build_settings(values), prompts=(PROMPT, "a red cat in a garden"))
    assert not state_of(p).failed, p.extra_generation_params
    assert recorder.found == [], "\n".join(recorder.found)
