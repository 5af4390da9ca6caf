"""`modules.scripts` (a1111.md §1): the Script base class, AlwaysVisible, scripts_data and a runner
that calls each always-on script's overridden hooks with its slice of `p.script_args`, reporting
and swallowing exceptions like the host."""

from __future__ import annotations

import traceback
from collections import namedtuple

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list[ScriptClassData] = []


class Script:
    name = None
    section = None
    filename = None
    args_from = None
    args_to = None
    alwayson = False
    is_txt2img = False
    is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return []

    def elem_id(self, item_id):
        title = "".join(c if c.isalnum() else "_" for c in self.title().lower())
        return f"script_{'img2img' if self.is_img2img else 'txt2img'}_{title}_{item_id}"

    def process(self, p, *args):
        pass

    def process_batch(self, p, *args, **kwargs):
        pass

    def process_before_every_sampling(self, p, *args, **kwargs):
        pass

    def before_hr(self, p, *args):
        pass

    def postprocess_batch(self, p, *args, **kwargs):
        pass

    def postprocess(self, p, processed, *args):
        pass


class ScriptRunner:
    def __init__(self, scripts: list[Script]):
        self.alwayson_scripts = list(scripts)
        self.errors: list[str] = []

    def _run(self, method: str, p, *leading, **kwargs):
        for script in self.alwayson_scripts:
            if getattr(type(script), method) is getattr(Script, method):
                continue  # the host only calls hooks a script overrides
            args = p.script_args[script.args_from : script.args_to]
            try:
                getattr(script, method)(p, *leading, *args, **kwargs)
            except Exception:
                self.errors.append(traceback.format_exc())

    def process(self, p):
        self._run("process", p)

    def process_batch(self, p, **kwargs):
        self._run("process_batch", p, **kwargs)

    def process_before_every_sampling(self, p, **kwargs):
        self._run("process_before_every_sampling", p, **kwargs)

    def before_hr(self, p):
        self._run("before_hr", p)

    def postprocess_batch(self, p, **kwargs):
        self._run("postprocess_batch", p, **kwargs)

    def postprocess(self, p, processed):
        self._run("postprocess", p, processed)
