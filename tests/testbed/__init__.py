"""Real parts for tests: the `ldm` UNet in SD1.5's and SDXL's layouts, text-encoder stand-ins, a
k-diffusion style sampler (eps and v models, SD and zero-terminal-SNR schedules) and the Forge
stand-in; the A1111 stand-in lives in ../fake_hosts (a1111.md §3, forge.md §1-§4)."""
