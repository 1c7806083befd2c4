"""Pipeline: chaos's guidance spread, per-image guidance in one batch, img2img and inpainting
boundaries, determinism, and the difference between kernel backends."""

import numpy as np
import pytest

from npdiff import kernels
from npdiff.imaging import to_uint8
from npdiff.pipeline import Pipeline, chaos_scales, initial_noise
from tiny_model import tiny_model


@pytest.fixture(scope="module")
def pipe():
    return Pipeline(tiny_model())


def test_chaos_scales():
    assert np.array_equal(chaos_scales(4.0, 0, 4), [4.0] * 4)
    assert chaos_scales(4.0, 100, 4) == pytest.approx([4.0, 3.0, 2.0, 1.0])
    assert chaos_scales(4.0, 50, 3) == pytest.approx([4.0, 3.25, 2.5])
    assert chaos_scales(7.0, 100, 1) == pytest.approx([7.0])          # a single image keeps its scale
    assert chaos_scales(1.0, 100, 4) == pytest.approx([1.0] * 4)       # no guidance stays no guidance


def test_each_image_gets_its_own_guidance_scale(pipe):
    """One batched call with scales (4, 2.5, 1) equals three separate calls, each with its own scale
    (float32 tolerance: the batch only changes the order of summation inside the network, and
    guidance u + s (c - u) multiplies that rounding by up to 2s - 1 = 7; a scale given to the wrong
    image would move the output by s-differences times (c - u), orders of magnitude more)."""
    prompts = ["a red circle", "a blue square", "a green triangle"]
    scales = np.array([4.0, 2.5, 1.0])
    x = initial_noise([1, 2, 3], (3, 16, 16))
    t = np.array([500, 500, 500])
    batched = pipe.model_fn(prompts, "yellow", scales)(x, t)
    for i in range(3):
        alone = pipe.model_fn([prompts[i]], "yellow", scales[i])(x[i:i + 1], t[i:i + 1])
        np.testing.assert_allclose(batched[i], alone[0], rtol=1e-4, atol=1e-5 * (2 * scales[i] - 1))


def test_guidance_scale_one_skips_the_unconditional_half(pipe):
    calls = []
    real = pipe.model.unet

    def counting(x, *a):
        calls.append(len(x))
        return real(x, *a)

    pipe.model.unet = counting
    try:
        pipe.model_fn(["a red circle"] * 2, "", 1.0)(initial_noise([0, 1], (3, 16, 16)), np.array([10, 10]))
        pipe.model_fn(["a red circle"] * 2, "", 3.0)(initial_noise([0, 1], (3, 16, 16)), np.array([10, 10]))
    finally:
        del pipe.model.unet
    assert calls == [2, 4]


def test_img2img_at_the_lowest_strength_returns_the_image(pipe):
    """strength 1/25 walks one step from t = 1, where sigma = sqrt(1 - abar) = 0.0064 under the cosine
    schedule: the output is the input plus sigma times (noise and the guided network output, which
    reaches about 10 for this random model): at most about 16 8-bit levels, and on average under 1.5.
    At strength 1 the image is forgotten."""
    image = to_uint8(initial_noise([5], (3, 16, 16))[0] * 0.5)
    out = pipe.img2img(image, ["a red circle"], strength=1 / 25, steps=25, seed=0, progress=False)
    diff = np.abs(out[0].astype(int) - image.astype(int))
    assert diff.max() <= 16 and diff.mean() < 1.5
    far = pipe.img2img(image, ["a red circle"], strength=1.0, steps=4, seed=0, progress=False)
    assert np.abs(far[0].astype(int) - image.astype(int)).mean() > 10


def test_inpaint_keeps_the_known_region_exactly(pipe):
    image = to_uint8(initial_noise([6], (3, 16, 24))[0] * 0.5)
    keep = np.zeros((16, 24), bool)
    keep[:, :16] = True
    out = pipe.inpaint(image, keep, ["a red circle"] * 2, steps=4, seed=3, progress=False)
    assert out.shape == (2, 16, 24, 3)
    assert np.array_equal(out[:, keep], np.broadcast_to(image[keep], out[:, keep].shape))
    assert not np.array_equal(out[0][~keep], image[~keep])


def test_same_settings_same_pixels(pipe):
    kw = dict(seed=11, steps=3, sampler="euler-a", guidance_scale=2.0, chaos=40, progress=False)
    a = pipe.generate(["a red circle"] * 2, **kw)
    b = pipe.generate(["a red circle"] * 2, **kw)
    assert np.array_equal(a, b)


BACKEND_TOLERANCE = 1e-3   # max |x0 difference| in [-1, 1] units: an eighth of one 8-bit level


def test_reference_and_cpu_backends_agree_within_tolerance(pipe):
    """The NumPy reference kernels (float64-capable oracle) and the Numba CPU kernels sum in different
    orders, so their pixels may differ by rounding; the whole 4-step sample must agree to
    BACKEND_TOLERANCE in x0 and to one 8-bit level after rounding (a value near a rounding boundary
    may land on either side)."""
    before = kernels.backend_name()
    outs = {}
    try:
        for name in ("reference", "cpu"):
            kernels.set_backend(name)
            outs[name] = pipe.generate(["a red circle"] * 2, seed=3, steps=4, progress=False, return_float=True)
    finally:
        kernels.set_backend(before)
    diff = np.abs(outs["reference"].astype(np.float64) - outs["cpu"]).max()
    print(f"reference vs cpu: max |x0 difference| = {diff:.2e} (tolerance {BACKEND_TOLERANCE:.0e})")
    assert diff <= BACKEND_TOLERANCE
    levels = np.abs(to_uint8(outs["reference"]).astype(int) - to_uint8(outs["cpu"]).astype(int)).max()
    assert levels <= 1
