"""k-diffusion style sampling around an eps-predicting `ldm` UNet.

`CompVisEpsDenoiser` mirrors what k-diffusion's CompVisDenoiser does for the WebUI: scale the input
by 1/sqrt(sigma²+1), map sigma to a (fractional) timestep of the SD1.5 discrete schedule, call the
UNet and return the denoised estimate x0 = x − sigma·eps. `sample_euler` is the Euler method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD1.x's 'scaled linear' beta schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class CompVisEpsDenoiser:
    """x0 from an eps model, with sigma and timestep handling as in k-diffusion's DiscreteSchedule."""

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        alphas = sd_alphas_cumprod()
        self.sigmas = (((1 - alphas) / alphas) ** 0.5).float()
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep by linear interpolation in log sigma."""
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        low_value, high_value = self.log_sigmas[low], self.log_sigmas[high]
        weight = ((low_value - log_sigma) / (low_value - high_value)).clamp(0, 1)
        return ((1 - weight) * low + weight * high).view(sigma.shape)

    def get_sigmas(self, steps: int) -> torch.Tensor:
        """Evenly spaced timesteps from the top of the schedule, then a final 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps)
        low, high, frac = t.floor().long(), t.ceil().long(), t.frac()
        log_sigma = (1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]
        return torch.cat([log_sigma.exp(), torch.zeros(1)])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        c_in = 1 / (sigma**2 + 1) ** 0.5
        scale = c_in.view(-1, *([1] * (x.dim() - 1)))
        context = torch.cat(cond["c_crossattn"], dim=1)
        eps = self.unet(x * scale, self.sigma_to_t(sigma), context=context)
        return x - eps * sigma.view(-1, *([1] * (x.dim() - 1)))


def sample_euler(
    model: Callable,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    extra_args: dict,
    callback: Callable[[dict], None] | None = None,
) -> torch.Tensor:
    """Euler steps: d = (x − x0)/sigma, x ← x + d·(sigma_next − sigma). The callback runs after
    each model call, as k-diffusion's does (it moves A1111's `state.sampling_step`)."""
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x
