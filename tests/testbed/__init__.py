"""Real parts for tests: the `ldm` UNet, a k-diffusion style sampler and an A1111 CFGDenoiser
stand-in that follows ../shared/hosts/a1111.md §3."""
