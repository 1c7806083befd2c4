"""Training losses: values, min-SNR weighting, the hybrid loss, and gradients by finite differences."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npdiff.diffusion.losses import haar_bands
from npdiff.diffusion import (Prediction, Schedule, discretized_gaussian_log_likelihood, min_snr_weight,
                              normal_kl, predict_x0_eps, prediction_target, q_posterior_mean_variance, q_sample,
                              snr, training_loss)

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)
SCHED = Schedule.from_name("linear", 200)


def batch(seed, shape=(4, 2, 3, 3)):
    rng = np.random.default_rng(seed)
    x0 = np.clip(rng.standard_normal(shape) * 0.6, -1, 1)
    x0 = np.round((x0 + 1) * 127.5) / 127.5 - 1  # 8-bit levels, as the discretized decoder expects
    noise = rng.standard_normal(shape)
    t = rng.integers(0, len(SCHED), shape[0])
    t[0] = 0  # always include the decoder step
    return rng, x0, noise, t


def central_difference(f, x, h=1e-6):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@SETTINGS
@given(seed=st.integers(0, 10_000), prediction=st.sampled_from(list(Prediction)),
       gamma=st.sampled_from([None, 1.0, 5.0]))
def test_simple_loss_gradient_matches_finite_differences(seed, prediction, gamma):
    rng, x0, noise, t = batch(seed)
    out = rng.standard_normal(x0.shape)
    loss, grad = training_loss(SCHED, out, x0, noise, t, prediction, min_snr_gamma=gamma)
    fd = central_difference(lambda o: training_loss(SCHED, o, x0, noise, t, prediction, min_snr_gamma=gamma)[0], out)
    # float64 central differences of a quadratic: exact up to rounding (~1e-10 here)
    assert np.allclose(grad, fd, rtol=1e-6, atol=1e-9)
    target = prediction_target(SCHED, x0, t, noise, prediction)
    w = np.ones(4) if gamma is None else min_snr_weight(snr(SCHED, t), gamma, prediction)
    assert loss == pytest.approx(np.mean(w * ((out - target) ** 2).mean(axis=(1, 2, 3))), rel=1e-12)
    perfect_loss, perfect_grad = training_loss(SCHED, target, x0, noise, t, prediction, min_snr_gamma=gamma)
    assert perfect_loss == 0 and not perfect_grad.any()


def test_min_snr_weights_in_each_form():
    s = np.array([0.0, 0.5, 5.0, 50.0])
    gamma = 5.0
    assert np.allclose(min_snr_weight(s, gamma, "eps"), [1.0, 1.0, 1.0, 0.1])  # min(snr, g) / snr
    assert np.allclose(min_snr_weight(s, gamma, "x0"), [0.0, 0.5, 5.0, 5.0])  # min(snr, g)
    assert np.allclose(min_snr_weight(s, gamma, "v"), [0.0, 0.5 / 1.5, 5 / 6, 5 / 51])  # min(snr, g)/(snr+1)


def test_snr_floor_keeps_the_noisiest_steps():
    s = np.array([0.0, 0.5, 2.0, 5.0, 50.0])
    # the x0 error counts clip(snr, 1, 5) times: 1 at the noisy end, where min-SNR alone gives 0
    assert np.allclose(min_snr_weight(s, 5.0, "x0", floor=1.0), [1.0, 1.0, 2.0, 5.0, 5.0])
    assert np.allclose(min_snr_weight(s, 5.0, "v", floor=1.0), [1.0, 1 / 1.5, 2 / 3, 5 / 6, 5 / 51])
    assert np.allclose(min_snr_weight(s, 5.0, "v", floor=0.0), min_snr_weight(s, 5.0, "v"))
    # the cosine schedule's last steps: without a floor they are all but untrained
    cos = Schedule.from_name("cosine", 1000)
    late = snr(cos, np.array([900, 990]))
    assert np.all(min_snr_weight(late, 5.0, "v") < 0.03)
    assert np.all(min_snr_weight(late, 5.0, "v", floor=1.0) > 0.97)
    with pytest.raises(ValueError, match="eps objective"):
        min_snr_weight(s, 5.0, "eps", floor=1.0)
    with pytest.raises(ValueError, match="floor must lie"):
        min_snr_weight(s, 5.0, "v", floor=6.0)
    with pytest.raises(ValueError, match="needs min_snr_gamma"):
        training_loss(SCHED, np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2)), [3], "v",
                      snr_floor=1.0)


@SETTINGS
@given(seed=st.integers(0, 10_000), prediction=st.sampled_from([Prediction.X0, Prediction.V]),
       floor=st.sampled_from([0.5, 1.0, 3.0]))
def test_floored_loss_is_the_clipped_x0_error_and_its_gradient_matches(seed, prediction, floor):
    # With v, ||v_hat - v||^2 = (snr + 1) ||x0_hat - x0||^2: the floored weight makes either objective
    # mean_n clip(snr, floor, gamma) ||x0_hat - x0||^2, for the same x0 guess.
    rng, x0, noise, t = batch(seed)
    x_t = q_sample(SCHED, x0, t, noise)
    x0_hat = x0 + 0.3 * rng.standard_normal(x0.shape)
    _, eps_hat = predict_x0_eps(SCHED, x_t, t, x0_hat, Prediction.X0)
    alpha = np.sqrt(SCHED.alphas_cumprod[t])[:, None, None, None]
    sigma = np.sqrt(1 - SCHED.alphas_cumprod[t])[:, None, None, None]
    out = x0_hat if prediction is Prediction.X0 else alpha * eps_hat - sigma * x0_hat
    loss, grad = training_loss(SCHED, out, x0, noise, t, prediction, min_snr_gamma=5.0, snr_floor=floor)
    expected = np.mean(np.clip(snr(SCHED, t), floor, 5.0) * ((x0_hat - x0) ** 2).mean(axis=(1, 2, 3)))
    assert loss == pytest.approx(expected, rel=1e-8)
    fd = central_difference(lambda o: training_loss(SCHED, o, x0, noise, t, prediction, min_snr_gamma=5.0,
                                                    snr_floor=floor)[0], out)
    assert np.allclose(grad, fd, rtol=1e-6, atol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 10_000), gamma=st.sampled_from([1.0, 5.0, 20.0]))
def test_min_snr_weighting_makes_the_three_objectives_one(seed, gamma):
    # The same network, parametrized three ways: a guess of x0, converted exactly to eps and v.
    # ||eps_hat - eps||^2 = snr ||x0_hat - x0||^2 and ||v_hat - v||^2 = (snr + 1) ||x0_hat - x0||^2, so with
    # the right per-objective weight all three losses equal mean_n min(snr, gamma) ||x0_hat - x0||^2.
    rng, x0, noise, t = batch(seed)
    t[0] = 1  # at t = 0, sigma = 0.01: converting x0 to eps divides by it; keep round-off small
    x_t = q_sample(SCHED, x0, t, noise)
    x0_hat = x0 + 0.3 * rng.standard_normal(x0.shape)
    _, eps_hat = predict_x0_eps(SCHED, x_t, t, x0_hat, Prediction.X0)
    alpha = np.sqrt(SCHED.alphas_cumprod[t])[:, None, None, None]
    sigma = np.sqrt(1 - SCHED.alphas_cumprod[t])[:, None, None, None]
    v_hat = alpha * eps_hat - sigma * x0_hat
    losses = [training_loss(SCHED, o, x0, noise, t, p, min_snr_gamma=gamma)[0]
              for o, p in [(eps_hat, "eps"), (x0_hat, "x0"), (v_hat, "v")]]
    expected = np.mean(np.minimum(snr(SCHED, t), gamma) * ((x0_hat - x0) ** 2).mean(axis=(1, 2, 3)))
    assert np.allclose(losses, expected, rtol=1e-8)
    unweighted = [training_loss(SCHED, o, x0, noise, t, p)[0] for o, p in [(eps_hat, "eps"), (x0_hat, "x0")]]
    assert not np.isclose(unweighted[0], unweighted[1], rtol=1e-3)  # without weights they differ


@SETTINGS
@given(seed=st.integers(0, 10_000), prediction=st.sampled_from(list(Prediction)))
def test_hybrid_loss_value_and_gradients(seed, prediction):
    rng, x0, noise, t = batch(seed)
    t[1] = 1  # a step where beta and beta~ differ a lot, so the variance gradient is large
    N, C = x0.shape[:2]
    # A network that is nearly right (as in training), so the loss is O(1) and finite differences are
    # not swamped by round-off of a huge bound term.
    near = prediction_target(SCHED, x0, t, noise, prediction) + 0.05 * rng.standard_normal(x0.shape)
    out = np.concatenate([near, rng.uniform(-1, 1, x0.shape)], axis=1)  # (N, 2C, H, W)
    lam = 0.001
    loss, grad, terms = training_loss(SCHED, out, x0, noise, t, prediction, variance="learned_range",
                                      vlb_weight=lam, return_terms=True)
    assert grad.shape == out.shape

    # The bound term, recomputed here from its definition.
    x_t = q_sample(SCHED, x0, t, noise)
    x0_hat, _ = predict_x0_eps(SCHED, x_t, t, out[:, :C], prediction)
    mu, _, _ = q_posterior_mean_variance(SCHED, x0_hat, x_t, t)
    true_mu, true_var, _ = q_posterior_mean_variance(SCHED, x0, x_t, t)
    frac = (out[:, C:] + 1) / 2
    log_beta = np.log(SCHED.betas[t])[:, None, None, None]
    pv = SCHED.posterior_variance
    log_post = np.log(np.where(t == 0, pv[1], pv[t]))[:, None, None, None]  # beta~ with its log clipped at t=0
    log_var = frac * log_beta + (1 - frac) * log_post
    kl = normal_kl(true_mu, np.log(np.maximum(true_var, 1e-300)), mu, log_var)
    nll = -discretized_gaussian_log_likelihood(x0, mu, 0.5 * log_var)
    term = np.where((t == 0)[:, None, None, None], nll, kl).mean(axis=(1, 2, 3)) / np.log(2)
    simple = training_loss(SCHED, out[:, :C], x0, noise, t, prediction)[0]
    assert loss == pytest.approx(simple + lam * len(SCHED) * term.mean(), rel=1e-10)

    # Mean channels: the bound sees the mean through a stop-gradient, so only L_simple trains them.
    assert np.allclose(grad[:, :C], training_loss(SCHED, out[:, :C], x0, noise, t, prediction)[1], rtol=1e-12)
    # Variance channels: the full loss by finite differences.
    f = lambda v: training_loss(SCHED, np.concatenate([out[:, :C], v], axis=1), x0, noise, t, prediction,  # noqa: E731
                                variance="learned_range", vlb_weight=lam)[0]
    fd = central_difference(f, out[:, C:], h=1e-6)
    # h = 1e-6 in float64: truncation ~h^2, round-off ~1e-16 |loss| / h; tolerance 1e-5 relative.
    assert np.allclose(grad[:, C:], fd, rtol=1e-5, atol=1e-5 * np.abs(fd).max())
    assert np.abs(grad[:, C:]).max() > 1e-6  # the bound does train the variance


def test_loss_errors_and_dtypes():
    _, x0, noise, t = batch(0)
    out2 = np.zeros((4, 4, 3, 3))
    with pytest.raises(ValueError, match="LEARNED_RANGE"):
        training_loss(SCHED, out2, x0, noise, t, "eps")
    with pytest.raises(ValueError, match="shape"):
        training_loss(SCHED, np.zeros((4, 3, 3, 3)), x0, noise, t, "eps")
    loss, grad = training_loss(SCHED, np.zeros(x0.shape, np.float32), x0.astype(np.float32),
                               noise.astype(np.float32), t, "v", min_snr_gamma=5.0)
    assert grad.dtype == np.float32 and np.isfinite(loss)
    zero = Schedule.from_name("linear", 200, zero_terminal_snr=True)
    t_last = np.full(4, 199)
    for p in ["eps", "x0", "v"]:  # SNR = 0 at the last step: every weight stays finite
        loss, grad = training_loss(zero, np.zeros(x0.shape), x0, noise, t_last, p, min_snr_gamma=5.0)
        assert np.isfinite(loss) and np.all(np.isfinite(grad))


# -- multiscale weighting: every Haar band of the error weighted with its own snr --------------------

@SETTINGS
@given(seed=st.integers(0, 10_000), h=st.sampled_from([2, 4, 6, 8, 12]), w=st.sampled_from([2, 4, 8, 10]))
def test_haar_bands_split_the_error_into_orthogonal_parts(seed, h, w):
    e = np.random.default_rng(seed).standard_normal((2, 3, h, w))
    bands = haar_bands(e)
    factors = [f for f, _ in bands]
    assert factors[0] == 1 and factors[-1] == h * w and factors == sorted(factors)
    assert np.allclose(sum(b for _, b in bands), e, atol=1e-12)
    for i, (_, a) in enumerate(bands):
        for _, b in bands[i + 1:]:
            assert abs(np.sum(a * b)) < 1e-9          # orthogonal: the squared norms add up
    assert np.allclose(bands[-1][1], e.mean(axis=(2, 3), keepdims=True))


def test_multiscale_weights_a_flat_error_by_the_image_snr_and_a_checkerboard_by_the_pixel_snr():
    # Closed forms on a 32 x 32 image: an error that is the same at every pixel lies wholly in the
    # image-mean band (snr seen 1024 times over); a +-c checkerboard lies wholly in the finest band.
    cos = Schedule.from_name("cosine", 1000)
    t = np.array([500, 900, 950, 990])
    s = snr(cos, t)
    x0 = np.zeros((4, 3, 32, 32))
    noise = np.random.default_rng(0).standard_normal(x0.shape)
    target = prediction_target(cos, x0, t, noise, "x0")
    flat = np.full(x0.shape, 0.3)
    checker = 0.3 * np.where((np.indices((32, 32)).sum(axis=0) % 2) == 0, 1.0, -1.0) * np.ones(x0.shape)
    for err, factor in ((flat, 1024.0), (checker, 1.0)):
        loss = training_loss(cos, target + err, x0, noise, t, "x0", min_snr_gamma=5.0, multiscale=True)[0]
        assert loss == pytest.approx(np.mean(np.minimum(factor * s, 5.0) * 0.09), rel=1e-9)
    # at t = 950 the flat error counts 5 (min(1024 snr, 5)) and the checkerboard 0.006: about 850 times less
    assert np.minimum(1024 * s[2], 5.0) / np.minimum(s[2], 5.0) > 800


@SETTINGS
@given(seed=st.integers(0, 10_000), prediction=st.sampled_from(list(Prediction)),
       floor=st.sampled_from([None, 0.5]))
def test_multiscale_loss_gradient_and_its_plain_limit(seed, prediction, floor):
    if prediction is Prediction.EPS:
        floor = None
    rng, x0, noise, t = batch(seed, shape=(3, 2, 4, 4))
    out = rng.standard_normal(x0.shape)
    f = lambda o: training_loss(SCHED, o, x0, noise, t, prediction, min_snr_gamma=5.0, snr_floor=floor,
                                multiscale=True)
    loss, grad = f(out)
    assert np.allclose(grad, central_difference(lambda o: f(o)[0], out), rtol=1e-6, atol=1e-9)
    # every band sees at least the pixel snr: never less than the plain loss
    plain = training_loss(SCHED, out, x0, noise, t, prediction, min_snr_gamma=5.0, snr_floor=floor)[0]
    assert loss >= plain * (1 - 1e-12)
    # where even the pixel snr exceeds gamma every band weighs gamma: the plain min-SNR loss
    low = np.zeros_like(t)
    assert snr(SCHED, low).min() > 5.0
    assert training_loss(SCHED, out, x0, noise, low, prediction, min_snr_gamma=5.0, multiscale=True)[0] == \
        pytest.approx(training_loss(SCHED, out, x0, noise, low, prediction, min_snr_gamma=5.0)[0], rel=1e-10)
    with pytest.raises(ValueError, match="needs min_snr_gamma"):
        training_loss(SCHED, out, x0, noise, t, prediction, multiscale=True)
    with pytest.raises(ValueError, match="needs images"):
        training_loss(SCHED, out[:, 0], x0[:, 0], noise[:, 0], t, prediction, min_snr_gamma=5.0, multiscale=True)
