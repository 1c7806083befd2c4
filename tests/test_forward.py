"""The forward process, the posterior and the conversions between eps, x0, v and the score."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from npdiff.diffusion import (BETA_SCHEDULES, Prediction, Schedule, predict_eps_from_v, predict_eps_from_x0,
                              predict_x0_eps, predict_x0_from_eps, predict_x0_from_v, prediction_target,
                              q_mean_variance, q_posterior_mean_variance, q_sample, score_from_eps, snr,
                              v_from_eps_x0)

SETTINGS = settings(max_examples=50, deadline=None, derandomize=True)
finite = st.floats(-3, 3, allow_nan=False)


def schedules():
    return st.builds(Schedule.from_name, st.sampled_from(BETA_SCHEDULES), st.integers(25, 1000))


@pytest.mark.parametrize("t", [0, 300, 999])
def test_q_sample_empirical_moments(t):
    sched = Schedule.from_name("linear", 1000)
    rng = np.random.default_rng(0)
    n = 200_000
    x0 = np.array([0.7, -1.2, 0.0])
    noise = rng.standard_normal((n, 3))
    x_t = q_sample(sched, np.broadcast_to(x0, (n, 3)), np.full(n, t), noise)
    abar = sched.alphas_cumprod[t]
    var = 1 - abar
    # Tolerance: 5 standard errors of the sample mean (sqrt(var/n)) and of the sample variance
    # (var sqrt(2/n) for Gaussian data); a 5-sigma miss has probability below 1e-6 per entry.
    assert np.all(np.abs(x_t.mean(0) - np.sqrt(abar) * x0) < 5 * np.sqrt(var / n))
    assert np.all(np.abs(x_t.var(0) - var) < 5 * var * np.sqrt(2 / n))
    mean, variance, log_variance = q_mean_variance(sched, x0[None], t)
    assert np.allclose(mean, np.sqrt(abar) * x0) and variance == pytest.approx(var)
    assert log_variance == pytest.approx(np.log(var))


@SETTINGS
@given(sched=schedules())
def test_marginal_is_the_composition_of_one_step_kernels(sched):
    # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t): compose the kernels one step at a time.
    # The seed document's N(sqrt(1 - beta_t) x_0, beta_t) is the one-step kernel, not this marginal.
    coef, var = 1.0, 0.0
    coefs, variances = [], []
    for beta in sched.betas:
        coef, var = coef * np.sqrt(1 - beta), (1 - beta) * var + beta
        coefs.append(coef)
        variances.append(var)
    assert np.allclose(sched.sqrt_alphas_cumprod, coefs, rtol=1e-10)
    assert np.allclose(1 - sched.alphas_cumprod, variances, rtol=1e-10)


@SETTINGS
@given(sched=schedules(), data=st.data(), x0=arrays(np.float64, 4, elements=finite),
       x_t=arrays(np.float64, 4, elements=finite))
def test_posterior_is_the_bayes_product_of_two_gaussians(sched, data, x0, x_t):
    t = data.draw(st.integers(1, len(sched) - 1))
    beta, abar_prev = sched.betas[t], sched.alphas_cumprod[t - 1]
    # q(x_{t-1} | x_t, x_0) is proportional to q(x_t | x_{t-1}) q(x_{t-1} | x_0). As a function of x_{t-1}:
    # q(x_t | x_{t-1}) = N(x_t; sqrt(1-beta) x_{t-1}, beta) has precision (1-beta)/beta, mean x_t/sqrt(1-beta);
    # q(x_{t-1} | x_0) = N(sqrt(abar_prev) x_0, 1 - abar_prev). Precisions add; means are precision-weighted.
    prec1, mean1 = (1 - beta) / beta, x_t / np.sqrt(1 - beta)
    prec2, mean2 = 1 / (1 - abar_prev), np.sqrt(abar_prev) * x0
    var = 1 / (prec1 + prec2)
    mean = var * (prec1 * mean1 + prec2 * mean2)
    got_mean, got_var, got_log_var = q_posterior_mean_variance(sched, x0[None], x_t[None], t)
    # Two float64 routes to the same numbers: only round-off separates them (measured at most 5e-13 in
    # the mean, 3e-13 relative in the variance over 2000 draws); 1e-9 leaves room for that and still
    # sees a wrong coefficient or a 1e-7 relative slip in beta~.
    assert np.allclose(got_mean[0], mean, rtol=1e-9, atol=1e-9)
    assert got_var == pytest.approx(var, rel=1e-9)
    assert got_log_var == pytest.approx(np.log(var), rel=1e-9, abs=1e-9)


def test_posterior_at_the_first_step_is_the_data_point():
    sched = Schedule.from_name("cosine", 100)
    x0, x_t = np.array([[0.3, -0.4]]), np.array([[1.0, 2.0]])
    mean, var, _ = q_posterior_mean_variance(sched, x0, x_t, 0)
    assert np.allclose(mean, x0, atol=1e-15) and var == 0.0


@SETTINGS
@given(sched=schedules(), data=st.data(), x0=arrays(np.float64, (2, 3), elements=finite),
       eps=arrays(np.float64, (2, 3), elements=finite))
def test_conversions_round_trip(sched, data, x0, eps):
    t = np.array([data.draw(st.integers(0, len(sched) - 1)) for _ in range(2)])
    x_t = q_sample(sched, x0, t, eps)
    # Round-off is amplified by 1/alpha (up to 2e4 at the cosine's last step) or 1/sigma (up to 160 at the
    # first step): measured at most 4e-12 over 2000 draws including both ends, so 1e-7 is pure margin
    # for any formula error, which is O(1).
    tol = dict(rtol=1e-7, atol=1e-7)
    assert np.allclose(predict_x0_from_eps(sched, x_t, t, eps), x0, **tol)
    assert np.allclose(predict_eps_from_x0(sched, x_t, t, x0), eps, **tol)
    v = v_from_eps_x0(sched, x0, t, eps)
    assert np.allclose(predict_x0_from_v(sched, x_t, t, v), x0, **tol)
    assert np.allclose(predict_eps_from_v(sched, x_t, t, v), eps, **tol)
    for p in Prediction:
        got_x0, got_eps = predict_x0_eps(sched, x_t, t, prediction_target(sched, x0, t, eps, p), p)
        assert np.allclose(got_x0, x0, **tol) and np.allclose(got_eps, eps, **tol)


@SETTINGS
@given(sched=schedules(), data=st.data(), x0=arrays(np.float64, 3, elements=finite),
       eps=arrays(np.float64, 3, elements=finite))
def test_score_from_the_true_noise_is_the_gradient_of_log_q(sched, data, x0, eps):
    t = data.draw(st.integers(0, len(sched) - 1))
    abar = sched.alphas_cumprod[t]
    x_t = q_sample(sched, x0[None], t, eps[None])[0]

    def log_q(x):  # log N(x; sqrt(abar) x0, (1 - abar) I)
        return -0.5 * np.sum((x - np.sqrt(abar) * x0) ** 2) / (1 - abar)

    h = 1e-5 * np.sqrt(1 - abar)
    fd = np.array([(log_q(x_t + h * e) - log_q(x_t - h * e)) / (2 * h) for e in np.eye(3)])
    got = score_from_eps(sched, t, eps[None])[0]
    assert np.allclose(got, fd, rtol=1e-6, atol=1e-6 / np.sqrt(1 - abar))


def test_snr_and_zero_terminal_snr():
    sched = Schedule.from_name("scaled_linear", 1000)
    s = snr(sched)
    assert np.allclose(s, sched.alphas_cumprod / (1 - sched.alphas_cumprod)) and np.all(np.diff(s) < 0)
    zero = Schedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    assert snr(zero, 999) < 1e-24 and snr(zero, [0])[0] == pytest.approx(s[0], rel=1e-12)
    # at SNR 0 only v (or x0) determines x0: x0 = sqrt(abar) x_t - sqrt(1-abar) v = -v
    v = np.array([[0.5, -0.25]])
    assert np.allclose(predict_x0_from_v(zero, np.ones((1, 2)), 999, v), -v, atol=1e-12)


def test_float32_stays_float32():
    sched = Schedule.from_name("linear", 1000)
    x0 = np.ones((2, 3), np.float32)
    out = q_sample(sched, x0, np.array([1, 500]), np.ones((2, 3), np.float32))
    assert out.dtype == np.float32
    assert predict_x0_eps(sched, out, np.array([1, 500]), x0, Prediction.V)[0].dtype == np.float32
