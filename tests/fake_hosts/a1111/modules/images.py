"""`modules.images`: `save_image` with the host's signature, writing a PNG named like the host's
default pattern ("NNNNN-seed-prompt" + suffix) with the infotext in its "parameters" chunk."""

from __future__ import annotations

import os


def save_image(
    image,
    path,
    basename,
    seed=None,
    prompt=None,
    extension="png",
    info=None,
    short_filename=False,
    no_prompt=False,
    grid=False,
    pnginfo_section_name="parameters",
    p=None,
    existing_info=None,
    forced_filename=None,
    suffix="",
    save_to_dirs=None,
):
    from PIL import PngImagePlugin

    os.makedirs(path, exist_ok=True)
    number = len(os.listdir(path))
    words = "-".join(str(prompt or "").split()[:4])
    fullfn = os.path.join(path, f"{number:05}-{seed}-{words}{suffix}.{extension}")
    pnginfo = PngImagePlugin.PngInfo()
    if info is not None:
        pnginfo.add_text(pnginfo_section_name, str(info))
    image.save(fullfn, pnginfo=pnginfo)
    image.already_saved_as = fullfn  # the gallery serves this file instead of writing a temporary one
    return fullfn, None
