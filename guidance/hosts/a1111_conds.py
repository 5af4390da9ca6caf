"""Extra prompts encoded exactly like A1111 encodes the main prompt (../shared/hosts/a1111.md §6.5),
and fitted to the main conditioning's token length for the shared UNet batch (pitfalls 2 and 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def encode_extra_prompts(p, texts: Sequence[str], cache: list) -> list:
    """Schedules per text (`list[list[ScheduledPromptConditioning]]`), through the processing
    object's own cached encoder: prompt scheduling, emphasis, embeddings, BREAK, LoRA state and
    SDXL's dict conditioning come out as for the main prompt. The hires pass encodes at its size
    with its own step count, as `calculate_hr_conds` does."""
    from modules import prompt_parser

    if getattr(p, "is_hr_pass", False):
        width, height = p.hr_upscale_to_x, p.hr_upscale_to_y
        hires_steps = _hires_total_steps(p)
        network_data = getattr(p, "hr_extra_network_data", None)
    else:
        width, height, hires_steps = p.width, p.height, None
        network_data = getattr(p, "extra_network_data", None)
    required = prompt_parser.SdConditioning(list(texts), width=width, height=height)
    return p.get_conds_with_caching(
        prompt_parser.get_learned_conditioning, required, p.firstpass_steps, [cache], network_data, hires_steps
    )


def _hires_total_steps(p) -> int:
    from modules import sd_samplers

    steps = p.hr_second_pass_steps or p.steps
    config = sd_samplers.find_sampler_config(p.hr_sampler_name or p.sampler_name)
    return config.total_steps(steps) if config else steps


def conds_for_step(schedules: list, rows: Sequence[int], step: int):
    """The extra rows' conditioning at denoiser call `step` (schedules resolved like the host)."""
    from modules import prompt_parser

    return prompt_parser.reconstruct_cond_batch([schedules[row] for row in rows], step)


def fit_tokens(extra: torch.Tensor, token_count: int, empty_chunk: torch.Tensor | None) -> torch.Tensor:
    """Pad (with whole empty-prompt chunks when the host has them, else by repeating the last
    vector, as its `stack_conds` does) or truncate `extra` (K, T, C) to `token_count` tokens."""
    have = extra.shape[1]
    if have > token_count:
        return extra[:, :token_count]
    if have == token_count:
        return extra
    missing = token_count - have
    if empty_chunk is not None and missing % empty_chunk.shape[-2] == 0:
        chunk = empty_chunk.reshape(1, -1, extra.shape[-1]).to(extra.device, extra.dtype)
        pad = chunk.repeat(extra.shape[0], missing // chunk.shape[1], 1)
    else:
        pad = extra[:, -1:].repeat(1, missing, 1)
    return torch.cat([extra, pad], dim=1)


CHUNK_TOKENS = 77


def carry_marker(extra: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """sd-webui-controlnet marks every cond with one extra leading token (pitfall 4): the extra rows
    get the same mark as the cond rows, so the UNet hook counts them as cond."""
    if reference.shape[1] % CHUNK_TOKENS == 1 and extra.shape[1] % CHUNK_TOKENS == 0:
        mark = reference[:1, :1].to(extra.device, extra.dtype).expand(extra.shape[0], 1, extra.shape[2])
        return torch.cat([mark, extra], dim=1)
    return extra


def append_rows(text_cond, extra, empty_chunk: torch.Tensor | None):
    """`text_cond` with the extra conditioning appended: tensors, or SDXL's `DictWithShape`
    (crossattn fitted to the token length, vector appended as it is)."""
    if isinstance(text_cond, dict):
        from modules import prompt_parser

        joined = {}
        for key, value in text_cond.items():
            addition = extra[key].to(value.device, value.dtype)
            if key == "crossattn":
                addition = fit_tokens(carry_marker(addition, value), value.shape[1], empty_chunk)
            joined[key] = torch.cat([value, addition])
        return prompt_parser.DictWithShape(joined, joined["crossattn"].shape)
    addition = carry_marker(extra.to(text_cond.device, text_cond.dtype), text_cond)
    addition = fit_tokens(addition, text_cond.shape[1], empty_chunk)
    return torch.cat([text_cond, addition])
