"""Where a training step spends its time: wall time of one step and the share of each kernel.

    NPDIFF_BACKEND=cpu python benchmarks/profile_step.py [--base-channels 32] [--batch 32] [--steps 3]

Every kernel of the active backend is wrapped with a timer; the rest of the step (layer glue,
reshapes, the loss, the text encoder's Python) is reported as "other".
"""

import argparse
import os
import sys
import time
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from npdiff import kernels  # noqa: E402
from npdiff.train import ShapesSource, TrainArgs, build_model, train_step  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-channels", type=int, default=32)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    a = ap.parse_args()
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

    rng = np.random.default_rng(0)
    args = TrainArgs(base_channels=a.base_channels, train_batch_size=a.batch)
    source = ShapesSource(32)
    model = build_model(args, source, rng)
    schedule = model.config.schedule()
    images, captions = source.batch(rng, a.batch)
    t0 = time.perf_counter()
    train_step(model, args, schedule, images, captions, rng)  # warm-up (compilation, caches)
    warm = time.perf_counter() - t0
    totals.clear(), counts.clear()
    times = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        train_step(model, args, schedule, images, captions, rng)
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    print(f"backend={kernels.backend_name()} base_channels={a.base_channels} batch={a.batch} "
          f"load={os.getloadavg()[0]:.2f}")
    print(f"first step {warm:.3f} s; steps {', '.join(f'{t:.3f}' for t in times)} s (median {step:.3f})")
    total = sum(times)
    for name, t in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {name:22s} {t / a.steps * 1e3:8.1f} ms/step  {100 * t / total:5.1f}%  ({counts[name] // a.steps} calls)")
    other = total - sum(totals.values())
    print(f"  {'other':22s} {other / a.steps * 1e3:8.1f} ms/step  {100 * other / total:5.1f}%")


if __name__ == "__main__":
    main()
