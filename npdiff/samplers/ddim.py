"""DDIM (Song, Meng & Ermon 2021, "Denoising diffusion implicit models", eq. 12).

Dimensions: N = batch, "..." = data dimensions.

From step t to the previous kept step s (abar_s > abar_t):

    x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps_hat + sigma z
    sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)

eta = 0 is the deterministic sampler (a first-order solver of the probability-flow ODE, identical to
first-order DPM-Solver); eta = 1 has exactly the posterior variance beta~ of the respaced process,
i.e. DDPM with fixed-small variance.
"""

from __future__ import annotations

import numpy as np

from ..diffusion.forward import Prediction, predict_x0_eps
from ..diffusion.schedule import Schedule
from .common import call_model, check_start, make_process_x0, respaced


def ddim_sigma(schedule: Schedule, i: int, eta: float) -> float:
    """The noise scale sigma of the DDIM step from step i to step i - 1 (eq. 16)."""
    abar, abar_prev = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]
    return float(eta * np.sqrt((1.0 - abar_prev) / (1.0 - abar)) * np.sqrt(1.0 - abar / abar_prev))


def ddim_step(schedule: Schedule, x_t, i: int, model_output, noise=None, *, eta: float = 0.0,
              prediction=Prediction.EPS, process_x0=None):
    """One DDIM step from step i of `schedule` to step i - 1 (to x_0 at i = 0). Returns (x_s, x0 estimate)."""
    x0, eps = predict_x0_eps(schedule, x_t, i, model_output, prediction)
    if process_x0 is not None:
        x0 = process_x0(x0)
        eps = predict_x0_eps(schedule, x_t, i, x0, Prediction.X0)[1]  # keep eps consistent with x0
    abar_prev = schedule.alphas_cumprod_prev[i]
    sigma = ddim_sigma(schedule, i, eta)
    x_prev = np.sqrt(abar_prev) * x0 + np.sqrt(max(1.0 - abar_prev - sigma**2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise
    return x_prev.astype(x_t.dtype, copy=False), x0


def sample_ddim(model_fn, schedule: Schedule, x_T, rng: np.random.Generator, *, steps: int,
                prediction=Prediction.EPS, eta: float = 0.0, spacing: str = "linspace", callback=None,
                clip_x0: bool = False, dynamic_threshold=None):
    """DDIM from x_T (the state at the first sampled step) to x_0; callback(i, x_t, x0_pred) per step."""
    x = check_start(x_T)
    sched = respaced(schedule, steps, spacing, prediction)
    process = make_process_x0(clip_x0, dynamic_threshold)
    for k, i in enumerate(range(len(sched) - 1, -1, -1)):
        pred, _ = call_model(model_fn, x, sched.timesteps[i])
        noise = rng.standard_normal(x.shape, dtype=x.dtype) if eta > 0 and i > 0 else None
        x_prev, x0 = ddim_step(sched, x, i, pred, noise, eta=eta, prediction=prediction, process_x0=process)
        if callback is not None:
            callback(k, x, x0)
        x = x_prev
    return x
