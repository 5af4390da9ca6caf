"""The functions one Forge sampler run installs on its UnetPatcher clone (../shared/hosts/forge.md §2-§4).

- pre-CFG function: arms the run for the denoiser call in flight (step, AND strengths);
- UNet function wrapper: appends the extra-prompt rows to the main call's cond chunk (blocks of B
  rows marked as cond), tells the attention router which rows the call holds, stashes the extra x0s;
- CFG function: hands every row to `GuidanceRun.step` in x0 space and returns `x - guided`;
- attn1/attn2 replace patches on the routed layers: the router's kernel.

Every function checks `ForgePatches.enabled`: after an error the run is switched off, so copies of
the functions that other extensions' clones still hold behave like the host.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from ..engine import GuidanceError, StepInputs

COND, UNCOND = 0, 1


def _tile_tokens(context: torch.Tensor, tokens: int) -> torch.Tensor:
    """Repeat a context along the token axis up to `tokens` (Forge's ConditionCrossAttn.concat)."""
    if context.shape[1] == tokens:
        return context
    return context.repeat(1, tokens // context.shape[1], 1)


class ForgePatches:
    """One sampler run's patches. `extra_conds`: the encoded extra prompts, one per
    `run.extra_rows` entry: a tensor (T, D) or a dict with 'crossattn' (T, D) and 'vector' (D,)."""

    def __init__(self, planned, extra_conds: Sequence, step_source: Callable[[], tuple[int, int]], on_error):
        self.planned = planned
        self.run = planned.run
        self.router = planned.router
        self.extra_conds = list(extra_conds)
        self.step_source = step_source
        self.on_error = on_error
        self.enabled = True
        self.wants_cfg = bool(self.run.extra_rows) or self.run.region_scale is not None
        # per denoiser call
        self.armed = False
        self.step = 0
        self.total_steps = 1
        self.edit_strength = 1.0
        self.extra_x0: torch.Tensor | None = None
        self.blocks = self._blocks()

    def _blocks(self) -> list[list[int | None]]:
        """Extra rows arranged in blocks of B rows (one row per image), so that the call's
        `cond_or_uncond` stays one label per B rows: block j, image i holds image i's j-th extra
        row (an index into `run.extra_rows`), or None (filled with the image's own cond row)."""
        per_image: list[list[int]] = [[] for _ in range(self.run.batch_size)]
        for index, row in enumerate(self.run.extra_rows):
            per_image[row.image].append(index)
        count = max((len(rows) for rows in per_image), default=0)
        return [[rows[j] if j < len(rows) else None for rows in per_image] for j in range(count)]

    def fail(self, error: Exception) -> None:
        if self.enabled:
            self.enabled = False
            self.armed = False
            if self.router is not None:
                self.router.end()
            self.on_error(error)

    # -- installation ------------------------------------------------------------------------
    def install(self, unet) -> None:
        """Put every function on `unet` (a fresh clone)."""
        unet.set_model_sampler_pre_cfg_function(self.pre_cfg, disable_cfg1_optimization=self.wants_cfg)
        unet.set_model_unet_function_wrapper(self.wrapper)
        if self.wants_cfg:
            unet.set_model_sampler_cfg_function(self.cfg_function, disable_cfg1_optimization=True)
        if self.router is not None:
            from ..attention_routing import LayerKey

            present = set()
            for name, _module in unet.model.diffusion_model.named_modules():
                key = LayerKey.from_module_name(name)
                if key is not None:
                    present.add(key)
            for key in sorted(self.router.routed_layers(present)):
                setter = unet.set_model_attn1_replace if key.kind == "self" else unet.set_model_attn2_replace
                setter(self._attention_patch(key), key.section, key.block, transformer_index=key.transformer)

    # -- pre-CFG: arm the call ---------------------------------------------------------------
    def pre_cfg(self, model, cond, uncond, x, timestep, model_options):
        if self.enabled:
            try:
                self.step, self.total_steps = self.step_source()
                self.edit_strength = float(sum(item.get("strength", 1) for item in cond))
                if x.shape[0] != self.run.batch_size:
                    raise GuidanceError(f"the run was set up for {self.run.batch_size} images, x has {x.shape[0]}")
                self.extra_x0 = None
                self.armed = True
            except Exception as error:
                self.fail(error)
        return model, cond, uncond, x, timestep, model_options

    # -- the UNet call -----------------------------------------------------------------------
    def wrapper(self, apply_model, args):
        if not (self.enabled and self.armed):
            if self.router is not None and self.enabled:
                self._begin_plain_call(args["input"])
            return apply_model(args["input"], args["timestep"], **args["c"])
        try:
            return self._main_call(apply_model, args)
        except Exception as error:
            self.fail(error)
            return apply_model(args["input"], args["timestep"], **args["c"])

    def _begin_plain_call(self, x: torch.Tensor) -> None:
        """Calls made outside the main cond/uncond batch (other extensions' extra passes): the
        router takes its fast path for them."""
        from ..attention_routing import CallRows

        none = (None,) * self.run.batch_size
        self.router.begin_call(CallRows(self.step, self.total_steps, tuple(x.shape[-2:]), none, none))

    def _main_call(self, apply_model, args):
        x, timestep, c, labels = args["input"], args["timestep"], args["c"], list(args["cond_or_uncond"])
        batch = self.run.batch_size
        if x.shape[0] != batch * len(labels):
            raise GuidanceError(f"a UNet call of {x.shape[0]} rows for {len(labels)} chunks of {batch} images")
        add_extra = bool(self.blocks) and self.extra_x0 is None and COND in labels
        if add_extra:
            x, timestep, c, labels = self._with_extra_rows(x, timestep, c, labels)
        if self.router is not None:
            self._begin_call(x, labels)
        out = apply_model(x, timestep, **c)
        if add_extra:
            rows = args["input"].shape[0]
            blocks = out[rows:].reshape(len(self.blocks), batch, *out.shape[1:])
            self.extra_x0 = torch.stack([blocks[j, image] for j, image in self._positions()])
            out = out[:rows]
        return out

    def _positions(self) -> list[tuple[int, int]]:
        """(block, image) of every extra row, in `run.extra_rows` order."""
        where = {}
        for j, block in enumerate(self.blocks):
            for image, index in enumerate(block):
                if index is not None:
                    where[index] = (j, image)
        return [where[index] for index in range(len(self.run.extra_rows))]

    def _with_extra_rows(self, x, timestep, c, labels):
        batch = self.run.batch_size
        first_cond = labels.index(COND) * batch
        cond_rows = slice(first_cond, first_cond + batch)
        context = c["c_crossattn"]
        cond_context = context[cond_rows]
        extra_context, extra_vector = [], []
        for block in self.blocks:
            for image, index in enumerate(block):
                if index is None:
                    extra_context.append(cond_context[image])
                    extra_vector.append(c["y"][first_cond + image] if "y" in c else None)
                    continue
                encoded = self.extra_conds[index]
                if isinstance(encoded, dict):
                    extra_context.append(encoded["crossattn"])
                    extra_vector.append(encoded.get("vector"))
                else:
                    extra_context.append(encoded)
                    extra_vector.append(None)
        added = torch.stack([e.to(context) for e in _equal_tokens(extra_context)])
        tokens = math.lcm(context.shape[1], added.shape[1])
        if tokens // min(context.shape[1], added.shape[1]) > 4:
            raise GuidanceError("an extra prompt's token length cannot be batched with the main prompt's")
        new_c = dict(c)
        new_c["c_crossattn"] = torch.cat([_tile_tokens(context, tokens), _tile_tokens(added, tokens)])
        if "y" in c:
            vectors = [v if v is not None else c["y"][first_cond] for v in extra_vector]
            new_c["y"] = torch.cat([c["y"], torch.stack([v.to(c["y"]) for v in vectors])])
        if c.get("c_concat") is not None:
            new_c["c_concat"] = torch.cat([c["c_concat"], c["c_concat"][cond_rows].repeat(len(self.blocks), 1, 1, 1)])
        if c.get("control") is not None:
            raise GuidanceError("ControlNet is active: its residuals cannot be shared with extra prompt rows")
        new_labels = labels + [COND] * len(self.blocks)
        options = dict(c.get("transformer_options", {}))
        sigmas = options.get("sigmas", timestep[:batch])
        options["cond_or_uncond"] = new_labels
        options["cond_mark"] = torch.tensor(
            [label for label in new_labels for _ in range(batch)], dtype=sigmas.dtype, device=sigmas.device
        )
        options["cond_indices"] = [
            i * batch + r for i, label in enumerate(new_labels) if label == COND for r in range(batch)
        ]
        options["uncond_indices"] = [
            i * batch + r for i, label in enumerate(new_labels) if label == UNCOND for r in range(batch)
        ]
        new_c["transformer_options"] = options
        x = torch.cat([x, x[cond_rows].repeat(len(self.blocks), 1, 1, 1)])
        timestep = torch.cat([timestep, timestep[cond_rows].repeat(len(self.blocks))])
        return x, timestep, new_c, new_labels

    def _begin_call(self, x: torch.Tensor, labels: list[int]) -> None:
        from ..attention_routing import CallRows

        batch = self.run.batch_size

        def rows_of(label: int) -> tuple[int | None, ...]:
            if label not in labels:
                return (None,) * batch
            start = labels.index(label) * batch
            return tuple(start + image for image in range(batch))

        self.router.begin_call(
            CallRows(self.step, max(self.total_steps, 1), tuple(x.shape[-2:]), rows_of(UNCOND), rows_of(COND))
        )

    # -- CFG ---------------------------------------------------------------------------------
    def cfg_function(self, args):
        x = args["input"]
        if self.enabled:
            try:
                return x - self._guided(args)
            except Exception as error:
                self.fail(error)
        return _host_cfg(args, self.edit_strength)

    def _guided(self, args) -> torch.Tensor:
        if not self.armed:
            raise GuidanceError("the CFG function ran without the pre-CFG function")
        self.armed = False
        if self.blocks and self.extra_x0 is None:
            raise GuidanceError("the extra prompt rows did not reach the UNet")
        x = args["input"]
        batch = self.run.batch_size
        inputs = StepInputs(
            uncond=args["uncond_denoised"],
            cond=args["cond_denoised"],
            conds_list=[[(image, self.edit_strength)] for image in range(batch)],
            x=x,
            sigma=args["sigma"],
            step=self.step,
            total_steps=max(self.total_steps, 1),
            cfg_scale=float(args["cond_scale"]),
            extra=self.extra_x0,
            space="x0",
        )
        self.extra_x0 = None
        return self.run.step(inputs)

    # -- attention ---------------------------------------------------------------------------
    def _attention_patch(self, key):
        router = self.router

        def patch(q, k, v, extra_options):
            heads = extra_options["n_heads"]
            if self.enabled:
                try:
                    return router.forward(key, q, k, v, heads)
                except Exception as error:
                    self.fail(error)
            from ..attention import attention

            return attention(q, k, v, heads)

        return patch


def _equal_tokens(contexts: list[torch.Tensor]) -> list[torch.Tensor]:
    """Extra contexts of different token lengths tiled to a common length, as Forge concatenates."""
    tokens = 1
    for context in contexts:
        tokens = math.lcm(tokens, context.shape[0])
    return [
        context.repeat(tokens // context.shape[0], 1) if context.shape[0] != tokens else context for context in contexts
    ]


def _host_cfg(args, edit_strength: float) -> torch.Tensor:
    """Forge's own CFG formula, in the CFG function's "x minus x0" units."""
    uncond, cond, scale = args["uncond_denoised"], args["cond_denoised"], args["cond_scale"]
    if math.isclose(edit_strength, 1.0):
        denoised = uncond + (cond - uncond) * scale
    else:
        denoised = uncond + (cond - uncond) * scale * edit_strength
    return args["input"] - denoised
