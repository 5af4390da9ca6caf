"""k-diffusion style sampling around an `ldm` UNet.

`CompVisEpsDenoiser` mirrors what k-diffusion's CompVisDenoiser does for the WebUI: scale the input
by 1/sqrt(sigma²+1), map sigma to a (fractional) timestep of the discrete schedule, call the UNet
and return the denoised estimate x0 = x − sigma·eps. `CompVisVDenoiser` does the same for a
v-prediction UNet (k-diffusion's CompVisVDenoiser scalings, sigma_data 1). Both take A1111's
condition dict: SD1's `{c_crossattn: [context], c_concat: [...]}` or SDXL's `{crossattn, vector,
c_concat}` (a1111.md §8). `zero_terminal_snr` rescales a schedule to zero terminal SNR;
`sample_euler` is the Euler method.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# A1111 1.10 (`rescale_zero_terminal_snr_abar`, setting "Zero Terminal SNR") and Forge (a `ztsnr`
# model) set the last alpha_bar to this instead of 0, so the top sigma is ≈ 4519, not infinite
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def sd_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD1.x's (and SDXL's) 'scaled linear' beta schedule."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """alpha_bar with zero terminal SNR (Lin et al. 2024, Algorithm 1): sqrt(alpha_bar) shifted so its
    last value is 0 and scaled so its first is unchanged; the last entry is then the hosts' clamp."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    rescaled = root**2
    rescaled[-1] = ZTSNR_LAST_ALPHA_BAR
    return rescaled


def unet_kwargs(cond: dict) -> dict:
    """The UNet's keyword arguments from A1111's condition dict (SDXL: context and pooled vector)."""
    if "crossattn" in cond:
        return {"context": cond["crossattn"], "y": cond["vector"]}
    return {"context": torch.cat(cond["c_crossattn"], dim=1)}


def _per_row(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return value.view(-1, *([1] * (x.dim() - 1)))


def x0_from_v(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0 = c_skip·x + c_out·v with c_skip = 1/(σ²+1), c_out = −σ/sqrt(σ²+1) (Salimans & Ho 2022;
    k-diffusion's CompVisVDenoiser and Forge's V_PREDICTION, sigma_data 1)."""
    c_in = _per_row(1 / (sigma**2 + 1) ** 0.5, x)
    return x * c_in**2 - v * _per_row(sigma, x) * c_in


class CompVisEpsDenoiser:
    """x0 from an eps model, with sigma and timestep handling as in k-diffusion's DiscreteSchedule."""

    def __init__(self, unet: torch.nn.Module, alphas_cumprod: torch.Tensor | None = None):
        self.unet = unet
        alphas = sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double()
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

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma of a fractional timestep, interpolated in log sigma."""
        t = t.float()
        low, high, frac = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - frac) * self.log_sigmas[low] + frac * self.log_sigmas[high]).exp()

    def get_sigmas(self, steps: int) -> torch.Tensor:
        """Evenly spaced timesteps from the top of the schedule, then a final 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, steps)
        return torch.cat([self.t_to_sigma(t), torch.zeros(1)])

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        c_in = _per_row(1 / (sigma**2 + 1) ** 0.5, x)
        eps = self.unet(x * c_in, self.sigma_to_t(sigma), **unet_kwargs(cond))
        return x - eps * _per_row(sigma, x)


class CompVisVDenoiser(CompVisEpsDenoiser):
    """x0 from a v model: `x0_from_v(x, v(c_in·x, t), σ)`, c_in = 1/sqrt(σ²+1) as for eps models."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        c_in = _per_row(1 / (sigma**2 + 1) ** 0.5, x)
        v = self.unet(x * c_in, self.sigma_to_t(sigma), **unet_kwargs(cond))
        return x0_from_v(x, v, sigma)


class VFromEps(torch.nn.Module):
    """A v-prediction network with the same underlying prediction as an eps network: for the scaled
    input x_in = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·eps, v = sqrt(ᾱ)·eps − sqrt(1−ᾱ)·x0 = (eps − sqrt(1−ᾱ)·x_in)/sqrt(ᾱ),
    with ᾱ = 1/(σ²+1) at the timestep's sigma (finite wherever ᾱ > 0)."""

    def __init__(self, eps_unet: torch.nn.Module, schedule: CompVisEpsDenoiser):
        super().__init__()
        self.eps_unet = eps_unet
        self.schedule = schedule

    def __getattr__(self, name: str):
        """The eps network's attributes (model_channels, num_classes, …) are the wrapper's too."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.eps_unet, name)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, **kwargs) -> torch.Tensor:
        """v for the timesteps' sigmas."""
        eps = self.eps_unet(x, timesteps, **kwargs)
        alpha_bar = _per_row(1 / (self.schedule.t_to_sigma(timesteps) ** 2 + 1), x)
        return (eps - (1 - alpha_bar).sqrt() * x) / alpha_bar.sqrt()


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
