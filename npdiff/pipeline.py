"""Sampling: prompts in, uint8 images out.

    prompt, negative prompt --text encoder--> two conditionings, encoded once
    x_T ~ N(0, I), one generator per image (seed, seed+1, ...) so each image can be re-made alone
    sampler(model_fn, schedule, x_T) where model_fn runs the U-Net on [x; x] with
        [prompt; negative] conditioning in one call and combines them by classifier-free guidance
    x_0 -> uint8

Dimension letters: N batch, L tokens, D text width, C channels, H height, W width.
"""

from __future__ import annotations

import numpy as np

from npdiff.imaging import to_uint8
from npdiff.model import Model
from npdiff.samplers import sample as run_sampler
from npdiff.samplers.guidance import classifier_free_guidance

DEFAULT_SAMPLER = "dpmpp-2m"
DEFAULT_STEPS = 25
DEFAULT_CFG = 3.0


def initial_noise(seeds: list[int], shape: tuple[int, int, int], dtype=np.float32) -> np.ndarray:
    """One standard normal (C, H, W) per seed -> (N, C, H, W)."""
    return np.stack([np.random.default_rng(s).standard_normal(shape).astype(dtype) for s in seeds])


class Pipeline:
    def __init__(self, model: Model):
        self.model = model
        self.schedule = model.config.schedule()

    def model_fn(self, prompts: list[str], negative_prompt: str, guidance_scale: float, rescale: float = 0.0):
        """The function samplers call: x (N, C, H, W), t (N,) -> prediction (N, C, H, W)."""
        n = len(prompts)
        context, mask, pooled, _ = self.model.encode_text(list(prompts) + [negative_prompt] * n)

        def both(x2, t2):                                   # x2: (2N, C, H, W) = [x; x]
            out, _ = self.model.unet(x2, t2, context, mask, pooled)
            return out

        if guidance_scale == 1.0:                           # no guidance: the conditional half only
            def cond_only(x, t):
                out, _ = self.model.unet(x, t, context[:n], mask[:n], pooled[:n])
                return out
            return cond_only
        return classifier_free_guidance(both, guidance_scale, rescale)

    def generate(self, prompts: list[str], *, negative_prompt: str = "", seed: int = 0,
                 steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, guidance_scale: float = DEFAULT_CFG,
                 width: int | None = None, height: int | None = None, callback=None,
                 progress: bool = True, return_float: bool = False):
        """-> (N, H, W, 3) uint8 (or the float x_0 in [-1, 1] when return_float)."""
        res = self.model.config.resolution
        width, height = width or res, height or res
        n = len(prompts)
        x_T = initial_noise([seed + i for i in range(n)], (self.model.config.unet.in_channels, height, width))
        rng = np.random.default_rng([seed, 1])              # the sampler's own noise (ancestral samplers)
        model_fn = self.model_fn(prompts, negative_prompt, guidance_scale)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=steps, unit="step", leave=False, dynamic_ncols=True)

        def step_callback(i, x_t, x0_pred):
            if bar is not None:
                bar.update(1)
            if callback is not None:
                callback(i, x_t, x0_pred)

        try:
            x0 = run_sampler(sampler, model_fn, self.schedule, x_T, rng, steps=steps,
                             prediction=self.model.config.prediction_type, clip_x0=True, callback=step_callback)
        finally:
            if bar is not None:
                bar.close()
        return x0 if return_float else to_uint8(x0)
