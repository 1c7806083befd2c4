"""Euler, Heun and Euler-ancestral samplers on Karras sigmas (Karras et al. 2022, "Elucidating the
design space of diffusion-based generative models", Algorithms 1-2 and eq. 5).

Dimensions: N = batch, "..." = data dimensions.

These samplers work in the variance-exploding parametrization x = x_vp / alpha_t, where the noise level
is sigma_t = sqrt((1 - abar_t) / abar_t) and the probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma,
D being the x0 estimate. The network still sees the variance-preserving x_vp = x / sqrt(1 + sigma^2)
and the original timestep.

Noise levels: eq. 5's sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
rho = 7, between the sigmas of the first and last step of the schedule; then sigma_n = 0. Each sigma is
snapped to the trained timestep with the nearest log-sigma, and that timestep's own sigma is used in the
update: the noise level the network is told always equals the noise level of its input, at the price
of a grid that is Karras-shaped only to within the spacing of the trained sigmas. (Interpolating a
fractional timestep instead would hand the network a t it never saw in training.) Steps that snap to the
same timestep are merged, so at most len(schedule) steps are taken.
"""

from __future__ import annotations

import numpy as np

from ..diffusion.forward import Prediction, x0_eps_from_prediction
from ..diffusion.schedule import Schedule
from .common import call_model, check_start, make_process_x0

ABAR_FLOOR = 2.0**-24  # a zero-terminal-SNR schedule has abar = 0 (sigma = inf) at its last step; as in
# diffusers, that step gets this abar instead, so sigma_max is large (4096) but finite.


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """(n,) descending noise levels of eq. 5, from sigma_max to sigma_min (no trailing zero)."""
    if n == 1:
        return np.array([sigma_max], dtype=np.float64)
    ramp = np.linspace(0.0, 1.0, n)
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def base_sigmas(schedule: Schedule) -> np.ndarray:
    """(T0,) sigma_t = sqrt((1 - abar_t) / abar_t) of the base schedule, increasing with t."""
    abar = schedule.base_alphas_cumprod
    abar = np.where(abar > 0, abar, ABAR_FLOOR)  # only the SNR-0 step is moved
    return np.sqrt((1.0 - abar) / abar)


def karras_timesteps(schedule: Schedule, steps: int, rho: float = 7.0):
    """(sigmas (n,), timesteps (n,)) descending: the Karras grid over the schedule's range of steps,
    snapped to trained timesteps (n <= steps after merging duplicates)."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    sig = base_sigmas(schedule)
    t_lo, t_hi = int(schedule.timesteps[0]), int(schedule.timesteps[-1])
    wanted = karras_sigmas(sig[t_lo], sig[t_hi], steps, rho)  # (steps,)
    log_sig = np.log(sig[t_lo:t_hi + 1])  # increasing
    j = np.clip(np.searchsorted(log_sig, np.log(wanted)), 1, max(len(log_sig) - 1, 1))
    if len(log_sig) == 1:
        t = np.zeros(len(wanted), dtype=np.int64)
    else:
        nearer_left = np.log(wanted) - log_sig[j - 1] < log_sig[j] - np.log(wanted)
        t = np.where(nearer_left, j - 1, j)
    t = np.unique(t)[::-1] + t_lo  # descending original timesteps
    return sig[t], t.astype(np.int64)


def _denoise(model_fn, x, sigma: float, t: int, prediction, process):
    """D(x; sigma): the x0 estimate for the VE state x; also returns the network's input x_vp."""
    sigma = float(sigma)
    scale = 1.0 / np.sqrt(1.0 + sigma**2)  # alpha_t
    x_vp = (x * scale).astype(x.dtype, copy=False)
    pred, _ = call_model(model_fn, x_vp, t)
    x0, _ = x0_eps_from_prediction(x_vp, pred, scale, sigma * scale, prediction)
    if process is not None:
        x0 = process(x0)
    return x0.astype(x.dtype, copy=False), x_vp


def _karras_loop(model_fn, schedule, x_T, rng, steps, prediction, rho, callback, clip_x0, dynamic_threshold,
                 step_fn):
    x = check_start(x_T)
    sig, ts = karras_timesteps(schedule, steps, rho)
    sig = np.append(sig, 0.0)  # (n+1,)
    process = make_process_x0(clip_x0, dynamic_threshold)
    x = (x * np.sqrt(1.0 + sig[0] ** 2)).astype(x.dtype)  # x_T is variance-preserving: divide by alpha
    for k in range(len(ts)):
        denoised, x_vp = _denoise(model_fn, x, sig[k], ts[k], prediction, process)
        if callback is not None:
            callback(k, x_vp, denoised)
        redo = None
        if k + 1 < len(ts):  # for Heun's correction at the next level
            redo = lambda y, k=k: _denoise(model_fn, y, sig[k + 1], ts[k + 1], prediction, process)[0]  # noqa: E731
        x = step_fn(x, denoised, float(sig[k]), float(sig[k + 1]), redo, rng).astype(x.dtype, copy=False)
    return x


def euler_step(x, denoised, sigma, sigma_next, redo=None, rng=None):
    """Euler on dx/dsigma = (x - D) / sigma (Karras Algorithm 1 without the correction)."""
    d = (x - denoised) / sigma
    return x + (sigma_next - sigma) * d


def heun_step(x, denoised, sigma, sigma_next, redo=None, rng=None):
    """Heun's method (Karras Algorithm 1): Euler, then average the slopes at both ends. The last step,
    to sigma = 0, stays Euler (the slope there is undefined)."""
    d = (x - denoised) / sigma
    x_euler = x + (sigma_next - sigma) * d
    if sigma_next == 0 or redo is None:
        return x_euler
    d_next = (x_euler - redo(x_euler)) / sigma_next
    return x + (sigma_next - sigma) * 0.5 * (d + d_next)


def ancestral_sigmas(sigma, sigma_next, eta: float = 1.0):
    """Split the step sigma -> sigma_next into a deterministic step to sigma_down and fresh noise sigma_up,
    with sigma_down^2 + sigma_up^2 = sigma_next^2 and sigma_up^2 = eta^2 sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2
    (for eta = 1, the variance the DDPM posterior would add, written in VE form)."""
    up = min(sigma_next, eta * np.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    down = np.sqrt(sigma_next**2 - up**2)
    return float(down), float(up)


def sample_euler(model_fn, schedule: Schedule, x_T, rng: np.random.Generator, *, steps: int,
                 prediction=Prediction.EPS, rho: float = 7.0, callback=None, clip_x0: bool = False,
                 dynamic_threshold=None):
    """Euler on Karras sigmas, one network call per step. Deterministic (rng unused)."""
    return _karras_loop(model_fn, schedule, x_T, rng, steps, prediction, rho, callback, clip_x0,
                        dynamic_threshold, euler_step)


def sample_heun(model_fn, schedule: Schedule, x_T, rng: np.random.Generator, *, steps: int,
                prediction=Prediction.EPS, rho: float = 7.0, callback=None, clip_x0: bool = False,
                dynamic_threshold=None):
    """Heun on Karras sigmas: second order, two network calls per step but the last. Deterministic."""
    return _karras_loop(model_fn, schedule, x_T, rng, steps, prediction, rho, callback, clip_x0,
                        dynamic_threshold, heun_step)


def sample_euler_a(model_fn, schedule: Schedule, x_T, rng: np.random.Generator, *, steps: int,
                   prediction=Prediction.EPS, eta: float = 1.0, rho: float = 7.0, callback=None,
                   clip_x0: bool = False, dynamic_threshold=None):
    """Euler ancestral on Karras sigmas: an Euler step down to sigma_down, then fresh noise sigma_up."""

    def step(x, denoised, sigma, sigma_next, redo, rng):
        down, up = ancestral_sigmas(sigma, sigma_next, eta)
        x = x + (down - sigma) * (x - denoised) / sigma
        if up > 0:
            x = x + up * rng.standard_normal(x.shape, dtype=x.dtype)
        return x

    return _karras_loop(model_fn, schedule, x_T, rng, steps, prediction, rho, callback, clip_x0,
                        dynamic_threshold, step)
