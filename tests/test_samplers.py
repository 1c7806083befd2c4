"""Every sampler, driven by the exact denoiser, must reproduce the data's mean and covariance."""

import numpy as np
import pytest
from diffusion_testlib import (ScriptedNoise, draw_response, gaussian_posterior, linear_response_moments,
                               mixture_moments)
from hypothesis import given, settings, strategies as st

from npdiff.diffusion import BETA_SCHEDULES, GaussianMixture, Schedule, make_denoiser, respace, space_timesteps
from npdiff.samplers import (SAMPLERS, ddim_sigma, ddim_step, dynamic_threshold, karras_timesteps, sample,
                             sample_ddim, sample_ddpm, sample_dpmpp_2m, sample_euler, sample_euler_a)

BASE = Schedule.from_name("linear", 1000)
M = np.array([0.5, -0.3])
S = np.array([[0.3, 0.1], [0.1, 0.1]])  # eigenvalues 0.05 and 0.35: a correlated, anisotropic Gaussian
GAUSS = GaussianMixture.gaussian(M, S)
MIX = dict(weights=np.array([0.3, 0.7]), means=np.array([[-1.0, 0.5], [0.8, -0.2]]),
           covs=np.array([[[0.1, 0.03], [0.03, 0.05]], [[0.2, -0.05], [-0.05, 0.1]]]))
ABAR_T = BASE.alphas_cumprod[-1]


def q_T(mean, cov, abar):
    """Mean and covariance of the exact q(x_T) for data with the given moments."""
    return np.sqrt(abar) * mean, abar * cov + (1 - abar) * np.eye(len(mean))


def moment_error(mean, cov, true_mean, true_cov):
    return max(np.abs(mean - true_mean).max(), np.abs(cov - true_cov).max())


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_gaussian_moments_exactly_computed_tighten_with_steps(name, prediction):
    # Moments of the sampler's output computed exactly by linear response (tests/diffusion_testlib.py):
    # no Monte Carlo error, only discretization error is left. Tolerance 5/n in the largest entry error
    # of mean and covariance (measured n * error at most 3.7, for DDPM and Euler-ancestral, which are
    # first order in the step with the largest error constant), and the error must fall at every doubling.
    model = make_denoiser(GAUSS, BASE, prediction)
    mean_T, cov_T = q_T(M, S, ABAR_T)
    errors = []
    for n in [10, 20, 40, 80, 160]:
        run = lambda x, rng: sample(name, model, BASE, x, rng, n, prediction=prediction)  # noqa: E731
        mean, cov, _ = linear_response_moments(run, mean_T, cov_T, max_calls=n)
        errors.append(moment_error(mean, cov, M, S))
        assert errors[-1] < 5.0 / n, (n, errors)
    assert np.all(np.diff(errors) < 0), errors


def test_ddpm_with_fixed_large_variance_reproduces_gaussian_moments():
    # The test above runs DDPM with its default variance (beta~) and the one below with the exact
    # learned-range variance; the third choice, beta_t, must also converge. Same tolerance, 5/n
    # (measured n * error 1.04, 0.92, 0.86, 0.83, 0.81 at n = 10 .. 160), falling at every doubling.
    model = make_denoiser(GAUSS, BASE, "eps")
    mean_T, cov_T = q_T(M, S, ABAR_T)
    errors = []
    for n in [10, 20, 40, 80, 160]:
        run = lambda x, rng: sample_ddpm(model, BASE, x, rng, steps=n, variance="fixed_large")  # noqa: E731
        mean, cov, _ = linear_response_moments(run, mean_T, cov_T, max_calls=n)
        errors.append(moment_error(mean, cov, M, S))
        assert errors[-1] < 5.0 / n, (n, errors)
    assert np.all(np.diff(errors) < 0), errors


@pytest.mark.parametrize("steps,spacing", [(2, "linspace"), (5, "linspace"), (1000, "linspace"), (5, "trailing"),
                                           (7, "leading")])
def test_ancestral_sampler_with_the_exact_reverse_variance_is_exact_at_any_step_count(steps, spacing):
    # Diagonal data covariance: Cov[x0 | x_t] is diagonal, so a learned-range output can carry the exact
    # reverse variance beta~ + c^2 Cov[x0|x_t]_jj of the respaced chain (law of total covariance). Started
    # from the exact q(x_T) at the first sampled step, every x_t is then exactly distributed, and the
    # output (the last mean, no noise added at the last step) is E[x0 | x_{t_0}] with covariance
    # S - Cov[x0 | x_{t_0}] -- exact, at 2 steps as at 1000. Tolerance 1e-9: round-off only.
    m, s = np.array([0.4, -0.2]), np.diag([0.3, 2.0])
    data = GaussianMixture.gaussian(m, s)
    sched = respace(BASE, space_timesteps(1000, steps, spacing))  # the chain the sampler will walk
    model = make_denoiser(data, sched, "eps", learned_range=True)
    mean_T, cov_T = q_T(m, s, sched.alphas_cumprod[-1])
    run = lambda x, rng: sample_ddpm(model, BASE, x, rng, steps=steps, variance="learned_range",  # noqa: E731
                                     spacing=spacing)
    mean, cov, draws = linear_response_moments(run, mean_T, cov_T, max_calls=steps)
    assert draws == steps - 1
    _, post_cov = gaussian_posterior(m, s, sched.alphas_cumprod[0])
    assert moment_error(mean, cov, m, s - post_cov) < 1e-9
    # The same chain with a fixed variance is not exact at few steps: the check can fail.
    if steps <= 7:
        for variance in ["fixed_small", "fixed_large"]:
            run = lambda x, rng: sample_ddpm(model, BASE, x, rng, steps=steps, variance=variance,  # noqa: E731
                                             spacing=spacing)
            mean, cov, _ = linear_response_moments(run, mean_T, cov_T, max_calls=steps)
            assert moment_error(mean, cov, m, s - post_cov) > 0.05


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_mixture_moments_by_monte_carlo_tighten_with_steps(name):
    # Two-component mixture: the denoiser is not affine, so moments are estimated from N = 20000 samples.
    # Tolerance per entry: 5 standard errors (estimated from the samples) plus 8/n for discretization
    # (the largest error measured: 0.246 at n = 20 and 0.061 at n = 80, Euler-ancestral, i.e. n * error
    # about 5). The same x_T and seed for both step counts, and the error must fall from 20 to 80 steps.
    data = GaussianMixture(**MIX)
    true_mean, true_cov = mixture_moments(*MIX.values())
    n_samples = 20_000
    errors = []
    for n in [20, 80]:
        rng = np.random.default_rng(5)
        x_T = data.noised(ABAR_T).sample(rng, n_samples)
        x = sample(name, make_denoiser(data, BASE, "eps"), BASE, x_T, rng, n)
        d = x - x.mean(0)
        se_mean = np.sqrt(d.var(0) / n_samples)
        se_cov = np.sqrt((d[:, :, None] * d[:, None, :]).var(0) / n_samples)
        err_mean, err_cov = np.abs(x.mean(0) - true_mean), np.abs(np.cov(x.T) - true_cov)
        assert np.all(err_mean < 5 * se_mean + 8 / n) and np.all(err_cov < 5 * se_cov + 8 / n), (n, err_mean, err_cov)
        errors.append(max(err_mean.max(), err_cov.max()))
    assert errors[1] < errors[0], errors


# ---- identities between samplers ---------------------------------------------------------------------

def _mixture_start(n=64, seed=3):
    rng = np.random.default_rng(seed)
    return GaussianMixture(**MIX).noised(ABAR_T).sample(rng, n)


def test_ddim_with_eta_1_is_ddpm_with_fixed_small_variance():
    model = make_denoiser(GaussianMixture(**MIX), BASE, "eps")
    x_T = _mixture_start()
    a = sample_ddim(model, BASE, x_T, np.random.default_rng(9), steps=30, eta=1.0)
    b = sample_ddpm(model, BASE, x_T, np.random.default_rng(9), steps=30, variance="fixed_small")
    assert np.allclose(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_ddim_is_first_order_dpm_solver_and_euler_on_the_same_timesteps(name):
    base = Schedule.from_name(name, 1000)  # cosine: abar_T ~ 1e-9, sigma_max ~ 3e4
    model = make_denoiser(GaussianMixture(**MIX), base, "v")
    x_T = _mixture_start()
    ddim = sample_ddim(model, base, x_T, None, steps=25, prediction="v")
    dpm1 = sample_dpmpp_2m(model, base, x_T, None, steps=25, prediction="v", order=1)
    assert np.allclose(ddim, dpm1, rtol=0, atol=1e-10)
    # DDIM's update is Euler's method in sigma on x / alpha (Karras et al. 2022, Sec. 3): run DDIM on the
    # timesteps the Karras grid snapped to, and the two samplers, written independently, agree.
    _, ts = karras_timesteps(base, 25)
    sub = respace(base, ts[::-1])
    assert np.allclose(sample_euler(model, base, x_T, None, steps=25, prediction="v"),
                       sample_ddim(model, sub, x_T, None, steps=len(sub), prediction="v"), rtol=0, atol=1e-9)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(name=st.sampled_from(BETA_SCHEDULES), T=st.integers(25, 1000), data=st.data())
def test_ddim_with_eta_1_has_exactly_the_posterior_mean_and_variance(name, T, data):
    base = Schedule.from_name(name, T)
    use = sorted(data.draw(st.sets(st.integers(0, T - 1), min_size=2, max_size=40)))
    sched = respace(base, use)
    i = data.draw(st.integers(1, len(sched) - 1))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**31)))
    x0, eps = rng.standard_normal((2, 1, 3))
    x_t = np.sqrt(sched.alphas_cumprod[i]) * x0 + np.sqrt(1 - sched.alphas_cumprod[i]) * eps
    # sigma^2 = beta~ of the respaced process. Two algebraic forms of one float64 number: measured at
    # most 1.1e-13 relative (sigma^2) and 7e-14 absolute (mean) over 2000 draws; 1e-9 and 1e-8 are margin.
    assert ddim_sigma(sched, i, 1.0) ** 2 == pytest.approx(sched.posterior_variance[i], rel=1e-9)
    mean, _ = ddim_step(sched, x_t, i, eps, np.zeros_like(x_t), eta=1.0, prediction="eps")
    post_mean = sched.posterior_mean_coef1[i] * x0 + sched.posterior_mean_coef2[i] * x_t
    assert np.allclose(mean, post_mean, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_euler_ancestral_adds_the_ddpm_posterior_noise(eta):
    # Euler-a's fresh noise sigma_up, in variance-preserving units (times alpha of the level it lands on),
    # is eta sqrt(beta~) of the DDPM posterior between the same two timesteps (algebra: sigma_up^2 =
    # sigma'^2 (sigma^2 - sigma'^2) / sigma^2 = beta~ / abar' for eta = 1). Read end to end: the state the
    # next step hands the network responds to the k-th draw with exactly that scale times I, since the
    # draw is the last thing step k adds. The moment tests above cannot see eta (the sampler converges
    # for any eta in [0, 1]); this can. Tolerance 1e-12: round-off only.
    model = make_denoiser(GAUSS, BASE, "eps")
    n, d = 12, 2
    rng = ScriptedNoise(d, n)
    x_T = np.zeros((rng.rows, d))
    x_T[1:1 + d] = np.eye(d)
    states = []
    sample_euler_a(model, BASE, x_T, rng, steps=n, eta=eta, callback=lambda i, x, x0: states.append(x.copy()))
    _, ts = karras_timesteps(BASE, n)
    assert rng.calls == len(ts) - 1 == len(states) - 1  # no noise on the last step, to sigma = 0
    for k in range(rng.calls):
        abar, abar_next = BASE.alphas_cumprod[ts[k]], BASE.alphas_cumprod[ts[k + 1]]
        beta_tilde = (1 - abar_next) / (1 - abar) * (1 - abar / abar_next)
        assert np.allclose(draw_response(states[k + 1], d, k), eta * np.sqrt(beta_tilde) * np.eye(d),
                           rtol=0, atol=1e-12)


# ---- plumbing: callbacks, dtypes, learned-variance outputs, dispatch -----------------------------------

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_dtype_and_timesteps(name):
    model = make_denoiser(GAUSS, BASE, "eps")
    seen_t, calls = [], []

    def counting_model(x, t):
        assert x.dtype == np.float32 and t.dtype == np.int64 and t.shape == (x.shape[0],)
        seen_t.append(int(t[0]))
        return model(x, t)

    x_T = np.random.default_rng(0).standard_normal((8, 2)).astype(np.float32)
    out = sample(name, counting_model, BASE, x_T, np.random.default_rng(1), 12,
                 callback=lambda i, x, x0: calls.append((i, x.shape, x0.shape, x.dtype)))
    assert out.dtype == np.float32 and out.shape == (8, 2) and np.all(np.isfinite(out))
    assert [c[0] for c in calls] == list(range(12))
    assert all(c[1:] == ((8, 2), (8, 2), np.float32) for c in calls)
    assert len(seen_t) == (2 * 12 - 1 if name == "heun" else 12)  # Heun: two calls per step but the last
    assert max(seen_t) == 999 and min(seen_t) == 0


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_learned_variance_channels_do_not_disturb_other_samplers(name):
    plain = make_denoiser(GAUSS, BASE, "eps")
    learned = make_denoiser(GAUSS, BASE, "eps", learned_range=True)
    x_T = np.random.default_rng(0).standard_normal((16, 2))
    a = sample(name, plain, BASE, x_T, np.random.default_rng(1), 10)
    b = sample(name, learned, BASE, x_T, np.random.default_rng(1), 10)
    assert np.array_equal(a, b)


def test_dispatch():
    assert list(SAMPLERS) == ["ddpm", "ddim", "dpmpp-2m", "euler", "heun", "euler-a"]
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp-2m, euler, heun, euler-a"):
        sample("plms", None, BASE, np.zeros((1, 2)), None, 10)
    with pytest.raises(ValueError, match="exceeds"):
        sample("ddim", None, BASE, np.zeros((1, 2)), None, 1001)


# ---- x0 clipping and dynamic thresholding -------------------------------------------------------------

def test_dynamic_threshold_by_hand():
    x = np.array([[0.5, 2.0, -3.0, 1.0], [0.1, -0.2, 0.3, 0.4]])
    # row 0: s = 3 (the 100th percentile of |x|): clip to [-3, 3], divide by 3
    # row 1: every |x| < 1, so s = max(s, 1) = 1 and the row is unchanged
    assert np.allclose(dynamic_threshold(x, 1.0), [[0.5 / 3, 2 / 3, -1.0, 1 / 3], [0.1, -0.2, 0.3, 0.4]])
    # median of |x| = (1 + 2) / 2 = 1.5: clip to [-1.5, 1.5], divide by 1.5
    assert np.allclose(dynamic_threshold(x[:1], 0.5), [[1 / 3, 1.0, -1.0, 2 / 3]])


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_clipping_and_thresholding_keep_pixels_in_range(name):
    # A model that predicts x0 far outside [-1, 1]: without processing the output leaves the range.
    wild = lambda x, t: 3.0 * np.sign(x) + x  # noqa: E731
    x_T = np.random.default_rng(0).standard_normal((4, 3, 4, 4))
    raw = sample(name, wild, BASE, x_T, np.random.default_rng(1), 8, prediction="x0")
    assert np.abs(raw).max() > 1.5
    for kw, process in [(dict(clip_x0=True), lambda x0: np.clip(x0, -1, 1)),
                        (dict(dynamic_threshold=0.9), lambda x0: dynamic_threshold(x0, 0.9))]:
        out = sample(name, wild, BASE, x_T, np.random.default_rng(1), 8, prediction="x0", **kw)
        # the last step returns (a combination of) processed x0 estimates; 1e-6 allows float round-off
        assert np.abs(out).max() <= 1 + 1e-6, kw
        # The option is wired to its own processing: for an x0-prediction model, processing x0 inside the
        # sampler is the same as a model that predicts the processed x0 (1e-12: round-off only).
        by_model = sample(name, lambda x, t: process(wild(x, t)), BASE, x_T, np.random.default_rng(1), 8,
                          prediction="x0")
        assert np.allclose(out, by_model, rtol=0, atol=1e-12), kw


# ---- zero terminal SNR --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SAMPLERS))
def test_zero_terminal_snr_with_v_prediction(name):
    # With abar_T = 0, x_T ~ N(0, I) IS the exact q(x_T); eps-prediction cannot work there, v can.
    base = Schedule.from_name("scaled_linear", 1000, zero_terminal_snr=True)
    model = make_denoiser(GAUSS, base, "v")
    run = lambda x, rng: sample(name, model, base, x, rng, 40, prediction="v")  # noqa: E731
    mean, cov, _ = linear_response_moments(run, np.zeros(2), np.eye(2), max_calls=40)
    err = moment_error(mean, cov, M, S)
    # Karras samplers floor abar at 2^-24 at the top (sigma_max = 4096) instead of starting at SNR 0.
    # Tolerance 6/n: measured errors 0.019 (Heun) to 0.118 (Euler-ancestral, n * error = 4.7; this
    # schedule's first-order constant is a little above the linear schedule's 3.7).
    assert err < 6 / 40, err


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpmpp-2m"])
def test_eps_prediction_at_zero_snr_is_refused_clearly(name):
    base = Schedule.from_name("linear", 100, zero_terminal_snr=True)
    with pytest.raises(ValueError, match="v- or x0-prediction"):
        sample(name, make_denoiser(GAUSS, base, "v"), base, np.zeros((2, 2)), None, 10, prediction="eps")
