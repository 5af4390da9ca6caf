"""The engine on plain tensors: CFG bit for bit, space conversion, composition, validation."""

import pytest
import torch

from guidance.engine import ExtraRow, GuidanceError, GuidanceRun, ImageInfo, StepInputs, combine_cfg, schedule_index
from guidance.params import build_settings


def _rows(n, seed, shape=(4, 8, 8)):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


class ConstantTerm:
    """An additive eps-space term that adds a fixed tensor times the first extra prompt's offset
    from uncond; enough to check the engine's plumbing without any real method."""

    source = "test"

    def __init__(self, scale, prompts=("extra",), active_from=0):
        self.scale = scale
        self.prompts = prompts
        self.active_from = active_from
        self.seen = []

    def extra_prompts(self):
        return self.prompts

    def active(self, step, total_steps):
        return step >= self.active_from

    def term(self, image_step):
        self.seen.append(image_step)
        return self.scale * (image_step.extra["test"][0] - image_step.eps_uncond)


def _inputs(batch=2, space="x0", extra=None, step=0, conds_list=None, skipped=False):
    conds_list = conds_list or [[(0, 1.0)], [(1, 0.7), (2, 0.3)]][:batch]
    n_cond = sum(len(c) for c in conds_list)
    return StepInputs(
        uncond=_rows(batch, 1),
        cond=_rows(n_cond, 2),
        conds_list=conds_list,
        x=_rows(batch, 3),
        sigma=torch.tensor([2.5, 0.7][:batch]),
        step=step,
        total_steps=10,
        cfg_scale=7.5,
        extra=extra,
        space=space,
        uncond_skipped=skipped,
    )


def test_plain_cfg_equals_hand_written_cfg_to_the_bit():
    uncond, cond = _rows(1, 1), _rows(1, 2)
    hand = uncond + (cond - uncond) * 7.5
    assert torch.equal(combine_cfg(uncond, cond, [[(0, 1.0)]], 7.5), hand)
    run = GuidanceRun(build_settings({"enable": True}), [ImageInfo("a cat")])
    out = run.step(StepInputs(uncond, cond, [[(0, 1.0)]], _rows(1, 3), torch.tensor([3.0]), 0, 10, 7.5))
    assert torch.equal(out, hand)


def test_and_prompts_are_weighted_like_the_host():
    inputs = _inputs()
    u, c = inputs.uncond, inputs.cond
    expected_1 = u[1] + (c[1] - u[1]) * (0.7 * 7.5)
    expected_1 = expected_1 + (c[2] - u[1]) * (0.3 * 7.5)
    out = GuidanceRun(build_settings({"enable": True}), [ImageInfo("a"), ImageInfo("b AND c")]).step(inputs)
    assert torch.equal(out[0], u[0] + (c[0] - u[0]) * 7.5)
    assert torch.equal(out[1], expected_1)


@pytest.mark.parametrize("space", ["x0", "eps"])
def test_acting_term_is_added_in_eps_space(space):
    term_a, term_b = ConstantTerm(2.0), ConstantTerm(0.5)
    run = GuidanceRun(
        build_settings({"enable": True}), [ImageInfo("a"), ImageInfo("b AND c")], terms=[[term_a], [term_b]]
    )
    assert run.extra_rows == (ExtraRow(0, "test", "extra"), ExtraRow(1, "test", "extra"))
    inputs = _inputs(space=space, extra=_rows(2, 4))
    out = run.step(inputs)
    plain = combine_cfg(inputs.uncond, inputs.cond, inputs.conds_list, inputs.cfg_scale)
    for image, scale in enumerate((2.0, 0.5)):
        if space == "x0":  # x0 = x − σ·eps, so an eps term t moves x0 by −σ·t
            sigma = inputs.sigma[image]
            eps_u = (inputs.x[image] - inputs.uncond[image]) / sigma
            eps_extra = (inputs.x[image] - inputs.extra[image]) / sigma
            expected = plain[image] - sigma * scale * (eps_extra - eps_u)
        else:
            expected = plain[image] + scale * (inputs.extra[image] - inputs.uncond[image])
        torch.testing.assert_close(out[image], expected, rtol=1e-5, atol=1e-5)
    # each image saw only its own extra row
    assert [s.image for s in term_a.seen] == [0] and [s.image for s in term_b.seen] == [1]


def test_inactive_terms_and_skipped_uncond_keep_the_host_result_exactly():
    term = ConstantTerm(3.0, active_from=5)
    run = GuidanceRun(build_settings({"enable": True}), [ImageInfo("a"), ImageInfo("b")], terms=[[term], []])
    inputs = _inputs(extra=_rows(1, 4), step=2)
    plain = combine_cfg(inputs.uncond, inputs.cond, inputs.conds_list, inputs.cfg_scale)
    assert torch.equal(run.step(inputs), plain)
    skipped = _inputs(extra=_rows(1, 4), step=7, skipped=True)
    assert torch.equal(run.step(skipped), combine_cfg(skipped.uncond, skipped.cond, skipped.conds_list, 7.5))
    assert term.seen == []
    assert not torch.equal(run.step(_inputs(extra=_rows(1, 4), step=7)), plain)
    assert run.steps_seen == 3


def test_region_scale_multiplies_the_cfg_direction():
    class HalfLeft:
        def active(self, step, total_steps):
            return True

        def rate(self, image_step):
            rate = torch.ones(1, *image_step.eps_uncond.shape[1:])
            rate[..., :4] = 0.5
            return rate

    inputs = _inputs(batch=1, space="eps", conds_list=[[(0, 1.0)]])
    out = GuidanceRun(build_settings({"enable": True}), [ImageInfo("a")], region_scale=HalfLeft()).step(inputs)
    u, c = inputs.uncond[0], inputs.cond[0]
    torch.testing.assert_close(out[0, ..., :4], u[..., :4] + 7.5 * 0.5 * (c - u)[..., :4])
    torch.testing.assert_close(out[0, ..., 4:], u[..., 4:] + 7.5 * (c - u)[..., 4:])


def test_mismatched_steps_raise_a_clear_error():
    run = GuidanceRun(build_settings({"enable": True}), [ImageInfo("a")], terms=[[ConstantTerm(1.0)]])
    with pytest.raises(GuidanceError, match="expected 1 extra rows, got 0"):
        run.step(_inputs(batch=1, conds_list=[[(0, 1.0)]]))
    with pytest.raises(GuidanceError, match="set up for 1 images"):
        run.step(_inputs(batch=2, extra=_rows(1, 4)))
    with pytest.raises(GuidanceError, match="unknown prediction space"):
        run.step(_inputs(batch=1, conds_list=[[(0, 1.0)]], extra=_rows(1, 4), space="v"))


def test_schedule_index_is_a_fraction_of_the_run():
    assert schedule_index(0.1, 50) == 5
    assert schedule_index(0.2, 20) == 4
    assert schedule_index(1.0, 13) == 13
    assert schedule_index(0.5, 7) == 4
    assert schedule_index(0.5, 5) == 3


# ---------------------------------------------------------------------------------------------
# which extra rows a step reads (the adapters leave the others out of the UNet batch)

ROWS_STEPS = 12


def _rows_run(**values):
    from guidance.methods.concept_steering import ConceptSteering
    from guidance.methods.sega import SegaEdits

    settings = build_settings({"enable": True, "sega_enable": True, **values})
    terms = [
        [ConceptSteering(["red book", "gold clock"], warmup=0.1, cooldown=0.5), SegaEdits.from_settings(settings)],
        [SegaEdits.from_settings(settings)],
    ]
    return GuidanceRun(settings, [ImageInfo("a red book and a gold clock"), ImageInfo("a cat")], terms=terms)


def _replay(run, garbage: bool) -> list[torch.Tensor]:
    """The run's outputs over a whole schedule; with `garbage`, every extra row the run says it does
    not read at a step holds large random values instead of its prediction."""
    outputs = []
    for step in range(ROWS_STEPS):
        inputs = _inputs(step=step, extra=_rows(len(run.extra_rows), 100 + step))
        inputs.total_steps = ROWS_STEPS
        if garbage:
            for index, used in enumerate(run.rows_used(step, ROWS_STEPS)):
                if not used:
                    inputs.extra[index] = 1e3 * _rows(1, 900 + step)[0]
        outputs.append(run.step(inputs))
    return outputs


@pytest.mark.parametrize(
    "edits, momentum",
    [
        ("+ gold clock : 5 : 0.9 : 0.0 : 0.25\n- red book : 3 : 0.9 : 0.1 : 0.6", 0.0),
        ("+ gold clock : 5 : 0.9 : 0.0 : 0.25\n- red book : 3 : 0.9 : 0.5 : 0.75", 0.5),
        ("+ gold clock : 5 : 0.9 : 0.25 : 1.0", 0.0),
    ],
    ids=["cooldowns", "momentum", "warmup-only"],
)
def test_rows_the_run_does_not_read_cannot_change_the_result(edits, momentum):
    used = _rows_run(sega_edits=edits, sega_momentum=momentum)
    reference = _replay(used, garbage=False)
    skipped = _replay(_rows_run(sega_edits=edits, sega_momentum=momentum), garbage=True)
    for step, (a, b) in enumerate(zip(reference, skipped, strict=True)):
        assert torch.equal(a, b), step


def test_a_step_given_only_the_rows_it_reads_gives_the_same_result():
    edits = "+ gold clock : 5 : 0.9 : 0.0 : 0.25\n- red book : 3 : 0.9 : 0.1 : 0.6"
    full, partial = _rows_run(sega_edits=edits, sega_momentum=0.5), _rows_run(sega_edits=edits, sega_momentum=0.5)
    left_out = 0
    for step in range(ROWS_STEPS):
        inputs = _inputs(step=step, extra=_rows(len(full.extra_rows), 100 + step))
        inputs.total_steps = ROWS_STEPS
        used = partial.rows_used(step, ROWS_STEPS)
        left_out += used.count(False)
        kept = [row for row, is_used in zip(inputs.extra, used, strict=True) if is_used]
        trimmed = StepInputs(**{**vars(inputs), "extra": torch.stack(kept) if kept else None, "extra_used": used})
        assert torch.equal(partial.step(trimmed), full.step(inputs)), step
    assert left_out > 0
    with pytest.raises(GuidanceError, match="expected 2 extra rows, got 6"):
        partial.step(StepInputs(**{**vars(inputs), "extra_used": (True, True) + (False,) * 4}))


def test_rows_used_follow_each_schedule_exactly():
    edits = "+ gold clock : 5 : 0.9 : 0.0 : 0.25\n- red book : 3 : 0.9 : 0.1 : 0.6"
    run = _rows_run(sega_edits=edits, sega_momentum=0.0)
    # extra rows: image 0 concepts (2), image 0 edits (2), image 1 edits (2)
    per_step = [run.rows_used(step, ROWS_STEPS) for step in range(ROWS_STEPS)]
    concepts = [used[0] and used[1] for used in per_step]
    assert concepts == [step < 6 for step in range(ROWS_STEPS)]  # cool-down 0.5 of 12 steps
    first_edit = [used[2] for used in per_step]
    assert first_edit == [step < 3 for step in range(ROWS_STEPS)]  # cool-down 0.25
    second_edit = [used[3] for used in per_step]  # no momentum: read from warm-up 0.1 to cool-down 0.6
    assert second_edit == [1 <= step < 7 for step in range(ROWS_STEPS)]
    assert [used[4:] for used in per_step] == [used[2:4] for used in per_step]  # image 1: same edits
    assert [run.rows_needed(step, ROWS_STEPS) for step in range(ROWS_STEPS)] == [step < 7 for step in range(12)]
    # the share of extra-row work a run with these schedules needs: what the benchmark's ratio targets
    assert sum(map(sum, per_step)) == 2 * 6 + 2 * (3 + 6)


def test_a_term_without_rows_used_reads_its_rows_while_active():
    run = GuidanceRun(build_settings({"enable": True}), [ImageInfo("a")], terms=[[ConstantTerm(1.0, active_from=3)]])
    assert [run.rows_used(step, 10) for step in range(5)] == [(False,)] * 3 + [(True,)] * 2
