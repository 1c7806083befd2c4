"""Training objectives, each returning the loss and its gradient with respect to the network output.

Dimensions: N = batch, C = data channels, D = number of data dimensions per example (C*H*W).

There is no autograd in npdiff: the training loop hands the gradient returned here to the network's
backward pass. Every gradient is written next to the forward line it differentiates.

Objectives (per example, mean over the D dimensions):
    eps: ||eps_hat - eps||^2     x0: ||x0_hat - x0||^2     v: ||v_hat - v||^2
For the same underlying x0 estimate these differ only by a factor that depends on t:
    ||eps_hat - eps||^2 = snr ||x0_hat - x0||^2,   ||v_hat - v||^2 = (snr + 1) ||x0_hat - x0||^2,
which is why min-SNR-gamma (Hang et al. 2023, "Efficient diffusion training via min-SNR weighting
strategy") takes a different form per objective so that all three weight the x0 error by min(snr, gamma).

That weight goes to zero with the snr: the noisiest steps, where a sampler's first steps decide the
layout of the image (where the object goes, what color the background is), would hardly be trained
(at t = 900 of the cosine schedule the v weight is 0.024, at t = 990 it is 0.0002). A floor keeps
them: the x0 error is weighted by clip(snr, floor, gamma); with floor 1 the noisy end is the
"truncated SNR" weighting max(snr, 1) of Salimans & Ho 2022 ("Progressive distillation for fast
sampling of diffusion models", Sec. 4), the rest is min-SNR-gamma. (The eps objective cannot take a
floor: its weight in x0 terms is snr, so keeping the x0 error at snr -> 0 needs a weight of 1 / snr.)

A floor weights every part of the error alike, the fine detail that no network can guess from pure
noise included. Multiscale weighting (multiscale=True) instead gives each spatial scale of the error
the SNR of that scale. Split the error e of an image into the bands of a Haar pyramid,

    e = (e - P_2 e) + (P_2 e - P_4 e) + ... + (P_B e - P_HW e) + P_HW e,

with P_b e the mean of e over each b x b block (repeated back over the block) and P_HW e its mean over
the whole image. The bands are orthogonal, so ||e||^2 is the sum of their squared norms. A mean over
b x b pixels has 1/b^2 of the noise variance and, on a flat patch, all of the signal: the band that
starts at block size b sees the image at b^2 snr, the image mean (the background color) at H W snr.
Each band's x0 error is weighted by min(b^2 snr, gamma) (clip with a floor), so at t = 950 of the
cosine schedule, where the per-pixel weight is 0.006, the band of 16 x 16 blocks (where the object
sits) counts 1.5 and the image mean 5, while fine detail keeps its min-SNR weight. With every band
weighted min(snr, gamma) this is the plain min-SNR loss. That average pooling by b raises the snr
by b^2 is the observation behind the shifted schedules of Hoogeboom et al. 2023 ("simple diffusion",
Sec. 3), which also add losses on downsampled images (their multiscale loss, Sec. 3.3); here the
bands partition the one error, so each part of it is counted once, at the weight its snr calls for.
"""

from __future__ import annotations

import numpy as np

from .forward import (Prediction, Variance, as_prediction, as_variance, extract, prediction_target, q_sample,
                      snr as snr_of)
from .gaussian import LOG2, discretized_gaussian_log_likelihood, vlb_term_bpd
from .reverse import p_mean_variance, split_model_output
from .schedule import Schedule


def _per_example(values, ndim):
    """(N,) -> (N, 1, 1, ...) to broadcast against an ndim-dimensional batch."""
    return values.reshape(values.shape + (1,) * (ndim - 1))


def min_snr_weight(snr, gamma: float, prediction, floor: float | None = None, factor: float = 1.0) -> np.ndarray:
    """The per-example loss weight of min-SNR-gamma for a given objective.

    eps: min(snr, gamma) / snr   (1 where snr <= gamma, which is also its limit at snr = 0)
    x0:  min(snr, gamma)
    v:   min(snr, gamma) / (snr + 1)
    With a floor (x0 and v only), min(snr, gamma) becomes clip(snr, floor, gamma). With a factor
    (a band of the multiscale loss, which sees factor * snr), min(snr, gamma) becomes
    min(factor * snr, gamma), still on an error of the objective's own kind.
    """
    snr = np.asarray(snr, dtype=np.float64)
    prediction = as_prediction(prediction)
    if floor is not None and not 0.0 <= floor <= gamma:
        raise ValueError(f"the SNR floor must lie in [0, gamma={gamma}], got {floor}")
    if floor and prediction is Prediction.EPS:
        raise ValueError("the eps objective cannot take an SNR floor (its weight would be 1/snr); "
                         "use x0 or v prediction, or no floor")
    clipped = np.clip(factor * snr, floor or 0.0, gamma)
    if prediction is Prediction.EPS:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(factor * snr > gamma, gamma / snr, factor)
    if prediction is Prediction.X0:
        return clipped
    return clipped / (snr + 1.0)


def haar_bands(e: np.ndarray) -> list[tuple[float, np.ndarray]]:
    """(N, C, H, W) -> [(factor, band)]: the orthogonal bands of a Haar pyramid (see the module
    docstring), finest first, each with the factor by which it sees the snr (b^2, and H W for the
    image mean). The bands sum to e. Block sizes double while they divide H and W."""
    N, C, H, W = e.shape
    levels, b = [(1.0, e)], 2
    while H % b == 0 and W % b == 0 and b < max(H, W):
        m = e.reshape(N, C, H // b, b, W // b, b).mean(axis=(3, 5), keepdims=True)
        levels.append((float(b * b), np.broadcast_to(m, (N, C, H // b, b, W // b, b)).reshape(e.shape)))
        b *= 2
    levels.append((float(H * W), np.broadcast_to(e.mean(axis=(2, 3), keepdims=True), e.shape)))
    bands = [(f, p - q) for (f, p), (_, q) in zip(levels, levels[1:])]
    return bands + [levels[-1]]


def training_loss(schedule: Schedule, model_output, x0, noise, t_idx, prediction, min_snr_gamma=None,
                  snr_floor=None, multiscale: bool = False, variance=Variance.FIXED_SMALL,
                  vlb_weight: float = 0.001, x_t=None, return_terms: bool = False):
    """(loss, d loss / d model_output) for one batch.

    model_output (N, C, ...) or, with variance=LEARNED_RANGE, (N, 2C, ...): prediction, then improved
    DDPM's v. x0, noise (N, C, ...) and t_idx (N,) indices into `schedule` are what produced
    x_t = q_sample(schedule, x0, t_idx, noise) (recomputed when not given).

    L = mean_n w_n mse_n                                   (L_simple, Ho et al. 2020 eq. 14)
      + vlb_weight * T * mean_n L_vlb,n    if learned       (L_hybrid, Nichol & Dhariwal 2021 Sec. 3.1)
    where w_n is the min-SNR weight (1 without it; snr_floor as in min_snr_weight) and L_vlb,n the
    bound term of example n at its t, in bits per dimension. T * L_t is the one-sample estimate of the
    whole bound sum_t L_t for uniform t; with vlb_weight = 0.001 this equals improved-diffusion's
    L_simple + L_vb * T / 1000. The bound term sees the mean through a stop-gradient, so it trains
    only the variance (as in the paper).
    multiscale (images, with min_snr_gamma): w_n mse_n becomes sum_k w_nk ||band_k||^2 / D over the
    bands of haar_bands(pred - target), band k weighted with its own snr (module docstring).
    """
    prediction, variance = as_prediction(prediction), as_variance(variance)
    t_idx = np.broadcast_to(np.asarray(t_idx, dtype=np.int64), (x0.shape[0],))
    if x_t is None:
        x_t = q_sample(schedule, x0, t_idx, noise)
    pred, var_values = split_model_output(model_output, x_t)
    if var_values is not None and variance is not Variance.LEARNED_RANGE:
        raise ValueError("the model outputs variance channels; train it with variance=LEARNED_RANGE")
    N = x0.shape[0]
    D = int(np.prod(x0.shape[1:]))

    # L_simple
    target = prediction_target(schedule, x0, t_idx, noise, prediction)
    diff = pred.astype(np.float64) - target  # (N, C, ...)
    mse = (diff**2).reshape(N, -1).mean(axis=1)  # (N,)
    if min_snr_gamma is None and (snr_floor or multiscale):
        raise ValueError(f"{'an SNR floor' if snr_floor else 'multiscale weighting'} needs min_snr_gamma")
    if multiscale and diff.ndim != 4:
        raise ValueError(f"multiscale weighting needs images (N, C, H, W), got shape {diff.shape}")
    s = snr_of(schedule, t_idx)

    def weight(factor):                                                  # (N,)
        if min_snr_gamma is None:
            return np.ones(N)
        return min_snr_weight(s, min_snr_gamma, prediction, snr_floor, factor)

    # mean_n sum_k w_nk (1/D) ||band_k||^2; without multiscale the one band is diff itself (factor 1).
    # The bands are orthogonal projections of diff, so d ||band||^2 / d diff = 2 band.
    w = weight(1.0)
    weighted, d_pred = np.zeros(N), np.zeros_like(diff)
    for factor, band in haar_bands(diff) if multiscale else [(1.0, diff)]:
        wk = w if factor == 1.0 else weight(factor)
        weighted += wk * (band**2).reshape(N, -1).mean(axis=1)
        d_pred += _per_example(wk, diff.ndim) * 2.0 * band / (N * D)
    loss_simple = float(np.mean(weighted))
    terms = dict(mse=mse, weight=w, loss_simple=loss_simple)

    if variance is not Variance.LEARNED_RANGE:
        loss, grad = loss_simple, d_pred
    else:
        if var_values is None:
            raise ValueError("variance=LEARNED_RANGE needs a model output with twice the data channels")
        # The bound term with the mean frozen (stop-gradient): only log Sigma depends on var_values.
        p = p_mean_variance(schedule, model_output, x_t, t_idx, prediction, variance)
        mean, log_var = p["mean"], p["log_variance"]
        vlb = vlb_term_bpd(schedule, x0, x_t, t_idx, mean, log_var, decoder="discretized")  # (N,)
        scale = vlb_weight * len(schedule)
        loss = loss_simple + scale * float(np.mean(vlb))
        # t > 0: KL = 0.5 (lv - lv~ + exp(lv~ - lv) + (mu~ - mu)^2 exp(-lv) - 1) per dimension
        #   d KL / d lv = 0.5 (1 - (beta~ + (mu~ - mu)^2) exp(-lv))
        true_mean = (extract(schedule.posterior_mean_coef1, t_idx, x0.shape) * x0
                     + extract(schedule.posterior_mean_coef2, t_idx, x0.shape) * x_t)
        true_var = extract(schedule.posterior_variance, t_idx, x0.shape)
        d_kl = 0.5 * (1.0 - (true_var + (true_mean - mean) ** 2) * np.exp(-log_var))
        # t = 0: -log P(x0; mu, log_scale = lv / 2), so d/d lv = -0.5 d log P / d log_scale
        _, dlogp = discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var, return_grad=True)
        d_nll = -0.5 * dlogp
        first = _per_example(t_idx == 0, x0.ndim)
        d_lv = np.where(first, d_nll, d_kl)
        # lv = f log beta + (1 - f) log beta~_clipped, f = (v + 1) / 2  =>  d lv / d v = (log beta - log beta~) / 2
        d_v = 0.5 * (extract(schedule.log_betas, t_idx, x0.shape)
                     - extract(schedule.posterior_log_variance_clipped, t_idx, x0.shape))
        # mean_n of (1 / (D log 2)) sum_j term_nj, times scale
        d_var = scale * d_lv * d_v / (N * D * LOG2)
        grad = np.concatenate([d_pred, d_var], axis=1)
        terms.update(vlb_bpd=vlb, loss_vlb=loss - loss_simple)
    grad = grad.astype(np.asarray(model_output).dtype, copy=False)
    if return_terms:
        return loss, grad, terms
    return loss, grad
