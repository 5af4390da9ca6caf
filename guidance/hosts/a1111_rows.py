"""A1111's denoiser batch layout, as pure tensor bookkeeping (../shared/hosts/a1111.md §3).

Rows fed to the UNet: each image's cond rows (one per AND sub-prompt), then the run's extra rows,
then one uncond row per image. The extra rows sit before the uncond block so that everything the
host does with "the last B rows" still finds uncond, and `conds_list` indices stay valid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..attention import select_rows
from ..engine import StepInputs


def step_inputs(
    x_out: torch.Tensor,
    x_in: torch.Tensor,
    sigma_in: torch.Tensor,
    conds_list: Sequence[Sequence[tuple[int, float]]],
    extra_count: int,
    step: int,
    total_steps: int,
    cfg_scale: float,
    space: str = "x0",
    uncond_skipped: bool = False,
    extra_used: tuple[bool, ...] | None = None,
) -> StepInputs:
    """Split one denoiser call's output rows into the engine's inputs.

    `x_in`/`sigma_in` are the rows the UNet was given (uncond rows possibly dropped on skipped
    steps); each image's latent and sigma are read from its first cond row, which every layout has.
    `extra_count` rows follow the cond rows: the extra rows `extra_used` flags (all when None).
    """
    batch_size = len(conds_list)
    n_cond = x_out.shape[0] - extra_count - batch_size
    if n_cond < batch_size:
        raise ValueError(f"{x_out.shape[0]} output rows cannot hold {batch_size} images with {extra_count} extra rows")
    first_rows = [conds[0][0] for conds in conds_list]
    return StepInputs(
        uncond=x_out[-batch_size:],
        cond=x_out[:n_cond],
        conds_list=conds_list,
        x=select_rows(x_in, first_rows),  # views, not an index tensor copied to the device
        sigma=select_rows(sigma_in, first_rows),
        step=step,
        total_steps=total_steps,
        cfg_scale=cfg_scale,
        extra=x_out[n_cond : n_cond + extra_count] if extra_count else None,
        space=space,
        uncond_skipped=uncond_skipped,
        extra_used=extra_used,
    )
