"""Beta schedules, zero-terminal-SNR rescaling, timestep spacing and respacing."""

import math

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from npdiff.diffusion import (BETA_SCHEDULES, Schedule, make_betas, rescale_zero_terminal_snr, respace,
                              space_timesteps)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)
TABLES = ["betas", "alphas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
          "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
          "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
          "posterior_mean_coef1", "posterior_mean_coef2", "log_betas"]


@pytest.mark.parametrize("T", [1000, 250, 4000])
def test_linear_schedule_matches_ddpm_scaled_by_1000_over_T(T):
    betas = make_betas("linear", T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    # Ho et al.: 1e-4 .. 0.02 at T = 1000; improved DDPM scales both ends by 1000/T.
    assert betas[0] == pytest.approx(1e-4 * 1000 / T, rel=1e-14)
    assert betas[-1] == pytest.approx(0.02 * 1000 / T, rel=1e-14)
    assert np.abs(np.diff(betas, 2)).max() < 1e-15  # linear in t


def test_scaled_linear_is_linear_in_sqrt_beta():
    betas = make_betas("scaled_linear", 1000)
    root = np.sqrt(betas)
    assert root[0] == pytest.approx(math.sqrt(0.00085), rel=1e-14)
    assert root[-1] == pytest.approx(math.sqrt(0.012), rel=1e-14)
    assert np.abs(np.diff(root, 2)).max() < 1e-15


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_schedule_follows_its_alpha_bar_until_the_clip(T):
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    sched = Schedule(make_betas("cosine", T))
    assert sched.betas.max() <= 0.999
    clipped = np.flatnonzero(sched.betas >= 0.999)
    assert len(clipped) <= 1 and (len(clipped) == 0 or clipped[0] == T - 1)  # only the singular last step
    # Unclipped, the last beta is 1 - f(T)/f(T-1) = 1 - O(1e-30): it must be clipped, and at 0.999 exactly
    # (a clip at 0.99 or 0.9999 would pass every check above).
    assert 1.0 - f(T) / f(T - 1) > 0.999 and sched.betas[-1] == 0.999
    expected = np.array([f(t + 1) / f(0) for t in range(T)])
    ok = slice(0, T - 1)  # the last step's beta is clipped, the rest follow eq. 17 exactly
    assert np.allclose(sched.alphas_cumprod[ok], expected[ok], rtol=1e-12, atol=0)


def test_sigmoid_schedule_is_a_logistic_ramp_between_the_linear_ends():
    T = 1000
    betas = make_betas("sigmoid", T)
    lo, hi = 1e-4, 0.02
    p = (betas - lo) / (hi - lo)
    logit = np.log(p / (1 - p))
    assert np.allclose(logit, np.linspace(-6, 6, T), atol=1e-9)


@SETTINGS
@given(name=st.sampled_from(BETA_SCHEDULES), T=st.integers(25, 2000))  # linear reaches beta = 1 at T = 20
def test_every_schedule_is_a_valid_process(name, T):
    sched = Schedule.from_name(name, T)
    assert len(sched) == T and np.array_equal(sched.timesteps, np.arange(T))
    assert np.all((sched.betas > 0) & (sched.betas < 1))
    assert np.all(np.diff(sched.alphas_cumprod) < 0)  # SNR strictly decreasing
    for table in TABLES:
        value = getattr(sched, table)
        assert value.dtype == np.float64 and value.shape == (T,) and np.all(np.isfinite(value)), table


@SETTINGS
@given(name=st.sampled_from(BETA_SCHEDULES), T=st.integers(25, 2000))
def test_zero_terminal_snr_rescale(name, T):
    old = Schedule(make_betas(name, T))
    new = Schedule(rescale_zero_terminal_snr(old.betas))
    assert new.alphas_cumprod[-1] < 1e-24  # SNR 0 at the last step
    assert new.betas[-1] == pytest.approx(1.0, abs=1e-12)
    assert new.alphas_cumprod[0] == pytest.approx(old.alphas_cumprod[0], rel=1e-12)
    # Lin et al. Algorithm 1 is an affine map of sqrt(abar): the ratio of shifted values is constant.
    a_old, a_new = np.sqrt(old.alphas_cumprod), np.sqrt(new.alphas_cumprod)
    ratio = (a_new[:-1] - a_new[-1]) / (a_old[:-1] - a_old[-1])
    assert np.allclose(ratio, ratio[0], rtol=1e-9)
    assert np.all(np.diff(new.alphas_cumprod) < 0)


@SETTINGS
@given(T=st.integers(1, 1500), data=st.data(), spacing=st.sampled_from(["linspace", "leading", "trailing"]))
def test_space_timesteps(T, data, spacing):
    n = data.draw(st.integers(1, T))
    ts = space_timesteps(T, n, spacing)
    assert ts.dtype == np.int64 and len(ts) == n
    assert np.all(np.diff(ts) > 0) and ts[0] >= 0 and ts[-1] < T
    if spacing == "linspace":
        assert ts[0] == 0 and ts[-1] == T - 1 if n > 1 else ts[0] == 0
    if spacing == "trailing":  # starts sampling at t = T
        assert ts[-1] == T - 1 and ts[0] == round(T / n) - 1 or n == 1
    if spacing == "leading":
        assert np.array_equal(ts, np.arange(n) * (T // n))
    if n == T:
        assert np.array_equal(ts, np.arange(T))


def test_spacing_examples():
    assert space_timesteps(1000, 4, "linspace").tolist() == [0, 333, 666, 999]
    assert space_timesteps(1000, 4, "leading").tolist() == [0, 250, 500, 750]
    assert space_timesteps(1000, 4, "trailing").tolist() == [249, 499, 749, 999]
    assert space_timesteps(10, 3, "trailing").tolist() == [2, 6, 9]  # round(10 - k 10/3) - 1


@SETTINGS
@given(name=st.sampled_from(BETA_SCHEDULES), T=st.integers(25, 1200), zero_snr=st.booleans())
@example(name="cosine", T=717, zero_snr=False)  # where the abar-ratio form of beta' misses the tolerance
@example(name="sigmoid", T=1150, zero_snr=False)
def test_respacing_that_keeps_every_step_is_the_identity(name, T, zero_snr):
    sched = Schedule.from_name(name, T, zero_terminal_snr=zero_snr)
    same = respace(sched, np.arange(T))
    assert np.array_equal(same.timesteps, sched.timesteps)
    # Each beta' is recomputed to a few ulps relative, so the tables agree to round-off: measured at most
    # 11% of this tolerance over every schedule and T = 25..1200 (with beta' = 1 - abar ratio, which holds
    # a beta of 4e-5 only to ~3e-12 relative, up to 142%: cosine T = 717, sigmoid T = 1150).
    for table in TABLES:
        a, b = getattr(sched, table), getattr(same, table)
        assert np.allclose(a, b, rtol=1e-12, atol=1e-15, equal_nan=True), table


@SETTINGS
@given(name=st.sampled_from(BETA_SCHEDULES), T=st.integers(25, 1200), data=st.data())
def test_respacing_keeps_alpha_bar_and_original_timesteps_and_composes(name, T, data):
    sched = Schedule.from_name(name, T)
    use = np.array(sorted(data.draw(st.sets(st.integers(0, T - 1), min_size=2, max_size=T))))
    sub = respace(sched, use)
    assert np.array_equal(sub.timesteps, use)
    # A schedule is stored as betas, and alpha' = 1 - beta' keeps only ~1e-16 absolute precision: after a
    # skip with beta' near 1 (over the cosine's clipped end) the next abar is held to about 1e-16 times
    # the previous one, relative error up to 1.5e-8 when abar is 2e-9. Hence atol 2e-16 beside rtol 1e-12
    # (measured at most 27% of it over 6000 random subsets, last step included; rtol alone: up to 146x).
    keep = dict(rtol=1e-12, atol=2e-16)
    assert np.allclose(sub.alphas_cumprod, sched.alphas_cumprod[use], **keep)
    # beta'_i = 1 - abar_{t_i} / abar_{t_{i-1}}; that reference ratio of two cumprods is itself held only
    # to a few 1e-15 absolute (measured up to 2.5e-15), hence atol 1e-14.
    prev = np.concatenate([[1.0], sched.alphas_cumprod[use[:-1]]])
    assert np.allclose(sub.betas, 1 - sched.alphas_cumprod[use] / prev, rtol=1e-12, atol=1e-14)
    assert sub.num_train_timesteps == T
    inner = np.array(sorted(data.draw(st.sets(st.integers(0, len(use) - 1), min_size=1, max_size=len(use)))))
    twice = respace(sub, inner)
    assert np.array_equal(twice.timesteps, use[inner])
    assert np.allclose(twice.alphas_cumprod, sched.alphas_cumprod[use[inner]], **keep)


def test_errors_say_what_to_do():
    with pytest.raises(ValueError, match="linear, scaled_linear, cosine, sigmoid"):
        make_betas("quadratic", 10)
    with pytest.raises(ValueError, match="1..10"):
        space_timesteps(10, 11, "linspace")
    with pytest.raises(ValueError, match="linspace, leading, trailing"):
        space_timesteps(10, 2, "uniform")
    with pytest.raises(ValueError, match="indices"):
        respace(Schedule.from_name("linear", 100), [3, 100])
