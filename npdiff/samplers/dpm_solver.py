"""DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: fast solver for guided sampling of diffusion
probabilistic models", Algorithm 2): a multistep exponential integrator of the probability-flow ODE in
its data-prediction form.

Dimensions: N = batch, "..." = data dimensions.

With alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) and lambda_t = log(alpha_t / sigma_t) (half
the log-SNR), the ODE solved exactly in its linear part gives, from t_{i-1} to t_i (lambda increasing,
h_i = lambda_{t_i} - lambda_{t_{i-1}}):

    x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i

first order:  D_i = x0_hat(t_{i-1})                                       (= DDIM with eta = 0)
second order: D_i = (1 + 1/(2 r_i)) x0_hat(t_{i-1}) - 1/(2 r_i) x0_hat(t_{i-2}),  r_i = h_{i-1} / h_i

The first step has no history and is first order; the last step goes to sigma = 0 (x_0 itself, where
lambda = +inf and e^{-h} = 0) and is also first order, so it returns the last x0 estimate (diffusers
does the same for final_sigmas_type="zero").
"""

from __future__ import annotations

import numpy as np

from ..diffusion.forward import Prediction, predict_x0_eps
from ..diffusion.schedule import Schedule
from .common import call_model, check_start, make_process_x0, respaced


def _lambda(abar):
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)); -inf at abar = 0, +inf at abar = 1."""
    with np.errstate(divide="ignore"):
        return 0.5 * (np.log(abar) - np.log1p(-abar))


def dpmpp_2m_step(schedule: Schedule, x_t, i: int, x0_pred, x0_pred_last=None, i_last=None):
    """One step from step i of `schedule` to step i - 1 (to x_0 at i = 0).

    x0_pred is the data prediction at step i; x0_pred_last, if given, the one at step i_last (> i), used
    for the second-order correction. Returns x at step i - 1.
    """
    abar_s, abar_t = schedule.alphas_cumprod[i], schedule.alphas_cumprod_prev[i]  # from s to t
    alpha_t, sigma_t, sigma_s = np.sqrt(abar_t), np.sqrt(1.0 - abar_t), np.sqrt(1.0 - abar_s)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        h = _lambda(abar_t) - _lambda(abar_s)
        phi = np.expm1(-h)  # e^{-h} - 1, -1 when t is the clean data
        D = x0_pred
        if x0_pred_last is not None and i > 0:
            h_last = _lambda(abar_s) - _lambda(schedule.alphas_cumprod[i_last])
            r = h_last / h
            if np.isfinite(r) and r > 0:
                D = (1.0 + 0.5 / r) * x0_pred - (0.5 / r) * x0_pred_last
        x_next = float(sigma_t / sigma_s) * x_t - float(alpha_t * phi) * D
    return x_next.astype(x_t.dtype, copy=False)


def sample_dpmpp_2m(model_fn, schedule: Schedule, x_T, rng: np.random.Generator, *, steps: int,
                    prediction=Prediction.EPS, order: int = 2, spacing: str = "linspace", callback=None,
                    clip_x0: bool = False, dynamic_threshold=None):
    """DPM-Solver++(2M) from x_T to x_0 (order=1 gives DPM-Solver++(1) = DDIM). Deterministic: rng is
    accepted for a uniform signature and not used. callback(i, x_t, x0_pred) per step."""
    if order not in (1, 2):
        raise ValueError(f"DPM-Solver++ order must be 1 or 2, got {order}")
    x = check_start(x_T)
    sched = respaced(schedule, steps, spacing, prediction)
    process = make_process_x0(clip_x0, dynamic_threshold)
    last = None  # (x0 estimate, step index) of the previous step
    for k, i in enumerate(range(len(sched) - 1, -1, -1)):
        pred, _ = call_model(model_fn, x, sched.timesteps[i])
        x0, _ = predict_x0_eps(sched, x, i, pred, prediction)
        if process is not None:
            x0 = process(x0)
        if callback is not None:
            callback(k, x, x0)
        if order == 2 and last is not None:
            x_next = dpmpp_2m_step(sched, x, i, x0, last[0], last[1])
        else:
            x_next = dpmpp_2m_step(sched, x, i, x0)
        last = (x0, i)
        x = x_next
    return x
