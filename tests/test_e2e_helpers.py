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
