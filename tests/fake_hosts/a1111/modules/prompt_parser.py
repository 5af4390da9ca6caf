"""`modules.prompt_parser` (a1111.md §6.2-§6.4): conditionings with schedules, AND sub-prompts with
weights, and their per-call reconstruction. Prompt scheduling syntax is not parsed here: every
prompt has one schedule entry lasting the whole run."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


@dataclass
class ScheduledPromptConditioning:
    end_at_step: int
    cond: torch.Tensor


@dataclass
class ComposableScheduledPromptConditioning:
    schedules: list
    weight: float = 1.0


@dataclass
class MulticondLearnedConditioning:
    shape: tuple
    batch: list


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """One schedule list per prompt; identical prompts are encoded once."""
    unique = list(dict.fromkeys(prompts))
    conds = model.get_learned_conditioning(SdConditioning(unique, copy_from=prompts))
    by_text = {text: [ScheduledPromptConditioning(steps, _row(conds, i))] for i, text in enumerate(unique)}
    return [by_text[text] for text in prompts]


def _row(conds, i):
    """Row i of a tensor, or of every tensor of SDXL's dict conditioning."""
    return {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]


_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^(.*?)(?::\s*([-+]?(?:\d+\.?\d*|\.\d+)))?\s*$", re.S)


def get_multicond_prompt_list(prompts):
    res_indexes, prompt_flat_list, prompt_indexes = [], [], {}
    for prompt in prompts:
        indexes = []
        for subprompt in _AND.split(prompt):
            match = _WEIGHT.match(subprompt)
            text, weight = (match.group(1), float(match.group(2))) if match.group(2) else (subprompt, 1.0)
            index = prompt_indexes.get(text)
            if index is None:
                index = len(prompt_flat_list)
                prompt_flat_list.append(text)
                prompt_indexes[text] = index
            indexes.append((index, weight))
        res_indexes.append(indexes)
    return res_indexes, prompt_flat_list, prompt_indexes


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    res_indexes, prompt_flat_list, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(
        model, SdConditioning(prompt_flat_list, copy_from=prompts), steps, hires_steps, use_old_scheduling
    )
    batch = [
        [ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes] for indexes in res_indexes
    ]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _pick(schedules, current_step):
    for entry in schedules:
        if current_step <= entry.end_at_step:
            return entry.cond
    return schedules[-1].cond


def reconstruct_cond_batch(c, current_step):
    param = c[0][0].cond
    if isinstance(param, dict):
        res = {k: torch.stack([_pick(s, current_step)[k] for s in c]) for k in param}
        return DictWithShape(res)
    res = torch.zeros((len(c),) + param.shape, device=param.device, dtype=param.dtype)
    for i, schedules in enumerate(c):
        res[i] = _pick(schedules, current_step)
    return res


def stack_conds(tensors):
    """Equal token lengths by repeating each tensor's last vector (SDXL's 1-D vectors stack as they are)."""
    if tensors[0].dim() == 1:
        return torch.stack(tensors)
    token_count = max(t.shape[0] for t in tensors)
    padded = [
        torch.cat([t, t[-1:].repeat(token_count - t.shape[0], 1)]) if t.shape[0] < token_count else t for t in tensors
    ]
    return torch.stack(padded)


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step):
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_batch = []
        for composable in composable_prompts:
            conds_for_batch.append((len(tensors), composable.weight))
            tensors.append(_pick(composable.schedules, current_step))
        conds_list.append(conds_for_batch)
    if isinstance(tensors[0], dict):
        stacked = {k: stack_conds([t[k] for t in tensors]) for k in tensors[0]}
        return conds_list, DictWithShape(stacked, stacked["crossattn"].shape)
    return conds_list, stack_conds(tensors)
