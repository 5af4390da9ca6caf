"""`modules.sd_samplers`: sampler configs and creation."""

from __future__ import annotations

from dataclasses import dataclass

from modules import sd_samplers_kdiffusion, sd_samplers_timesteps


@dataclass
class SamplerData:
    name: str
    constructor: type
    second_order: bool = False

    def total_steps(self, steps):
        return steps * 2 if self.second_order else steps


all_samplers = [
    SamplerData("Euler", sd_samplers_kdiffusion.KDiffusionSampler),
    SamplerData("DDIM", sd_samplers_timesteps.CompVisSampler),
]


def find_sampler_config(name):
    return next((s for s in all_samplers if s.name == name), None)


def create_sampler(name, model):
    config = find_sampler_config(name)
    return config.constructor(config.name.lower(), model)
