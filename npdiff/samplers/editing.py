"""Editing with any sampler: img2img (SDEdit, Meng et al. 2022) and RePaint inpainting (Lugmayr et
al. 2022, "RePaint: inpainting using denoising diffusion probabilistic models").

Dimensions: N = batch, "..." = data dimensions.
"""

from __future__ import annotations

import numpy as np

from ..diffusion.forward import Prediction, Variance, q_sample
from ..diffusion.schedule import Schedule, respace, space_timesteps
from .common import call_model, check_start, make_process_x0, respaced
from .ddpm import ddpm_step


def img2img_schedule(schedule: Schedule, steps: int, strength: float, spacing: str = "linspace"):
    """The sub-schedule img2img samples: of the `steps`-step grid, the round(strength * steps) lowest
    steps (at least one). strength = 1 starts from the top of the grid, i.e. from (almost) pure noise."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"img2img strength must be in (0, 1], got {strength}")
    grid = space_timesteps(len(schedule), steps, spacing)
    k = int(np.clip(round(strength * steps), 1, steps))
    return respace(schedule, grid[:k])


def img2img(sampler, model_fn, schedule: Schedule, image, rng: np.random.Generator, *, strength: float,
            steps: int, spacing: str = "linspace", noise=None, **sampler_kwargs):
    """Noise `image` (N, ...) to the noise level that `strength` selects, q(x_t | x_0 = image), and run
    `sampler` (a sample_* function or a registry name) from there; it walks the remaining round(strength * steps) steps.
    Every sampler gets this for free because skipping steps is only a change of schedule."""
    image = check_start(image)
    sub = img2img_schedule(schedule, steps, strength, spacing)
    if noise is None:
        noise = rng.standard_normal(image.shape, dtype=image.dtype)
    t_start = len(sub) - 1  # the top step of the sub-schedule
    x_t = q_sample(sub, image, t_start, noise).astype(image.dtype, copy=False)
    if isinstance(sampler, str):
        from . import get_sampler
        sampler = get_sampler(sampler)
    # steps=len(sub): the sub-schedule is walked whole (every spacing of k steps out of k is the identity).
    return sampler(model_fn, sub, x_t, rng, steps=len(sub), **sampler_kwargs)


def repaint_moves(n: int, jump_length: int, jump_n_sample: int):
    """The RePaint time schedule on a grid of n steps, as a list of moves:
    ("down", i): a reverse step from step i to i - 1 (to x_0 at i = 0);
    ("up", i, j): re-noise from step i to step j > i with the forward process.
    After reaching a step i that is a multiple of jump_length (with room above it), jump back up
    jump_length steps, jump_n_sample - 1 times per such step, so each block is sampled jump_n_sample times.
    """
    if jump_length < 1 or jump_n_sample < 1:
        raise ValueError(f"jump_length and jump_n_sample must be >= 1, got {jump_length}, {jump_n_sample}")
    moves, jumps_left = [], {}
    i = n - 1
    while i >= 0:
        moves.append(("down", i))
        i -= 1
        if i >= 0 and i % jump_length == 0 and i + jump_length <= n - 1:
            left = jumps_left.setdefault(i, jump_n_sample - 1)
            if left > 0:
                jumps_left[i] = left - 1
                moves.append(("up", i, i + jump_length))
                i += jump_length
    return moves


def sample_repaint(model_fn, schedule: Schedule, x_T, rng: np.random.Generator, *, steps: int, known,
                   keep_mask, jump_length: int = 10, jump_n_sample: int = 1, prediction=Prediction.EPS,
                   variance=Variance.FIXED_SMALL, spacing: str = "linspace", callback=None,
                   clip_x0: bool = False, dynamic_threshold=None):
    """RePaint inpainting: DDPM ancestral steps on the whole image, after each of which the known region
    is replaced by a fresh draw of q(x_{t-1} | x_0 = known) (Algorithm 1, line 5-8), with resampling
    jumps (Sec. 4.2) that re-noise the whole image so the generated part can harmonize with the known one.

    known (N, ...): the source image; keep_mask (broadcastable to it): 1 where the source is kept, 0
    where new content is generated. jump_n_sample = 1 is plain replacement without resampling.
    callback(i, x_t, x0_pred) is called once per reverse step (more than `steps` times with jumps).
    """
    x = check_start(x_T)
    known = np.asarray(known, dtype=x.dtype)
    keep = np.broadcast_to(np.asarray(keep_mask, dtype=x.dtype), x.shape)
    if known.shape != x.shape:
        raise ValueError(f"known image has shape {known.shape}, x_T has {x.shape}")
    sched = respaced(schedule, steps, spacing, prediction)
    process = make_process_x0(clip_x0, dynamic_threshold)
    k = 0  # reverse steps taken, for the callback
    for move in repaint_moves(len(sched), jump_length, jump_n_sample):
        if move[0] == "up":
            _, i, j = move
            ratio = sched.alphas_cumprod[j] / sched.alphas_cumprod[i]  # q(x_j | x_i) = N(sqrt(ratio) x_i, 1 - ratio)
            noise = rng.standard_normal(x.shape, dtype=x.dtype)
            x = (np.sqrt(ratio) * x + np.sqrt(1.0 - ratio) * noise).astype(x.dtype)
            continue
        i = move[1]
        pred, var = call_model(model_fn, x, sched.timesteps[i])
        out = pred if var is None else np.concatenate([pred, var.astype(x.dtype)], axis=1)
        noise = rng.standard_normal(x.shape, dtype=x.dtype) if i > 0 else None
        x_unknown, x0 = ddpm_step(sched, x, i, out, noise, prediction=prediction, variance=variance,
                                  process_x0=process)
        if i > 0:
            x_known = q_sample(sched, known, i - 1, rng.standard_normal(x.shape, dtype=x.dtype))
        else:
            x_known = known
        if callback is not None:
            callback(k, x, x0)
        k += 1
        x = (keep * x_known + (1.0 - keep) * x_unknown).astype(x.dtype, copy=False)
    return x
