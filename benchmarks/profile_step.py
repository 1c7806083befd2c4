"""Where a training step spends its time: wall time of one step and the share of each kernel.

    NPDIFF_BACKEND=cpu python benchmarks/profile_step.py [--base-channels 32] [--batch 32] [--steps 3]
    NPDIFF_BACKEND=cpu python benchmarks/profile_step.py --sample [--batch 8] [--steps 10]

Every kernel of the active backend is wrapped with a timer; the rest of the step (layer glue,
reshapes, the loss, the text encoder's Python) is reported as "other". With --sample the step is
one network evaluation of the sampler instead: the shipped model's U-Net forward in inference
mode at batch 8 (a 2x2 grid and its unconditional twins under classifier-free guidance).
"""

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from npdiff import kernels  # noqa: E402
from npdiff.model import Model  # noqa: E402
from npdiff.nn.mode import inference  # noqa: E402
from npdiff.train import ShapesSource, TrainArgs, build_model, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-channels", type=int, default=32)
    ap.add_argument("--batch", type=int, default=None, help="default 32, or 8 with --sample")
    ap.add_argument("--steps", type=int, default=None, help="default 3, or 10 with --sample")
    ap.add_argument("--sample", action="store_true", help="profile the sampler's network evaluation")
    a = ap.parse_args()
    a.batch = a.batch or (8 if a.sample else 32)
    a.steps = a.steps or (10 if a.sample else 3)
    backend = kernels.get_backend()
    totals, counts = defaultdict(float), defaultdict(int)
    for name in kernels.KERNEL_NAMES:
        fn = getattr(backend, name)

        def timed(*args, _fn=fn, _name=name, **kw):
            t0 = time.perf_counter()
            out = _fn(*args, **kw)
            totals[_name] += time.perf_counter() - t0
            counts[_name] += 1
            return out
        setattr(backend, name, timed)

    step_fn = _sampler_step(a.batch) if a.sample else _train_step(a.base_channels, a.batch)
    t0 = time.perf_counter()
    step_fn()  # warm-up (compilation, caches)
    warm = time.perf_counter() - t0
    totals.clear(), counts.clear()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    what = ("sampler network evaluation, shipped model" if a.sample
            else f"training step, base_channels={a.base_channels}")
    print(f"backend={kernels.backend_name()} {what} batch={a.batch} load={os.getloadavg()[0]:.2f}")
    print(f"first step {warm:.3f} s; steps {', '.join(f'{t:.3f}' for t in times)} s (median {step:.3f})")
    total = sum(times)
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {t / a.steps * 1e3:8.1f} ms/step  {100 * t / total:5.1f}%  "
              f"({counts[name] // a.steps} calls)")
    other = total - sum(totals.values())
    print(f"  {'other':22s} {other / a.steps * 1e3:8.1f} ms/step  {100 * other / total:5.1f}%")


def _train_step(base_channels, batch):
    rng = np.random.default_rng(0)
    args = TrainArgs(base_channels=base_channels, train_batch_size=batch)
    source = ShapesSource(32)
    model = build_model(args, source, rng)
    schedule = model.config.schedule()
    images, captions = source.batch(rng, batch)
    return lambda: train_step(model, args, schedule, images, captions, rng)


def _sampler_step(batch):
    model = Model.load()
    with inference():
        prompt = "a red circle on the left and a blue square on the right"
        context, mask, pooled, _ = model.encode_text([prompt] * batch)
    x = np.random.default_rng(0).standard_normal((batch, 3, 32, 32)).astype(np.float32)
    t = np.full(batch, 500)

    def step():
        with inference():
            model.unet(x, t, context, mask, pooled)
    return step


if __name__ == "__main__":
    main()
