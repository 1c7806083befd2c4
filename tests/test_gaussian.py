"""normal_kl, the discretized decoder, and the variational bound on Gaussian data."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from npdiff.diffusion import (GaussianMixture, Schedule, calc_bpd, discretized_gaussian_log_likelihood,
                              make_denoiser, normal_kl, prior_bpd)

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


@pytest.mark.parametrize("m1,v1,m2,v2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 2.0), (1.0, 0.01, 0.9, 0.02),
                                         (-2.0, 3.0, 0.0, 1.0)])
def test_normal_kl_matches_monte_carlo(m1, v1, m2, v2):
    rng = np.random.default_rng(1)
    n = 400_000
    x = m1 + np.sqrt(v1) * rng.standard_normal(n)
    log_ratio = stats.norm.logpdf(x, m1, np.sqrt(v1)) - stats.norm.logpdf(x, m2, np.sqrt(v2))
    mc, se = log_ratio.mean(), log_ratio.std() / np.sqrt(n)
    got = normal_kl(m1, np.log(v1), m2, np.log(v2))
    # Tolerance: 5 Monte Carlo standard errors (plus 1e-12 for the zero-variance case KL = 0 exactly).
    assert abs(got - mc) <= 5 * se + 1e-12
    assert got >= 0


@SETTINGS
@given(mean=st.floats(-1.5, 1.5), log_scale=st.floats(-6, 1))
def test_discretized_likelihood_is_a_distribution_over_256_levels(mean, log_scale):
    levels = np.arange(256) * 2 / 255 - 1
    logp = discretized_gaussian_log_likelihood(levels, mean, log_scale)
    # Probabilities floored at 1e-12 before the log can add at most 256e-12 to the total.
    assert abs(np.exp(logp).sum() - 1) < 1e-9
    assert np.all(logp <= 1e-15)


@SETTINGS
@given(mean=st.floats(-1.2, 1.2), log_scale=st.floats(-5, 0.5))
def test_discretized_likelihood_matches_scipy_bin_probabilities(mean, log_scale):
    levels = np.arange(256) * 2 / 255 - 1
    scale = np.exp(log_scale)
    upper = np.where(levels > 0.999, np.inf, levels + 1 / 255)
    lower = np.where(levels < -0.999, -np.inf, levels - 1 / 255)
    p = stats.norm.cdf(upper, mean, scale) - stats.norm.cdf(lower, mean, scale)
    got = np.exp(discretized_gaussian_log_likelihood(levels, mean, log_scale))
    big = p > 1e-6  # where scipy's own difference of CDFs is accurate to ~1e-10 relative
    assert np.allclose(got[big], p[big], rtol=1e-8)


@SETTINGS
@given(mean=st.floats(-1.2, 1.2), log_scale=st.floats(-5, 0.5), level=st.integers(0, 255))
def test_discretized_likelihood_gradient_wrt_log_scale(mean, log_scale, level):
    x = level * 2 / 255 - 1
    logp, grad = discretized_gaussian_log_likelihood(x, mean, log_scale, return_grad=True)
    if logp <= np.log(1e-12) + 1e-9:
        assert grad == 0.0  # floored: constant in log_scale
        return
    h = 1e-6
    fd = (discretized_gaussian_log_likelihood(x, mean, log_scale + h)
          - discretized_gaussian_log_likelihood(x, mean, log_scale - h)) / (2 * h)
    # central differences in float64: truncation O(h^2), cancellation ~1e-16 |logp| / h
    assert grad == pytest.approx(fd, rel=1e-6, abs=1e-7 * (1 + abs(logp)))


def test_prior_term_closed_form():
    sched = Schedule.from_name("linear", 100)
    x0 = np.array([[0.5, -1.0, 0.25]])
    abar = sched.alphas_cumprod[-1]
    kl = 0.5 * (abar * x0**2 + (1 - abar) - 1 - np.log(1 - abar))  # KL(N(a x0, 1-abar) || N(0, 1))
    assert prior_bpd(sched, x0)[0] == pytest.approx(kl.mean() / np.log(2), rel=1e-10)


# ---- the whole bound on Gaussian data ----------------------------------------------------------------

M = np.array([0.5, -0.3])
S = np.array([[0.3, 0.1], [0.1, 0.1]])


def cubature_points(m, S):
    """A degree-3 cubature rule for (x0, eps) ~ N(m, S) x N(0, I): the 2n points +-sqrt(n) e_i of the
    standard normal in n = 2d dimensions, equally weighted, integrate every polynomial of degree <= 3
    exactly. Every bound term below is quadratic in (x0, eps), so its expectation is exact."""
    d = len(m)
    n = 2 * d
    u = np.concatenate([np.eye(n), -np.eye(n)]) * np.sqrt(n)  # (2n, n)
    x0 = m + u[:, :d] @ np.linalg.cholesky(S).T
    return x0, u[:, d:]


def expected_vlb_nats(sched, m, S):
    """E[L] for data N(m, S) under the exact denoiser with variance beta_t, derived directly:
    with mu_theta = c1 E[x0 | x_t] + c2 x_t and mu~ = c1 x0 + c2 x_t,
    E KL(N(mu~, beta~) || N(mu_theta, beta)) = d/2 (log(beta/beta~) + beta~/beta - 1) + c1^2 tr C_t / (2 beta),
    C_t = Cov[x0 | x_t]; E[-log N(x0; E[x0 | x_1], beta_1)] = d/2 log(2 pi beta_1) + tr C_1 / (2 beta_1);
    E KL(q(x_T | x0) || N(0, I)) = (abar (|m|^2 + tr S) + d (1 - abar) - d - d log(1 - abar)) / 2."""
    d = len(m)
    total = 0.0
    for t in range(len(sched)):
        abar, beta = sched.alphas_cumprod[t], sched.betas[t]
        cross = np.sqrt(abar) * S
        C = S - cross @ np.linalg.inv(abar * S + (1 - abar) * np.eye(d)) @ cross.T
        if t == 0:
            total += 0.5 * d * np.log(2 * np.pi * beta) + np.trace(C) / (2 * beta)
        else:
            abar_prev = sched.alphas_cumprod[t - 1]
            post = beta * (1 - abar_prev) / (1 - abar)
            c1 = np.sqrt(abar_prev) * beta / (1 - abar)
            total += 0.5 * d * (np.log(beta / post) + post / beta - 1) + c1**2 * np.trace(C) / (2 * beta)
    abar = sched.alphas_cumprod[-1]
    total += 0.5 * (abar * (m @ m + np.trace(S)) + d * (1 - abar) - d - d * np.log(1 - abar))
    return total


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_vlb_upper_bounds_the_exact_nll_and_the_gap_shrinks_with_T(name):
    d = 2
    nll = 0.5 * np.log(np.linalg.det(2 * np.pi * np.e * S))  # exact E[-log p(x0)], the data's entropy
    data = GaussianMixture.gaussian(M, S)
    x0, eps = cubature_points(M, S)
    gaps = []
    for T in [50, 100, 200, 400]:
        sched = Schedule.from_name(name, T)
        model = make_denoiser(data, sched, "x0")
        # Variance beta_t (fixed large): the reverse process of the exact denoiser whose per-step
        # Gaussian approximation error vanishes as the steps shrink (with beta~ it does not at small t).
        res = calc_bpd(sched, model, x0, prediction="x0", variance="fixed_large", decoder="gaussian", noise=eps)
        vlb = res["total_bpd"].mean() * d * np.log(2)  # bits per dimension -> nats per example
        # The cubature evaluation equals the closed-form expectation derived independently above.
        assert vlb == pytest.approx(expected_vlb_nats(sched, M, S), rel=1e-10)
        assert vlb > nll
        gaps.append(vlb - nll)
    # The gap is O(1/T): each doubling of T halves it (measured 0.119, 0.060, 0.030, 0.015 nats for
    # linear). Tolerance: ratio within [0.45, 0.55].
    ratios = np.array(gaps[1:]) / np.array(gaps[:-1])
    assert np.all((ratios > 0.45) & (ratios < 0.55)), (gaps, ratios)
    assert gaps[-1] < 0.02


def test_bits_per_dim_of_8bit_data_approaches_its_exact_discrete_nll():
    # 8-bit data: N(0, 0.1 I) quantized to 256 levels (4 independent dimensions). Its exact code length
    # -log2 P(x0) per dimension comes from scipy's normal CDF over each bin. The bound with the exact
    # denoiser, variance beta_t and the discretized decoder must be close above it; with beta~ the
    # decoder and the small-t steps are too narrow and the bound is visibly loose.
    rng = np.random.default_rng(0)
    sched = Schedule.from_name("cosine", 200)
    sd = np.sqrt(0.1)
    data = GaussianMixture.gaussian(np.zeros(4), sd**2 * np.eye(4))
    x0 = np.round((np.clip(data.sample(rng, 512), -1, 1) + 1) * 127.5) / 127.5 - 1  # (512, 4)
    upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
    lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
    nll = -np.log2(stats.norm.cdf(upper, 0, sd) - stats.norm.cdf(lower, 0, sd)).mean(axis=1)  # (512,)
    model = make_denoiser(data, sched, "eps")
    gaps = {}
    for variance in ["fixed_large", "fixed_small"]:
        res = calc_bpd(sched, model, x0, rng, prediction="eps", variance=variance)
        assert np.all(np.isfinite(res["total_bpd"])) and np.all(res["terms_bpd"][:, 0] >= 0)
        gap = res["total_bpd"] - nll
        gaps[variance] = (gap.mean(), gap.std() / np.sqrt(len(gap)))
    # Tolerance: each total is a one-draw Monte Carlo estimate per step; 4 standard errors of the mean
    # gap (about 0.03 bits each) either side, plus 0.05 bits of true gap allowed for beta_t at T = 200.
    mean, se = gaps["fixed_large"]
    assert -4 * se < mean < 4 * se + 0.05, gaps
    mean_small, se_small = gaps["fixed_small"]
    assert mean_small - 4 * se_small > 0.3, gaps
