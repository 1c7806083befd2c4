"""How fast is each layer kernel at the shipped model's real shapes? NumPy reference vs Numba CPU
(vs PyTorch CPU when importable), forward and backward, with GFLOP/s for convolutions, linear
maps and attention as a fraction of this machine's sgemm peak, measured in the same run.

    python benchmarks/bench_layers.py [--train-batch 32] [--sample-batch 8] [--repeats 7]
        [--backends reference,cpu,torch] [--json benchmarks/results/bench_layers.json]

The shapes are not listed by hand: one forward pass of the text encoder and the U-Net built from
TrainArgs' defaults (the shipped recipe: base 32 channels, channel_mult 1,2,2, 32x32 images,
24 text tokens) runs with every forward kernel wrapped, and each distinct call (kernel, array
shapes and memory order, other arguments) becomes a case, with the number of times one pass
makes it. Training cases (batch 32) time the forward kernel and its backward; sampling cases
(batch 8: 4 images and their unconditional twins under classifier-free guidance) time the
forward only.

Validate before timing: every backend's output and gradients are compared with the reference run
in float64 on the same float32 inputs, err = max|a - b| / max|b| <= 1e-4; a mismatch stops the
run, naming the case, the output and the error.

Times are medians over repeats, each backend's repeats back to back (thread pools of different
libraries slow each other when interleaved, see DESIGN.md). Ratios compare backends measured in
the same process; the load average printed at start and end says how busy the machine was.

Dimension legend: N batch, C K input and output channels, H W sides, L M query and key lengths,
E heads, Dh head width, B rows, I J features.
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import numpy as np  # noqa: E402

from npdiff import kernels  # noqa: E402
from npdiff.kernels import reference as ref  # noqa: E402
from npdiff.model import ModelConfig  # noqa: E402
from npdiff.nn.text_encoder import TextEncoderConfig, init_text_encoder, text_encoder_forward  # noqa: E402
from npdiff.nn.unet import UNetConfig, init_unet, unet_forward  # noqa: E402
from npdiff.train import TrainArgs  # noqa: E402

FORWARD_KERNELS = tuple(k for k in kernels.KERNEL_NAMES if k.endswith("_forward"))
VALIDATE_TOL = 1e-4  # float32 against a float64 oracle; the parity tests measure below 1e-6
SGEMM_SIZE = 2048  # square float32 matrices for the peak: 17 GFLOP per product


# ----------------------------------------------------------------------------------------------
# the cases: every distinct kernel call of one forward pass of the shipped networks


def shipped_configs():
    """The U-Net and text-encoder configs `npdiff train` builds from its defaults."""
    a, m = TrainArgs(), ModelConfig()
    unet = UNetConfig(base_channels=a.base_channels, channel_mult=tuple(a.channel_mult),
                      num_res_blocks=a.num_res_blocks, attention_levels=tuple(a.attention_levels),
                      num_groups=a.num_groups, context_dim=a.text_width)
    text = TextEncoderConfig(vocab_size=a.vocab_size, max_length=m.max_length, width=a.text_width,
                             num_layers=a.text_layers)
    return unet, text, a.resolution, m.max_length


def _keep(a, rng):
    """A copy with the same memory order (a transposed view stays transposed). An all-zero float
    array (ADM starts some weights at zero) gets random values, so that validation sees nonzero
    outputs and gradients."""
    if not isinstance(a, np.ndarray):
        return a
    b = np.empty_like(a, order="K")
    b[...] = a
    if b.dtype.kind == "f" and not b.any():
        b[...] = 0.1 * rng.standard_normal(b.shape)
    return b


def _describe(a):
    if isinstance(a, np.ndarray):
        return ("array", a.shape, a.dtype.str, a.strides)
    return a


def record_cases(N, seed=0):
    """Run the text encoder and the U-Net forward at batch N with every forward kernel wrapped.
    Returns a list of dicts: net, kernel, args (copies of the first call's arrays), calls, and
    need_dx (False for the convolution that reads the image: training never needs its dx)."""
    unet_cfg, text_cfg, side, L = shipped_configs()
    backend = kernels.set_backend("cpu")
    cases, current, image = {}, {"net": None}, {"x": None}
    fill = np.random.default_rng(seed + 1)
    originals = {name: getattr(backend, name) for name in FORWARD_KERNELS}

    def wrap(name, fn):
        def recorded(*args):
            key = (current["net"], name, tuple(_describe(a) for a in args))
            if key not in cases:
                cases[key] = {"net": current["net"], "kernel": name, "args": [_keep(a, fill) for a in args],
                              "calls": 0, "need_dx": args[0] is not image["x"]}
            cases[key]["calls"] += 1
            return fn(*args)
        return recorded

    try:
        for name, fn in originals.items():
            setattr(backend, name, wrap(name, fn))
        rng = np.random.default_rng(seed)
        ids = rng.integers(1, text_cfg.vocab_size, (N, L))  # (N, L)
        mask = np.arange(L)[None, :] < rng.integers(2, L + 1, (N, 1))  # (N, L) captions of varied length
        current["net"] = "text"
        tokens, pooled, _ = text_encoder_forward(init_text_encoder(text_cfg, rng), text_cfg, ids, mask)
        current["net"] = "unet"
        image["x"] = rng.standard_normal((N, unet_cfg.in_channels, side, side)).astype(np.float32)
        t = rng.integers(0, 1000, N)
        unet_forward(init_unet(unet_cfg, rng), unet_cfg, image["x"], t, tokens, mask, pooled)
    finally:
        for name, fn in originals.items():
            setattr(backend, name, fn)
    return list(cases.values())


def label(case):
    k, a = case["kernel"], case["args"]
    views = any(isinstance(x, np.ndarray) and not x.flags.c_contiguous for x in a)
    return _label(k, a) + (" (view)" if views else "")


def _label(k, a):
    if k == "conv2d_forward":
        x, w, _, stride, _ = a
        return (f"conv{w.shape[2]}x{w.shape[3]} {x.shape[1]}->{w.shape[0]} {x.shape[2]}x{x.shape[3]}"
                + (f" s{stride}" if stride != 1 else ""))
    if k == "group_norm_forward":
        return f"group_norm C={a[0].shape[1]} {'x'.join(map(str, a[0].shape[2:]))} G={a[3]}"
    if k == "layer_norm_forward":
        return f"layer_norm {int(np.prod(a[0].shape[:-1]))}x{a[0].shape[-1]}"
    if k in ("silu_forward", "gelu_forward"):
        return f"{k.split('_')[0]} {'x'.join(map(str, a[0].shape[1:]))}"
    if k == "linear_forward":
        x, w, b = a
        return f"linear {int(np.prod(x.shape[:-1]))}x{w.shape[1]}->{w.shape[0]}" + ("" if b is not None else " nobias")
    q, kk, _, m, _ = a
    masked = " mask" if m is not None else ""
    return f"attention E={q.shape[1]} L={q.shape[2]} M={kk.shape[2]} Dh={q.shape[3]}{masked}"


def flops(case, y):
    """(forward, backward) floating-point operations of the matrix products, or (None, None)."""
    k, a = case["kernel"], case["args"]
    if k == "conv2d_forward":
        K, C, R, S = a[1].shape
        f = 2 * y.shape[0] * K * C * R * S * y.shape[2] * y.shape[3]
        return f, f * (2 if case["need_dx"] else 1)
    if k == "linear_forward":
        J, I = a[1].shape
        f = 2 * int(np.prod(a[0].shape[:-1])) * I * J
        return f, 2 * f
    if k == "attention_forward":
        N, E, L, Dh = a[0].shape
        f = 4 * N * E * L * a[1].shape[2] * Dh  # Q K^T and P V
        return f, 2 * f  # dV, dP, dQ, dK
    return None, None


# ----------------------------------------------------------------------------------------------
# one case on one backend


def backward_args(case, fargs, out, dy):
    """The backward kernel's arguments from the forward's (and its saved outputs)."""
    k = case["kernel"]
    if k == "conv2d_forward":
        x, w, _, stride, padding = fargs
        return (dy, x, w, stride, padding, case["need_dx"])
    if k == "group_norm_forward":
        x, g, _, G, _ = fargs
        return (dy, x, g, out[1], out[2], G)
    if k == "layer_norm_forward":
        x, g, _, _ = fargs
        return (dy, x, g, out[1], out[2])
    if k in ("silu_forward", "gelu_forward"):
        return (dy, fargs[0])
    if k == "linear_forward":
        x, w, b = fargs
        return (dy, x, w, b is not None)
    q, kk, v, _, scale = fargs
    return (dy, q, kk, v, out[1], scale)


def numpy_runner(module, case, dy):
    """(forward(), backward(), outputs()) for a kernel module (reference or cpu)."""
    fname = case["kernel"]
    bname = fname.replace("_forward", "_backward")
    fwd, bwd = getattr(module, fname), getattr(module, bname)
    fargs = case["args"]
    out = fwd(*fargs)
    bargs = backward_args(case, fargs, out, dy)

    def outputs():
        o = fwd(*fargs)
        grads = bwd(*backward_args(case, fargs, o, dy))
        return [o if isinstance(o, np.ndarray) else o[0]], list(grads if isinstance(grads, tuple) else (grads,))

    return (lambda: fwd(*fargs)), (lambda: bwd(*bargs)), outputs


def torch_runner(torch, case, dy, need_grad):
    """The same layer with torch.nn.functional and autograd."""
    TF = torch.nn.functional
    k, a = case["kernel"], case["args"]
    ts = [torch.from_numpy(x) if isinstance(x, np.ndarray) else x for x in a]
    grad_idx = [i for i, x in enumerate(a) if isinstance(x, np.ndarray) and x.dtype.kind == "f"]
    if k == "conv2d_forward" and not case["need_dx"]:
        grad_idx = grad_idx[1:]
    if need_grad:
        ts = [t.detach().requires_grad_(True) if i in grad_idx else t for i, t in enumerate(ts)]

    def forward():
        if k == "conv2d_forward":
            return TF.conv2d(ts[0], ts[1], ts[2], stride=ts[3], padding=ts[4])
        if k == "group_norm_forward":
            return TF.group_norm(ts[0], ts[3], ts[1], ts[2], ts[4])
        if k == "layer_norm_forward":
            return TF.layer_norm(ts[0], (ts[0].shape[-1],), ts[1], ts[2], ts[3])
        if k == "silu_forward":
            return TF.silu(ts[0])
        if k == "gelu_forward":
            return TF.gelu(ts[0], approximate="tanh")
        if k == "linear_forward":
            return TF.linear(ts[0], ts[1], ts[2])
        mask = None if ts[3] is None else ts[3][:, None, None, :]  # (N, 1, 1, M), True = attend
        return TF.scaled_dot_product_attention(ts[0], ts[1], ts[2], attn_mask=mask, scale=ts[4])

    if not need_grad:
        def forward_nograd():
            with torch.no_grad():
                return forward()
        return forward_nograd, None, lambda: ([forward_nograd().numpy()], [])
    dy_t = torch.from_numpy(dy)
    y = forward()
    inputs = [ts[i] for i in grad_idx]

    def backward():
        return torch.autograd.grad(y, inputs, dy_t, retain_graph=True)

    def outputs():
        grads = backward()
        return [y.detach().numpy()], [g.numpy() for g in grads]

    return forward, backward, outputs


def oracle_outputs(case, dy):
    """The reference kernels in float64 on the same float32 values."""
    up = lambda x: x.astype(np.float64) if isinstance(x, np.ndarray) and x.dtype.kind == "f" else x  # noqa: E731
    c64 = dict(case, args=[up(x) for x in case["args"]])
    return numpy_runner(ref, c64, dy.astype(np.float64))[2]()


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = float(np.max(np.abs(b)))
    diff = float(np.max(np.abs(a - b)))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))


def _gradients(case, grads, placeholders):
    """Gradients to compare, in input order. The NumPy-style kernels return a slot for every
    gradient (None where not computed; conv2d a bias gradient even without a bias), autograd one
    per input that needs it: drop the slots that autograd would not have."""
    grads = list(grads)
    if placeholders and case["kernel"] == "conv2d_forward" and case["args"][2] is None:
        grads = grads[:2]
    return [g for g in grads if g is not None]


def validate(name, case, got, want, need_grad):
    """Fail loudly when a backend's result differs from the float64 reference."""
    (y,), grads = got
    (y_ref,), grads_ref = want
    checks = [("y", y, y_ref)]
    if need_grad:
        grads = _gradients(case, grads, placeholders=name != "torch")
        grads_ref = _gradients(case, grads_ref, placeholders=True)
        if len(grads) != len(grads_ref):
            raise SystemExit(f"VALIDATION FAILED: {name} {label(case)}: {len(grads)} gradients, "
                             f"the reference has {len(grads_ref)}")
        checks += [(f"gradient {i}", g, r) for i, (g, r) in enumerate(zip(grads, grads_ref))]
    worst = 0.0
    for what, a, b in checks:
        if a.shape != b.shape:
            raise SystemExit(f"VALIDATION FAILED: {name} {label(case)} {what}: shape {a.shape}, "
                             f"the reference gives {b.shape}")
        err = rel_err(a, b)
        if not err <= VALIDATE_TOL:
            raise SystemExit(f"VALIDATION FAILED: {name} {label(case)} {what}: relative error "
                             f"{err:.2e} > {VALIDATE_TOL:.0e}; fix the backend before timing it")
        worst = max(worst, err)
    return worst


def median_time(fn, repeats):
    """Median seconds per call. Two untimed calls first (compilation, caches, first-touch page
    faults); calls faster than a millisecond are timed in runs of several."""
    fn()
    t0 = time.perf_counter()
    fn()
    once = time.perf_counter() - t0
    inner = int(min(50, max(1, 1e-3 / max(once, 1e-9))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return float(np.median(times))


def sgemm_peak(repeats=5):
    """GFLOP/s of the best of `repeats` float32 products of two SGEMM_SIZE^2 matrices (np.dot,
    NumPy's own BLAS with its default threads)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE)).astype(np.float32)
    b = rng.standard_normal((SGEMM_SIZE, SGEMM_SIZE)).astype(np.float32)
    np.dot(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.dot(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * SGEMM_SIZE ** 3 / best / 1e9


# ----------------------------------------------------------------------------------------------
# the run


def run_cases(cases, backends, torch, repeats, train):
    rows = []
    rng = np.random.default_rng(1)
    for i, case in enumerate(cases):
        print(f"  {i + 1}/{len(cases)} {case['net']} {label(case)}", file=sys.stderr, flush=True)
        y0 = getattr(ref, case["kernel"])(*case["args"])
        y0 = y0 if isinstance(y0, np.ndarray) else y0[0]
        dy = rng.standard_normal(y0.shape).astype(np.float32)
        want = oracle_outputs(case, dy)
        f_fwd, f_bwd = flops(case, y0)
        row = {"net": case["net"], "layer": label(case), "kernel": case["kernel"], "batch": y0.shape[0],
               "calls": case["calls"], "flop_forward": f_fwd, "flop_backward": f_bwd if train else None,
               "ms": {}, "max_rel_err": {}}
        for name in backends:
            if name == "torch":
                forward, backward, outputs = torch_runner(torch, case, dy, train)
            else:
                forward, backward, outputs = numpy_runner(kernels.get_backend(name), case, dy)
            row["max_rel_err"][name] = validate(name, case, outputs(), want, train)
            row["ms"][name] = {"forward": 1e3 * median_time(forward, repeats)}
            if train:
                row["ms"][name]["backward"] = 1e3 * median_time(backward, repeats)
        rows.append(row)
    return rows


def add_rates(rows, peak):
    """GFLOP/s of the matrix-product kernels, and as a fraction of the sgemm peak."""
    for row in rows:
        for name, times in row["ms"].items():
            for pass_, ms in times.items():
                f = row[f"flop_{pass_}"]
                if f is not None:
                    gflops = f / (ms * 1e-3) / 1e9
                    row.setdefault("gflops", {}).setdefault(name, {})[pass_] = gflops
                    row.setdefault("fraction_of_peak", {}).setdefault(name, {})[pass_] = gflops / peak


SHORT = {"reference": "ref", "cpu": "cpu", "torch": "torch", "forward": "fwd", "backward": "bwd"}


def print_table(title, rows, backends, passes):
    ratio_cols = [b for b in ("reference", "torch") if b in backends and "cpu" in backends]
    head = f"{'net':4s} {'layer':38s} {'pass':4s} {'n':>3s}" + "".join(f" {SHORT[b] + ' ms':>9s}" for b in backends)
    head += "".join(f" {'ref/cpu' if b == 'reference' else 'cpu/torch':>9s}" for b in ratio_cols)
    head += "".join(f" {SHORT[b] + ' GF/s (%pk)':>17s}" for b in backends)
    print(f"\n{title}\n{head}\n{'-' * len(head)}")
    totals = {p: {b: 0.0 for b in backends} for p in passes}
    for r in rows:
        for p in passes:
            line = f"{r['net']:4s} {r['layer']:38s} {SHORT[p]:4s} {r['calls']:3d}"
            ms = {b: r["ms"][b][p] for b in backends}
            line += "".join(f" {ms[b]:9.3f}" for b in backends)
            # speed-up (ref ms / cpu ms > 1: cpu is faster), slow-down against torch (cpu ms / torch ms)
            for b in ratio_cols:
                line += f" {(ms[b] / ms['cpu'] if b == 'reference' else ms['cpu'] / ms[b]):9.2f}"
            for b in backends:
                g = r.get("gflops", {}).get(b, {}).get(p)
                line += f" {'':>17s}" if g is None else f" {g:8.1f} ({100 * r['fraction_of_peak'][b][p]:3.0f}%)  "
            print(line)
            for b in backends:
                totals[p][b] += r["calls"] * ms[b]
    for p in passes:
        t = totals[p]
        line = f"{'all':4s} {'sum over one pass (ms x n)':38s} {SHORT[p]:4s} {'':3s}"
        line += "".join(f" {t[b]:9.1f}" for b in backends)
        for b in ratio_cols:
            line += f" {(t[b] / t['cpu'] if b == 'reference' else t['cpu'] / t[b]):9.2f}"
        print(line)
    return totals


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-batch", type=int, default=TrainArgs().train_batch_size)
    ap.add_argument("--sample-batch", type=int, default=8, help="0 skips the sampling cases")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--backends", default="reference,cpu,torch")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "bench_layers.json"))
    a = ap.parse_args()

    backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    torch = None
    if "torch" in backends:
        try:
            import torch
            torch.set_num_threads(2)
        except ImportError:
            print("torch is not importable: PyTorch columns skipped (pip install torch==2.13.0)")
            backends.remove("torch")
    from npdiff.kernels import cpu
    load0 = os.getloadavg()
    peak0 = sgemm_peak()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average "
          f"{load0[0]:.2f}; numpy {np.__version__}, numba threads {cpu.numba.get_num_threads()}, "
          f"inner BLAS single-threaded: {cpu.INNER_BLAS_SINGLE_THREADED}"
          + (f", torch {torch.__version__} threads {torch.get_num_threads()}" if torch else ""))
    t_start = time.perf_counter()
    sections = [("training", a.train_batch, True)]
    if a.sample_batch > 0:
        sections.append(("sampling", a.sample_batch, False))
    measured = [(title, N, train, run_cases(record_cases(N), backends, torch, a.repeats, train))
                for title, N, train in sections]
    seconds = time.perf_counter() - t_start
    load1 = os.getloadavg()
    peak1 = sgemm_peak()
    # other work on the machine can only slow a product down: the better of the two is the peak
    peak = max(peak0, peak1)
    print(f"sgemm peak (np.dot float32 {SGEMM_SIZE}^3, best of 5, at the start and at the end): "
          f"{peak0:.1f} and {peak1:.1f} GFLOP/s; fractions below are of {peak:.1f}")
    result = {"sgemm_peak_gflops": peak, "sgemm_gflops_start_end": [peak0, peak1], "backends": backends,
              "repeats": a.repeats, "load_average_start": load0, "load_average_end": load1,
              "seconds": seconds, "sections": {}}
    for title, N, train, rows in measured:
        add_rates(rows, peak)
        passes = ("forward", "backward") if train else ("forward",)
        totals = print_table(f"{title}: batch {N}, {'forward and backward' if train else 'forward'} "
                             "(times in ms, median; n = calls per pass of the network)", rows, backends, passes)
        result["sections"][title] = {"batch": N, "rows": rows, "total_ms": totals}
    print(f"\nload average {load0[0]:.2f} at the start, {load1[0]:.2f} at the end. ref/cpu > 1: Numba "
          "faster than the NumPy reference; cpu/torch > 1: Numba slower than PyTorch by that factor")
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
