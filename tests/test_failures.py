"""Failures inside the A1111 attention kernel never cost the image: whole generations through the
A1111 stand-in (real script, adapter and ldm UNet) with an out-of-memory error, a RuntimeError or
NaN injected at each stage of the routed attention (capture, regulation, bias, call set-up). The
image comes out, the note is there once, no instance forward stays on any module."""

import pytest
import torch

SIZE = dict(width=128, height=128, steps=4, cfg_scale=7.0)
PROMPT = "a red book and a gold clock"
ATTENTION = dict(enable=True, scfg_enable=True, regulation_enable=True)
NOTE = "S-CFG / attention regulation stopped"


@pytest.fixture
def reported(monkeypatch):
    """The adapter's wiring of the kernel's notes: `on_error` reports to the processing object
    (console and infotext), as guidance/hosts/a1111.py passes it to UNetRouting."""
    from guidance.hosts import a1111
    from guidance.hosts.common import report

    prepare = a1111.A1111Adapter.prepare
    seen = []

    def prepare_with_reports(self, p, state):
        prepare(self, p, state)
        if state.active is None:
            return
        routing = state.active.routing
        if routing is not None and routing.router is not None:
            seen.append(routing)
            routing.on_error = lambda note: report(p, note)
        run = state.active.planned.run
        step = run.step

        def step_and_report(inputs):  # after GuidanceRun.step: the notes its methods made
            guided = step(inputs)
            for note in run.take_notes():
                report(p, note)
            return guided

        run.step = step_and_report

    monkeypatch.setattr(a1111.A1111Adapter, "prepare", prepare_with_reports)
    return seen


def _raise(error):
    def broken(*args, **kwargs):
        raise error

    return broken


def _oom():
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 34.00 GiB")


STAGES = {
    # (object path, attribute, replacement factory, settings)
    "capture-oom": ("guidance.attention_routing", "head_averaged_probabilities", lambda: _raise(_oom()), "scfg"),
    "fused-product-oom": ("guidance.attention", "head_averaged_product", lambda: _raise(_oom()), "scfg-unformed"),
    "record-runtime": ("guidance.methods.scfg.RegionScales", "record", lambda: _raise(RuntimeError("boom")), "scfg"),
    "begin-call-runtime": (
        "guidance.methods.scfg.RegionScales",
        "begin_call",
        lambda: _raise(RuntimeError("boom")),
        "scfg",
    ),
    "regulation-oom": (
        "guidance.methods.attention_regulation.AttentionRegulator",
        "regulate",
        lambda: _raise(_oom()),
        "regulation",
    ),
    "bias-runtime": (
        "guidance.methods.attention_regulation",
        "edited_scores",
        lambda: _raise(RuntimeError("boom")),
        "regulation",
    ),
    "router-oom-all-methods": ("guidance.attention_routing.AttentionRouter", "forward", lambda: _raise(_oom()), "all"),
}
METHODS = {
    "scfg": dict(enable=True, scfg_enable=True),
    "regulation": dict(enable=True, regulation_enable=True),
    # R = 1 with a 1-byte layer budget: every self-attention map unformed, its products fused
    "scfg-unformed": dict(enable=True, scfg_enable=True, scfg_mask_factor=1),
    "all": dict(enable=True, scfg_enable=True, regulation_enable=True, concepts_enable=True, sega_enable=True),
}


def _target(path):
    import importlib

    module_path, _, attribute = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ImportError:
        return getattr(importlib.import_module(module_path), attribute)


def _routed_calls(monkeypatch):
    """Counts AttentionRouter.forward calls made after the router stopped (must stay 0)."""
    from guidance.attention_routing import AttentionRouter

    forward = AttentionRouter.forward
    after_stop = []

    def counting(self, *args, **kwargs):
        if self.stopped:
            after_stop.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AttentionRouter, "forward", counting)
    return after_stop


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_an_error_in_the_kernel_gives_an_image_one_note_and_no_patch(host, reported, monkeypatch, capsys, stage):
    path, attribute, make, methods = STAGES[stage]
    after_stop = _routed_calls(monkeypatch)
    monkeypatch.setattr(_target(path), attribute, make())
    if methods == "scfg-unformed":
        monkeypatch.setattr(_target("guidance.attention_routing"), "layer_capture_budget", lambda cap, q: 1)
    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    processed = host.generate(args=host.args(**METHODS[methods]), prompt=PROMPT, **SIZE)
    images = torch.stack(processed.images)
    assert images.shape == torch.stack(baseline.images).shape and torch.isfinite(images).all()
    err = capsys.readouterr().err
    assert err.count(NOTE) == 1, err
    assert processed.infotexts[0].count(NOTE) == 1
    assert host.leftover_patches() == []
    assert after_stop == []  # after the failure no layer is routed any more
    (routing,) = reported
    assert routing.failed and routing.router.stopped and routing.patched == []
    if methods != "all":  # the attention part was all there was: it stopped at step 0, the host's image
        assert torch.equal(images, torch.stack(baseline.images))


def test_the_out_of_memory_note_says_so(host, reported, monkeypatch, capsys):
    monkeypatch.setattr(_target("guidance.attention_routing"), "head_averaged_probabilities", _raise(_oom()))
    processed = host.generate(args=host.args(**METHODS["scfg"]), prompt=PROMPT, **SIZE)
    assert "stopped (out of memory)" in processed.infotexts[0]
    assert "RuntimeError: boom" not in capsys.readouterr().err


def test_a_failure_mid_run_stops_the_attention_part_for_the_rest_of_the_image(host, reported, monkeypatch):
    from guidance.methods.scfg import RegionScales

    record = RegionScales.record
    calls = []

    def fails_at_step_two(self, key, probs, *args, **kwargs):
        calls.append(self._step)
        if self._step == 2:
            raise RuntimeError("boom")
        return record(self, key, probs, *args, **kwargs)

    monkeypatch.setattr(RegionScales, "record", fails_at_step_two)
    baseline = host.generate(extension=False, prompt=PROMPT, **SIZE)
    processed = host.generate(args=host.args(**METHODS["scfg"]), prompt=PROMPT, **SIZE)
    assert max(calls) == 2 and calls.count(2) == 1  # nothing recorded after the failure
    images = torch.stack(processed.images)
    assert torch.isfinite(images).all()
    assert (images - torch.stack(baseline.images)).abs().max() > 1e-4  # steps 0-1 were steered
    assert processed.infotexts[0].count(NOTE) == 1
    assert host.leftover_patches() == []


@pytest.mark.parametrize("where", ["regulated-output", "captured-maps"])
def test_nan_inside_the_kernel_is_replaced_and_noted_once(host, reported, monkeypatch, capsys, where):
    from guidance.methods.attention_regulation import AttentionRegulator

    if where == "regulated-output":
        forward = AttentionRegulator.forward

        def nan_output(self, *args, **kwargs):
            out, probs = forward(self, *args, **kwargs)
            return out * float("nan"), probs

        monkeypatch.setattr(AttentionRegulator, "forward", nan_output)
        settings = METHODS["regulation"]
    else:
        from guidance import attention_routing

        averaged = attention_routing.head_averaged_probabilities
        monkeypatch.setattr(
            attention_routing, "head_averaged_probabilities", lambda *a, **k: averaged(*a, **k) * float("nan")
        )
        settings = METHODS["scfg"]
    processed = host.generate(args=host.args(**settings), prompt=PROMPT, **SIZE)
    images = torch.stack(processed.images)
    assert torch.isfinite(images).all()
    assert processed.infotexts[0].count("non-finite values (NaN/inf)") == 1
    assert capsys.readouterr().err.count("non-finite values (NaN/inf)") == 1
    assert host.leftover_patches() == []


def test_without_the_adapters_wiring_the_note_still_reaches_the_console(host, monkeypatch, capsys):
    monkeypatch.setattr(_target("guidance.attention_routing"), "head_averaged_probabilities", _raise(_oom()))
    processed = host.generate(args=host.args(**METHODS["scfg"]), prompt=PROMPT, **SIZE)
    assert torch.isfinite(torch.stack(processed.images)).all()
    assert capsys.readouterr().err.count(NOTE) == 1
    assert host.leftover_patches() == []


def test_inactive_steps_call_the_hosts_own_attention(host, reported, monkeypatch):
    """Outside every attention window the routed layers call the class forward (the host's SDP)."""
    from guidance.attention_routing import AttentionRouter

    steps = []
    forward = AttentionRouter.forward

    def recording(self, *args, **kwargs):
        steps.append(self.rows.step)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(AttentionRouter, "forward", recording)
    host.generate(args=host.args(**METHODS["scfg"], scfg_start=0.5), prompt=PROMPT, **SIZE)
    assert steps and min(steps) == 2  # steps 0 and 1 (of 4) are outside S-CFG's window


# ---------------------------------------------------------------------------------------------
# bad numbers through the whole host path, every method on

ALL = dict(METHODS["all"], sega_edits="+ gold clock : 6")
SMALL = dict(width=64, height=64, steps=3, cfg_scale=7.0)


def _init(batch=1):
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(3))


BAD_NUMBERS = {
    # name: (kind, fields, notes expected in the infotext)
    "cfg-0": ("txt2img", dict(SIZE, cfg_scale=0.0), ["S-CFG: at CFG scale 0 there is no CFG direction to scale"]),
    "cfg-1": ("txt2img", dict(SIZE, cfg_scale=1.0), []),
    "steps-1": ("txt2img", dict(SIZE, steps=1), []),
    "denoising-0": ("img2img", dict(SIZE, init_latent=_init(), denoising_strength=0.0), []),
    "192x128": ("txt2img", dict(SIZE, width=192, height=128), []),
    # 64 px: regulation's layers have 2×2 maps, too small for a bump (not regulated, noted)
    "batch-8": ("txt2img", dict(SMALL, batch_size=8), ["Attention regulation: some chosen layers have 2×2"]),
}


@pytest.mark.parametrize("case", sorted(BAD_NUMBERS))
def test_bad_numbers_give_an_image_and_say_what_could_not_act(host, reported, capsys, case):
    kind, fields, expected = BAD_NUMBERS[case]
    baseline = host.generate(kind, extension=False, prompt=PROMPT, **fields)
    processed = host.generate(kind, args=host.args(**ALL), prompt=PROMPT, **fields)
    images, plain = torch.stack(processed.images), torch.stack(baseline.images)
    assert images.shape == plain.shape and torch.isfinite(images).all()
    assert processed.errors == [] and host.leftover_patches() == []
    notes = [part for part in processed.infotexts[0].splitlines()[-1].split(", ") if "Semantic Fidelity note" in part]
    for note in expected:
        assert len(notes) == 1 and notes[0].count(note) == 1, notes
    if not expected:
        assert notes == [], notes
    assert "Error" not in capsys.readouterr().err


def test_cfg_0_through_region_scales_is_plain_cfg_without_a_division_by_zero():
    from guidance.engine import ImageStep
    from guidance.methods.scfg import RegionScales

    scales = RegionScales(batch_size=1)
    step = ImageStep(0, 0, 4, 0.0, torch.zeros(4, 8, 8), torch.randn(4, 8, 8))
    assert torch.equal(scales.rate(step), torch.ones(1, 1, 1))
    assert scales.notes == ["S-CFG: at CFG scale 0 there is no CFG direction to scale; it does not act."]


def test_odd_latent_sizes_map_every_level():
    """72×56 px (latent 9×7) is what the host allows (8-px steps; A1111 interpolates the UNet's skip
    connections, which the stand-in does not): every level of the ceil-halving chain is found."""
    from guidance.attention_routing import map_size

    assert [map_size((9, 7), tokens) for tokens in (63, 20, 6, 2)] == [(9, 7, 1), (5, 4, 2), (3, 2, 4), (2, 1, 8)]
