"""The model's reverse step p(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_t) and its variance choices.

Dimensions: N = batch, C = data channels (axis 1), "..." = the remaining data dimensions.

A network with a learned variance outputs 2C channels on axis 1: the first C are its prediction
(eps, x0 or v), the last C are the interpolation value v in [-1, 1] of improved DDPM (eq. 15).
"""

from __future__ import annotations

import numpy as np

from .forward import Variance, as_variance, extract, predict_x0_eps, q_posterior_mean_variance
from .schedule import Schedule


def split_model_output(model_output: np.ndarray, x_t: np.ndarray):
    """(prediction, variance_values or None): split 2C output channels into the two halves.

    Any sampler may be driven by a learned-variance network; those that do not use the variance
    simply ignore the second half.
    """
    if model_output.shape == x_t.shape:
        return model_output, None
    if (model_output.ndim == x_t.ndim and model_output.shape[0] == x_t.shape[0]
            and model_output.shape[1] == 2 * x_t.shape[1] and model_output.shape[2:] == x_t.shape[2:]):
        c = x_t.shape[1]
        return model_output[:, :c], model_output[:, c:]
    raise ValueError(
        f"model output has shape {model_output.shape}; expected {x_t.shape} (a prediction) or twice the "
        f"channels on axis 1 (prediction and learned variance)")


def fixed_large_variance(schedule: Schedule) -> np.ndarray:
    """(T,) beta_t, the upper end of the range (Ho et al. 2020 sigma_t^2 = beta_t; diffusers' fixed_large).

    improved-diffusion instead puts beta~_2 at the first step to improve its discretized decoder
    likelihood; we keep the paper's choice, which is also the optimal variance for N(0, I) data.
    """
    return schedule.betas


def model_variance(schedule: Schedule, t_idx, variance: Variance, var_values, shape):
    """(variance, log_variance) of p(x_{t-1} | x_t), broadcast against an array of the given shape.

    LEARNED_RANGE: log Sigma = f log beta_t + (1 - f) log beta~_t with f = (v + 1) / 2 (improved DDPM,
    eq. 15; beta~ with its log clipped at the first step, see Schedule.posterior_log_variance_clipped).
    """
    variance = as_variance(variance)
    if variance is Variance.FIXED_SMALL:
        log_var = extract(schedule.posterior_log_variance_clipped, t_idx, shape)
        return extract(schedule.posterior_variance, t_idx, shape), log_var
    if variance is Variance.FIXED_LARGE:
        var = extract(fixed_large_variance(schedule), t_idx, shape)
        return var, np.log(var)
    if var_values is None:
        raise ValueError("variance=LEARNED_RANGE needs a model that outputs twice the data channels")
    frac = (np.asarray(var_values, dtype=np.float64) + 1.0) / 2.0
    log_var = (frac * extract(schedule.log_betas, t_idx, shape)
               + (1.0 - frac) * extract(schedule.posterior_log_variance_clipped, t_idx, shape))
    return np.exp(log_var), log_var


def p_mean_variance(schedule: Schedule, model_output, x_t, t_idx, prediction, variance=Variance.FIXED_SMALL,
                    process_x0=None):
    """The reverse step a network defines: the posterior q(x_{t-1} | x_t, x_0) with x_0 replaced by the
    network's estimate (Ho et al. 2020, eq. 11 in its x0 form).

    process_x0: optional function applied to the x0 estimate (clipping, dynamic thresholding).
    Returns dict(mean, variance, log_variance, pred_x0, pred_eps); mean and pred_* have x_t's shape.
    """
    pred, var_values = split_model_output(model_output, x_t)
    x0, eps = predict_x0_eps(schedule, x_t, t_idx, pred, prediction)
    if process_x0 is not None:
        x0 = process_x0(x0)
        eps = predict_x0_eps(schedule, x_t, t_idx, x0, "x0")[1]
    mean, _, _ = q_posterior_mean_variance(schedule, x0, x_t, t_idx)
    var, log_var = model_variance(schedule, t_idx, variance, var_values, x_t.shape)
    return dict(mean=mean, variance=var, log_variance=log_var, pred_x0=x0, pred_eps=eps)
