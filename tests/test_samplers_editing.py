"""img2img and RePaint inpainting on Gaussian data, with exact moments by linear response."""

import numpy as np
import pytest
from diffusion_testlib import ScriptedNoise, gaussian_posterior, linear_response_moments, rows_moments

from npdiff.diffusion import GaussianMixture, Schedule, make_denoiser
from npdiff.samplers import (SAMPLERS, img2img, img2img_schedule, repaint_moves, respaced, sample_ddpm,
                             sample_repaint)

BASE = Schedule.from_name("linear", 1000)


@pytest.mark.parametrize("strength", [0.3, 0.5, 1.0])
def test_img2img_with_the_exact_ancestral_sampler_samples_the_exact_edit_distribution(strength):
    # Data N(m, s) with diagonal s, a fixed image y. img2img noises y to the start step t_k and runs the
    # exact ancestral sampler (learned-range output carrying the exact reverse variance) down to t_0,
    # then returns E[x0 | x_{t_0}]. Independently: x_{t_k} ~ N(sqrt(a_k) y, (1 - a_k) I), and the exact
    # reverse chain of the prior gives x_{t_0} | x_{t_k} by joint-Gaussian conditioning of
    # (x_{t_0}, x_{t_k}), Cov = V_0, V_k, cross sqrt(a_k / a_0) V_0. Tolerance 1e-9: round-off only.
    m, s = np.array([0.4, -0.2]), np.diag([0.3, 0.8])
    y = np.array([-0.5, 0.9])
    steps = 10
    sub = img2img_schedule(BASE, steps, strength)
    assert len(sub) == round(strength * steps) and sub.timesteps[0] == 0
    model = make_denoiser(GaussianMixture.gaussian(m, s), sub, "eps", learned_range=True)
    run = lambda x, rng: img2img(sample_ddpm, model, BASE, x, rng, strength=strength, steps=steps,  # noqa: E731
                                 variance="learned_range")
    mean, cov, draws = linear_response_moments(run, y, np.zeros((2, 2)), max_calls=steps + 1)
    assert draws == len(sub)  # the noise that starts the edit, and one per step but the last

    a0, ak = sub.alphas_cumprod[0], sub.alphas_cumprod[-1]
    V0, Vk = a0 * s + (1 - a0) * np.eye(2), ak * s + (1 - ak) * np.eye(2)
    cross = np.sqrt(ak / a0) * V0
    K = cross @ np.linalg.inv(Vk)
    mean_t0 = np.sqrt(a0) * m + K @ (np.sqrt(ak) * y - np.sqrt(ak) * m)
    cov_t0 = K @ ((1 - ak) * np.eye(2)) @ K.T + V0 - K @ cross.T
    G, _ = gaussian_posterior(m, s, a0)
    assert np.allclose(mean, m + G @ (mean_t0 - np.sqrt(a0) * m), atol=1e-9)
    assert np.allclose(cov, G @ cov_t0 @ G.T, atol=1e-9)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_img2img_walks_only_the_last_steps_with_every_sampler(name):
    data = GaussianMixture.gaussian([0.0, 0.0], 0.2 * np.eye(2))
    model = make_denoiser(data, BASE, "eps")
    seen, steps_done = [], []

    def spy(x, t):
        seen.append(int(t[0]))
        return model(x, t)

    image = np.random.default_rng(0).standard_normal((4, 2)) * 0.4
    out = img2img(name, spy, BASE, image, np.random.default_rng(1), strength=0.4, steps=20,
                  callback=lambda i, x, x0: steps_done.append(i))
    start = img2img_schedule(BASE, 20, 0.4).timesteps[-1]
    assert max(seen) == start < 999 and min(seen) == 0
    assert len(steps_done) <= 8 and np.all(np.isfinite(out))
    # a light edit stays close to the image; a full-strength one forgets it
    near = np.abs(out - image).mean()
    far = np.abs(img2img(name, model, BASE, image, np.random.default_rng(1), strength=1.0, steps=20) - image).mean()
    assert near < far


def test_img2img_rejects_bad_strength():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        img2img_schedule(BASE, 10, 0.0)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        img2img_schedule(BASE, 10, 1.5)
    assert len(img2img_schedule(BASE, 10, 0.01)) == 1  # at least one step


@pytest.mark.parametrize("n,j,r", [(10, 3, 2), (25, 5, 4), (12, 1, 3), (8, 10, 5), (20, 4, 1)])
def test_repaint_schedule(n, j, r):
    moves = repaint_moves(n, j, r)
    i = n - 1
    for move in moves:  # the moves form a connected walk from the top to x_0
        if move[0] == "down":
            assert move[1] == i
            i -= 1
        else:
            assert move[1] == i and move[2] == i + j
            i = move[2]
    assert i == -1
    jump_points = [p for p in range(0, n) if p % j == 0 and p + j <= n - 1]
    ups = [mv for mv in moves if mv[0] == "up"]
    assert len(ups) == len(jump_points) * (r - 1)
    assert sum(mv[0] == "down" for mv in moves) == n + len(ups) * j


def test_repaint_keeps_the_known_region_and_resampling_harmonizes_the_rest():
    # Correlated Gaussian, coordinate 1 known (y1 = 0.8), coordinate 0 generated. The exact conditional
    # is N(m0 + S01/S11 (y1 - m1), S00 - S01^2/S11). Plain replacement (RePaint without resampling) pulls
    # the generated part toward the unconditional mean: the known region only reaches it through the
    # denoiser at each step. Resampling jumps let it harmonize (Lugmayr et al. 2022, Sec. 4.2).
    # Moments by linear response: exact, no sampling error. Measured at 50 steps, fixed-small variance:
    # conditional-mean error 0.274 without resampling, 0.030 with jump length 1 and 10 resamplings.
    m, S = np.array([0.2, -0.1]), 0.5 * np.array([[1.0, 0.9], [0.9, 1.0]])
    y1 = 0.8
    cond_mean = m[0] + S[0, 1] / S[1, 1] * (y1 - m[1])
    cond_var = S[0, 0] - S[0, 1] ** 2 / S[1, 1]
    model = make_denoiser(GaussianMixture.gaussian(m, S), BASE, "eps")
    a_T = BASE.alphas_cumprod[-1]
    errors = {}
    for j, r in [(1, 1), (1, 10)]:
        def run(x, rng):
            known = np.tile([0.0, y1], (x.shape[0], 1))
            return sample_repaint(model, BASE, x, rng, steps=50, known=known, keep_mask=np.array([0.0, 1.0]),
                                  jump_length=j, jump_n_sample=r)
        mean, cov, _ = linear_response_moments(run, np.sqrt(a_T) * m, a_T * S + (1 - a_T) * np.eye(2),
                                               max_calls=3 * 50 * r)
        assert mean[1] == pytest.approx(y1, abs=1e-12) and abs(cov[1, 1]) < 1e-20  # known region kept exactly
        errors[r] = (abs(mean[0] - cond_mean), abs(cov[0, 0] - cond_var))
    assert errors[1][0] > 0.2  # plain replacement misses the conditional mean
    assert errors[10][0] < 0.05 and errors[10][1] < 0.05, errors


@pytest.mark.parametrize("j,r", [(1, 1), (3, 3)])
def test_repaint_known_region_is_exactly_q_of_the_source_at_every_step(j, r):
    # Every state RePaint hands the network (but the starting x_T) must hold, in the known region, an
    # exact draw of q(x_{t_i} | x_0 = known) at that state's own step i: mean sqrt(abar_i) y and variance
    # 1 - abar_i, after reverse steps (re-noised from the source) and after resampling jumps (forward
    # process from step i to i + j) alike. A known region noised one step off changes the variance by
    # about beta'_i, which the harmonization test above cannot see. Moments by linear response on the
    # recorded states; tolerance 1e-12: round-off only.
    m, S = np.array([0.2, -0.1]), 0.5 * np.array([[1.0, 0.9], [0.9, 1.0]])
    y1, steps, d = 0.8, 12, 2
    model = make_denoiser(GaussianMixture.gaussian(m, S), BASE, "eps")
    sched = respaced(BASE, steps, "linspace")
    rng = ScriptedNoise(d, 3 * steps * r)
    x_T = np.zeros((rng.rows, d))
    x_T[1:1 + d] = np.eye(d)
    states = []
    sample_repaint(model, BASE, x_T, rng, steps=steps, known=np.tile([0.0, y1], (rng.rows, 1)),
                   keep_mask=np.array([0.0, 1.0]), jump_length=j, jump_n_sample=r,
                   callback=lambda k, x, x0: states.append(x.copy()))
    at = [mv[1] for mv in repaint_moves(steps, j, r) if mv[0] == "down"]  # the step of each state
    assert len(states) == len(at) and (r == 1 or len(at) > steps)
    a_T = BASE.alphas_cumprod[-1]
    for x, i in list(zip(states, at))[1:]:
        mean, cov = rows_moments(x, np.sqrt(a_T) * m, a_T * S + (1 - a_T) * np.eye(2), rng.calls)
        abar = sched.alphas_cumprod[i]
        assert mean[1] == pytest.approx(np.sqrt(abar) * y1, abs=1e-12), i
        assert cov[1, 1] == pytest.approx(1 - abar, abs=1e-12), i
        assert abs(cov[0, 1]) < 1e-12, i  # a fresh draw (or its forward re-noising): independent of the rest
