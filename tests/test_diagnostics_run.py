"""'Show diagnostics' end to end: what the methods record, the pictures postprocess appends and saves.

Whole generations run through the A1111 stand-in with the real script, adapter and test-bed UNet (and
the Forge stand-in for its adapter's part); the recorded numbers are checked against concept
steering's own functions on the same inputs, driven through the real engine."""

from __future__ import annotations

import pytest
import torch

from guidance.engine import StepInputs
from guidance.methods.concept_steering import abs_cosine, concept_scores, concept_step
from guidance.params import build_settings
from guidance.planning import RunSteps, plan_run

PROMPT = "a red book and a gold clock"
FIELDS = dict(prompt=[PROMPT, "a cat on a gold clock"], batch_size=2, steps=6, width=128, height=128)
ON = dict(enable=True, concepts_enable=True, concepts="red book; gold clock", scfg_enable=True, concept_warmup=0.0)
SAVE_OPTION = "semantic_fidelity_save_diagnostics"


@pytest.fixture
def saving(host):
    """The settings page's "Save diagnostics images", reset afterwards."""
    yield host.shared.opts.data
    host.shared.opts.data.pop(SAVE_OPTION, None)


def _latents(processed, count: int = 2) -> torch.Tensor:
    return torch.stack(processed.images[:count])


def _is_picture(image) -> bool:
    return hasattr(image, "getpixel")


def _state(processed):
    from guidance.hosts.common import state_of

    return state_of(processed.p)


def _drawn_pixels(picture) -> int:
    """How many pixels are not the page's white background."""
    histogram = picture.convert("L").histogram()
    return picture.width * picture.height - histogram[255]


# ---------------------------------------------------------------------------------------------
# switch off: nothing kept, nothing changes


def test_switch_off_records_nothing_and_adds_no_picture(host):
    off = host.generate(args=host.args(**ON), **FIELDS)
    on = host.generate(args=host.args(**ON, show_diagnostics=True), **FIELDS)
    assert len(off.images) == len(off.infotexts) == 2 and not any(_is_picture(i) for i in off.images)
    assert _state(off).diagnostics == [] and off.errors == []
    # recording reads what the methods compute and changes nothing of it
    assert torch.equal(_latents(on), _latents(off))


def test_switch_off_plans_no_log():
    settings = build_settings(ON)
    planned = plan_run(settings, _images(), RunSteps(6))
    assert [term.log for terms in planned.run.terms for term in terms] == [None, None]
    assert planned.run.region_scale.region_log is None
    shown = plan_run(settings.replace(show_diagnostics=True), _images(), RunSteps(6))
    assert all(term.log is not None for terms in shown.run.terms for term in terms)
    assert shown.run.region_scale.region_log == {}


def test_master_switch_off_with_diagnostics_on_is_the_host_alone(host):
    baseline = host.generate(extension=False, **FIELDS)
    processed = host.generate(args=host.args(show_diagnostics=True, concepts_enable=True), **FIELDS)
    assert torch.equal(torch.stack(processed.images), torch.stack(baseline.images))
    assert processed.infotexts == baseline.infotexts and _state(processed).diagnostics == []


# ---------------------------------------------------------------------------------------------
# switch on: one picture per image after the images


def test_one_picture_per_image_after_the_images_with_its_infotext(host):
    processed = host.generate(args=host.args(**ON, show_diagnostics=True), **FIELDS)
    assert processed.errors == [] and len(processed.images) == len(processed.infotexts) == 4
    pictures = processed.images[2:]
    assert all(_is_picture(p) and p.mode == "RGB" and p.width == 640 for p in pictures)
    assert processed.infotexts[2:] == processed.infotexts[:2]  # the gallery pairs them by index
    for picture in pictures:
        assert _drawn_pixels(picture) > 0.05 * picture.width * picture.height
    # per image: concept steering's plot, then S-CFG's regions
    from guidance import diagnostics

    plot_height = diagnostics.layout(diagnostics.ConceptRecord((None,) * 3, 0, 0)).height
    assert pictures[0].height == plot_height + diagnostics.MARGIN_TOP + diagnostics.MAP_SIDE + 8
    assert _state(processed).diagnostics == []  # drawn once, nothing kept for the next generation


def test_hires_pass_adds_its_panels_to_the_same_picture(host):
    fields = dict(FIELDS, prompt=PROMPT, batch_size=1, enable_hr=True, hr_second_pass_steps=3)
    processed = host.generate(args=host.args(**ON, show_diagnostics=True), **fields)
    assert len(processed.images) == 2
    single = host.generate(args=host.args(**ON, show_diagnostics=True, apply_hires=False), **fields)
    assert processed.images[1].height > single.images[1].height  # the hires pass's two panels below


def test_batches_number_the_images_of_the_generation(host):
    fields = dict(FIELDS, prompt=PROMPT, batch_size=1, n_iter=2)
    processed = host.generate(args=host.args(**ON, show_diagnostics=True), **fields)
    assert len(processed.images) == len(processed.infotexts) == 4
    assert processed.infotexts[2:] == processed.infotexts[:2]
    assert "Seed: 2" in processed.infotexts[3]


def test_a_method_without_a_picture_adds_none(host):
    sega = dict(enable=True, sega_enable=True, sega_edits="+ sunglasses : 5", show_diagnostics=True)
    processed = host.generate(args=host.args(**sega), **FIELDS)
    assert len(processed.images) == 2 and processed.errors == []


# ---------------------------------------------------------------------------------------------
# the recorded numbers are those concept steering computed


def _images():
    from guidance.engine import ImageInfo

    return [ImageInfo(PROMPT, 1), ImageInfo("a gold clock and a red book", 2)]


def _random_steps(run, steps: int):
    """StepInputs of a 2-image batch in eps space with random predictions for every extra row."""
    generator = torch.Generator().manual_seed(7)
    shape = (4, 8, 8)
    for step in range(steps):
        rows = len(run.extra_rows)
        yield StepInputs(
            uncond=torch.randn((2, *shape), generator=generator),
            cond=torch.randn((2, *shape), generator=generator),
            conds_list=[[(0, 1.0)], [(1, 1.0)]],
            x=torch.randn((2, *shape), generator=generator),
            sigma=torch.ones(2),
            step=step,
            total_steps=steps,
            cfg_scale=7.0,
            extra=torch.randn((rows, *shape), generator=generator),
            space="eps",
        )


def test_recorded_similarities_and_gates_are_the_engines():
    settings = build_settings(dict(ON, scfg_enable=False, concept_warmup=0.2, show_diagnostics=True))
    planned = plan_run(settings, _images(), RunSteps(10))
    run, inputs = planned.run, list(_random_steps(planned.run, 10))
    for step_inputs in inputs:
        run.step(step_inputs)
    for image in range(2):
        (steering,) = run.terms[image]
        schedule = steering.schedule(10)
        expected_similarity, expected_gate, history, momentum = [], [], {}, None
        for step_inputs in inputs:
            rows = [k for k, row in enumerate(run.extra_rows) if row.image == image]
            prompt = step_inputs.cond[image] - step_inputs.uncond[image]
            subjects = step_inputs.extra[rows] - step_inputs.uncond[image]
            result = concept_step(prompt, subjects, schedule, step_inputs.step, momentum, history)
            history[step_inputs.step], momentum = result.similarity, result.momentum
            expected_similarity.append(result.similarity.tolist())
            expected_gate.append([bool(g) for g in result.gate.tolist()])
            # the similarity is |cos(P, score)| of this step's scores, whatever the history
            direct = abs_cosine(prompt, concept_scores(prompt, subjects, schedule.percentile, True))
            assert torch.equal(direct, result.similarity)
        record = steering.capture().record("image")
        assert [c.name for c in record.concepts] == ["red book", "gold clock", "abstract"]
        assert (record.warmup, record.cooldown, record.total_steps) == (2, 10, 10)
        assert [c.threshold for c in record.concepts] == [0.5, 0.5, 0.5]
        for k, trace in enumerate(record.concepts):
            assert list(trace.similarity) == [row[k] for row in expected_similarity]
            assert list(trace.steered) == [row[k] for row in expected_gate]
        assert any(any(c.steered) for c in record.concepts)  # the case steers something


def test_steps_the_run_never_asked_for_have_no_numbers():
    settings = build_settings(dict(ON, scfg_enable=False, concept_cooldown=0.5, show_diagnostics=True))
    planned = plan_run(settings, _images(), RunSteps(8))
    for step_inputs in _random_steps(planned.run, 8):
        planned.run.step(step_inputs)
    record = planned.run.terms[0][0].capture().record()
    # concept steering stops asking at its cool-down (step 4 of 8): no similarity, nothing steered after
    assert all(v is not None for v in record.concepts[0].similarity[:4])
    assert record.concepts[0].similarity[4:] == (None,) * 4 and not any(record.concepts[0].steered[4:])


# ---------------------------------------------------------------------------------------------
# saving, and failures that must not cost the images


def test_the_setting_saves_the_pictures_beside_the_images(host, saving, tmp_path):
    from PIL import Image

    args = host.args(**ON, show_diagnostics=True)
    for option, expected in ((False, 0), (True, 2)):
        saving[SAVE_OPTION] = option
        folder = tmp_path / f"saved-{option}"
        processed = host.generate(args=args, outpath_samples=str(folder), **FIELDS)
        files = sorted(folder.glob("*-semantic-fidelity.png")) if folder.exists() else []
        assert len(files) == expected and len(processed.images) == 4
    saved = Image.open(files[0])
    assert saved.size == processed.images[2].size
    assert saved.text["parameters"] == processed.infotexts[2]
    # a generation whose images the host does not save (the API's default) saves no picture either
    folder = tmp_path / "not-saved"
    processed = host.generate(args=args, outpath_samples=str(folder), do_not_save_samples=True, **FIELDS)
    assert not folder.exists() and len(processed.images) == 4


def test_a_failure_in_drawing_is_one_note_and_the_images_stay(host, monkeypatch, capsys):
    import PIL.ImageDraw

    plain = host.generate(args=host.args(**ON), **FIELDS)
    capsys.readouterr()

    def broken(*args, **kwargs):
        raise RuntimeError("no ink")

    monkeypatch.setattr(PIL.ImageDraw, "Draw", broken)  # PIL's, not ours: drawing fails inside PIL
    processed = host.generate(args=host.args(**ON, show_diagnostics=True), **FIELDS)
    assert len(processed.images) == len(processed.infotexts) == 2 and processed.errors == []
    assert torch.equal(_latents(processed), _latents(plain))
    notes = [line for line in capsys.readouterr().err.splitlines() if "diagnostics" in line]
    assert notes == [
        "Semantic Fidelity: diagnostics: RuntimeError: no ink; the images are unchanged, without their "
        "diagnostics picture."
    ]


def test_a_failure_in_saving_keeps_the_pictures(host, saving, tmp_path, capsys):
    saving[SAVE_OPTION] = True
    blocker = tmp_path / "a-file"
    blocker.write_text("the samples folder is a file")
    processed = host.generate(args=host.args(**ON, show_diagnostics=True), outpath_samples=str(blocker), **FIELDS)
    assert len(processed.images) == 4 and processed.errors == []
    assert "diagnostics pictures could not be saved" in capsys.readouterr().err


def test_unsaved_pictures_get_the_hosts_temporary_folder(host, saving, tmp_path):
    """Forge Neo's gallery writes unsaved images into `temp_dir` (default <data>/tmp), which it makes
    only when the setting changes: the pictures, unsaved by default, need it made."""
    opts = host.shared.opts.data
    args = host.args(**ON, show_diagnostics=True)
    try:
        for saved in (True, False):
            saving[SAVE_OPTION] = saved
            folder = tmp_path / f"tmp-{saved}"
            opts["temp_dir"] = str(folder)
            processed = host.generate(args=args, outpath_samples=str(tmp_path / "out"), **FIELDS)
            assert len(processed.images) == 4 and processed.errors == []
            assert folder.is_dir() == (not saved)  # saved pictures are served from their files
        opts["temp_dir"] = ""  # A1111's and Forge's default: gradio's own cache folder
        host.generate(args=args, **FIELDS)
    finally:
        opts.pop("temp_dir", None)


# ---------------------------------------------------------------------------------------------
# Forge: its adapter keeps the same records for the script's postprocess


def test_forge_adapter_keeps_one_capture_per_image():
    from guidance.hosts.common import state_of
    from tests.test_forge_adapter import run
    from tests.testbed.forge import ForgeDiffusionEngine

    engine = ForgeDiffusionEngine(seed=0)
    values = dict(ON, concepts="red cat; wooden table", show_diagnostics=True)
    prompts = ("a red cat on a wooden table", "a red cat")
    shown, p = run(engine, build_settings(values), prompts=prompts)
    captures = state_of(p).diagnostics
    assert [(c.image, c.hires) for c in captures] == [(0, False), (1, False)]
    record = captures[0].concepts.record()
    assert [c.name for c in record.concepts] == ["red cat", "wooden table", "abstract"]
    assert all(v is not None for c in record.concepts for v in c.similarity)
    assert captures[0].regions.record().regions  # S-CFG's regions of the last step
    plain, p_off = run(engine, build_settings(dict(values, show_diagnostics=False)), prompts=prompts)
    assert state_of(p_off).diagnostics == [] and torch.equal(plain, shown)


def test_a_failure_in_recording_stops_the_log_not_the_steering():
    from guidance.methods.concept_steering import SimilarityLog

    log = SimilarityLog()
    log.add(0, 4, torch.tensor([0.5, 0.4]), torch.tensor([0.0, 1.0]))
    log.add(1, 4, torch.tensor([0.5, 0.4]), torch.tensor([1.0]))  # shapes that cannot be stacked
    log.add(2, 4, torch.tensor([0.5, 0.4]), torch.tensor([0.0, 1.0]))
    assert log.steps == [0] and log.error.startswith("RuntimeError")
