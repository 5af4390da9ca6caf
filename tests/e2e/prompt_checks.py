"""Prompts as the host reads them (issue 15), in the real host: for the AND, schedule, subtracted-AND and
five-BREAK prompts every method acts (the image differs from the host's own in decoded pixels), no
method falls back, the "acted" summary says each one did, and the detected concepts are the prompt's
positive parts with their step ranges."""

from __future__ import annotations

from .api_checks import METHODS
from .common import PREFIX, Api, Checks, infotext_value, is_blank, same_pixels, with_extension

SIZE = {"width": 128, "height": 128, "steps": 6}  # regulation's maps need 128 px; 6 steps show ranges
DETECTED, ACTED, NOTE = f"{PREFIX} detected concepts", f"{PREFIX} acted", f"{PREFIX} note"
# per prompt: phrases the detected concepts must hold and must not hold
PROMPTS = {
    "AND with a weight": ("a red book AND a gold clock :1.2", ("red book", "gold clock"), ()),
    "schedule": ("[a dog:a cat:0.5] on a sofa", ("dog (steps 1–4)", "cat (steps 5–6)", "sofa"), ()),
    "subtracted AND part": ("a castle on a hill AND a dragon :-1", ("castle", "hill"), ("dragon",)),
    "five BREAKs": (
        "a red cat BREAK a wooden table BREAK a garden BREAK blue sky BREAK soft light BREAK green grass",
        ("red cat",),
        (),
    ),
}
# Forge and Neo average AND parts by their weights (sampling_function's out_cond / out_count), so parts
# whose weights sum to 0 divide by ~1e-37 and the host's own image is NaN; there the subtracted part
# weighs -0.5 (A1111 adds weighted differences instead and takes -1)
FORGE_FAMILY_PROMPTS = {"subtracted AND part": "a castle on a hill AND a dragon :-0.5"}
# the methods as the user gives them for these prompts: concepts and targets detected from the prompt
PROMPT_METHODS = {
    "concepts": {"concepts_enable": True, "concept_warmup": 0.0},
    "sega": METHODS["sega"],
    "scfg": METHODS["scfg"],
    "regulation": {"regulation_enable": True, "regulation_iterations": 2},
}
# a note that is information, not a fallback: regulation acts on each image's first cond row, and a
# target that row lacks at some steps (a scheduled word, the second AND part) is left alone there
SEGMENT_NOTE = "not regulated there"


def problem_of(infotext: str, wanted: tuple, unwanted: tuple, method: str) -> str | None:
    """What is wrong with one method's infotext, or None."""
    note = infotext_value(infotext, NOTE)
    if note is not None and not (method == "regulation" and SEGMENT_NOTE in note):
        return f"note: {note}"
    acted = infotext_value(infotext, ACTED) or ""
    if not acted or "did not act" in acted:
        return f"acted: {acted or 'missing'}"
    if method == "concepts":
        detected = infotext_value(infotext, DETECTED) or ""
        missing = [phrase for phrase in wanted if phrase not in detected]
        extra = [phrase for phrase in unwanted if phrase in detected]
        if missing or extra:
            return f"detected concepts {detected!r}: missing {missing}, unwanted {extra}"
    return None


def method_check(api: Api, prompt: str, plain: list, wanted: tuple, unwanted: tuple, method: str):
    """One prompt x method: generate with the method on and judge it against the host's own image."""

    def check():
        images, infotexts = api.generate(with_extension(**PROMPT_METHODS[method]), prompt=prompt, **SIZE)
        if same_pixels(images, plain):
            return "same pixels as the host's own image"
        print(f"    {ACTED}: {infotext_value(infotexts[0], ACTED)}", flush=True)
        if method == "concepts":
            print(f"    {DETECTED}: {infotext_value(infotexts[0], DETECTED)}", flush=True)
        return problem_of(infotexts[0], wanted, unwanted, method)

    return check


def run(api: Api, host, checks: Checks) -> None:
    for name, (prompt, wanted, unwanted) in PROMPTS.items():
        if host.name in ("forge", "neo"):
            prompt = FORGE_FAMILY_PROMPTS.get(name, prompt)
        plain, _ = api.generate([False], prompt=prompt, **SIZE)
        if is_blank(plain[0]):
            checks.run(f"prompt {name!r}", lambda: "the host's own image is one colour (NaN) for this prompt")
            continue
        for method in PROMPT_METHODS:
            checks.run(f"prompt {name!r} x {method}", method_check(api, prompt, plain, wanted, unwanted, method))
