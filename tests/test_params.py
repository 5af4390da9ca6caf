import re

import pytest

from guidance import params
from guidance.params import (
    BY_KEY,
    EDIT_FIELDS,
    PARAMS,
    Edit,
    InvalidSettings,
    build_settings,
    defaults,
    format_edits_text,
    infotext_fields,
    parse_edits_text,
    resolve_preset,
    settings_from_args,
    values_from_infotext,
)

# A1111's infotext key pattern (infotext_utils.re_param): keys must survive a paste round trip.
INFOTEXT_KEY = re.compile(r"^\w[\w \-/]*$")


def test_defaults_are_the_authors():
    s = defaults()
    # ConceptDiffusion, configs/models/ours.yaml (50 steps: warm-up 5, cool-down 50, window 5)
    assert (s.concept_scale, s.concept_subject_threshold, s.concept_abstract_threshold) == (8.5, 0.5, 0.5)
    assert (s.concept_percentile, s.concept_momentum, s.concept_momentum_beta) == (0.9, 0.5, 0.5)
    assert (s.concept_warmup, s.concept_cooldown, s.concept_window) == (0.1, 1.0, 5)
    assert s.concept_auto_threshold is False
    # SEGA, diffusers defaults (warm-up 10 of 50 steps)
    edit = Edit("x")
    assert (edit.scale, edit.threshold, edit.warmup, edit.cooldown, edit.weight) == (5.0, 0.9, 0.2, 1.0, 1.0)
    assert (s.sega_momentum, s.sega_momentum_beta) == (0.1, 0.4)
    # S-CFG
    assert (s.scfg_rate_min, s.scfg_rate_max, s.scfg_rate_cap, s.scfg_mask_factor) == (0.8, 3.0, 15.0, 4)
    # Attention regulation: 20 iterations, lr 100, stop after 25 of 50 steps, 0.25 blend, 0.99 decay
    assert (s.regulation_iterations, s.regulation_step_size, s.regulation_end) == (20, 100.0, 0.5)
    assert (s.regulation_previous_weight, s.regulation_decay) == (0.25, 0.99)
    # Everything off by default.
    assert s.enable is False and s.active_methods == ()


def test_definitions_are_complete_and_unique():
    assert [p.position for p in PARAMS] == list(range(len(PARAMS)))
    assert len({p.key for p in PARAMS}) == len(PARAMS)
    assert len({p.infotext_key for p in PARAMS}) == len(PARAMS)
    assert len({p.xyz_label for p in PARAMS}) == len(PARAMS)
    for p in PARAMS:
        assert p.kind in params.KINDS
        assert p.section in params.SECTIONS
        assert INFOTEXT_KEY.match(p.infotext_key), p.infotext_key
        assert p.infotext_key.startswith("Semantic Fidelity")
        assert p.tooltip and p.label
        if p.kind in ("int", "float"):
            assert p.minimum <= p.default <= p.maximum, p.key
            assert p.xyz
        # the default itself validates
        assert params.coerce(p, p.default) == p.default
    # the switches the API documents
    for key in ("enable", "concepts_enable", "sega_enable", "scfg_enable", "regulation_enable", "sega_edits"):
        assert key in BY_KEY


def test_positional_and_named_args_agree():
    positional = [p.default for p in PARAMS]
    positional[BY_KEY["enable"].position] = True
    positional[BY_KEY["sega_enable"].position] = True
    positional[BY_KEY["sega_edits"].position] = "+ sunglasses : 6"
    from_positional = settings_from_args(positional)
    from_named = settings_from_args(
        [{"enable": True, "sega_enable": True, "sega_edits": [{"prompt": "sunglasses", "scale": 6}]}]
    )
    assert from_positional == from_named
    assert from_named.sega_edits == (Edit("sunglasses", scale=6.0),)
    assert from_named.active_methods == ("sega",)
    # a short positional list keeps the defaults for the rest (as A1111's API does)
    assert settings_from_args([True]).enable is True
    # A1111's API pads the args with UI defaults after the dict (seen in the real A1111 1.10.1)
    padded = [{"enable": True, "sega_enable": True, "sega_edits": "+ sunglasses : 6"}] + positional[1:]
    assert settings_from_args(padded) == from_named


def test_strings_from_infotext_and_xyz_are_coerced():
    s = build_settings(
        {"concept_window": "7.0", "concept_scale": "3", "enable": "True", "regulation_layers": "FIRST UP"}
    )
    assert s.concept_window == 7 and isinstance(s.concept_window, int)
    assert s.concept_scale == 3.0 and s.enable is True
    assert s.regulation_layers == "first up"


@pytest.mark.parametrize(
    "values, expected",
    [
        ({"concept_scale": 99}, "Concept steering › Concept scale: 99 is above the maximum 30"),
        ({"concept_window": 2.5}, "Concept steering › Concept window: expected a whole number, got 2.5"),
        ({"scfg_rate_min": "abc"}, "S-CFG region scales › S-CFG minimum rate: expected a number, got 'abc'"),
        ({"sega_momentum": float("nan")}, "SEGA edits › Edit momentum: expected a finite number"),
        ({"enable": "maybe"}, "Semantic Fidelity: Enable Semantic Fidelity: expected true or false, got 'maybe'"),
        ({"concept_scal": 3}, "unknown setting 'concept_scal' (did you mean 'concept_scale'?)"),
        ({"sega_edits": [{"prompt": "  "}]}, "SEGA edits › Edits: edit 1: the prompt is empty"),
        ({"sega_edits": [{"prompt": "hat", "colour": 1}]}, "edit 1: unknown field(s) colour"),
        ({"sega_edits": "+ hat : 90"}, "edit 1 (hat): scale 90 is above the maximum 50"),
        ({"sega_edits": "+ hat : 5 : 0.9 : 0.5 : 0.4"}, "edit 1 (hat): cool-down 0.4 must be later than warm-up 0.5"),
        ({"concepts": "x" * 1000}, "Concept steering › Concepts: 1000 characters given, at most 400"),
        ({"concepts": "a;b;c;d;e;f;g;h;i"}, "9 phrases given, at most 8"),
        ({"regulation_layers": "middle"}, "'middle' is not one of: last down + first up"),
        ({"preset": "Maximum"}, "Preset: 'Maximum' is not one of: Light, Balanced, Strong, Custom"),
        ({"scfg_rate_min": 4, "scfg_rate_max": 2}, "S-CFG: minimum rate must not exceed maximum rate"),
        ({"scfg_mask_factor": 3}, "S-CFG: mask resolution factor R must be 1, 2, 4 or 8"),
        ({"concept_warmup": 0.5, "concept_cooldown": 0.5}, "cool-down must be later than warm-up"),
    ],
)
def test_bad_values_give_one_clear_message(values, expected):
    with pytest.raises(InvalidSettings) as error:
        build_settings(values)
    message = str(error.value)
    assert message.startswith("Semantic Fidelity: ")
    assert expected in message


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidSettings) as error:
        build_settings({"concept_scale": -1, "sega_momentum": 2, "nonsense": 1})
    assert len(error.value.problems) == 3


def test_edit_text_form_round_trip():
    edits = parse_edits_text(
        "+ sunglasses : 5\n- blur : 4 : 0.95\n  a (smiling:1.2) face : 3 : 0.9 : 0.1 : 0.8 : 2 ; \u2212 text, watermark"
    )
    assert edits == (
        Edit("sunglasses", False, 5.0),
        Edit("blur", True, 4.0, 0.95),
        Edit("a (smiling:1.2) face", False, 3.0, 0.9, 0.1, 0.8, 2.0),
        Edit("text, watermark", True),
    )
    text = format_edits_text(edits)
    assert text == (
        "+ sunglasses : 5; - blur : 4 : 0.95; + a (smiling:1.2) face : 3 : 0.9 : 0.1 : 0.8 : 2; - text, watermark : 5"
    )
    assert parse_edits_text(text) == edits
    # numbers alone never become the prompt
    assert parse_edits_text("+ 1990 : 5") == (Edit("1990", False, 5.0),)
    assert len(EDIT_FIELDS) == 5


def test_infotext_round_trip_restores_every_control():
    s = build_settings(
        {
            "enable": True,
            "concepts_enable": True,
            "concepts": "a red book; a gold clock",
            "concept_scale": 6.5,
            "sega_enable": True,
            "sega_edits": "+ sunglasses : 6; - blur",
            "scfg_rate_max": 2.5,
            "apply_hires": False,
        }
    )
    fields = infotext_fields(resolve_preset(s, is_sdxl=False))  # methods ticked: the preset did nothing
    assert fields == {
        "Semantic Fidelity": "True",
        "Semantic Fidelity hires": "False",
        "Semantic Fidelity concept steering": "True",
        "Semantic Fidelity concepts": "a red book; a gold clock",
        "Semantic Fidelity concept scale": "6.5",
        "Semantic Fidelity SEGA": "True",
        "Semantic Fidelity SEGA edits": "+ sunglasses : 6; - blur : 5",
    }  # S-CFG is off, so its changed maximum is not written
    restored = values_from_infotext(fields)
    assert build_settings(restored) == s.replace(scfg_rate_max=3.0)
    # an infotext without the extension changes nothing; a disabled run writes nothing
    assert values_from_infotext({"Steps": "20"}) == {}
    assert infotext_fields(defaults().replace(concepts_enable=True)) == {}


def test_api_schema_lists_every_param():
    schema = params.api_schema()
    assert [p["key"] for p in schema["params"]] == [p.key for p in PARAMS]
    types = {p["key"]: p["type"] for p in schema["params"]}
    assert types["enable"] == "bool" and types["sega_edits"] == "edits"
    assert types["concept_window"] == "int" and types["regulation_layers"] == "choice"
    scale = next(p for p in schema["params"] if p["key"] == "concept_scale")
    assert (scale["default"], scale["min"], scale["max"]) == (8.5, 0.0, 30.0)
    assert [f["key"] for f in schema["edit_fields"]] == list(params.EDIT_KEYS)


# ---------------------------------------------------------------------------------------------
# Presets, labels, the positional order

# The positional order of the API before presets existed: it may only grow at the end.
POSITIONS_BEFORE_PRESETS = [
    "enable",
    "apply_hires",
    "concepts_enable",
    "concepts",
    "concept_scale",
    "concept_subject_threshold",
    "concept_abstract_threshold",
    "concept_auto_threshold",
    "concept_abstract",
    "concept_percentile",
    "concept_momentum",
    "concept_momentum_beta",
    "concept_warmup",
    "concept_cooldown",
    "concept_window",
    "sega_enable",
    "sega_edits",
    "sega_momentum",
    "sega_momentum_beta",
    "scfg_enable",
    "scfg_rate_min",
    "scfg_rate_max",
    "scfg_rate_cap",
    "scfg_mask_factor",
    "scfg_start",
    "scfg_end",
    "regulation_enable",
    "regulation_targets",
    "regulation_layers",
    "regulation_end",
    "regulation_iterations",
    "regulation_step_size",
    "regulation_previous_weight",
    "regulation_decay",
]


def test_positional_order_only_grows_at_the_end():
    assert [p.key for p in PARAMS[: len(POSITIONS_BEFORE_PRESETS)]] == POSITIONS_BEFORE_PRESETS
    assert [p.key for p in PARAMS[len(POSITIONS_BEFORE_PRESETS) :]] == ["preset", "apply_detailer", "show_diagnostics"]


def test_labels_are_unique_and_say_which_method():
    labels = [p.label for p in PARAMS]
    assert len(labels) == len(set(labels))  # one ui-config.json entry each
    assert BY_KEY["concept_momentum"].label == "Concept momentum"
    assert BY_KEY["sega_momentum"].label == "Edit momentum"
    assert (BY_KEY["scfg_end"].label, BY_KEY["regulation_end"].label) == ("S-CFG end", "Regulation end")


@pytest.mark.parametrize(
    "preset, is_sdxl, methods, changed",
    [
        ("Light", False, ("scfg",), {}),
        ("Light", True, ("scfg",), {}),
        ("Balanced", False, ("concepts", "scfg"), {}),
        ("Balanced", True, ("concepts", "scfg"), {}),
        ("Strong", False, ("concepts", "scfg", "regulation"), {}),
        (
            "Strong",
            True,
            ("concepts", "scfg", "regulation"),
            {"regulation_layers": "last down", "regulation_iterations": 10},
        ),
    ],
)
def test_the_header_switch_alone_runs_the_preset(preset, is_sdxl, methods, changed):
    given = build_settings({"enable": True, "preset": preset, "concept_scale": 6.0})
    resolved = resolve_preset(given, is_sdxl)
    assert resolved.active_methods == methods
    switches = {params.METHOD_SWITCHES[m]: True for m in methods}
    assert resolved == given.replace(**switches, **changed)  # the user's strength stays
    assert resolve_preset(resolved, is_sdxl) == resolved.replace(preset="Custom")
    fields = infotext_fields(resolved)
    assert fields["Semantic Fidelity preset"] == preset
    if "concepts" in methods:
        assert fields["Semantic Fidelity concept scale"] == "6"
    else:  # a method that did not run writes nothing
        assert "Semantic Fidelity concept scale" not in fields
    # the paste restores the preset with no method ticked, as it was set up: the same run again
    pasted = build_settings(values_from_infotext(fields))
    assert pasted.preset == preset and pasted.active_methods == ()
    assert infotext_fields(resolve_preset(pasted, is_sdxl)) == fields


def test_presets_only_touch_switches_and_advanced_controls():
    assert params.PRESET_NAMES == ("Light", "Balanced", "Strong", "Custom")
    assert BY_KEY["preset"].default == params.PRESET_DEFAULT == "Balanced"
    for name in params.PRESET_NAMES:
        for is_sdxl in (False, True):
            values = params.preset_values(name, is_sdxl)
            build_settings(values)  # valid
            for key in values:
                assert key in params.METHOD_SWITCHES.values() or BY_KEY[key].advanced, (name, key)
    assert params.preset_methods("Strong") == ("concepts", "scfg", "regulation")
    assert params.preset_methods("Custom") == ()


def test_explicit_method_switches_get_exactly_what_they_send():
    sent = {"enable": True, "sega_enable": True, "sega_edits": "+ sunglasses : 6"}
    for preset in params.PRESET_NAMES:
        resolved = resolve_preset(settings_from_args([{**sent, "preset": preset}]), is_sdxl=True)
        assert resolved.active_methods == ("sega",)
        assert resolved == build_settings(sent).replace(preset="Custom")
        assert "Semantic Fidelity preset" not in infotext_fields(resolved)  # it did nothing
    # the positional form of before presets (34 values) keeps working, the preset taking its default
    old = [p.default for p in PARAMS[:34]]
    old[0], old[BY_KEY["scfg_enable"].position] = True, True
    assert resolve_preset(settings_from_args(old), False).active_methods == ("scfg",)
    assert settings_from_args(old).preset == "Balanced"


def test_custom_with_nothing_ticked_runs_nothing_and_off_stays_off():
    assert resolve_preset(build_settings({"enable": True, "preset": "Custom"}), False).active_methods == ()
    off = build_settings({"preset": "Strong"})
    assert resolve_preset(off, True) == off and infotext_fields(resolve_preset(off, True)) == {}


def test_the_hosts_default_preset_fills_in_where_the_request_names_none():
    light = {"preset": "Light"}
    assert settings_from_args([{"enable": True}], fallback=light).preset == "Light"
    assert settings_from_args([{"enable": True, "preset": "Strong"}], fallback=light).preset == "Strong"
    assert settings_from_args([True], fallback=light).preset == "Light"
    full = [p.default for p in PARAMS]
    assert settings_from_args(full, fallback=light).preset == "Balanced"  # a full positional list names one
