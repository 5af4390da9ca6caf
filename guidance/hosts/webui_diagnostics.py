"""The diagnostics pictures in the WebUI's results (both hosts): drawn in the script's `postprocess`
from what the sampler runs recorded, appended after the images, and saved beside them when the
settings page asks for it.

Like sd-webui-controlnet's detected maps, each picture goes to the end of `processed.images`, with
an entry of its own in `processed.infotexts` (the gallery and the API pair them by index). A picture
gets the infotext of the image it describes, so PNG Info and the gallery say which image it is.
Forge's `processed.extra_images` is not used: its gallery and API show them after `images`, but
only `images` are paired with `infotexts`.
Nothing here may break a generation: any failure is one note and the images stay as they are.
"""

from __future__ import annotations

from .common import DIAGNOSTICS_NOTE, report, state_of
from .webui_ui import SAVE_DIAGNOSTICS_OPTION

FILE_SUFFIX = "-semantic-fidelity"


def add_pictures(p, processed) -> None:
    """postprocess: the generation's diagnostics pictures appended to `processed` (and saved when
    the settings page says so). Without recorded numbers ("Show diagnostics" off) nothing happens."""
    state = state_of(p)
    if state is None or not state.diagnostics:
        return
    captures, state.diagnostics = state.diagnostics, []  # drawn once; the device tensors go with them
    try:
        pictures = draw_pictures(p, captures)
        append_pictures(processed, pictures)
    except Exception as error:  # the images are what the user asked for; the pictures are extra
        report(p, DIAGNOSTICS_NOTE.format(error=f"{type(error).__name__}: {error}"))
        return
    try:
        if saving_wanted(p):
            save_pictures(p, processed, pictures)
    except Exception as error:
        report(p, f"diagnostics pictures could not be saved ({type(error).__name__}: {error}); they are shown.")
    try:
        if any(not getattr(picture, "already_saved_as", None) for picture in pictures.values()):
            prepare_gallery_folder()
    except Exception as error:
        report(p, f"diagnostics: the host's temp_dir could not be made ({type(error).__name__}: {error}).")


def prepare_gallery_folder() -> None:
    """The folder the host's gallery writes unsaved images into (the `temp_dir` setting), made when missing.

    Forge Neo's default is `<data>/tmp`, made only when the setting is changed; its own images are saved
    by default, so on a fresh install our unsaved pictures were the first to need it, and the gallery's
    FileNotFoundError cost the whole result in the web UI. A1111 and Forge default to '' (gradio's
    cache folder, which they make): nothing to do."""
    import os

    from modules import shared

    folder = getattr(shared.opts, "temp_dir", "")
    if folder:
        os.makedirs(folder, exist_ok=True)


def draw_pictures(p, captures) -> dict:
    """{image index: picture}; a recording that stopped early is noted and drawn as far as it got."""
    from .. import diagnostics

    for capture in captures:
        error = getattr(getattr(capture.concepts, "log", None), "error", None)
        if error is not None:
            report(p, f"diagnostics: recording stopped ({error}); the picture shows the steps before.")
    return diagnostics.pictures_by_image(captures, lambda image: image_title(p, image))


def image_title(p, image: int) -> str:
    """ "image 2, seed 1235": which of the generation's images a picture describes."""
    seeds = getattr(p, "all_seeds", None) or []
    seed = f", seed {seeds[image]}" if image < len(seeds) else ""
    return f"image {image + 1}{seed}"


def infotext_of(processed, image: int) -> str:
    """The infotext of the generation's image `image` (after the grid, when the host returns one)."""
    index = getattr(processed, "index_of_first_image", 0) + image
    infotexts = processed.infotexts
    return infotexts[index] if index < len(infotexts) else getattr(processed, "info", "")


def append_pictures(processed, pictures: dict) -> None:
    """Each picture after the images, with its image's infotext at the same index."""
    texts = [infotext_of(processed, image) for image in pictures]
    # a host output without infotext (A1111's returned masks) would shift ours onto other pictures
    while len(processed.infotexts) < len(processed.images):
        processed.infotexts.append(getattr(processed, "info", ""))
    for picture, text in zip(pictures.values(), texts, strict=True):
        picture.info["parameters"] = text  # as the host marks its images (a download from the gallery keeps it)
    processed.images.extend(pictures.values())
    processed.infotexts.extend(texts)


def saving_wanted(p) -> bool:
    """The settings page's "Save diagnostics images", for generations whose images the host saves."""
    from modules import shared

    return bool(getattr(shared.opts, SAVE_DIAGNOSTICS_OPTION, False)) and not getattr(p, "do_not_save_samples", False)


def save_pictures(p, processed, pictures: dict) -> None:
    """Each picture into the samples folder, named like its image with FILE_SUFFIX."""
    from modules import images, shared

    file_format = getattr(shared.opts, "samples_format", "png")
    seeds, prompts = getattr(p, "all_seeds", None) or [], getattr(p, "all_prompts", None) or []
    for image, picture in pictures.items():
        seed = seeds[image] if image < len(seeds) else None
        prompt = prompts[image] if image < len(prompts) else None
        info = infotext_of(processed, image)
        images.save_image(picture, p.outpath_samples, "", seed, prompt, file_format, info=info, p=p, suffix=FILE_SUFFIX)
