"""npdiff against PyTorch on the same network with the same weights: is the Numba CPU engine as
fast as PyTorch on the CPU? (Performance issue: conv2d, U-Net forward, training step, a sampled
grid, cold start, peak memory, sampler overhead.)

    python benchmarks/bench_unet.py [--runs 5] [--cold-runs 2] [--json benchmarks/results/bench_unet.json]

The network is the shipped recipe (TrainArgs with base_channels 32: channel_mult 1,2,2, one
residual block per level, attention at 16x16 and 8x8, 32x32 images, a 2-layer text encoder of
width 128), freshly initialized, or the weights in npdiff/weights when they exist. A fresh
network's zero-initialized layers (the last conv of each residual branch, the output conv) are
given small random values so that every path carries signal. benchmarks/torch_twin.py runs the
same parameter dict in PyTorch.

Validate before timing: text tokens, pooled vector and U-Net output agree with the twin's, and so
do the loss and every gradient of one training step (err = |a - b| / |b| in the 2-norm, at most
1e-4); a mismatch stops the run.

Both engines get the same thread count (--threads, default 2 = this machine's cores) and float32.
Each timing section runs in --runs fresh processes (Numba kernels vary between processes, see
DESIGN.md); the table gives the median over processes of each process's median time, with the
min-max over processes. Cold start runs the real CLI (`python -m npdiff sample`) with an empty
Numba cache, then again with the cache it left. Peak memory is each engine's own process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

TOL = 1e-4
CONV_BATCH = 32          # conv shapes: those of the training step
FORWARD_BATCHES = (1, 4, 16)
TRAIN_BATCH = 32
GRID_PROMPTS = ["a red circle", "a small blue square on the left", "a purple triangle",
                "a red circle on the left and a blue square on the right"]
STEPS = 25
CFG = 3.0
SGEMM_SIZE = 2048


# ----------------------------------------------------------------------------------------------
# the model both engines run


def build(seed=0):
    """(Model, TrainArgs) of the shipped recipe; every all-zero tensor gets small random values."""
    import numpy as np
    from npdiff.model import DEFAULT_MODEL_DIR, Model
    from npdiff.train import ShapesSource, TrainArgs, build_model
    args = TrainArgs(base_channels=32, train_batch_size=TRAIN_BATCH)
    if (DEFAULT_MODEL_DIR / "model.safetensors").is_file():
        return Model.load(DEFAULT_MODEL_DIR), args, "npdiff/weights"
    rng = np.random.default_rng(seed)
    model = build_model(args, ShapesSource(args.resolution), rng)
    for k, v in model.params.items():
        if not v.any():
            v[...] = 0.05 * rng.standard_normal(v.shape)
    model.set_params(model.params)
    return model, args, "fresh init (zero layers randomized)"


def rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def median_time(fn, repeats, warmup=1):
    """Median seconds of `repeats` calls after `warmup` untimed ones."""
    import numpy as np
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def sgemm_peak(repeats=5):
    """GFLOP/s of the best float32 product of two SGEMM_SIZE^2 matrices (NumPy's BLAS)."""
    import numpy as np
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE)).astype(np.float32) for _ in range(2))
    np.dot(a, b)
    best = min(_timed(lambda: np.dot(a, b)) for _ in range(repeats))
    return 2 * SGEMM_SIZE ** 3 / best / 1e9


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# one training step in each engine (forward, loss, backward, clipping, AdamW)


def npdiff_train_step(model, args, schedule, images, captions, rng, opt_state):
    from npdiff.nn import optim
    from npdiff.train import learning_rate, train_step
    loss, grads = train_step(model, args, schedule, images, captions, rng)
    optim.clip_grad_norm(grads, args.max_grad_norm)
    optim.adamw_step(model.params, grads, opt_state, lr=learning_rate(args, 0), weight_decay=args.weight_decay)
    model.set_params(model.params)
    return loss, grads


def torch_batch(model, args, schedule, images, captions, rng):
    """What npdiff's train_step draws, drawn the same way (caption dropout, t, noise), as inputs
    and target for the twin."""
    import numpy as np
    from npdiff.diffusion.forward import prediction_target, q_sample, snr
    from npdiff.diffusion.losses import min_snr_weight
    from npdiff.imaging import from_uint8
    from npdiff.train import CAPTION_DROPOUT
    n = images.shape[0]
    drop = rng.random(n) < CAPTION_DROPOUT
    captions = ["" if d else c for d, c in zip(drop, captions)]
    x0 = from_uint8(images, np.float32)
    t = rng.integers(0, len(schedule), size=n)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)
    x_t = q_sample(schedule, x0, t, noise).astype(np.float32)
    ids, mask = model.tokenizer.encode_batch(captions, model.config.max_length)
    target = prediction_target(schedule, x0, t, noise, model.config.prediction_type).astype(np.float32)
    w = min_snr_weight(snr(schedule, t), args.min_snr_gamma, model.config.prediction_type,
                       args.snr_floor).astype(np.float32)
    return x_t, schedule.timesteps[t], ids, mask, target, w


def torch_loss(twin, x_t, t, ids, mask, target, w):
    import torch
    tokens, pooled = twin.text(ids, mask)
    out = twin.unet(torch.from_numpy(x_t), t, tokens, mask, pooled)
    mse = ((out - torch.from_numpy(target)) ** 2).flatten(1).mean(1)
    return (torch.from_numpy(w) * mse).mean()


def torch_train_step(twin, opt, model, args, schedule, images, captions, rng):
    import torch
    batch = torch_batch(model, args, schedule, images, captions, rng)
    opt.zero_grad(set_to_none=True)
    loss = torch_loss(twin, *batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(twin.parameters(), args.max_grad_norm)
    opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------------------------
# validation


def validate(model, args, torch, TorchTwin):
    import numpy as np
    from npdiff.train import ShapesSource, train_step
    errs = {}
    twin = TorchTwin(model.unet_params, model.text_params, model.config)
    rng = np.random.default_rng(1)
    prompts = GRID_PROMPTS + [""]
    ctx, mask, pooled, _ = model.encode_text(prompts)
    ids, tmask = model.tokenizer.encode_batch(prompts, model.config.max_length)
    x = rng.standard_normal((len(prompts), 3, 32, 32)).astype(np.float32)
    t = rng.integers(0, 1000, len(prompts))
    out, _ = model.unet(x, t, ctx, mask, pooled)
    with torch.no_grad():
        ttok, tpool = twin.text(ids, tmask)
        tout = twin.unet(torch.from_numpy(x), t, ttok, tmask, tpool)
    errs["text tokens"], errs["pooled"] = rel(ctx, ttok.numpy()), rel(pooled, tpool.numpy())
    errs["unet out"] = rel(out, tout.numpy())
    # one training step's loss and gradients from the same draws
    schedule = model.config.schedule()
    images, captions = ShapesSource(args.resolution).batch(np.random.default_rng(2), 8)
    loss, grads = train_step(model, args, schedule, images, captions, np.random.default_rng(3))
    gtwin = TorchTwin(model.unet_params, model.text_params, model.config, requires_grad=True)
    tl = torch_loss(gtwin, *torch_batch(model, args, schedule, images, captions, np.random.default_rng(3)))
    tl.backward()
    tl = float(tl.detach())
    errs["train loss"] = abs(loss - tl) / abs(tl)
    tgrads = {**{f"unet.{k}": v.grad.numpy() for k, v in gtwin.U.items()},
              **{f"text.{k}": v.grad.numpy() for k, v in gtwin.T.items()}}
    # A bias that feeds a group norm has gradient exactly 0 (the norm removes any per-channel shift),
    # and both engines return rounding noise for it (with trained weights that noise reaches 1e-7 of
    # the whole gradient): each gradient's error is measured against the larger of its own norm and
    # 1e-3 of the norm of all gradients together.
    floor = 1e-3 * float(np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in tgrads.values())))

    def gerr(k):
        return float(np.linalg.norm(grads[k].astype(np.float64) - tgrads[k]) / max(np.linalg.norm(tgrads[k]), floor))
    worst = max(grads, key=gerr)
    errs[f"worst gradient ({worst})"] = gerr(worst)
    for name, e in errs.items():
        print(f"  validate {name:48s} rel err {e:.1e}", file=sys.stderr)
        if not e <= TOL:
            raise SystemExit(f"validation failed: {name} differs from the PyTorch twin by {e:.2e} > {TOL}")
    return errs


# ----------------------------------------------------------------------------------------------
# the timings of one process


def conv_shapes(model, N):
    """Distinct 3x3 convolutions of one U-Net forward at batch N: {(C, H, W, K, stride): count}."""
    import numpy as np
    from npdiff import kernels
    backend = kernels.get_backend()
    fwd = backend.conv2d_forward
    seen = {}

    def spy(x, w, b, stride, padding):
        if w.shape[2] == 3:
            key = (x.shape[1], x.shape[2], x.shape[3], w.shape[0], stride)
            seen[key] = seen.get(key, 0) + 1
        return fwd(x, w, b, stride, padding)
    backend.conv2d_forward = spy
    try:
        ctx, mask, pooled, _ = model.encode_text(["a red circle"] * N)
        model.unet(np.zeros((N, 3, 32, 32), np.float32), np.zeros(N, np.int64), ctx, mask, pooled)
    finally:
        backend.conv2d_forward = fwd
    return seen


def time_convs(model, torch, repeats):
    import numpy as np
    from npdiff import kernels
    backend = kernels.get_backend()
    TF = torch.nn.functional
    rng = np.random.default_rng(0)
    rows = []
    for (C, H, W, K, stride), count in sorted(conv_shapes(model, CONV_BATCH).items()):
        N = CONV_BATCH
        x = rng.standard_normal((N, C, H, W)).astype(np.float32)
        w = (rng.standard_normal((K, C, 3, 3)) / np.sqrt(9 * C)).astype(np.float32)
        b = rng.standard_normal(K).astype(np.float32)
        y = backend.conv2d_forward(x, w, b, stride, 1)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        tx, tw, tb = (torch.from_numpy(a).requires_grad_() for a in (x, w, b))
        ty = TF.conv2d(tx, tw, tb, stride=stride, padding=1)
        dx, dw, db = backend.conv2d_backward(dy, x, w, stride, 1)
        tdx, tdw, tdb = torch.autograd.grad(ty, (tx, tw, tb), torch.from_numpy(dy))
        for a, t in ((y, ty.detach()), (dx, tdx), (dw, tdw), (db, tdb)):
            e = rel(a, t.numpy())
            if not e <= TOL:
                raise SystemExit(f"validation failed: conv2d {(N, C, H, W, K, stride)} differs from torch by {e:.2e}")
        with torch.no_grad():
            t_f = median_time(lambda: TF.conv2d(tx, tw, tb, stride=stride, padding=1), repeats)
        tdy = torch.from_numpy(dy)

        def torch_bwd():
            out = TF.conv2d(tx, tw, tb, stride=stride, padding=1)
            torch.autograd.grad(out, (tx, tw, tb), tdy)
        t_fb = median_time(torch_bwd, repeats)
        n_f = median_time(lambda: backend.conv2d_forward(x, w, b, stride, 1), repeats)
        n_b = median_time(lambda: backend.conv2d_backward(dy, x, w, stride, 1), repeats)
        P, Q = y.shape[2], y.shape[3]
        rows.append({"shape": [N, C, H, W, K, stride], "count": count, "gflop_fwd": 2 * N * K * C * 9 * P * Q / 1e9,
                     "npdiff_fwd": n_f, "npdiff_bwd": n_b, "torch_fwd": t_f, "torch_bwd": max(t_fb - t_f, 1e-9)})
    return rows


def time_forward(model, twin, torch, repeats):
    import numpy as np
    from npdiff.nn.mode import inference
    rng = np.random.default_rng(0)
    out = {}
    for N in FORWARD_BATCHES:
        prompts = (GRID_PROMPTS * N)[:N]
        ctx, mask, pooled, _ = model.encode_text(prompts)
        ids, tmask = model.tokenizer.encode_batch(prompts, model.config.max_length)
        x = rng.standard_normal((N, 3, 32, 32)).astype(np.float32)
        t = rng.integers(0, 1000, N)
        with torch.no_grad():
            ttok, tpool = twin.text(ids, tmask)
            tx = torch.from_numpy(x)
            t_t = median_time(lambda: twin.unet(tx, t, ttok, tmask, tpool), repeats, warmup=2)
        with inference():  # as the sampling pipeline runs it; PyTorch under no_grad
            t_n = median_time(lambda: model.unet(x, t, ctx, mask, pooled), repeats, warmup=2)
        out[N] = {"npdiff": t_n, "torch": t_t}
    return out


def time_train(model, args, twin_cls, torch, repeats):
    import numpy as np
    from npdiff.nn import optim
    from npdiff.train import ShapesSource, learning_rate
    schedule = model.config.schedule()
    images, captions = ShapesSource(args.resolution).batch(np.random.default_rng(5), TRAIN_BATCH)
    twin = twin_cls(model.unet_params, model.text_params, model.config, requires_grad=True)
    opt = torch.optim.AdamW(twin.parameters(), lr=learning_rate(args, 0), weight_decay=args.weight_decay)
    rng_t = np.random.default_rng(6)
    t_t = median_time(lambda: torch_train_step(twin, opt, model, args, schedule, images, captions, rng_t), repeats)
    saved = {k: v.copy() for k, v in model.params.items()}
    opt_state = optim.adamw_init(model.params)
    rng_n = np.random.default_rng(6)
    t_n = median_time(lambda: npdiff_train_step(model, args, schedule, images, captions, rng_n, opt_state), repeats)
    for k, v in saved.items():  # later sections run the weights that were validated
        model.params[k][...] = v
    model.set_params(model.params)
    return {"npdiff": t_n, "torch": t_t}


def torch_grid_fn(model, twin, torch, steps=STEPS):
    """The twin's 2x2 grid: npdiff's own sampler and guidance around the twin's networks."""
    import numpy as np
    from npdiff.pipeline import initial_noise
    from npdiff.samplers import get_sampler
    from npdiff.samplers.guidance import classifier_free_guidance
    schedule = model.config.schedule()

    def grid():
        n = len(GRID_PROMPTS)
        ids, mask = model.tokenizer.encode_batch(GRID_PROMPTS + [""] * n, model.config.max_length)
        with torch.no_grad():
            tokens, pooled = twin.text(ids, mask)

            def both(x2, t2):  # [x; x] -> [cond; uncond]
                return twin.unet(torch.from_numpy(np.ascontiguousarray(x2)), t2, tokens, mask, pooled).numpy()
            x_T = initial_noise(list(range(n)), (3, 32, 32))
            return get_sampler("dpmpp-2m")(classifier_free_guidance(both, CFG), schedule, x_T,
                                           np.random.default_rng([0, 1]), steps=steps,
                                           prediction=model.config.prediction_type, clip_x0=True)
    return grid


def npdiff_grid_fn(model, steps=STEPS):
    from npdiff.pipeline import Pipeline
    pipe = Pipeline(model)
    return lambda: pipe.generate(GRID_PROMPTS, seed=0, steps=steps, guidance_scale=CFG, progress=False)


def time_grid(model, twin, torch, repeats):
    """A 2x2 grid: 4 prompts, 25 DPM-Solver++ steps, CFG on the batch of 8. npdiff runs its
    Pipeline; the twin runs the same sampler and guidance with its own networks. Also the share of
    npdiff's time spent outside the networks (sampler, guidance, conversions, PNG-free)."""
    npdiff_grid = npdiff_grid_fn(model)
    t_t = median_time(torch_grid_fn(model, twin, torch), repeats)
    t_n = median_time(npdiff_grid, repeats)
    # network time inside one npdiff grid: wrap the U-Net and the text encoder
    inner = [0.0]
    unet, encode = model.unet, model.encode_text

    def timed(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            r = fn(*a, **k)
            inner[0] += time.perf_counter() - t0
            return r
        return wrapper
    model.unet, model.encode_text = timed(unet), timed(encode)
    try:
        t_all = _timed(npdiff_grid)
    finally:
        model.unet, model.encode_text = unet, encode
    return {"npdiff": t_n, "torch": t_t, "overhead_share": (t_all - inner[0]) / t_all}


def worker(args_ns):
    import numpy as np
    import torch
    from torch_twin import TorchTwin
    from npdiff import kernels
    import numba
    torch.set_num_threads(args_ns.threads)
    numba.set_num_threads(args_ns.threads)
    model, args, source = build()
    print(f"worker {os.getpid()}: model {source}, backend {kernels.backend_name()}, numba threads "
          f"{numba.get_num_threads()}, torch threads {torch.get_num_threads()}", file=sys.stderr)
    validation = validate(model, args, torch, TorchTwin)
    twin = TorchTwin(model.unet_params, model.text_params, model.config)
    res = {"model": source, "validation": validation, "load_start": os.getloadavg()[0],
           "sgemm_gflops": sgemm_peak()}
    res["conv"] = time_convs(model, torch, args_ns.repeats)
    res["forward"] = time_forward(model, twin, torch, args_ns.repeats)
    res["train"] = time_train(model, args, TorchTwin, torch, max(3, args_ns.repeats // 2))
    res["grid"] = time_grid(model, twin, torch, max(2, args_ns.repeats // 3))
    res["sgemm_gflops"] = max(res["sgemm_gflops"], sgemm_peak())
    res["load_end"] = os.getloadavg()[0]
    json.dump(res, sys.stdout)


# ----------------------------------------------------------------------------------------------
# runs in fresh processes: cold start and peak memory


CHILD_ENV_KEEP = ("PATH", "HOME", "LANG", "PYTHONPATH")


def _env(threads, **extra):
    env = {k: v for k, v in os.environ.items() if k in CHILD_ENV_KEEP or k.startswith("PYENV")}
    env.update(NUMBA_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads), PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


FIRST_STEP_PROBE = """
import sys, time
import npdiff.pipeline as P
seen = []
step = P._Progress.step
def first(self, *a):
    if not seen:
        seen.append(time.time())
        print(f"FIRST_STEP {seen[0]!r}", file=sys.stderr, flush=True)
    return step(self, *a)
P._Progress.step = first
from npdiff.cli import main
code = main(sys.argv[1:])
print(f"DONE {time.time()!r}", file=sys.stderr, flush=True)
raise SystemExit(code)
"""


def cold_start(model_dir, threads, runs):
    """Wall time of `python -m npdiff sample` to its first denoising step and to its end, with an
    empty Numba cache (compilation included) and then with the cache that run left."""
    rows = []
    for i in range(runs):
        cache = tempfile.mkdtemp(prefix="npdiff_numba_cache_")
        out = tempfile.mkdtemp(prefix="npdiff_cold_out_")
        try:
            for state in ("cold", "warm"):
                env = _env(threads, NUMBA_CACHE_DIR=cache)
                t0 = time.time()
                p = subprocess.run([sys.executable, "-c", FIRST_STEP_PROBE, "sample", "a red circle",
                                    "--model", str(model_dir), "--outdir", out, "--seed", "0", "--quiet"],
                                   env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
                if p.returncode != 0:
                    raise SystemExit(f"npdiff sample failed:\n{p.stderr[-2000:]}")
                marks = dict(line.split(" ", 1) for line in p.stderr.splitlines()
                             if line.startswith(("FIRST_STEP ", "DONE ")))
                rows.append({"state": state, "run": i, "first_step": float(marks["FIRST_STEP"]) - t0,
                             "total": float(marks["DONE"]) - t0})
                print(f"  cold start run {i} {state}: first step {rows[-1]['first_step']:.1f} s, "
                      f"total {rows[-1]['total']:.1f} s", file=sys.stderr)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    return rows


MEMORY_PROBE = """
import json, resource, sys
sys.path.insert(0, {here!r})
import numpy as np
import bench_unet as B
engine, job, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
model, args, _ = B.build()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if engine == "torch":
    import torch
    from torch_twin import TorchTwin
    torch.set_num_threads(threads)
if job == "train":
    from npdiff.nn import optim
    from npdiff.train import ShapesSource
    schedule = model.config.schedule()
    images, captions = ShapesSource(args.resolution).batch(np.random.default_rng(5), B.TRAIN_BATCH)
    rng = np.random.default_rng(6)
    if engine == "torch":
        twin = TorchTwin(model.unet_params, model.text_params, model.config, requires_grad=True)
        opt = torch.optim.AdamW(twin.parameters(), lr=1e-4)
        for _ in range(2):
            B.torch_train_step(twin, opt, model, args, schedule, images, captions, rng)
    else:
        state = optim.adamw_init(model.params)
        for _ in range(2):
            B.npdiff_train_step(model, args, schedule, images, captions, rng, state)
else:
    if engine == "torch":
        B.torch_grid_fn(model, TorchTwin(model.unet_params, model.text_params, model.config), torch, 5)()
    else:
        B.npdiff_grid_fn(model, 5)()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"base_mib": base / 1024, "peak_mib": peak / 1024}}))
"""


def peak_memory(threads):
    """Peak resident memory (MiB) of a fresh process per engine and job; base_mib is the process
    after imports and model construction, before the job."""
    out = {}
    code = MEMORY_PROBE.format(here=str(HERE))
    for job in ("train", "sample"):
        for engine in ("npdiff", "torch"):
            p = subprocess.run([sys.executable, "-c", code, engine, job, str(threads)], env=_env(threads),
                               capture_output=True, text=True, cwd=str(ROOT))
            if p.returncode != 0:
                raise SystemExit(f"memory probe {engine} {job} failed:\n{p.stderr[-2000:]}")
            out[f"{job}/{engine}"] = json.loads(p.stdout.strip().splitlines()[-1])
            print(f"  peak RSS {job} {engine}: {out[f'{job}/{engine}']['peak_mib']:.0f} MiB", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------------
# the table


def _spread(values):
    import numpy as np
    v = np.asarray(values, dtype=np.float64)
    return float(np.median(v)), float(v.min()), float(v.max())


def summarize(runs, cold, memory, threads):
    import numpy as np
    peak = max(r["sgemm_gflops"] for r in runs)
    rows = []  # (what, npdiff seconds (med, lo, hi), torch seconds, extra)

    def add(what, n_vals, t_vals, gflop=None, unit="ms"):
        n, t = _spread(n_vals), _spread(t_vals)
        ratio = _spread([a / b for a, b in zip(n_vals, t_vals)])
        rows.append({"what": what, "npdiff_s": n, "torch_s": t, "ratio": ratio, "gflop": gflop, "unit": unit})

    shapes = [tuple(c["shape"]) for c in runs[0]["conv"]]
    for i, shape in enumerate(shapes):
        c0 = runs[0]["conv"][i]
        g = 3 * c0["gflop_fwd"]  # forward + backward (dx and dw) = 3 forward products
        n, c, h, w, k, s = shape
        add(f"conv2d 3x3 fwd+bwd N={n} C={c} {h}x{w} K={k} s={s} (x{c0['count']})",
            [r["conv"][i]["npdiff_fwd"] + r["conv"][i]["npdiff_bwd"] for r in runs],
            [r["conv"][i]["torch_fwd"] + r["conv"][i]["torch_bwd"] for r in runs], g)
    tot = [sum(c["count"] * (c["npdiff_fwd"] + c["npdiff_bwd"]) for c in r["conv"]) for r in runs]
    ttot = [sum(c["count"] * (c["torch_fwd"] + c["torch_bwd"]) for c in r["conv"]) for r in runs]
    add("conv2d 3x3 fwd+bwd, all of one training step", tot, ttot,
        sum(3 * c["count"] * c["gflop_fwd"] for c in runs[0]["conv"]))
    for N in FORWARD_BATCHES:
        add(f"U-Net forward, batch {N}", [r["forward"][str(N)]["npdiff"] for r in runs],
            [r["forward"][str(N)]["torch"] for r in runs])
    add(f"training step, batch {TRAIN_BATCH} (fwd, loss, bwd, clip, AdamW)", [r["train"]["npdiff"] for r in runs],
        [r["train"]["torch"] for r in runs], unit="s")
    add(f"2x2 grid, {STEPS} DPM-Solver++ steps, CFG (200 image-evaluations)", [r["grid"]["npdiff"] for r in runs],
        [r["grid"]["torch"] for r in runs], unit="s")
    overhead = _spread([r["grid"]["overhead_share"] for r in runs])
    cold_first = _spread([c["first_step"] for c in cold if c["state"] == "cold"]) if cold else None
    warm_first = _spread([c["first_step"] for c in cold if c["state"] == "warm"]) if cold else None
    return {"machine": machine(), "threads": threads, "sgemm_peak_gflops": peak, "rows": rows,
            "sampler_overhead_share": overhead, "cold_start_first_step_s": cold_first,
            "warm_start_first_step_s": warm_first, "cold_start_runs": cold, "peak_memory_mib": memory,
            "load": [(r["load_start"], r["load_end"]) for r in runs], "model": runs[0]["model"],
            "validation": runs[0]["validation"], "processes": len(runs)}


def machine():
    name = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                name = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "python": platform.python_version()}


def _fmt_s(v, unit):
    scale = 1e3 if unit == "ms" else 1.0
    med, lo, hi = (x * scale for x in v)
    prec = 1 if unit == "ms" else 2
    return f"{med:.{prec}f} ({lo:.{prec}f}-{hi:.{prec}f}) {unit}"


def table(summary):
    peak = summary["sgemm_peak_gflops"]
    lines = [f"| what | npdiff | PyTorch | npdiff / PyTorch | npdiff GFLOP/s (% sgemm) | PyTorch GFLOP/s (% sgemm) |",
             "|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        if r["gflop"]:
            gn, gt = r["gflop"] / r["npdiff_s"][0], r["gflop"] / r["torch_s"][0]
            rates = f"{gn:.0f} ({100 * gn / peak:.0f}%)", f"{gt:.0f} ({100 * gt / peak:.0f}%)"
        else:
            rates = "", ""
        ratio = r["ratio"]
        lines.append(f"| {r['what']} | {_fmt_s(r['npdiff_s'], r['unit'])} | {_fmt_s(r['torch_s'], r['unit'])} | "
                     f"{ratio[0]:.2f} ({ratio[1]:.2f}-{ratio[2]:.2f}) | {rates[0]} | {rates[1]} |")
    o = summary["sampler_overhead_share"]
    lines.append(f"| sampler overhead (all but the networks) in the grid | {100 * o[0]:.1f}% "
                 f"({100 * o[1]:.1f}-{100 * o[2]:.1f}%) of the time | | | | |")
    if summary["cold_start_first_step_s"]:
        c, w = summary["cold_start_first_step_s"], summary["warm_start_first_step_s"]
        lines.append("| `npdiff sample` to the first denoising step, empty Numba cache | "
                     f"{c[0]:.1f} ({c[1]:.1f}-{c[2]:.1f}) s | | | | |")
        lines.append("| `npdiff sample` to the first denoising step, warm cache | "
                     f"{w[0]:.2f} ({w[1]:.2f}-{w[2]:.2f}) s | | | | |")
    mem = summary["peak_memory_mib"]
    for job, what in (("train", f"peak RSS, training batch {TRAIN_BATCH}"),
                      ("sample", "peak RSS, sampling a 2x2 grid (batch 4, CFG 8)")):
        if f"{job}/npdiff" in mem:
            n, t = mem[f"{job}/npdiff"]["peak_mib"], mem[f"{job}/torch"]["peak_mib"]
            lines.append(f"| {what} | {n:.0f} MiB | {t:.0f} MiB | {n / t:.2f} | | |")
    m = summary["machine"]
    head = (f"{m['cpu']}, {m['cores']} cores; {summary['threads']} threads for both engines; float32; "
            f"measured sgemm peak {peak:.0f} GFLOP/s (NumPy, {SGEMM_SIZE}^2); times are the median over "
            f"{summary['processes']} fresh processes (min-max); load average during the runs "
            + ", ".join(f"{a:.1f}-{b:.1f}" for a, b in summary["load"]) + f"; weights: {summary['model']}")
    return head + "\n\n" + "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5, help="fresh processes for the timing sections")
    ap.add_argument("--cold-runs", type=int, default=2,
                    help="cold/warm start pairs (each cold run compiles every kernel)")
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per measurement within a process")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=str(HERE / "results" / "bench_unet.json"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--skip-cold", action="store_true", help="no cold-start and memory runs")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    runs = []
    for i in range(a.runs):
        p = subprocess.run([sys.executable, __file__, "--worker", "--repeats", str(a.repeats), "--threads",
                            str(a.threads)], env=_env(a.threads), capture_output=True, text=True, cwd=str(ROOT))
        sys.stderr.write(p.stderr)
        if p.returncode != 0:
            raise SystemExit(f"worker {i} failed")
        runs.append(json.loads(p.stdout))
    cold, memory = [], {}
    if not a.skip_cold:
        with tempfile.TemporaryDirectory(prefix="npdiff_bench_model_") as d:
            model, _, _ = build()
            model.save(d)
            cold = cold_start(d, a.threads, a.cold_runs)
        memory = peak_memory(a.threads)
    summary = summarize(runs, cold, memory, a.threads)
    summary["command"] = "python benchmarks/bench_unet.py " + " ".join(sys.argv[1:])
    summary["raw"] = runs
    text = table(summary)
    print(text)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(summary, indent=1))
    print(f"\nwritten to {a.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
