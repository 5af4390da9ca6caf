"""The functions one Forge sampler run installs on its UnetPatcher clone (../shared/hosts/forge.md §2-§4).

Everything composes with the other tools of the generation (DynamicThresholding, LatentModifier,
MultiDiffusion, SAG, PAG, StyleAlign, FreeU, ControlNet…), whatever order their scripts run in:

- the one installed function is a pre-CFG function (a list every tool appends to). At every denoiser
  call it arms the run and returns a copy of `model_options` in which the UNet function wrapper and
  the CFG function are ours *around whatever is there now*: ours calls the other tool's wrapper and
  CFG function and adds to them, so nothing set before or after us is replaced;
- UNet wrapper: the extra-prompt rows ride in the main cond/uncond call (blocks of B rows marked as
  cond) when nothing else reads that call's batch layout; with another tool's attention patches,
  ControlNet or token lengths Forge cannot tile, they run as one extra call of their own (through
  the other wrappers too, with ControlNet's control computed for them). The attention patches of
  the routed layers are added to the main call's options only, on the steps where an attention
  method acts, each calling the patch that was there before;
- CFG function: `GuidanceRun.step` in x0 space; with another tool's CFG function, its result plus
  our guidance's difference from plain CFG;
- a conditioning modifier that notes the latent of the host's own CFG call: another tool's modifier may
  run a sampling pass of its own first (reference_only records the reference latent's attention with
  CFG scale 1), which our pre-CFG function leaves to the host. It also keeps the uncond prediction on
  the host's steps at CFG scale 1 (Skip Early CFG, NGMS) without keeping it in that other pass.

Every function checks `ForgePatches.enabled`: after an error the run is switched off and every
function behaves like the host (calls what was there).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..engine import GuidanceError, StepInputs
from .common import NONFINITE_NOTE

COND, UNCOND = 0, 1
MAX_TILING = 4  # Forge tiles token lengths into one call only up to 4x (ConditionCrossAttn.can_concat)
TILED_NOTE = (
    "S-CFG and attention regulation need the whole latent in one UNet call; another extension runs the "
    "UNet in tiles (e.g. MultiDiffusion), so they do not act while it is on."
)
UNSEEN_LATENT_NOTE = (
    "another extension replaced the latent before the CFG call; Semantic Fidelity left a step of this "
    "image to the host."
)


def _tile_tokens(context: torch.Tensor, tokens: int) -> torch.Tensor:
    """Repeat a context along the token axis up to `tokens` (Forge's ConditionCrossAttn.concat)."""
    if context.shape[1] == tokens:
        return context
    return context.repeat(1, tokens // context.shape[1], 1)


def _equal_tokens(contexts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Extra contexts of different token lengths tiled to a common length, as Forge concatenates."""
    tokens = 1
    for context in contexts:
        tokens = math.lcm(tokens, context.shape[0])
    return [
        context.repeat(tokens // context.shape[0], 1) if context.shape[0] != tokens else context for context in contexts
    ]


def _plain_call(apply_model, args):
    return apply_model(args["input"], args["timestep"], **args["c"])


def plain_cfg(args, edit_strength: float) -> torch.Tensor:
    """Forge's own CFG formula (sampling_function_inner), as x0."""
    uncond, cond, scale = args["uncond_denoised"], args["cond_denoised"], args["cond_scale"]
    if math.isclose(edit_strength, 1.0):
        return uncond + (cond - uncond) * scale
    return uncond + (cond - uncond) * scale * edit_strength


def host_attention(q, k, v, heads: int) -> torch.Tensor:
    """The attention Forge's CrossAttention runs when no patch replaces it (its chosen kernel)."""
    try:
        from backend.attention import attention_function
    except ImportError:  # outside Forge (the stand-in): numerically the SDP kernel
        from ..attention import attention

        return attention(q, k, v, heads)
    return attention_function(q, k, v, heads)


def row_labels(labels: Sequence[int], batch: int, cond_mark: torch.Tensor) -> dict:
    """The transformer options Forge derives from a call's chunk labels (compute_cond_mark,
    compute_cond_indices in sampling_function.py). `cond_mark` is the host's mark of the call's first
    rows: our rows (all cond, 0) are appended on its device, with no host-to-device copy."""
    rows = [(i * batch + r, label) for i, label in enumerate(labels) for r in range(batch)]
    added = len(rows) - cond_mark.shape[0]
    return {
        "cond_or_uncond": list(labels),
        "cond_mark": torch.cat([cond_mark, cond_mark.new_zeros(added)]) if added > 0 else cond_mark[: len(rows)],
        "cond_indices": [row for row, label in rows if label == COND],
        "uncond_indices": [row for row, label in rows if label == UNCOND],
    }


def foreign_patches(options: dict) -> bool:
    """Whether another tool patches attention in this call (StyleAlign, SAG, IP-Adapter…): they may read
    the call's batch layout, which extra rows inside the call would change."""
    patches = any(bool(fns) for fns in options.get("patches", {}).values())
    return patches or any(bool(table) for table in options.get("patches_replace", {}).values())


class ForgePatches:
    """One sampler run's patches. `extra_conds`: the encoded extra prompts, one per
    `run.extra_rows` entry: a tensor (T, D) or a dict with 'crossattn' (T, D) and 'vector' (D,)."""

    def __init__(self, planned, extra_conds: Sequence, step_source: Callable[[], tuple[int, int]], on_error, report):
        self.planned = planned
        self.run = planned.run
        self.router = planned.router
        self.extra_conds = list(extra_conds)
        self.step_source = step_source
        self.on_error = on_error
        self.report = report  # one note, console + infotext
        self.enabled = True
        self.wants_cfg = bool(self.run.extra_rows) or self.run.region_scale is not None
        self.routed: list = []  # LayerKeys whose attention the router handles, set by install
        # per denoiser call
        self.armed = False
        self.step = 0
        self.total_steps = 1
        self.edit_strength = 1.0
        self.extra_x0: torch.Tensor | None = None
        self.used: tuple[bool, ...] = (True,) * len(self.run.extra_rows)
        self.blocks = self._blocks()
        # with our conditioning modifier (set by install): the latent of the current denoiser call until
        # our pre-CFG function takes it; a call that finds none is another tool's pass before ours
        self.has_modifier = False
        self.call_latent: torch.Tensor | None = None

    def _blocks(self) -> list[list[int | None]]:
        """The carried extra rows (`used`) arranged in blocks of B rows (one row per image), so that the
        call's `cond_or_uncond` stays one label per B rows: block j, image i holds image i's j-th
        carried row (an index into `run.extra_rows`), or None (filled with the image's own cond row)."""
        per_image: list[list[int]] = [[] for _ in range(self.run.batch_size)]
        for index, row in enumerate(self.run.extra_rows):
            if self.used[index]:
                per_image[row.image].append(index)
        count = max((len(rows) for rows in per_image), default=0)
        return [[rows[j] if j < len(rows) else None for rows in per_image] for j in range(count)]

    def fail(self, error: Exception) -> None:
        if self.enabled:
            self.enabled = False
            self.armed = False
            if self.router is not None:
                self.router.stop()  # S-CFG stops too: no later step uses a partial capture
            self.on_error(error)

    def finish(self) -> None:
        """After the run: no call is current, and non-finite attention outputs the kernel replaced
        (one device read per run, never per step) are reported once."""
        self._check_latent_taken()
        if self.router is not None:
            self.router.end()
            if self.enabled and self.router.nonfinite_seen():
                self.report(NONFINITE_NOTE)

    # -- installation ------------------------------------------------------------------------
    def install(self, unet) -> None:
        """Put the pre-CFG function on `unet` (a fresh clone) and find the layers to route."""

        # a plain function, not a bound method: a later tool's clone deep-copies model_options, and a
        # bound method would copy this whole object with it (functions are copied by reference)
        def pre_cfg(model, cond, uncond, x, timestep, model_options):
            return self.pre_cfg(model, cond, uncond, x, timestep, model_options)

        # a host whose sampling function runs conditioning modifiers gets ours, which keeps the uncond rows
        # per call; otherwise the patcher keeps them on every call
        self.has_modifier = callable(getattr(unet, "add_conditioning_modifier", None))
        if self.has_modifier:

            def conditioning_modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
                options = self.conditioning_modifier(x, cond_scale, model_options)
                return model, x, timestep, uncond, cond, cond_scale, options, seed

            unet.add_conditioning_modifier(conditioning_modifier)
        keep_uncond = self.wants_cfg and not self.has_modifier
        unet.set_model_sampler_pre_cfg_function(pre_cfg, disable_cfg1_optimization=keep_uncond)
        if self.router is not None:
            from ..attention_routing import LayerKey

            present = set()
            for name, _module in unet.model.diffusion_model.named_modules():
                key = LayerKey.from_module_name(name)
                if key is not None:
                    present.add(key)
            self.routed = sorted(self.router.routed_layers(present))

    # -- conditioning modifier: which sampling pass is the host's own -------------------------------
    def conditioning_modifier(self, x, cond_scale, model_options: dict) -> dict:
        """Notes the latent of this denoiser call: the host's sampling pass is the one that brings it to
        our pre-CFG function. At CFG scale 1 the host would drop the uncond rows our CFG function reads."""
        self._check_latent_taken()
        self.call_latent = x
        if self.enabled and self.wants_cfg and math.isclose(float(cond_scale), 1.0):
            return dict(model_options, disable_cfg1_optimization=True)
        return model_options

    def _check_latent_taken(self) -> None:
        """A denoiser call whose latent never reached our pre-CFG function (a later modifier or pre-CFG
        function replaced it) was left to the host: said once."""
        if self.enabled and self.call_latent is not None:
            self.report(UNSEEN_LATENT_NOTE)
        self.call_latent = None

    # -- pre-CFG: arm the call, chain the wrapper and the CFG function ----------------------------
    def pre_cfg(self, model, cond, uncond, x, timestep, model_options):
        if not self.enabled or (self.has_modifier and x is not self.call_latent):
            # another tool's own pass inside its conditioning modifier (reference_only's recording): the host's
            return model, cond, uncond, x, timestep, model_options
        self.call_latent = None
        try:
            self.step, self.total_steps = self.step_source()
            self.edit_strength = float(sum(item.get("strength", 1) for item in cond))
            if x.shape[0] != self.run.batch_size:
                raise GuidanceError(f"the run was set up for {self.run.batch_size} images, x has {x.shape[0]}")
            self.extra_x0 = None
            if self.run.extra_rows:  # cost follows the schedule: only the rows a method reads now
                used = self.run.rows_used(self.step, max(self.total_steps, 1))
                if used != self.used:
                    self.used = used
                    self.blocks = self._blocks()
            options = dict(model_options)
            options["model_function_wrapper"] = self._wrapper_around(model_options.get("model_function_wrapper"))
            if self.wants_cfg:
                options["sampler_cfg_function"] = self._cfg_around(model_options.get("sampler_cfg_function"))
            self.armed = True
            return model, cond, uncond, x, timestep, options
        except Exception as error:
            self.fail(error)
            return model, cond, uncond, x, timestep, model_options

    # -- the UNet call -----------------------------------------------------------------------
    def _wrapper_around(self, previous):
        """Our UNet function wrapper for this call, calling `previous` (another tool's) for the UNet."""
        call = previous or _plain_call

        def wrapper(apply_model, args):
            if not (self.enabled and self.armed):
                return call(apply_model, args)
            try:
                return self._main_call(call, apply_model, args)
            except Exception as error:
                self.fail(error)
                return call(apply_model, args)

        return wrapper

    def _main_call(self, call, apply_model, args):
        x, labels = args["input"], list(args["cond_or_uncond"])
        batch = self.run.batch_size
        if x.shape[0] != batch * len(labels):
            raise GuidanceError(f"a UNet call of {x.shape[0]} rows for {len(labels)} chunks of {batch} images")
        add_extra = bool(self.blocks) and self.extra_x0 is None and COND in labels
        extra_args = self._extra_args(args) if add_extra else None
        together = add_extra and self._rides_along(args, extra_args)
        main = self._joined(args, extra_args) if together else args
        if self.router is not None and self.router.active(self.step, max(self.total_steps, 1)):
            main = self._with_attention(main)
        out = call(apply_model, main)
        if not self.wants_cfg and COND in labels:
            self.armed = False  # no CFG function disarms: later calls (PAG's, SAG's) are the host's
        if not add_extra:
            return out
        rows = x.shape[0]
        extra_out = out[rows:] if together else self._own_calls(call, apply_model, args, extra_args)
        blocks = extra_out.reshape(len(self.blocks), batch, *extra_out.shape[1:])
        self.extra_x0 = torch.stack([blocks[j, image] for j, image in self._positions()])
        return out[:rows]

    def _positions(self) -> list[tuple[int, int]]:
        """(block, image) of every carried extra row, in `run.extra_rows` order."""
        where = {}
        for j, block in enumerate(self.blocks):
            for image, index in enumerate(block):
                if index is not None:
                    where[index] = (j, image)
        return [where[index] for index in sorted(where)]

    def _own_calls(self, call, apply_model, args, extra_args) -> torch.Tensor:
        """The extra rows in calls of their own. Another tool's attention patches may set a call's rows
        against what they recorded from the host's calls (reference_only joins its recorded keys to the
        cond rows'): with them, each block of B rows gets a call shaped like the host's cond chunk."""
        if len(self.blocks) == 1 or not foreign_patches(args["c"].get("transformer_options", {})):
            return call(apply_model, self._with_control(extra_args, len(self.blocks)))
        return torch.cat(
            [call(apply_model, self._with_control(self._extra_args(args, [block]), 1)) for block in self.blocks]
        )

    def _extra_args(self, args, blocks: list | None = None) -> dict:
        """The wrapper arguments of a call that holds only the extra rows of `blocks` (default: all): the
        cond chunk's latents and sigmas once per block, the extra contexts (SDXL: their pooled vectors),
        inpainting's c_concat."""
        x, timestep, c, labels = args["input"], args["timestep"], args["c"], list(args["cond_or_uncond"])
        blocks = self.blocks if blocks is None else blocks
        batch = self.run.batch_size
        first_cond = labels.index(COND) * batch
        cond_rows = slice(first_cond, first_cond + batch)
        contexts, vectors = [], []
        for block in blocks:
            for image, index in enumerate(block):
                encoded = c["c_crossattn"][first_cond + image] if index is None else self.extra_conds[index]
                if isinstance(encoded, dict):
                    encoded, vector = encoded["crossattn"], encoded.get("vector")
                else:
                    vector = c["y"][first_cond + image] if index is None and "y" in c else None
                contexts.append(encoded)
                vectors.append(vector)
        context = c["c_crossattn"]
        extra_c = {k: v for k, v in c.items() if k not in ("control", "control_model", "transformer_options")}
        extra_c["c_crossattn"] = torch.stack([e.to(context) for e in _equal_tokens(contexts)])
        if "y" in c:
            extra_c["y"] = torch.stack([(v if v is not None else c["y"][first_cond]).to(c["y"]) for v in vectors])
        if c.get("c_concat") is not None:
            extra_c["c_concat"] = c["c_concat"][cond_rows].repeat(len(blocks), 1, 1, 1)
        # one cond chunk of K·B rows: tools that loop over a call's chunks (StyleAlign) see a batch
        extra_timestep = timestep[cond_rows].repeat(len(blocks))
        options = dict(c.get("transformer_options", {}))
        mark = options.get("cond_mark", extra_timestep)
        options.update(row_labels([COND], batch * len(blocks), mark.new_zeros(0)), sigmas=extra_timestep)
        extra_c["transformer_options"] = options
        if c.get("control_model") is not None:
            extra_c["control_model"] = c["control_model"]
        return {
            "input": x[cond_rows].repeat(len(blocks), 1, 1, 1),
            "timestep": extra_timestep,
            "c": extra_c,
            "cond_or_uncond": [COND],
        }

    def _rides_along(self, args, extra_args) -> bool:
        """Whether the extra rows can join the main call: nothing else reads the call's batch layout
        or residuals, and Forge would tile the token lengths into one call."""
        c = args["c"]
        if c.get("control") is not None or foreign_patches(c.get("transformer_options", {})):
            return False
        a, b = c["c_crossattn"].shape[1], extra_args["c"]["c_crossattn"].shape[1]
        return math.lcm(a, b) // min(a, b) <= MAX_TILING

    def _joined(self, args, extra_args) -> dict:
        """One call holding the main rows and then the extra blocks (all marked cond)."""
        c, extra_c = args["c"], extra_args["c"]
        labels = list(args["cond_or_uncond"]) + [COND] * len(self.blocks)
        tokens = math.lcm(c["c_crossattn"].shape[1], extra_c["c_crossattn"].shape[1])
        joined = dict(c)
        joined["c_crossattn"] = torch.cat(
            [_tile_tokens(c["c_crossattn"], tokens), _tile_tokens(extra_c["c_crossattn"], tokens)]
        )
        for key in ("y", "c_concat"):
            if c.get(key) is not None:
                joined[key] = torch.cat([c[key], extra_c[key]])
        options = dict(c.get("transformer_options", {}))
        mark = options.get("cond_mark", args["timestep"].new_zeros(0))
        options.update(row_labels(labels, self.run.batch_size, mark))
        joined["transformer_options"] = options
        return {
            "input": torch.cat([args["input"], extra_args["input"]]),
            "timestep": torch.cat([args["timestep"], extra_args["timestep"]]),
            "c": joined,
            "cond_or_uncond": labels,
        }

    def _with_control(self, extra_args, blocks: int) -> dict:
        """ControlNet's residuals for the extra rows (`blocks` blocks of B), computed the way Forge computes
        them for a chunk (calc_cond_uncond_batch): the same control images, each row with its own context."""
        c = extra_args["c"]
        control = c.get("control_model")
        if control is None:
            return extra_args
        unit = control
        while unit is not None:
            unit.transformer_options = c["transformer_options"]
            unit = getattr(unit, "previous_controlnet", None)
        c = dict(c)
        # the control images are broadcast per block of B rows, as for the chunks of a main call
        c["control"] = control.get_control(extra_args["input"], extra_args["timestep"], dict(c), blocks)
        return dict(extra_args, c=c)

    # -- attention -----------------------------------------------------------------------------
    def _with_attention(self, args) -> dict:
        """The call's options with our patch on every routed layer, each around the patch that was
        there (a 3-part key, or the block's 2-part key, as Forge looks them up)."""
        from ..attention_routing import CallRows

        c = dict(args["c"])
        options = dict(c.get("transformer_options", {}))
        replace = {kind: dict(table) for kind, table in options.get("patches_replace", {}).items()}
        for key in self.routed:
            table = replace.setdefault("attn1" if key.kind == "self" else "attn2", {})
            full = (key.section, key.block, key.transformer)
            table[full] = self._attention_patch(key, table.get(full) or table.get((key.section, key.block)))
        options["patches_replace"] = replace
        c["transformer_options"] = options
        labels = list(args["cond_or_uncond"])
        batch = self.run.batch_size

        def rows_of(label: int) -> tuple[int | None, ...]:
            if label not in labels:
                return (None,) * batch
            start = labels.index(label) * batch
            return tuple(start + image for image in range(batch))

        rows = CallRows(
            self.step, max(self.total_steps, 1), tuple(args["input"].shape[-2:]), rows_of(UNCOND), rows_of(COND)
        )
        self.router.begin_call(rows)
        return dict(args, c=c)

    def _attention_patch(self, key, previous):
        router = self.router

        def patch(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            if self.enabled and not self._tiled(extra_options):
                try:
                    if previous is None:
                        return router.forward(key, q, k, v, heads)
                    # another tool computes this layer's output; our maps are read on the side
                    if key in router.regulated:
                        self.report(
                            "Attention regulation leaves the layers that another extension's attention patch "
                            "replaces (e.g. SAG, StyleAlign) to that extension."
                        )
                    router.forward(key, q, k, v, heads)
                    return previous(q, k, v, extra_options)
                except Exception as error:
                    self.fail(error)
            return previous(q, k, v, extra_options) if previous is not None else host_attention(q, k, v, heads)

        return patch

    def _tiled(self, extra_options) -> bool:
        """Whether another tool runs this call in tiles (MultiDiffusion): the maps of a tile are not
        the latent's, so S-CFG and regulation leave the call alone, with one note."""
        shape = extra_options.get("original_shape")
        rows = self.router.rows
        if shape is None or rows is None or tuple(shape[-2:]) == tuple(rows.latent_size):
            return False
        self.report(TILED_NOTE)
        return True

    # -- CFG ---------------------------------------------------------------------------------
    def _cfg_around(self, previous):
        """Our CFG function for this call. Alone: the guided x0. After another tool's CFG function
        (DynamicThresholding, LatentModifier): its result plus our guidance minus plain CFG."""

        def cfg_function(args):
            x = args["input"]
            if self.enabled:
                try:
                    guided = self._guided(args)
                    if previous is None:
                        return x - guided
                    return previous(args) - (guided - plain_cfg(args, self.edit_strength))
                except Exception as error:
                    self.fail(error)
            return previous(args) if previous is not None else x - plain_cfg(args, self.edit_strength)

        return cfg_function

    def _guided(self, args) -> torch.Tensor:
        if not self.armed:
            raise GuidanceError("the CFG function ran without the pre-CFG function")
        self.armed = False
        if self.blocks and self.extra_x0 is None:
            raise GuidanceError("the extra prompt rows did not reach the UNet")
        batch = self.run.batch_size
        inputs = StepInputs(
            uncond=args["uncond_denoised"],
            cond=args["cond_denoised"],
            conds_list=[[(image, self.edit_strength)] for image in range(batch)],
            x=args["input"],
            sigma=args["sigma"],
            step=self.step,
            total_steps=max(self.total_steps, 1),
            cfg_scale=float(args["cond_scale"]),
            extra=self.extra_x0,
            space="x0",
            extra_used=self.used if self.run.extra_rows else None,
        )
        self.extra_x0 = None
        guided = self.run.step(inputs)
        for note in self.run.take_notes():
            self.report(note)
        return guided
