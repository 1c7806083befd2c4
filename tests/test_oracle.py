"""The exact denoiser, checked against Tweedie's formulas on scipy's densities (not on its own algebra)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

from npdiff.diffusion import (GaussianMixture, Prediction, Schedule, make_denoiser, model_variance,
                              posterior_mean_cov, predict_x0_eps, respace)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)

MIXTURE = dict(weights=np.array([0.3, 0.7]), means=np.array([[-1.0, 0.5], [0.8, -0.2]]),
               covs=np.array([[[0.1, 0.03], [0.03, 0.05]], [[0.2, -0.05], [-0.05, 0.1]]]))


def noised_log_density(mix, abar):
    """log p_t(x) of x_t = sqrt(abar) x0 + sqrt(1-abar) eps, built from scipy's multivariate normal."""
    comps = [stats.multivariate_normal(np.sqrt(abar) * m, abar * C + (1 - abar) * np.eye(len(m)))
             for m, C in zip(mix["means"], mix["covs"])]
    return lambda x: np.log(sum(w * c.pdf(x) for w, c in zip(mix["weights"], comps)))


def grad_hess(f, x, h):
    d = len(x)
    E = np.eye(d) * h
    g = np.array([(f(x + E[i]) - f(x - E[i])) / (2 * h) for i in range(d)])
    H = np.array([[(f(x + E[i] + E[j]) - f(x + E[i] - E[j]) - f(x - E[i] + E[j]) + f(x - E[i] - E[j])) / (4 * h * h)
                   for j in range(d)] for i in range(d)])
    return g, H


@SETTINGS
@given(abar=st.floats(0.02, 0.98), x=st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
       single=st.booleans())
def test_denoiser_obeys_tweedie_on_scipy_densities(abar, x, single):
    mix = {k: v[:1] for k, v in MIXTURE.items()} if single else MIXTURE
    if single:
        mix["weights"] = np.ones(1)
    data = GaussianMixture(**mix)
    x = np.array(x)
    g, H = grad_hess(noised_log_density(mix, abar), x, h=1e-4)
    # Tweedie (Efron 2011; Robbins 1956) for x_t = a x0 + s eps:
    #   E[x0 | x_t] = (x_t + s^2 grad log p_t) / a,   Cov[x0 | x_t] = s^2 (I + s^2 hess log p_t) / a^2
    s2 = 1 - abar
    mean = (x + s2 * g) / np.sqrt(abar)
    cov = s2 * (np.eye(2) + s2 * H) / abar
    got_mean, got_cov = posterior_mean_cov(data, x[None], abar)
    # Central differences with h = 1e-4 on a smooth log density: errors ~1e-8 (gradient) and ~1e-6 (Hessian)
    assert np.allclose(got_mean[0], mean, atol=1e-6)
    assert np.allclose(got_cov[0], cov, atol=2e-5)
    assert np.allclose(got_cov[0], got_cov[0].T) and np.all(np.linalg.eigvalsh(got_cov[0]) > 0)


def test_mixture_moments_and_sampling():
    data = GaussianMixture(**MIXTURE)
    rng = np.random.default_rng(0)
    n = 200_000
    x = data.sample(rng, n)
    mean, cov = x.mean(0), np.cov(x.T)
    # 5 standard errors of the sample mean and of each sample covariance entry
    assert np.all(np.abs(data.mean() - mean) < 5 * np.sqrt(np.diag(cov) / n))
    d = x - mean
    se = np.sqrt((d[:, :, None] * d[:, None, :]).var(0) / n)
    assert np.all(np.abs(data.cov() - cov) < 5 * se)
    lp = data.log_prob(x[:5])
    ref = np.log(sum(w * stats.multivariate_normal(m, C).pdf(x[:5]) for w, m, C in zip(*MIXTURE.values())))
    assert np.allclose(lp, ref, rtol=1e-12)


@pytest.mark.parametrize("prediction", list(Prediction))
def test_every_prediction_form_names_the_same_x0(prediction):
    sched = Schedule.from_name("cosine", 100)
    data = GaussianMixture(**MIXTURE)
    x = np.random.default_rng(1).standard_normal((6, 2))
    t = np.array([0, 10, 50, 50, 90, 99])
    out = make_denoiser(data, sched, prediction)(x, t)
    x0, _ = predict_x0_eps(sched, x, t, out, prediction)
    for i in range(6):
        assert np.allclose(x0[i], posterior_mean_cov(data, x[i:i + 1], sched.alphas_cumprod[t[i]])[0][0], atol=1e-9)


def test_learned_range_output_gives_the_exact_reverse_variance():
    base = Schedule.from_name("linear", 1000)
    sched = respace(base, [0, 250, 500, 999])
    data = GaussianMixture.gaussian([0.2, -0.1], np.diag([0.3, 2.0]))
    model = make_denoiser(data, sched, "eps", learned_range=True)
    x = np.random.default_rng(2).standard_normal((3, 2))
    for i in [1, 2, 3]:
        out = model(x, np.full(3, sched.timesteps[i]))
        assert out.shape == (3, 4)
        var, _ = model_variance(sched, i, "learned_range", out[:, 2:], x.shape)
        # beta~ + c^2 Cov[x0 | x_t]_jj with c = sqrt(abar_prev) beta / (1 - abar): law of total variance
        abar, abar_prev, beta = sched.alphas_cumprod[i], sched.alphas_cumprod_prev[i], sched.betas[i]
        c = np.sqrt(abar_prev) * beta / (1 - abar)
        s = np.array([0.3, 2.0])
        cov = s - abar * s**2 / (abar * s + 1 - abar)
        assert np.allclose(var, beta * (1 - abar_prev) / (1 - abar) + c**2 * cov, rtol=1e-12)
    with pytest.raises(ValueError, match="not steps"):
        model(x, np.full(3, 17))
