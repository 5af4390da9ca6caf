"""Browser checks of the `--ui` run: a person's path through the extension in the host's web UI.

Headless Debian Chromium driven by Playwright (`pip install playwright`; `apt-get install chromium`;
../shared/tools/browser/README.md). Every extension control is found by the elem_id the UI gives it,
`script_{tab}_semantic_fidelity_{key}`, and read by its params.py kind, so the paste check covers
every control there is, not a chosen few.

The selectors hold on gradio 3.41 (AUTOMATIC1111) and 4.40 (Forge, Forge Neo) alike: the hosts give
their own elements the ids used here (`#txt2img_prompt`, `#txt2img_generate`, `#txt2img_gallery`,
`#generation_info_txt2img`, `#html_info_txt2img`, `#txt2img_tools #paste`, `#tabs > .tab-nav`), and
both gradio versions render an accordion's header as `.label-wrap`, a dropdown's options as
`ul.options li` and a component's input inside the block that carries its elem_id; the
InputAccordion's header checkbox is `<elem_id>-visible-checkbox` in all three hosts. Nothing here
needs to know the version.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

from PIL import Image

from guidance import params
from guidance.diagnostics import WIDTH as DIAGNOSTICS_WIDTH

from .common import same_pixels

CHROMIUM = os.environ.get("SF_CHROMIUM", "/usr/bin/chromium")
PROMPT = "a red book and a gold clock on a wooden table"
EXPECTED_CONCEPTS = ("red book", "gold clock", "wooden table")
EDIT_PROMPT = "sunglasses"
CHANGED_SLIDER = ("concept_scale", 11.5)  # one number moved away from its default, so paste must restore it
SIZE_AND_STEPS = (("width", "64"), ("height", "64"), ("steps", "4"))
TIMEOUT_MS = 300_000
MAX_ACCORDION_HEIGHT = 700  # issue 18: the open accordion with the defaults, at a 1,400 px wide window
PRESET_TO_PASTE = "Light"  # S-CFG only: acts at 64 px on SD1.5 and SDXL, where regulation's maps are too small


def control_id(tab: str, key: str) -> str:
    return f"script_{tab}_semantic_fidelity_{key}"


# The value of every control in the page, by params.py kind. The enable switch is the accordion's
# header checkbox (InputAccordion); the others are gradio blocks with one input inside.
_READ_CONTROLS = """
(controls) => {
  const root = typeof gradioApp === "function" ? gradioApp() : document;
  const values = {};
  for (const [key, id, kind] of controls) {
    const block = root.querySelector("#" + id);
    if (!block) { values[key] = null; continue; }
    let input;
    if (kind === "enable") {
      input = root.querySelector("#" + id + "-visible-checkbox") || block.querySelector("input[type=checkbox]");
      values[key] = input ? input.checked : null;
    } else if (kind === "bool") {
      input = block.querySelector("input[type=checkbox]");
      values[key] = input ? input.checked : null;
    } else if (kind === "int" || kind === "float") {
      input = block.querySelector("input[type=number]");
      values[key] = input ? Number(input.value) : null;
    } else {
      input = block.querySelector("textarea") || block.querySelector("input");
      values[key] = input ? input.value : null;
    }
  }
  return values;
}
"""


def read_controls(page, tab: str) -> dict:
    controls = [(p.key, control_id(tab, p.key), "enable" if p.key == "enable" else p.kind) for p in params.PARAMS]
    return page.evaluate(_READ_CONTROLS, controls)


def differences(expected: dict, actual: dict) -> list[str]:
    out = []
    for key, want in expected.items():
        got = actual.get(key)
        same = abs(got - want) < 1e-6 if isinstance(want, float) and isinstance(got, float) else got == want
        if not same:
            out.append(f"{key}: {got!r} instead of {want!r}")
    return out


def choose(page, block: str, option: str) -> None:
    """Picks `option` in the gradio dropdown inside `block` (gradio 3 and 4: a text input over a list)."""
    page.locator(f"{block} input").first.click()
    page.locator("ul.options li", has_text=option).first.click()
    page.wait_for_timeout(500)


class Session:
    """One headless Chromium page with the page's errors collected per page load (uncaught exceptions,
    and console errors with the resource they name)."""

    def __init__(self, url: str):
        from playwright.sync_api import sync_playwright

        self.url = url
        self._playwright = sync_playwright().start()
        self._browser = self._playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        self.page = self._browser.new_page(viewport={"width": 1400, "height": 1100})
        self.errors_by_load: list[list[str]] = []
        self.page.on("pageerror", lambda error: self._record(f"page error: {error} {error.stack or ''}".strip()))
        self.page.on("console", self._console)

    def _console(self, message) -> None:
        if message.type == "error":
            where = (message.location or {}).get("url", "")
            self._record(f"console: {message.text} [{where}]")

    def _record(self, error: str) -> None:
        if not self.errors_by_load:
            self.errors_by_load.append([])
        self.errors_by_load[-1].append(error)

    def open(self) -> None:
        self.errors_by_load.append([])
        self.page.goto(self.url, timeout=TIMEOUT_MS)
        self.page.wait_for_selector("#txt2img_generate", timeout=TIMEOUT_MS)
        self.page.wait_for_timeout(1500)  # onUiLoaded callbacks and late resources

    # The host's own actions, shared by the person's path and the baseline path without the extension.

    def click_tab(self, name: str) -> None:
        self.page.locator("#tabs > .tab-nav button", has_text=name).first.click()
        self.page.wait_for_timeout(500)

    def set_number(self, selector: str, value) -> None:
        box = self.page.locator(f"{selector} input[type=number]")
        box.fill(str(value))
        box.press("Enter")

    def prepare_prompt(self, tab: str = "txt2img") -> None:
        self.page.fill(f"#{tab}_prompt textarea", PROMPT)
        for name, value in SIZE_AND_STEPS:
            self.set_number(f"#{tab}_{name}", value)

    def generate(self, tab: str = "txt2img") -> str:
        """Presses Generate and returns the first image's infotext (from the hidden generation info)."""
        self.page.click(f"#{tab}_generate")
        self.page.wait_for_selector(f"#{tab}_gallery img", timeout=TIMEOUT_MS)
        self.page.wait_for_function(
            "(id) => { const t = document.querySelector('#' + id + ' textarea');"
            " return t && t.value.includes('infotexts'); }",
            arg=f"generation_info_{tab}",
            timeout=TIMEOUT_MS,
        )
        return json.loads(self.page.locator(f"#generation_info_{tab} textarea").input_value())["infotexts"][0]

    def generate_image(self, tab: str = "txt2img") -> tuple[str, bytes]:
        """Presses Generate and waits for this generation's info (a new job timestamp); returns the first
        image's infotext and the first gallery image's bytes (as the host serves the file)."""
        info = f"#generation_info_{tab} textarea"
        before = self.page.locator(info).input_value() if self.page.locator(info).count() else ""
        self.page.click(f"#{tab}_generate")
        self.page.wait_for_function(
            "([sel, before]) => { const t = document.querySelector(sel);"
            " return t && t.value.includes('infotexts') && t.value !== before; }",
            arg=[info, before],
            timeout=TIMEOUT_MS,
        )
        self.page.wait_for_timeout(1000)  # the gallery updates in the same event
        infotext = json.loads(self.page.locator(info).input_value())["infotexts"][0]
        source = self.page.locator(f"#{tab}_gallery img").first.get_attribute("src")
        if source.startswith("data:"):
            import base64

            return infotext, base64.b64decode(source.split(",", 1)[1])
        return infotext, self.page.request.get(source).body()

    def paste(self, infotext: str, tab: str = "txt2img") -> None:
        """The infotext into the prompt box, then the host's paste button; waits for the prompt to be
        restored and for the controls' own change events to settle."""
        self.page.fill(f"#{tab}_prompt textarea", infotext)
        self.page.locator(f"#{tab}_tools #paste, #{tab}_toprow #paste").first.click()
        self.page.wait_for_function(
            "([sel, prompt]) => { const t = document.querySelector(sel); return t && t.value === prompt; }",
            arg=[f"#{tab}_prompt textarea", PROMPT],
            timeout=60_000,
        )
        self.page.wait_for_timeout(1500)

    def close(self) -> None:
        self._browser.close()
        self._playwright.stop()


def host_path_errors(url: str) -> list[list[str]]:
    """The page errors, load by load, of the same path taken without the extension (the baseline):
    the host logs some of its own."""
    session = Session(url)
    try:
        session.open()
        session.click_tab("img2img")
        session.click_tab("txt2img")
        session.prepare_prompt()
        infotext = session.generate()
        session.open()
        session.paste(infotext)
        for _ in ("header switch alone", "preset restored by paste"):  # their page loads, without us
            session.open()
            session.prepare_prompt()
            infotext = session.generate_image()[0]
        session.open()
        session.paste(infotext)
        session.open()  # diagnostics in the gallery
        session.prepare_prompt()
        session.generate_image()
        return session.errors_by_load
    finally:
        session.close()


def _ours(error: str) -> bool:
    return "semantic-fidelity" in error or "semantic_fidelity" in error


def new_errors(baseline: list[str], seen: list[str]) -> list[str]:
    """Errors beyond the baseline's, counted as a multiset. A failed load of a resource that is not
    the extension's (the host's CDN script, fetched a varying number of times offline) is the host's
    business; every error naming the extension's files counts."""
    relevant = [e for e in seen if _ours(e) or not e.startswith("console: Failed to load resource")]
    base = [e for e in baseline if not _ours(e)]
    extra = Counter(relevant) - Counter(base)
    return sorted(extra.elements())


class PersonPath:
    """The UI checks, in the order a person works: each method returns None or what went wrong."""

    def __init__(self, url: str, shots: Path | None, host: str, baseline_errors: list[list[str]]):
        self.session = Session(url)
        self.page = self.session.page
        self.shots = shots
        self.host = host
        self.baseline_errors = baseline_errors
        self.used: dict = {}
        self.infotext = ""

    def _text_box(self, tab: str, key: str):
        block = f"#{control_id(tab, key)}"
        return self.page.locator(f"{block} textarea, {block} input[type=text]").first

    def accordion_in_both_tabs(self) -> str | None:
        self.session.open()
        missing = []
        for tab in ("img2img", "txt2img"):
            self.session.click_tab(tab)
            header = self.page.locator(f"#{control_id(tab, 'enable')} .label-wrap").first
            if not header.is_visible():
                missing.append(tab)
        return f"no visible accordion in {missing}" if missing else None

    def switch_on_detect_and_edit(self) -> str | None:
        page, tab = self.page, "txt2img"
        self.session.prepare_prompt(tab)
        defaults = read_controls(page, tab)
        wrong_defaults = differences({p.key: params.ui_value(p, p.default) for p in params.PARAMS}, defaults)
        if wrong_defaults:
            return f"controls do not start at their defaults: {wrong_defaults[:4]}"

        page.locator(f"#{control_id(tab, 'enable')} .label-wrap").first.click()  # opening it switches it on
        page.locator(f"#{control_id(tab, 'concepts_enable')} input[type=checkbox]").check()
        page.locator(f"#{control_id(tab, 'detect')}").click()
        page.wait_for_function(
            "(id) => { const b = document.querySelector('#' + id); const i = b && (b.querySelector('textarea') ||"
            " b.querySelector('input')); return i && i.value.length > 0; }",
            arg=control_id(tab, "concepts"),
            timeout=60_000,
        )
        detected = self._text_box(tab, "concepts").input_value()
        if not all(concept in detected for concept in EXPECTED_CONCEPTS):
            return f"Detect filled {detected!r}, expected {EXPECTED_CONCEPTS}"

        page.locator(f"#{control_id(tab, 'sega_enable')} input[type=checkbox]").check()
        page.locator(f"#{control_id(tab, 'advanced_sega')} .label-wrap").first.click()  # the slots are folded
        self._text_box(tab, "edit1_prompt").fill(EDIT_PROMPT)
        page.wait_for_function(
            "([id, word]) => { const b = document.querySelector('#' + id); const t = b && b.querySelector('textarea');"
            " return t && t.value.includes(word); }",
            arg=[control_id(tab, "sega_edits"), EDIT_PROMPT],
            timeout=60_000,
        )
        key, value = CHANGED_SLIDER
        self.session.set_number(f"#{control_id(tab, key)}", value)
        page.wait_for_timeout(500)

        self.used = read_controls(page, tab)
        expected_changes = {
            "enable": True,
            "concepts_enable": True,
            "sega_enable": True,
            "sega_edits": params.format_edits_text([params.Edit(prompt=EDIT_PROMPT)]),
            key: value,
        }
        wrong = differences(expected_changes, self.used)
        if wrong:
            return f"controls after the person's changes: {wrong}"
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            shot = self.shots / f"{self.host}-accordion.png"
            page.locator(f"#{control_id(tab, 'enable')}").screenshot(path=str(shot))
        return None

    def generate_and_read_infotext(self) -> str | None:
        page, tab = self.page, "txt2img"
        self.infotext = self.session.generate(tab)
        shown = page.locator(f"#html_info_{tab}").last.inner_text()  # gradio 3 nests a second one
        needed = [
            f"{params.INFOTEXT_PREFIX} concept steering: True",
            f"{params.INFOTEXT_PREFIX} SEGA edits:",
            EDIT_PROMPT,
            f"{params.INFOTEXT_PREFIX} concept scale: {CHANGED_SLIDER[1]}",
        ]
        missing = [n for n in needed if n not in self.infotext]
        if missing:
            return f"infotext lacks {missing}: {self.infotext!r}"
        if f"{params.INFOTEXT_PREFIX} note" in self.infotext:
            return f"unexpected note: {self.infotext!r}"
        if EDIT_PROMPT not in shown:
            return f"the page's infotext panel does not show the edit: {shown[:300]!r}"
        return None

    def paste_restores_every_control(self) -> str | None:
        if not self.infotext:
            return "no infotext from the generation"
        page, tab = self.page, "txt2img"
        self.session.open()  # a fresh page: every control back at its default
        if read_controls(page, tab)["enable"]:
            return "the reloaded page starts enabled"
        self.session.paste(self.infotext, tab)
        pasted = read_controls(page, tab)
        wrong = differences(self.used, pasted)
        return f"not restored: {wrong}" if wrong else None

    def header_switch_alone(self) -> str | None:
        """Ticking only the header switch applies the default preset: the image changes and the infotext
        says which preset and what acted. The accordion it opens is at most MAX_ACCORDION_HEIGHT tall."""
        page, tab = self.page, "txt2img"
        self.session.open()
        self.session.prepare_prompt(tab)
        _, plain = self.session.generate_image(tab)
        page.locator(f"#{control_id(tab, 'enable')} .label-wrap").first.click()  # opens it and switches it on
        page.wait_for_timeout(500)
        height = page.locator(f"#{control_id(tab, 'enable')}").bounding_box()["height"]
        print(f"    {self.host}: the open accordion with the defaults is {height:.0f} px tall", flush=True)
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            page.locator(f"#{control_id(tab, 'enable')}").screenshot(path=str(self.shots / f"{self.host}-compact.png"))
        infotext, image = self.session.generate_image(tab)
        preset = params.BY_KEY["preset"].infotext_key
        needed = [f"{preset}: {params.PRESET_DEFAULT}", f"{params.INFOTEXT_PREFIX} acted: "]
        missing = [n for n in needed if n not in infotext]
        if missing:
            return f"infotext lacks {missing}: {infotext!r}"
        if f"{params.INFOTEXT_PREFIX} note" in infotext or "did not act" in infotext:
            return f"a method did not act or a note: {infotext!r}"
        if same_pixels([image], [plain]):
            return "the header switch alone left the image as the host makes it"
        if height > MAX_ACCORDION_HEIGHT:
            return f"the open accordion is {height:.0f} px tall (at most {MAX_ACCORDION_HEIGHT})"
        return None

    def preset_restored_by_paste(self) -> str | None:
        """A preset chosen, generated, and a fresh page's paste of that infotext: the preset comes back
        with no method ticked (it chooses the methods again)."""
        page, tab = self.page, "txt2img"
        self.session.open()
        self.session.prepare_prompt(tab)
        page.locator(f"#{control_id(tab, 'enable')} .label-wrap").first.click()
        choose(page, f"#{control_id(tab, 'preset')}", PRESET_TO_PASTE)
        infotext, _ = self.session.generate_image(tab)
        if f"{params.BY_KEY['preset'].infotext_key}: {PRESET_TO_PASTE}" not in infotext:
            return f"the infotext does not name preset {PRESET_TO_PASTE}: {infotext!r}"
        self.session.open()
        self.session.paste(infotext, tab)
        expected = {"enable": True, "preset": PRESET_TO_PASTE}
        expected.update(dict.fromkeys(params.METHOD_SWITCHES.values(), False))
        wrong = differences(expected, read_controls(page, tab))
        return f"not restored: {wrong}" if wrong else None

    def diagnostics_in_gallery(self) -> str | None:
        """The header switch and "Show diagnostics": one picture per image after the images, with the
        image's infotext; saved as <host>-diagnostics.png with --screenshots."""
        page, tab = self.page, "txt2img"
        self.session.open()
        self.session.prepare_prompt(tab)
        page.locator(f"#{control_id(tab, 'enable')} .label-wrap").first.click()
        page.locator(f"#{control_id(tab, 'show_diagnostics')} input[type=checkbox]").check()
        self.session.generate_image(tab)
        infotexts = json.loads(page.locator(f"#generation_info_{tab} textarea").input_value())["infotexts"]
        sources = []
        for source in page.locator(f"#{tab}_gallery img").evaluate_all("(images) => images.map((i) => i.src)"):
            if source not in sources:
                sources.append(source)
        if len(infotexts) != 2 or len(sources) != 2:
            return f"expected the image and one picture: {len(infotexts)} infotexts, {len(sources)} gallery images"
        picture = Image.open(io.BytesIO(page.request.get(sources[-1]).body()))
        if picture.width != DIAGNOSTICS_WIDTH or picture.height < 200:
            return f"the picture is {picture.width}x{picture.height}, not {DIAGNOSTICS_WIDTH} wide"
        if self.shots is not None:
            self.shots.mkdir(parents=True, exist_ok=True)
            picture.save(self.shots / f"{self.host}-diagnostics.png")
        return None

    def no_new_page_errors(self) -> str | None:
        loads = self.session.errors_by_load
        if len(loads) != len(self.baseline_errors):
            return f"{len(loads)} page loads against the baseline's {len(self.baseline_errors)}"
        extra = [e for seen, base in zip(loads, self.baseline_errors, strict=True) for e in new_errors(base, seen)]
        return f"errors the host without the extension does not log: {extra}" if extra else None

    def close(self) -> None:
        self.session.close()


def run(checks, url: str, shots: Path | None, host: str, baseline_errors: list[list[str]]) -> None:
    path = PersonPath(url, shots, host, baseline_errors)
    try:
        checks.run("UI: accordion in txt2img and img2img", path.accordion_in_both_tabs)
        checks.run("UI: switch on, Detect, add a SEGA edit", path.switch_on_detect_and_edit)
        checks.run("UI: generate 64x64, 4 steps, read the infotext", path.generate_and_read_infotext)
        checks.run("UI: paste the infotext restores every control", path.paste_restores_every_control)
        checks.run("UI: header switch alone changes the image, says what acted; height", path.header_switch_alone)
        checks.run("UI: a preset, generated, restored by pasting its infotext", path.preset_restored_by_paste)
        checks.run("UI: Show diagnostics adds one picture to the gallery", path.diagnostics_in_gallery)
        checks.run("UI: no page errors beyond the host's own", path.no_new_page_errors)
    finally:
        path.close()
