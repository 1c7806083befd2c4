"""The forward (noising) process and the conversions between what a network can predict.

Dimensions: N = batch, "..." = any data dimensions (C, H, W for images; d for vectors).

t_idx indexes the steps of the schedule that is passed in (0..len-1); for a base schedule that is the
original 0-based timestep. It may be a Python int or an int array of shape (N,).

Notation (DPM-Solver's): alpha_t = sqrt(abar_t) and sigma_t = sqrt(1 - abar_t), so that
x_t = alpha_t x_0 + sigma_t eps.
"""

from __future__ import annotations

from enum import Enum

import numpy as np

from .schedule import Schedule


class Prediction(Enum):
    """What the network outputs."""

    EPS = "eps"  # the noise that was added (Ho et al. 2020)
    X0 = "x0"  # the clean data
    V = "v"  # alpha_t eps - sigma_t x_0 (Salimans & Ho 2022, "Progressive distillation")


class Variance(Enum):
    """How the reverse step's variance is chosen."""

    FIXED_SMALL = "fixed_small"  # beta~_t: optimal when x_0 is a single point (Ho et al. 2020, Sec. 3.2)
    FIXED_LARGE = "fixed_large"  # beta_t: optimal when x_0 ~ N(0, I)
    # exp(v log beta_t + (1 - v) log beta~_t), v predicted (Nichol & Dhariwal 2021, eq. 15)
    LEARNED_RANGE = "learned_range"


def as_prediction(p) -> Prediction:
    try:
        return p if isinstance(p, Prediction) else Prediction(p)
    except ValueError:
        raise ValueError(f"unknown prediction {p!r}; expected one of {[m.value for m in Prediction]}") from None


def as_variance(v) -> Variance:
    try:
        return v if isinstance(v, Variance) else Variance(v)
    except ValueError:
        raise ValueError(f"unknown variance {v!r}; expected one of {[m.value for m in Variance]}") from None


def extract(table: np.ndarray, t_idx, shape, dtype=np.float64) -> np.ndarray:
    """table[t_idx] shaped to broadcast against an array of the given shape: (N, 1, 1, ...) or a scalar."""
    values = np.asarray(table[np.asarray(t_idx)], dtype=dtype)
    if values.ndim == 0:
        return values
    return values.reshape((values.shape[0],) + (1,) * (len(shape) - 1))


def _dtype(x) -> np.dtype:
    x = np.asarray(x)
    return x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)


def q_sample(schedule: Schedule, x0: np.ndarray, t_idx, noise: np.ndarray) -> np.ndarray:
    """Draw from q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (Ho et al. 2020, eq. 4)."""
    dt = _dtype(x0)
    a = extract(schedule.sqrt_alphas_cumprod, t_idx, x0.shape, dt)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t_idx, x0.shape, dt)
    return a * x0 + s * noise


def q_mean_variance(schedule: Schedule, x0: np.ndarray, t_idx):
    """Mean, variance and log-variance of q(x_t | x_0); the variance terms broadcast against x0."""
    mean = extract(schedule.sqrt_alphas_cumprod, t_idx, x0.shape, _dtype(x0)) * x0
    variance = extract(1.0 - schedule.alphas_cumprod, t_idx, x0.shape)
    log_variance = extract(schedule.log_one_minus_alphas_cumprod, t_idx, x0.shape)
    return mean, variance, log_variance


def q_posterior_mean_variance(schedule: Schedule, x0: np.ndarray, x_t: np.ndarray, t_idx):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (Ho et al. 2020, eq. 6-7):

    mu~ = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
    beta~ = beta_t (1 - abar_{t-1}) / (1 - abar_t)
    """
    dt = _dtype(x_t)
    mean = (extract(schedule.posterior_mean_coef1, t_idx, x_t.shape, dt) * x0
            + extract(schedule.posterior_mean_coef2, t_idx, x_t.shape, dt) * x_t)
    variance = extract(schedule.posterior_variance, t_idx, x_t.shape)
    log_variance = extract(schedule.posterior_log_variance_clipped, t_idx, x_t.shape)
    return mean, variance, log_variance


# ---- conversions, written for explicit alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) -----------

def x0_eps_from_prediction(x_t, model_output, alpha, sigma, prediction: Prediction):
    """(x0, eps) implied by a network output; alpha and sigma broadcast against x_t.

    eps: x0 = (x_t - sigma eps) / alpha
    x0:  eps = (x_t - alpha x0) / sigma
    v:   x0 = alpha x_t - sigma v,  eps = sigma x_t + alpha v   (since alpha^2 + sigma^2 = 1)
    """
    prediction = as_prediction(prediction)
    if prediction is Prediction.EPS:
        eps = model_output
        with np.errstate(divide="ignore", invalid="ignore"):
            x0 = (x_t - sigma * eps) / alpha
    elif prediction is Prediction.X0:
        x0 = model_output
        with np.errstate(divide="ignore", invalid="ignore"):
            eps = (x_t - alpha * x0) / sigma
    else:
        x0 = alpha * x_t - sigma * model_output
        eps = sigma * x_t + alpha * model_output
    return x0, eps


def _alpha_sigma(schedule: Schedule, t_idx, x):
    dt = _dtype(x)
    return (extract(schedule.sqrt_alphas_cumprod, t_idx, x.shape, dt),
            extract(schedule.sqrt_one_minus_alphas_cumprod, t_idx, x.shape, dt))


def predict_x0_eps(schedule: Schedule, x_t, t_idx, model_output, prediction: Prediction):
    """(x0, eps) implied by a network output of the given kind at step t_idx."""
    alpha, sigma = _alpha_sigma(schedule, t_idx, x_t)
    return x0_eps_from_prediction(x_t, model_output, alpha, sigma, prediction)


def predict_x0_from_eps(schedule: Schedule, x_t, t_idx, eps):
    return predict_x0_eps(schedule, x_t, t_idx, eps, Prediction.EPS)[0]


def predict_eps_from_x0(schedule: Schedule, x_t, t_idx, x0):
    return predict_x0_eps(schedule, x_t, t_idx, x0, Prediction.X0)[1]


def predict_x0_from_v(schedule: Schedule, x_t, t_idx, v):
    return predict_x0_eps(schedule, x_t, t_idx, v, Prediction.V)[0]


def predict_eps_from_v(schedule: Schedule, x_t, t_idx, v):
    return predict_x0_eps(schedule, x_t, t_idx, v, Prediction.V)[1]


def v_from_eps_x0(schedule: Schedule, x0, t_idx, eps):
    """v = sqrt(abar) eps - sqrt(1 - abar) x0, the v-prediction target for x_t = q_sample(x0, eps)."""
    alpha, sigma = _alpha_sigma(schedule, t_idx, x0)
    return alpha * eps - sigma * x0


def prediction_target(schedule: Schedule, x0, t_idx, eps, prediction: Prediction):
    """What a network of the given kind should output for x_t = q_sample(x0, t_idx, eps)."""
    prediction = as_prediction(prediction)
    if prediction is Prediction.EPS:
        return eps
    if prediction is Prediction.X0:
        return x0
    return v_from_eps_x0(schedule, x0, t_idx, eps)


def score_from_eps(schedule: Schedule, t_idx, eps):
    """grad_x log q(x_t) = -E[eps | x_t] / sqrt(1 - abar_t) (Tweedie; Song et al. 2021, Sec. 4.3)."""
    return -eps / extract(schedule.sqrt_one_minus_alphas_cumprod, t_idx, eps.shape, _dtype(eps))


def snr(schedule: Schedule, t_idx=None):
    """Signal-to-noise ratio abar / (1 - abar) of each step (or of the steps t_idx)."""
    abar = schedule.alphas_cumprod if t_idx is None else schedule.alphas_cumprod[np.asarray(t_idx)]
    return abar / (1.0 - abar)
