"""Shared helpers for the diffusion and sampler tests (independent of the code under test).

Linear response: with Gaussian data the exact denoiser is affine in x_t, so every sampler driven by it
is an affine map of its start x_T and of the standard normal draws z_k it makes:
x_0 = c + A x_T + sum_k B_k z_k. Running the sampler once on a batch whose rows are 0, the unit vectors
for x_T, and the unit vectors for each draw (served by ScriptedNoise) reads off c, A and every B_k, so
the exact mean and covariance of the sampler's output follow with no Monte Carlo error:
mean = c + A mu_T, cov = A S_T A^T + sum_k B_k B_k^T.
"""

import numpy as np


class ScriptedNoise:
    """Stands in for np.random.Generator: the k-th call to standard_normal returns zeros except a unit
    vector e_j in row 1 + d + k d + j, for j = 0..d-1."""

    def __init__(self, d: int, max_calls: int):
        self.d, self.max_calls, self.calls = d, max_calls, 0

    @property
    def rows(self) -> int:
        return 1 + self.d * (1 + self.max_calls)

    def standard_normal(self, shape, dtype=np.float64):
        assert shape[0] == self.rows and self.calls < self.max_calls, (shape, self.calls)
        z = np.zeros(shape, dtype=dtype).reshape(shape[0], -1)
        start = 1 + self.d * (1 + self.calls)
        z[start:start + self.d] = np.eye(self.d, dtype=dtype)
        self.calls += 1
        return z.reshape(shape)


def linear_response_moments(run, mean_T, cov_T, max_calls):
    """Exact (mean, cov) of run(x_T, rng) for x_T ~ N(mean_T, cov_T), run being affine in x_T and in its
    draws from rng (at most max_calls of them). Returns (mean (d,), cov (d, d), number of draws)."""
    d = len(mean_T)
    rng = ScriptedNoise(d, max_calls)
    x_T = np.zeros((rng.rows, d))
    x_T[1:1 + d] = np.eye(d)
    out = run(x_T, rng)
    mean, cov = rows_moments(out, mean_T, cov_T, rng.calls)
    # rows of draws never made must equal row 0
    assert np.allclose(out[1 + d * (1 + rng.calls):], out[0], atol=1e-12)
    return mean, cov, rng.calls


def rows_moments(out, mean_T, cov_T, calls):
    """(mean, cov) of any state that is affine in x_T and the draws, read off the rows of a batch run as
    in linear_response_moments (out (rows, d); an intermediate state works too: draws made after it
    leave their rows equal to row 0 and contribute nothing)."""
    d = len(mean_T)
    c = out[0]
    A = (out[1:1 + d] - c).T  # (d, d): column j is the response to x_T = e_j
    cov = A @ cov_T @ A.T
    for k in range(calls):
        start = 1 + d * (1 + k)
        B = (out[start:start + d] - c).T
        cov = cov + B @ B.T
    return c + A @ mean_T, cov


def draw_response(out, d, k):
    """(d, d) response of the state out (rows, d) to the k-th scripted draw."""
    start = 1 + d * (1 + k)
    return (out[start:start + d] - out[0]).T


def gaussian_flow_map(m, S, x, abar_from, abar_to):
    """The exact probability-flow ODE map for data N(m, S), from noise level abar_from to abar_to.

    In the eigenbasis of S the marginal variance is v_k(abar) = abar s_k + 1 - abar, the ODE is linear
    and diagonal, and (x - sqrt(abar) m)_k / sqrt(v_k) is constant along it (monotone transport).
    """
    w, Q = np.linalg.eigh(S)
    v_from, v_to = abar_from * w + 1 - abar_from, abar_to * w + 1 - abar_to
    z = (x - np.sqrt(abar_from) * m) @ Q
    return np.sqrt(abar_to) * m + (z * np.sqrt(v_to / v_from)) @ Q.T


def gaussian_posterior(m, S, abar):
    """(gain G, Cov[x0 | x_t]) for x_t = sqrt(abar) x0 + sqrt(1-abar) eps, x0 ~ N(m, S), by joint-Gaussian
    conditioning: E[x0 | x_t] = m + G (x_t - sqrt(abar) m)."""
    cross = np.sqrt(abar) * S  # Cov[x0, x_t]
    var_xt = abar * S + (1 - abar) * np.eye(len(m))
    G = cross @ np.linalg.inv(var_xt)
    return G, S - G @ cross.T


def mixture_moments(weights, means, covs):
    """Overall mean and covariance of a Gaussian mixture."""
    mean = sum(w * mu for w, mu in zip(weights, means))
    second = sum(w * (C + np.outer(mu, mu)) for w, mu, C in zip(weights, means, covs))
    return mean, second - np.outer(mean, mean)
