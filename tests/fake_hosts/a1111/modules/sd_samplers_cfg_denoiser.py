"""`modules.sd_samplers_cfg_denoiser.CFGDenoiser` (a1111.md §3) for ordinary (non-edit) models:
batch layout [cond rows per image (one per AND sub-prompt), uncond rows], `on_cfg_denoiser` whose
replaced fields are read back, skipped uncond steps (skip early CFG, NGMS), split UNet calls,
`on_cfg_denoised` (in-place edits only), `combine_denoised`, inpaint blend, `on_cfg_after_cfg`."""

from __future__ import annotations

import torch

from modules import prompt_parser, script_callbacks, shared


def catenate_conds(conds):
    """Tensors, or SDXL's dicts key by key, concatenated along the batch."""
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):
    return {key: value[a:b] for key, value in cond.items()} if isinstance(cond, dict) else cond[a:b]


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.p = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.mask_before_denoising = False
        self.unet_calls: list[int] = []  # rows per UNet call (for tests)

    @property
    def inner_model(self):
        raise NotImplementedError

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0] :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def _model(self, x, sigma, c_crossattn, image_cond):
        self.unet_calls.append(x.shape[0])
        if isinstance(c_crossattn, dict):  # SDXL: {**cond_dict, c_concat}
            return self.inner_model(x, sigma, cond={**c_crossattn, "c_concat": [image_cond]})
        return self.inner_model(x, sigma, cond={"c_crossattn": [c_crossattn], "c_concat": [image_cond]})

    def apply_refiner(self) -> bool:
        """sd_samplers_common.apply_refiner: past `p.refiner_switch_at` of the steps, the refiner
        checkpoint (here `p.refiner_model`) becomes `shared.sd_model` and the inner model is rebuilt
        from it (update_inner_model); the stand-in's refiner keeps the text encoder, so the conds stay."""
        model = getattr(self.p, "refiner_model", None)
        if model is None or self.step / self.total_steps <= self.p.refiner_switch_at or shared.sd_model is model:
            return False
        self.p.extra_generation_params["Refiner switch at"] = self.p.refiner_switch_at
        shared.sd_model = model
        self.sampler.model_wrap = None
        return True

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if shared.state.interrupted or shared.state.skipped:
            raise InterruptedError
        if self.apply_refiner():
            cond, uncond = self.sampler.sampler_extra_args["cond"], self.sampler.sampler_extra_args["uncond"]
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if self.mask_before_denoising and self.mask is not None:
            x = self.init_latent * self.mask + self.nmask * x
        batch_size = len(conds_list)
        repeats = [len(conds_list[i]) for i in range(batch_size)]

        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat(
            [torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [image_cond]
        )

        params = script_callbacks.CFGDenoiserParams(
            x_in, image_cond_in, sigma_in, shared.state.sampling_step, shared.state.sampling_steps, tensor, uncond, self
        )
        script_callbacks.cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        skip_uncond = False
        if shared.opts.skip_early_cond != 0 and self.step / self.total_steps <= shared.opts.skip_early_cond:
            skip_uncond = True
        elif (self.step % 2 or shared.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond:
            skip_uncond = True
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if shared.opts.batch_cond_uncond:
                x_out = self._model(x_in, sigma_in, cond_in, image_cond_in)
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self._model(
                        x_in[a:b], sigma_in[a:b], subscript_cond(cond_in, a, b), image_cond_in[a:b]
                    )
        else:
            x_out = torch.zeros_like(x_in)
            step = batch_size * 2 if shared.opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], step):
                b = min(a + step, tensor.shape[0])
                x_out[a:b] = self._model(x_in[a:b], sigma_in[a:b], subscript_cond(tensor, a, b), image_cond_in[a:b])
            count = uncond.shape[0]
            x_out[-count:] = self._model(x_in[-count:], sigma_in[-count:], uncond, image_cond_in[-count:])

        if skip_uncond:
            fake_uncond = torch.cat([x_out[i : i + 1] for i in [conds[0][0] for conds in conds_list]])
            x_out = torch.cat([x_out, fake_uncond])

        script_callbacks.cfg_denoised_callback(
            script_callbacks.CFGDenoisedParams(
                x_out, shared.state.sampling_step, shared.state.sampling_steps, self.inner_model
            )
        )
        denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0 if skip_uncond else cond_scale)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask

        after = script_callbacks.AfterCFGCallbackParams(
            denoised, shared.state.sampling_step, shared.state.sampling_steps
        )
        script_callbacks.cfg_after_cfg_callback(after)
        self.step += 1
        return after.x
