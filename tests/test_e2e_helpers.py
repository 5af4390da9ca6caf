"""The pure parts of the real-host runner (tests/e2e), which CI cannot run against a host: how it
judges a pip freeze, the page's errors and the controls read back after a paste."""

from tests.e2e import browser, install_check


def test_changed_packages_lists_new_versions_and_removals_only():
    before = {"pydantic": "1.10.27", "numpy": "1.26.2", "gradio": "3.41.2"}
    after = {"pydantic": "2.8.2", "gradio": "3.41.2", "spacy": "3.8.11"}
    assert install_check.changed_packages(before, after) == ["numpy 1.26.2 removed", "pydantic 1.10.27 -> 2.8.2"]
    assert install_check.changed_packages(before, dict(before, spacy="3.8.11")) == []


def test_new_errors_counts_page_errors_and_ignores_the_hosts_resources():
    host_cdn = "console: Failed to load resource: net::ERR_NAME_NOT_RESOLVED [https://cdnjs.example/x.js]"
    props = "page error: Cannot read properties of undefined (reading 'props')"
    baseline = [host_cdn, props, props]
    assert browser.new_errors(baseline, [host_cdn, host_cdn, host_cdn, props, props]) == []
    assert browser.new_errors(baseline, [props, props, props]) == [props]
    ours = "console: Failed to load resource: 404 [http://h/file=extensions/semantic-fidelity/style.css]"
    thrown = "page error: TypeError: x is undefined at http://h/file=extensions/semantic-fidelity/javascript/a.js"
    assert browser.new_errors(baseline + [ours], [ours, thrown]) == [ours, thrown]


def test_differences_compares_numbers_with_a_tolerance():
    expected = {"enable": True, "concept_scale": 11.5, "sega_edits": "+ sunglasses : 5"}
    assert browser.differences(expected, dict(expected, concept_scale=11.5000001)) == []
    wrong = browser.differences(expected, dict(expected, enable=False, concept_scale=8.5))
    assert wrong == ["enable: False instead of True", "concept_scale: 8.5 instead of 11.5"]


def test_every_control_has_an_element_id_per_tab():
    ids = {browser.control_id(tab, p.key) for tab in ("txt2img", "img2img") for p in browser.params.PARAMS}
    assert len(ids) == 2 * len(browser.params.PARAMS)
    assert browser.control_id("txt2img", "enable") == "script_txt2img_semantic_fidelity_enable"


def _png(value: int, size: int = 8, text: str = "") -> bytes:
    """A one-colour PNG; `text` goes into a PNG text chunk, as a host's infotext does."""
    import io

    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (value, value, value)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def test_same_pixels_ignores_the_infotext_chunk_and_compares_every_image():
    from tests.e2e import common

    assert _png(10, text="a") != _png(10, text="b")
    assert common.same_pixels([_png(10, text="a")], [_png(10, text="b")])
    assert not common.same_pixels([_png(10)], [_png(11)])
    assert not common.same_pixels([_png(10), _png(10)], [_png(10), _png(12)])
    assert not common.same_pixels([_png(10)], [_png(10), _png(10)])


def test_cell_problem_needs_both_parts_in_the_pixels_our_key_and_no_note():
    from tests.e2e import compat

    key = compat.INFOTEXT_KEYS["sega"]
    tool, ours, on = ([_png(1)], ["tool"]), ([_png(2)], [f"{key}: on"]), [f"{key}: on"]
    assert compat.cell_problem(tool, ours, ([_png(3)], [f"x, {key}: on"]), "sega") is None
    assert compat.cell_problem(tool, ours, ([_png(1)], on), "sega") == "same pixels as the tool alone"
    assert compat.cell_problem(tool, ours, ([_png(2)], on), "sega") == "same pixels as ours alone"
    assert compat.cell_problem(tool, ours, ([_png(3)], ["Steps: 4"]), "sega") == f"infotext lacks {key!r}"
    noted = ([_png(3)], [f"{key}: on, {compat.NOTE}: SEGA fell back to the host, Version: v1.10.1"])
    assert compat.cell_problem(tool, ours, noted, "sega") == "note: SEGA fell back to the host"
    quoted = ([_png(1)], [f'{key}: on, {compat.NOTE}: "no tiles, no S-CFG", Version: f2.0.1'])
    assert compat.cell_problem(tool, ours, quoted, "sega") == "same pixels as the tool alone; note: no tiles, no S-CFG"
    # a declared impossible combination passes only with a note that gives the declared reason
    assert compat.cell_problem(tool, ours, quoted, "sega", impossible="no tiles") is None
    assert compat.cell_problem(tool, ours, noted, "sega", impossible="no tiles") == (
        "no note saying why it cannot act (note: SEGA fell back to the host)"
    )
    assert compat.cell_problem(tool, ours, ([_png(1)], on), "sega", impossible="no tiles") == (
        "no note saying why it cannot act (note: none)"
    )


def test_filled_args_places_settings_over_the_hosts_defaults_and_checks_labels():
    from tests.e2e import compat

    defaults = [{"label": "Enabled", "value": False}, {"label": "Scale", "value": 3.0}, {"label": "Mode", "value": "a"}]
    assert compat.filled_args(defaults, ((0, "Enabled", True), (2, "Mode", "b"))) == ([True, 3.0, "b"], None)
    assert compat.filled_args(defaults, ((1, "Strength", 2.0),))[1] == "argument 1 is 'Scale', not 'Strength'"
    assert compat.filled_args(defaults, ((5, "", 1),))[1] == "the script has 3 arguments, not 6"


def test_matrix_text_has_a_row_per_tool_a_column_per_method_and_the_reasons():
    from tests.e2e import compat

    tools = compat.FORGE_TOOLS[:2]
    results = {(tools[0].name, m): None for m in compat.METHODS}
    results[tools[1].name, "scfg"] = "same pixels as the tool alone"
    lines = compat.matrix_text(tools, results).splitlines()
    assert lines[0].split() == list(compat.METHODS)
    assert lines[1].split() == [tools[0].name, "PASS", "PASS", "PASS", "PASS"]
    assert lines[2].startswith(tools[1].name) and lines[2].count("FAIL") == 4  # 3 not run, 1 failed
    assert f"  {tools[1].name} x scfg: same pixels as the tool alone" in lines
    assert lines[-1] == "  (none)"  # none of these two tools has a combination declared impossible
    multidiffusion = next(t for t in compat.FORGE_TOOLS if t.name == "MultiDiffusion")
    lines = compat.matrix_text([multidiffusion], {(multidiffusion.name, m): None for m in compat.METHODS}).splitlines()
    assert lines[1].split()[1:] == ["PASS", "PASS", "NOTED", "(cannot", "act)", "NOTED", "(cannot", "act)"]
    assert lines[-1].startswith("  MultiDiffusion x regulation: S-CFG and attention regulation need")


def test_every_row_names_its_script_and_the_controlnet_rows_their_preprocessor():
    from tests.e2e import compat

    for tools in compat.TOOLS.values():
        assert len({t.name for t in tools}) == len(tools)
        scripts = [t for t in tools if t.script]
        assert all(t.script == t.script.lower() and (t.settings or t.controlnet_module) for t in scripts)
        # a row without a script is a host setting that the request switches on
        assert all(t.switch and not t.settings for t in tools if not t.script)
    assert [t.controlnet_module for t in compat.A1111_TOOLS if t.controlnet_module] == ["none"]
    assert [t.controlnet_module for t in compat.FORGE_TOOLS if t.controlnet_module] == ["None"]
    assert [t.controlnet_module for t in compat.NEO_TOOLS if t.controlnet_module] == ["None", "reference_only"]
    assert [t.name for t in compat.NEO_TOOLS if t.kind == "img2img"] == ["MultiDiffusion (img2img)"]


def test_a_neo_row_is_switched_on_in_its_own_requests_only():
    """(a) the tool alone and (c) both carry the row's switch and img2img's init image; (b) ours alone not."""
    from tests.e2e import compat

    sent = []

    class Recorder:
        def call(self, path, payload=None):
            sent.append((path, payload))
            return {"images": [], "info": '{"infotexts": []}'}

    runner = compat.Compat(Recorder(), type("Host", (), {"name": "neo"})())
    tome = next(t for t in compat.NEO_TOOLS if t.name == "Token Merging")
    runner.cell_problem(tome, {}, "sega")
    paths = [path for path, _ in sent]
    assert paths == ["/sdapi/v1/txt2img"] * 3
    switched = [payload.get("override_settings") for _, payload in sent]
    assert switched == [{"token_merging_ratio": 0.5}, None, {"token_merging_ratio": 0.5}]
    sent.clear()
    tiles = next(t for t in compat.NEO_TOOLS if t.kind == "img2img")
    runner.cell_problem(tiles, {tiles.script: {"args": [True]}}, "regulation")
    assert [path for path, _ in sent] == ["/sdapi/v1/img2img"] * 3
    assert all(payload["init_images"] and payload["width"] == 128 for _, payload in sent)
    assert [tiles.script in payload.get("alwayson_scripts", {}) for _, payload in sent] == [True, False, True]


def test_random_controlnet_has_the_sd15_controlnet_layout():
    from tests.e2e import make_random_controlnet as cn

    assert cn.input_block_channels() == [320] * 4 + [640] * 3 + [1280] * 5
    shapes = cn.controlnet_shapes()
    assert len(shapes) == 340 and all(name.startswith("control_model.") for name in shapes)
    assert shapes["control_model.input_hint_block.0.weight"] == (16, 3, 3, 3)
    assert shapes["control_model.input_hint_block.14.weight"] == (320, 256, 3, 3)
    assert shapes["control_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"] == (640, 768)
    assert shapes["control_model.zero_convs.11.0.weight"] == (1280, 1280, 1, 1)
    assert shapes["control_model.middle_block_out.0.weight"] == (1280, 1280, 1, 1)
    assert not any(".output_blocks." in n or ".label_emb." in n or n.endswith(".out.2.weight") for n in shapes)
    weights = cn.random_weights({k: shapes[k] for k in list(shapes)[:6]}, seed=0)
    assert all(w.dtype.is_floating_point and w.dtype.itemsize == 2 for w in weights.values())


def test_soak_requests_cover_methods_samplers_batches_hires_img2img_and_plain():
    from tests.e2e import soak

    plans = [soak.soak_request(i, {"hr_cfg": 7}) for i in range(soak.REQUESTS)]
    kinds = [kind for kind, _, _ in plans]
    assert kinds.count("img2img") == 14 and sum(r.get("enable_hr", False) for _, _, r in plans) == 14
    assert all(r["hr_cfg"] == 7 for _, _, r in plans if r.get("enable_hr"))
    assert {r["sampler_name"] for _, _, r in plans} == set(soak.SAMPLERS)
    assert {r["batch_size"] for _, _, r in plans} == {1, 2}
    enabled = [args[0] for _, args, _ in plans if args != [False]]
    assert sum(1 for _, args, _ in plans if args == [False]) == 16
    for method, values in soak.METHODS.items():
        key = next(iter(values))
        assert sum(1 for e in enabled if e.get(key)) >= 20, method
    assert any(all(e.get(next(iter(v))) for v in soak.METHODS.values()) for e in enabled)


def test_resident_mb_reads_this_process():
    import os

    from tests.e2e import soak

    assert 10 < soak.resident_mb(os.getpid()) < 100_000


def test_prompt_check_judges_notes_acted_summary_and_detected_concepts():
    from tests.e2e import prompt_checks as pc

    good = f'x, {pc.DETECTED}: "dog (steps 1–3); sofa; cat (steps 4–6)", {pc.ACTED}: concepts 5/6 steps, Version: 1'
    wanted = ("dog (steps 1–3)", "cat (steps 4–6)", "sofa")
    assert pc.problem_of(good, wanted, (), "concepts") is None
    assert pc.problem_of(good, wanted, ("sofa",), "concepts").startswith("detected concepts")
    assert pc.problem_of(f"x, {pc.ACTED}: regulation did not act", (), (), "regulation") == (
        "acted: regulation did not act"
    )
    segment = f'x, {pc.NOTE}: "Attention regulation: dog not in the first row; not regulated there.", {pc.ACTED}: a'
    assert pc.problem_of(segment, (), (), "regulation") is None
    assert pc.problem_of(segment, (), (), "scfg").startswith("note:")


def test_sdxl_checkpoint_is_linked_into_the_hosts_folder_with_its_yaml_where_narrow(tmp_path, monkeypatch):
    from dataclasses import replace

    from tests.e2e import models
    from tests.e2e.hosts import HOSTS

    monkeypatch.setattr(models, "CACHE", tmp_path / "cache")
    models.CACHE.mkdir()
    for name in ("sdxl-tiny64", "sdxl-random"):
        (models.CACHE / f"{name}.safetensors").write_bytes(name.encode())
    assert models.checkpoint_of(HOSTS["a1111"], "sd15") is None
    for host_name, stem, yaml in (("a1111", "sdxl-tiny64", True), ("forge", "sdxl-random", False)):
        host = replace(HOSTS[host_name], models=tmp_path / host_name)
        host.models.mkdir()
        checkpoint = models.checkpoint_of(host, "sdxl")
        models.place(host, checkpoint)
        placed = host.models / f"{stem}.safetensors"
        assert placed.read_bytes() == stem.encode()
        assert placed.stat().st_ino == (models.CACHE / placed.name).stat().st_ino  # a hard link, not a copy
        assert (host.models / f"{stem}.yaml").exists() == yaml
    assert "model_channels: 64" in (tmp_path / "a1111" / "sdxl-tiny64.yaml").read_text()
