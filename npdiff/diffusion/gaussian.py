"""Gaussian helpers for the variational bound: KL divergences, decoder likelihoods, bits per dimension.

Dimensions: N = batch, D = number of data dimensions per example (C*H*W), T = steps of the schedule.

The variational bound of a diffusion model (Ho et al. 2020, eq. 5; Sohl-Dickstein et al. 2015):

    L = L_T + sum_{t>1} L_{t-1} + L_0
    L_T     = KL(q(x_T | x_0) || N(0, I))                     (prior_bpd)
    L_{t-1} = KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t))   (vlb_term_bpd, t > 1)
    L_0     = -log p(x_0 | x_1)                               (vlb_term_bpd, t = 1)

All terms here are reported in bits per dimension: nats summed over D, divided by D log 2.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from .forward import Variance, q_mean_variance, q_posterior_mean_variance
from .reverse import p_mean_variance
from .schedule import Schedule

LOG2 = math.log(2.0)


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats:

    0.5 (logvar2 - logvar1 + exp(logvar1 - logvar2) + (mean1 - mean2)^2 exp(-logvar2) - 1)
    """
    return 0.5 * (logvar2 - logvar1 + np.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * np.exp(-logvar2) - 1.0)


def gaussian_log_likelihood(x, mean, log_variance):
    """log N(x; mean, exp(log_variance)), elementwise, for continuous data."""
    return -0.5 * (math.log(2.0 * math.pi) + log_variance + (x - mean) ** 2 * np.exp(-log_variance))


# ---- discretized decoder for 8-bit data --------------------------------------------------------------

HALF_BIN = 1.0 / 255.0  # pixel values k in 0..255 map to 2k/255 - 1; each owns [x - 1/255, x + 1/255]
LOG_PROB_FLOOR = 1e-12  # probabilities are floored here before the log, as in improved-diffusion


@njit(cache=True)
def _std_normal_pdf(z):
    return math.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)


@njit(cache=True)
def _discretized_kernel(x, mean, log_scale, logp, dlogp):  # all (M,) float64
    r2 = math.sqrt(2.0)
    for i in range(x.shape[0]):
        inv_s = math.exp(-log_scale[i])
        c = x[i] - mean[i]
        zp = (c + HALF_BIN) * inv_s  # upper bin edge, standardized
        zm = (c - HALF_BIN) * inv_s  # lower bin edge, standardized
        # P = Phi(zp) - Phi(zm), with the first and last bins open to -inf and +inf. Written with
        # erfc on the side of the tail the bin lies in, so no two numbers close to 1 are subtracted.
        # d/ds of z = (edge - mean) exp(-s) is -z, hence dP/ds below.
        if x[i] < -0.999:
            p = 0.5 * math.erfc(-zp / r2)
            dp = -zp * _std_normal_pdf(zp)
        elif x[i] > 0.999:
            p = 0.5 * math.erfc(zm / r2)
            dp = zm * _std_normal_pdf(zm)
        else:
            if zm > 0.0:
                p = 0.5 * (math.erfc(zm / r2) - math.erfc(zp / r2))
            elif zp < 0.0:
                p = 0.5 * (math.erfc(-zp / r2) - math.erfc(-zm / r2))
            else:
                p = 1.0 - 0.5 * math.erfc(zp / r2) - 0.5 * math.erfc(-zm / r2)
            dp = -zp * _std_normal_pdf(zp) + zm * _std_normal_pdf(zm)
        if p < LOG_PROB_FLOOR:
            logp[i] = math.log(LOG_PROB_FLOOR)
            dlogp[i] = 0.0  # the floor is constant in s
        else:
            logp[i] = math.log(p)
            dlogp[i] = dp / p


def discretized_gaussian_log_likelihood(x, mean, log_scale, return_grad: bool = False):
    """log P(x) for data quantized to 256 levels in [-1, 1] under N(mean, exp(log_scale)^2), elementwise
    (Ho et al. 2020, eq. 13). With return_grad, also d log P / d log_scale (used by the hybrid loss).
    """
    x, mean, log_scale = np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (x, mean, log_scale)))
    shape = x.shape
    flat = [np.ascontiguousarray(a).ravel() for a in (x, mean, log_scale)]
    logp = np.empty(flat[0].shape, dtype=np.float64)
    dlogp = np.empty_like(logp)
    _discretized_kernel(*flat, logp, dlogp)
    if return_grad:
        return logp.reshape(shape), dlogp.reshape(shape)
    return logp.reshape(shape)


# ---- bound terms --------------------------------------------------------------------------------------

def mean_flat_bits(nats):
    """(N, ...) nats -> (N,) bits per dimension."""
    return nats.reshape(nats.shape[0], -1).mean(axis=1) / LOG2


def prior_bpd(schedule: Schedule, x0):
    """L_T = KL(q(x_T | x_0) || N(0, I)) in bits per dimension, (N,). Nearly 0 for a good schedule."""
    t_last = np.full(x0.shape[0], len(schedule) - 1)
    mean, _, log_var = q_mean_variance(schedule, x0, t_last)
    return mean_flat_bits(normal_kl(mean, log_var, 0.0, 0.0))


def vlb_term_bpd(schedule: Schedule, x0, x_t, t_idx, model_mean, model_log_variance, decoder="discretized"):
    """L_{t-1} (t_idx > 0) or L_0 (t_idx == 0) per example, in bits per dimension, (N,).

    decoder: "discretized" for 8-bit images, "gaussian" for continuous data (a density, not a probability).
    """
    t_idx = np.broadcast_to(np.asarray(t_idx), (x0.shape[0],))
    true_mean, _, true_log_var = q_posterior_mean_variance(schedule, x0, x_t, t_idx)
    kl = mean_flat_bits(normal_kl(true_mean, true_log_var, model_mean, model_log_variance))
    if decoder == "discretized":
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
    elif decoder == "gaussian":
        nll = -gaussian_log_likelihood(x0, model_mean, model_log_variance)
    else:
        raise ValueError(f"unknown decoder {decoder!r}; expected 'discretized' or 'gaussian'")
    return np.where(t_idx == 0, mean_flat_bits(nll), kl)


def calc_bpd(schedule: Schedule, model_fn, x0, rng=None, *, prediction, variance=Variance.FIXED_SMALL,
             decoder="discretized", noise=None, process_x0=None):
    """The whole bound, term by term, for a batch x0 (N, ...), evaluating the model once per step.

    Each L_{t-1} is evaluated at one draw x_t ~ q(x_t | x_0): fresh noise from rng per step, or, when
    `noise` (x0's shape) is given, that same standardized noise at every step (useful for quadrature).
    Returns dict(total_bpd (N,), prior_bpd (N,), terms_bpd (N, T)).
    """
    if noise is None and rng is None:
        raise ValueError("calc_bpd needs either rng or noise")
    N, T = x0.shape[0], len(schedule)
    terms = np.zeros((N, T))  # (N, T)
    for i in range(T):
        t_idx = np.full(N, i, dtype=np.int64)
        eps = noise if noise is not None else rng.standard_normal(x0.shape)
        x_t = schedule.sqrt_alphas_cumprod[i] * x0 + schedule.sqrt_one_minus_alphas_cumprod[i] * eps
        out = model_fn(x_t, np.full(N, schedule.timesteps[i], dtype=np.int64))
        p = p_mean_variance(schedule, out, x_t, t_idx, prediction, variance, process_x0)
        terms[:, i] = vlb_term_bpd(schedule, x0, x_t, t_idx, p["mean"], p["log_variance"], decoder)
    prior = prior_bpd(schedule, x0)
    return dict(total_bpd=terms.sum(axis=1) + prior, prior_bpd=prior, terms_bpd=terms)
