"""Exact denoisers for Gaussian and Gaussian-mixture data: the perfect network, in closed form.

Dimensions: N = batch, d = data dimension (an (N, C, H, W) batch is flattened to d = C*H*W),
K = mixture components.

If x_0 ~ N(m, S) and x_t = a x_0 + s eps with a = sqrt(abar), s = sqrt(1 - abar), then (x_0, x_t) is
jointly Gaussian and conditioning gives (Bishop, PRML eq. 2.81-2.82):

    x_t ~ N(a m, M),  M = abar S + (1 - abar) I
    E[x_0 | x_t]   = m + a S M^{-1} (x_t - a m)
    Cov[x_0 | x_t] = S - abar S M^{-1} S

For a mixture sum_k w_k N(m_k, S_k), x_t is the mixture of the components' marginals; each component
answers as above and is weighted by its responsibility r_k(x_t) = P(k | x_t), and
Cov[x_0 | x_t] = sum_k r_k (C_k + mu_k mu_k^T) - mu mu^T (law of total covariance).

A sampler driven by this denoiser needs no trained network, and its samples must reproduce the data's
moments: that is how every sampler in npdiff is tested. Tweedie's formula ties the denoiser to the
score of the noised data, E[x_0 | x_t] = (x_t + (1 - abar) grad log p_t(x_t)) / a, which the tests use
to check this module independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .forward import Prediction, as_prediction
from .schedule import Schedule


@dataclass(frozen=True, eq=False)
class GaussianMixture:
    """sum_k weights[k] N(means[k], covs[k]); a single Gaussian is the case K = 1."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K, d)
    covs: np.ndarray  # (K, d, d)

    def __post_init__(self):
        w = np.atleast_1d(np.asarray(self.weights, dtype=np.float64))
        m = np.atleast_2d(np.asarray(self.means, dtype=np.float64))
        c = np.asarray(self.covs, dtype=np.float64)
        c = c[None] if c.ndim == 2 else c
        K, d = m.shape
        if w.shape != (K,) or c.shape != (K, d, d):
            raise ValueError(f"mixture shapes disagree: weights {w.shape}, means {m.shape}, covs {c.shape}")
        if np.any(w <= 0) or abs(w.sum() - 1.0) > 1e-12:
            raise ValueError(f"weights must be positive and sum to 1, got {w}")
        if not np.allclose(c, np.swapaxes(c, 1, 2)) or np.any(np.linalg.eigvalsh(c) <= 0):
            raise ValueError("each covariance must be symmetric positive definite")
        object.__setattr__(self, "weights", w)
        object.__setattr__(self, "means", m)
        object.__setattr__(self, "covs", c)

    @classmethod
    def gaussian(cls, mean, cov) -> "GaussianMixture":
        mean = np.atleast_1d(np.asarray(mean, dtype=np.float64))
        return cls(np.ones(1), mean[None], np.asarray(cov, dtype=np.float64)[None])

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def mean(self) -> np.ndarray:
        """(d,) overall mean."""
        return self.weights @ self.means

    def cov(self) -> np.ndarray:
        """(d, d) overall covariance (law of total covariance)."""
        mu = self.mean()
        second = np.einsum("k,kij->ij", self.weights, self.covs + np.einsum("ki,kj->kij", self.means, self.means))
        return second - np.outer(mu, mu)

    def noised(self, abar: float) -> "GaussianMixture":
        """The distribution of x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
        eye = np.eye(self.dim)
        return GaussianMixture(self.weights, np.sqrt(abar) * self.means, abar * self.covs + (1.0 - abar) * eye)

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """(n, d) independent draws."""
        k = rng.choice(len(self.weights), size=n, p=self.weights)  # (n,)
        z = rng.standard_normal((n, self.dim))  # (n, d)
        chol = np.linalg.cholesky(self.covs)  # (K, d, d)
        return self.means[k] + np.einsum("nij,nj->ni", chol[k], z)

    def log_prob(self, x: np.ndarray) -> np.ndarray:
        """(N,) log density at x (N, d)."""
        return _logsumexp(_component_log_probs(self, np.asarray(x, dtype=np.float64)))


def _logsumexp(a):  # (N, K) -> (N,)
    top = a.max(axis=1)
    return top + np.log(np.exp(a - top[:, None]).sum(axis=1))


def _component_log_probs(mix: GaussianMixture, x):
    """(N, K) log w_k + log N(x; m_k, S_k)."""
    d = mix.dim
    chol = np.linalg.cholesky(mix.covs)  # (K, d, d)
    chol_inv = np.linalg.inv(chol)  # (K, d, d), small: invert once, then one matrix product per component
    log_det = 2.0 * np.log(np.diagonal(chol, axis1=1, axis2=2)).sum(axis=1)  # (K,)
    out = np.empty((x.shape[0], len(mix.weights)))  # (N, K)
    for k in range(len(mix.weights)):
        z = (x - mix.means[k]) @ chol_inv[k].T  # (N, d), L^{-1}(x - m)
        out[:, k] = np.log(mix.weights[k]) - 0.5 * ((z**2).sum(axis=1) + log_det[k] + d * np.log(2.0 * np.pi))
    return out


def posterior_mean_cov(data: GaussianMixture, x_t: np.ndarray, abar: float, want_cov: bool = True):
    """E[x_0 | x_t] (N, d) and, if asked, Cov[x_0 | x_t] (N, d, d) for x_t (N, d) at noise level abar."""
    x_t = np.asarray(x_t, dtype=np.float64)
    a = np.sqrt(abar)
    eye = np.eye(data.dim)
    M = abar * data.covs + (1.0 - abar) * eye  # (K, d, d), covariance of x_t given component k
    # gain G_k = a S_k M_k^{-1}; with S_k and M_k symmetric, G_k^T = M_k^{-1} (a S_k) is one solve.
    G = np.swapaxes(np.linalg.solve(M, a * data.covs), 1, 2)  # (K, d, d)
    mu_k = np.stack([data.means[k] + (x_t - a * data.means[k]) @ G[k].T for k in range(len(G))], axis=1)  # (N, K, d)
    if len(data.weights) == 1:
        r = np.ones((x_t.shape[0], 1))
    else:
        lp = _component_log_probs(data.noised(abar), x_t)  # (N, K)
        r = np.exp(lp - _logsumexp(lp)[:, None])  # (N, K) responsibilities
    mu = np.einsum("nk,nki->ni", r, mu_k)
    if not want_cov:
        return mu, None
    C_k = data.covs - a * np.einsum("kij,kjl->kil", G, data.covs)  # (K, d, d), S - abar S M^{-1} S
    second = np.einsum("nk,nkij->nij", r, C_k[None] + np.einsum("nki,nkj->nkij", mu_k, mu_k))
    return mu, second - np.einsum("ni,nj->nij", mu, mu)


def make_denoiser(data: GaussianMixture, schedule: Schedule, prediction=Prediction.X0, learned_range: bool = False):
    """A model_fn(x, t) computing the exact prediction for data, t being original 0-based timesteps.

    The noise level of t is read from `schedule` (t must be one of schedule.timesteps). With
    learned_range, the output has twice the channels: the second half is improved DDPM's v chosen so
    that the reverse step of *this* schedule has the exact variance beta~_t + c_t^2 Cov[x_0 | x_t]_jj,
    c_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t): exact when Cov[x_0 | x_t] is diagonal, which holds
    for a single Gaussian with diagonal covariance.
    """
    prediction = as_prediction(prediction)
    timesteps = schedule.timesteps

    def model_fn(x, t):
        shape = x.shape
        flat = np.asarray(x, dtype=np.float64).reshape(shape[0], -1)  # (N, d)
        t = np.broadcast_to(np.asarray(t), (shape[0],))
        idx = np.searchsorted(timesteps, t)
        if np.any(idx >= len(timesteps)) or np.any(timesteps[np.minimum(idx, len(timesteps) - 1)] != t):
            raise ValueError(f"timesteps {np.unique(t)} are not steps of the denoiser's schedule")
        pred = np.empty_like(flat)
        var_v = np.empty_like(flat) if learned_range else None
        for i in np.unique(idx):  # usually one step for the whole batch
            rows = idx == i
            abar = schedule.alphas_cumprod[i]
            x0, cov = posterior_mean_cov(data, flat[rows], abar, want_cov=learned_range)
            a, s = np.sqrt(abar), np.sqrt(1.0 - abar)
            if prediction is Prediction.X0:
                pred[rows] = x0
            elif prediction is Prediction.EPS:
                pred[rows] = (flat[rows] - a * x0) / s
            else:
                eps = (flat[rows] - a * x0) / s
                pred[rows] = a * eps - s * x0
            if learned_range:
                c = schedule.posterior_mean_coef1[i]
                exact = schedule.posterior_variance[i] + c**2 * np.diagonal(cov, axis1=1, axis2=2)  # (n, d)
                lo, hi = schedule.posterior_log_variance_clipped[i], schedule.log_betas[i]
                var_v[rows] = 2.0 * (np.log(exact) - lo) / (hi - lo) - 1.0
        out = pred.reshape(shape).astype(x.dtype, copy=False)
        if learned_range:
            out = np.concatenate([out, var_v.reshape(shape).astype(x.dtype, copy=False)], axis=1)
        return out

    return model_fn
