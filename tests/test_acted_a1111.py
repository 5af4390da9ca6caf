"""The "acted" summary through the A1111 stand-in (its own module: the Forge stand-in's `modules`
and A1111's cannot be loaded at once), with `record_acted` called in the adapter's finish as the lead
wires it, hires fix on."""

from __future__ import annotations

from guidance.hosts.common import ACTED_KEY

PROMPT = "a photo of a red cat on a wooden table"


def test_the_a1111_adapter_records_both_passes(host):
    args = host.args(enable=True, scfg_enable=True, apply_hires=True)
    fields = dict(width=64, height=64, steps=4, cfg_scale=7.0, enable_hr=True, hr_second_pass_steps=2)
    processed = host.generate(args=args, prompt=PROMPT, **fields)
    assert processed.errors == []
    # SD1.5 at R = 4: 6 blocks per call, one call per step; 4 steps, then 2 hires steps
    assert processed.p.extra_generation_params[ACTED_KEY] == "S-CFG 24 blocks, 4 steps; hires: S-CFG 12 blocks, 2 steps"
