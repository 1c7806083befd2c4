"""Classifier-free guidance: one batched call, the combination, guidance rescale, learned variance."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npdiff.diffusion import GaussianMixture, Schedule, make_denoiser
from npdiff.samplers import classifier_free_guidance, sample

BASE = Schedule.from_name("linear", 1000)


class TwoBranchModel:
    """A batched model whose first half answers with the 'prompt' and second half with the 'negative
    prompt': cond(x) = 2x + 1, uncond(x) = -x. Counts its calls."""

    def __init__(self, channels_out=None):
        self.calls, self.channels_out = 0, channels_out

    def __call__(self, x2, t2):
        self.calls += 1
        n = x2.shape[0] // 2
        assert np.array_equal(x2[:n], x2[n:]) and np.array_equal(t2[:n], t2[n:])
        out = np.concatenate([2 * x2[:n] + 1, -x2[n:]])
        if self.channels_out:  # learned variance: constant 0.25 (cond) and -0.75 (uncond) channels
            var = np.concatenate([np.full_like(x2[:n], 0.25), np.full_like(x2[n:], -0.75)])
            out = np.concatenate([out, var], axis=1)
        return out


@settings(max_examples=30, deadline=None, derandomize=True)
@given(scale=st.floats(0, 15), seed=st.integers(0, 1000))
def test_guided_prediction_is_uncond_plus_scale_times_difference(scale, seed):
    x = np.random.default_rng(seed).standard_normal((3, 2, 4, 4))
    t = np.array([5, 5, 5])
    model = TwoBranchModel()
    out = classifier_free_guidance(model, scale)(x, t)
    assert model.calls == 1  # one network call on [x; x]
    assert np.allclose(out, -x + scale * ((2 * x + 1) - (-x)), atol=1e-12)


def test_scale_one_is_the_conditional_and_zero_the_unconditional_model():
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 4))
    t = np.array([1, 1])
    assert np.allclose(classifier_free_guidance(TwoBranchModel(), 1.0)(x, t), 2 * x + 1)
    assert np.allclose(classifier_free_guidance(TwoBranchModel(), 0.0)(x, t), -x)


@pytest.mark.parametrize("phi", [0.0, 0.3, 0.7, 1.0])
def test_guidance_rescale(phi):
    x = np.random.default_rng(1).standard_normal((2, 3, 4, 4))
    x[1] *= 3.0
    t = np.array([1, 1])
    # Branches that are not affine in x with shared coefficients (for TwoBranchModel std(cond) / std(guided)
    # is one constant, so a std taken over the whole batch instead of per sample would go unseen), and
    # rows of different scale: the per-sample ratios differ.
    def batched(x2, t2):
        n = x2.shape[0] // 2
        return np.concatenate([2 * x2[:n] + 1, -x2[n:] ** 3])

    out = classifier_free_guidance(batched, 7.5, rescale=phi)(x, t)
    cond, uncond = 2 * x + 1, -x**3
    guided = uncond + 7.5 * (cond - uncond)
    # Lin et al. 2023 eq. 15-16: per sample, rescale to the conditional std, then mix with weight phi.
    std = lambda a: a.reshape(2, -1).std(axis=1)[:, None, None, None]  # noqa: E731
    expected = phi * guided * std(cond) / std(guided) + (1 - phi) * guided
    assert np.allclose(out, expected, atol=1e-12)
    if phi == 1.0:
        assert np.allclose(std(out), std(cond))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classifier_free_guidance(TwoBranchModel(), 7.5, rescale=1.5)


def test_learned_variance_is_taken_from_the_conditional_branch():
    x = np.random.default_rng(2).standard_normal((2, 3, 4, 4))
    out = classifier_free_guidance(TwoBranchModel(channels_out=6), 4.0)(x, np.array([3, 3]))
    assert out.shape == (2, 6, 4, 4)
    assert np.allclose(out[:, :3], -x + 4.0 * (3 * x + 1)) and np.all(out[:, 3:] == 0.25)


def test_guided_sampling_equals_sampling_the_combined_model():
    # Two exact denoisers stand for the conditional and unconditional networks; a sampler given the
    # guidance wrapper must produce what it produces on their explicit combination.
    cond = make_denoiser(GaussianMixture.gaussian([0.6, 0.2], 0.1 * np.eye(2)), BASE, "eps")
    uncond = make_denoiser(GaussianMixture.gaussian([0.0, 0.0], 0.5 * np.eye(2)), BASE, "eps")

    def batched(x2, t2):
        n = x2.shape[0] // 2
        return np.concatenate([cond(x2[:n], t2[:n]), uncond(x2[n:], t2[n:])])

    def combined(x, t):
        return uncond(x, t) + 3.0 * (cond(x, t) - uncond(x, t))

    x_T = np.random.default_rng(0).standard_normal((16, 2))
    for name in ["ddim", "dpmpp-2m", "euler-a"]:
        a = sample(name, classifier_free_guidance(batched, 3.0), BASE, x_T, np.random.default_rng(1), 15)
        b = sample(name, combined, BASE, x_T, np.random.default_rng(1), 15)
        assert np.allclose(a, b, atol=1e-12)
