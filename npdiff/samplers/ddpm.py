"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2), on any respacing of the schedule.

Dimensions: N = batch, "..." = data dimensions.

Each step draws x_{t-1} ~ p(x_{t-1} | x_t) = N(mu~(x_t, x0_hat), Sigma_t): the posterior mean with the
network's x0 estimate, and a variance that is fixed (beta~_t or beta_t) or learned (improved DDPM).
On a respaced schedule the betas are the respaced ones (improved DDPM, Sec. 4), so the same code
samples in 1000 steps or in 50.
"""

from __future__ import annotations

import numpy as np

from ..diffusion.forward import Prediction, Variance
from ..diffusion.reverse import p_mean_variance
from ..diffusion.schedule import Schedule
from .common import call_model, check_start, make_process_x0, respaced


def ddpm_step(schedule: Schedule, x_t, i: int, model_output, noise, *, prediction=Prediction.EPS,
              variance=Variance.FIXED_SMALL, process_x0=None):
    """One reverse step from step i of `schedule` to step i - 1 (to x_0 when i = 0, where no noise is
    added, as in Algorithm 2). Returns (x_{t-1}, x0 estimate)."""
    p = p_mean_variance(schedule, model_output, x_t, i, prediction, variance, process_x0)
    x_prev = p["mean"]
    if i > 0:
        x_prev = x_prev + np.exp(0.5 * p["log_variance"]) * noise
    return x_prev.astype(x_t.dtype, copy=False), p["pred_x0"]


def sample_ddpm(model_fn, schedule: Schedule, x_T, rng: np.random.Generator, *, steps: int,
                prediction=Prediction.EPS, variance=Variance.FIXED_SMALL, spacing: str = "linspace",
                callback=None, clip_x0: bool = False, dynamic_threshold=None):
    """Ancestral sampling from x_T (the state at the first sampled step) down to x_0.

    variance: FIXED_SMALL (beta~), FIXED_LARGE (beta) or LEARNED_RANGE (model outputs 2C channels).
    callback(i, x_t, x0_pred) is called once per step, i = 0 .. steps-1 in sampling order.
    """
    x = check_start(x_T)
    sched = respaced(schedule, steps, spacing, prediction)
    process = make_process_x0(clip_x0, dynamic_threshold)
    for k, i in enumerate(range(len(sched) - 1, -1, -1)):
        out = call_model(model_fn, x, sched.timesteps[i])
        noise = rng.standard_normal(x.shape, dtype=x.dtype) if i > 0 else None
        full = out[0] if out[1] is None else np.concatenate(out, axis=1)
        x_prev, x0 = ddpm_step(sched, x, i, full, noise, prediction=prediction, variance=variance,
                               process_x0=process)
        if callback is not None:
            callback(k, x, x0)
        x = x_prev
    return x
