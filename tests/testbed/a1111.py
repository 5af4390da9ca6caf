"""A stand-in for AUTOMATIC1111 1.10's CFG denoiser, written from ../shared/hosts/a1111.md §2-§3.

It keeps the host's field names, callback order and batch layout: for each image its cond rows (one
per AND sub-prompt), then one uncond row per image; `on_cfg_denoiser` may replace x, image_cond,
sigma, text_cond and text_uncond (they are read back); `on_cfg_denoised` sees every output row and
only in-place edits count; `combine_denoised` may be overridden on the instance; skipped-uncond
steps (NGMS) drop the last B rows before the UNet and append copies of each image's first cond row
afterwards; callback exceptions are reported and swallowed. The state's `sampling_step` lags the
denoiser's `step` by one, as in the real host.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import CompVisEpsDenoiser, sample_euler

# ---------------------------------------------------------------------------------------------
# prompt_parser: scheduled and composable (AND) conditionings


@dataclass
class ScheduledPromptConditioning:
    end_at_step: int
    cond: torch.Tensor  # (T, C)


@dataclass
class ComposableScheduledPromptConditioning:
    schedules: list[ScheduledPromptConditioning]
    weight: float = 1.0


@dataclass
class MulticondLearnedConditioning:
    shape: tuple
    batch: list[list[ComposableScheduledPromptConditioning]]


def _pick_schedule(schedules: list[ScheduledPromptConditioning], current_step: int) -> torch.Tensor:
    for entry in schedules:
        if current_step <= entry.end_at_step:
            return entry.cond
    return schedules[0].cond


def _stack_conds(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Equal token lengths by repeating each tensor's last vector (the host's stack_conds)."""
    token_count = max(t.shape[0] for t in tensors)
    padded = [
        torch.cat([t, t[-1:].repeat(token_count - t.shape[0], 1)]) if t.shape[0] < token_count else t for t in tensors
    ]
    return torch.stack(padded)


def reconstruct_cond_batch(c: list[list[ScheduledPromptConditioning]], current_step: int) -> torch.Tensor:
    return torch.stack([_pick_schedule(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step: int):
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_image = []
        for composable in composable_prompts:
            conds_for_image.append((len(tensors), composable.weight))
            tensors.append(_pick_schedule(composable.schedules, current_step))
        conds_list.append(conds_for_image)
    return conds_list, _stack_conds(tensors)


def multicond(prompts: list[list[tuple[torch.Tensor, float]]]) -> MulticondLearnedConditioning:
    """Per image a list of (cond (T, C), AND weight), each with a single schedule entry."""
    batch = [
        [ComposableScheduledPromptConditioning([ScheduledPromptConditioning(10**6, c)], w) for c, w in image]
        for image in prompts
    ]
    return MulticondLearnedConditioning((len(batch),), batch)


def plain_conds(conds: torch.Tensor) -> list[list[ScheduledPromptConditioning]]:
    return [[ScheduledPromptConditioning(10**6, c)] for c in conds]


# ---------------------------------------------------------------------------------------------
# script_callbacks: parameter objects and the callback lists


@dataclass
class CFGDenoiserParams:
    x: torch.Tensor
    image_cond: torch.Tensor
    sigma: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    text_cond: torch.Tensor
    text_uncond: torch.Tensor
    denoiser: Any = None


@dataclass
class CFGDenoisedParams:
    x: torch.Tensor
    sampling_step: int
    total_sampling_steps: int
    inner_model: Any


@dataclass
class AfterCFGCallbackParams:
    x: torch.Tensor
    sampling_step: int
    total_sampling_steps: int


@dataclass
class ScriptCallbacks:
    """The three sampling callback lists; like the host, an exception is reported, not raised."""

    cfg_denoiser: list[Callable] = field(default_factory=list)
    cfg_denoised: list[Callable] = field(default_factory=list)
    cfg_after_cfg: list[Callable] = field(default_factory=list)
    reported: list[str] = field(default_factory=list)

    def call(self, kind: str, params: Any) -> None:
        for callback in getattr(self, kind):
            try:
                callback(params)
            except Exception:
                self.reported.append(traceback.format_exc())


@dataclass
class Options:
    batch_cond_uncond: bool = True
    skip_early_cond: float = 0.0
    s_min_uncond_all: bool = False


@dataclass
class State:
    sampling_step: int = 0
    sampling_steps: int = 0


# ---------------------------------------------------------------------------------------------
# CFGDenoiser


class CFGDenoiser:
    """`sd_samplers_cfg_denoiser.CFGDenoiser` for an ordinary (non-edit, non-inpaint) eps model."""

    def __init__(
        self, inner_model: CompVisEpsDenoiser, callbacks: ScriptCallbacks, opts: Options, state: State, p: Any = None
    ):
        self.inner_model = inner_model
        self.callbacks = callbacks
        self.opts = opts
        self.state = state
        self.p = p
        self.mask = None
        self.step = 0
        self.steps = 0
        self.total_steps = 0
        self.unet_calls: list[int] = []  # rows per UNet call, for tests

    def _model(self, x, sigma, c_crossattn, c_concat):
        self.unet_calls.append(x.shape[0])
        return self.inner_model(x, sigma, cond={"c_crossattn": [c_crossattn], "c_concat": [c_concat]})

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0] :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def __call__(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        conds_list, tensor = reconstruct_multicond_batch(cond, self.step)
        uncond = reconstruct_cond_batch(uncond, self.step)
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]

        x_in = torch.cat([torch.stack([x[i]] * n) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i]] * n) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i]] * n) for i, n in enumerate(repeats)] + [image_cond])

        params = CFGDenoiserParams(
            x_in, image_cond_in, sigma_in, self.state.sampling_step, self.state.sampling_steps, tensor, uncond, self
        )
        self.callbacks.call("cfg_denoiser", params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = False
        if self.opts.skip_early_cond != 0 and self.step / self.total_steps <= self.opts.skip_early_cond:
            skip_uncond = True
        elif (self.step % 2 or self.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else torch.cat([tensor, uncond])
            if self.opts.batch_cond_uncond:
                x_out = self._model(x_in, sigma_in, cond_in, image_cond_in)
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self._model(x_in[a:b], sigma_in[a:b], cond_in[a:b], image_cond_in[a:b])
        else:
            x_out = torch.zeros_like(x_in)
            step = batch_size * 2 if self.opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], step):
                b = min(a + step, tensor.shape[0])
                x_out[a:b] = self._model(x_in[a:b], sigma_in[a:b], tensor[a:b], image_cond_in[a:b])
            count = uncond.shape[0]
            x_out[-count:] = self._model(x_in[-count:], sigma_in[-count:], uncond, image_cond_in[-count:])

        if skip_uncond:
            fake_uncond = torch.cat([x_out[i : i + 1] for i in [conds[0][0] for conds in conds_list]])
            x_out = torch.cat([x_out, fake_uncond])

        self.callbacks.call(
            "cfg_denoised",
            CFGDenoisedParams(x_out, self.state.sampling_step, self.state.sampling_steps, self.inner_model),
        )
        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale)

        after = AfterCFGCallbackParams(denoised, self.state.sampling_step, self.state.sampling_steps)
        self.callbacks.call("cfg_after_cfg", after)
        self.step += 1
        return after.x


def sample_txt2img(
    denoiser: CFGDenoiser,
    noise: torch.Tensor,
    steps: int,
    cond: MulticondLearnedConditioning,
    uncond: list,
    cfg_scale: float,
    s_min_uncond: float = 0.0,
) -> torch.Tensor:
    """What KDiffusionSampler.sample does for Euler: sigmas, launch_sampling bookkeeping, the loop."""
    sigmas = denoiser.inner_model.get_sigmas(steps)
    denoiser.step = 0
    denoiser.steps = steps
    denoiser.total_steps = steps
    denoiser.state.sampling_steps = steps
    denoiser.state.sampling_step = 0
    image_cond = noise.new_zeros(noise.shape[0], 5, 1, 1)

    def advance(d):
        denoiser.state.sampling_step = d["i"]

    extra_args = dict(cond=cond, uncond=uncond, cond_scale=cfg_scale, s_min_uncond=s_min_uncond, image_cond=image_cond)
    with torch.no_grad():
        return sample_euler(denoiser, noise * sigmas[0], sigmas, extra_args, callback=advance)
