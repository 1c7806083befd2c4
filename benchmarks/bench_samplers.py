"""How much does a sampler cost beyond the network? (Performance target: at most 2% of a step.)

Each sampler runs 25 steps on a batch shaped like the default sampling job (4 images of 3x32x32, float32)
with a model function that does no work (it returns a precomputed prediction), so the time measured is
all the sampler's own work: schedule look-ups, x0/eps conversions, the update, noise draws. It is
reported per network evaluation, next to the time of one U-Net forward on the CFG batch [x; x] with
npdiff's default U-Net configuration measured in the same run (when npdiff.nn.unet is importable).

Validation before timing: with the exact Gaussian denoiser, DDIM equals first-order DPM-Solver++ and
Euler equals DDIM on the Karras timesteps (two independent implementations of one method), and every
sampler gives finite output and, when deterministic, the same output twice.

Usage: python benchmarks/bench_samplers.py [--repeats 5]
"""

import argparse
import time

import numpy as np

from npdiff.diffusion import GaussianMixture, Schedule, make_denoiser, respace
from npdiff.samplers import SAMPLERS, karras_timesteps, sample, sample_ddim, sample_dpmpp_2m, sample_euler

SHAPE = (4, 3, 32, 32)  # (N, C, H, W)
STEPS = 25


def validate(base):
    data = GaussianMixture.gaussian(np.array([0.3, -0.2]), np.array([[0.3, 0.1], [0.1, 0.2]]))
    model = make_denoiser(data, base, "eps")
    x_T = np.random.default_rng(0).standard_normal((32, 2))
    ddim = sample_ddim(model, base, x_T, None, steps=STEPS)
    assert np.allclose(ddim, sample_dpmpp_2m(model, base, x_T, None, steps=STEPS, order=1), atol=1e-10)
    _, ts = karras_timesteps(base, STEPS)
    assert np.allclose(sample_euler(model, base, x_T, None, steps=STEPS),
                       sample_ddim(model, respace(base, ts[::-1]), x_T, None, steps=len(ts)), atol=1e-10)
    for name in SAMPLERS:
        a = sample(name, model, base, x_T, np.random.default_rng(1), STEPS)
        b = sample(name, model, base, x_T, np.random.default_rng(1), STEPS)
        assert np.all(np.isfinite(a)) and np.array_equal(a, b), name
    print("validated: DDIM == DPM-Solver++(1) == Euler on the same timesteps; all samplers finite and repeatable")


def time_sampler(name, base, x_T, pred, repeats):
    calls = [0]

    def free_model(x, t):
        calls[0] += 1
        return pred

    best = np.inf
    for _ in range(repeats):
        calls[0] = 0
        t0 = time.perf_counter()
        sample(name, free_model, base, x_T, np.random.default_rng(0), STEPS, prediction="v")
        best = min(best, time.perf_counter() - t0)
    return best / calls[0]


def time_unet(repeats):
    try:
        from npdiff.nn.unet import UNetConfig, init_unet, unet_forward
    except ImportError as e:
        print(f"(no U-Net timing: {e})")
        return None
    config = UNetConfig()
    d = config.context_dim
    params = init_unet(config, np.random.default_rng(0), np.float32)
    n = 2 * SHAPE[0]
    x = np.random.default_rng(1).standard_normal((n,) + SHAPE[1:]).astype(np.float32)
    t = np.full(n, 500, dtype=np.int64)
    L = 8
    try:
        context = np.zeros((n, L, d), np.float32)
        mask = np.ones((n, L), bool)
        pooled = np.zeros((n, d), np.float32)
        unet_forward(params, config, x, t, context, mask, pooled)  # warm-up (compilation)
    except Exception as e:  # the U-Net is developed alongside; report rather than fail
        print(f"(no U-Net timing: {type(e).__name__}: {e})")
        return None
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        unet_forward(params, config, x, t, context, mask, pooled)
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = Schedule.from_name("cosine", 1000)
    validate(base)
    rng = np.random.default_rng(0)
    x_T = rng.standard_normal(SHAPE).astype(np.float32)
    pred = rng.standard_normal(SHAPE).astype(np.float32)
    unet = time_unet(args.repeats)
    print(f"\nbatch {SHAPE} float32, {STEPS} steps, best of {args.repeats}")
    if unet is not None:
        print(f"U-Net forward on the CFG batch of {2 * SHAPE[0]}: {unet * 1e3:.1f} ms")
    print(f"{'sampler':10s} {'us per eval':>12s} {'of a U-Net eval':>16s}")
    for name in SAMPLERS:
        per_eval = time_sampler(name, base, x_T, pred, args.repeats)
        ratio = f"{100 * per_eval / unet:.2f}%" if unet else "-"
        print(f"{name:10s} {per_eval * 1e6:12.1f} {ratio:>16s}")


if __name__ == "__main__":
    main()
