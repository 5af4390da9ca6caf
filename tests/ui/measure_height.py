"""Height of the opened accordion in a 1,400 px wide window (run by hand; CI does not collect it).

The accordion is built by the real script in the A1111 stand-in, in the left half of a page styled
with a host's own style.css and ours and the hosts' default theme font, as txt2img lays it out.
Two processes, because the page needs the host's gradio and its pins while the browser needs
Playwright (and Chromium, e.g. Debian's `chromium`). gradio 4 writes a .pyi beside the stand-in's
ui_components.py: delete it afterwards.

    HOST_PY tests/ui/measure_height.py serve HOST_STYLE_CSS PORT      # A1111: gradio 3.41.2, Forge: 4.40.0
    PW_PY tests/ui/measure_height.py measure PORT OUT_DIR

`measure` prints the closed and open heights, each section's, and with every Advanced fold open,
and saves screenshots. A1111's inputAccordion.js moves the header's extra column into the label;
`measure` does the same before it measures.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
ACCORDION = "#script_txt2img_semantic_fidelity_enable"
SECTIONS = ("general", "concepts", "sega", "scfg", "regulation")
FONT = ["Source Sans Pro", "ui-sans-serif", "system-ui", "sans-serif"]  # both hosts' default theme


def serve(host_css: Path, port: int) -> None:
    """The page: prompt and our accordion in the left column, a gallery stand-in in the right."""
    sys.path.insert(0, str(REPOSITORY))
    import gradio as gr

    from tests.a1111_host import SCRIPT, a1111_modules

    css = host_css.read_text() + "\n" + (REPOSITORY / "style.css").read_text()
    with a1111_modules():
        spec = importlib.util.spec_from_file_location("semantic_fidelity.py", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        theme = gr.themes.Default(font=FONT)
        with gr.Blocks(css=css, theme=theme, analytics_enabled=False) as demo, gr.Row():
            _left_column(gr, module)
            with gr.Column(scale=1):
                gr.Image(label="gallery")
        demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        print("READY", flush=True)
        time.sleep(600)


def _left_column(gr, module) -> None:
    with gr.Column(scale=1):
        gr.Textbox(label="Prompt", elem_id="txt2img_prompt")
        script = module.SemanticFidelityScript()
        script.is_txt2img, script.is_img2img = True, False
        script.ui(False)


def measure(port: int, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(f"http://127.0.0.1:{port}/")
        page.wait_for_selector(ACCORDION)
        page.evaluate(
            "(id) => { const a = document.querySelector(id); const w = a.querySelector('.label-wrap');"
            " const e = document.querySelector(id + '-extra'); if (e) w.insertBefore(e, w.lastElementChild); }",
            ACCORDION,
        )
        closed = page.locator(ACCORDION).bounding_box()["height"]
        page.locator(f"{ACCORDION} .label-wrap").first.click()
        page.wait_for_timeout(1000)
        box = page.locator(ACCORDION).bounding_box()
        print(f"closed {closed:.0f} px; open {box['height']:.0f} px at {box['width']:.0f} px wide")
        for section in SECTIONS:
            height = page.locator(f"#script_txt2img_semantic_fidelity_section_{section}").bounding_box()["height"]
            print(f"  {section}: {height:.0f} px")
        page.locator(ACCORDION).screenshot(path=str(out / "accordion-open.png"))
        for section in SECTIONS[1:]:
            page.locator(f"#script_txt2img_semantic_fidelity_advanced_{section} .label-wrap").first.click()
        page.wait_for_timeout(1000)
        print(f"every Advanced fold open: {page.locator(ACCORDION).bounding_box()['height']:.0f} px")
        page.locator(ACCORDION).screenshot(path=str(out / "accordion-all-open.png"))
        browser.close()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        measure(int(sys.argv[2]), Path(sys.argv[3]))
