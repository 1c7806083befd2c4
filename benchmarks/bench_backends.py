"""How far apart are the backends on the sampling path, kernel by kernel and for a whole U-Net forward?

Backends: the NumPy reference (npdiff/kernels/reference.py), the Numba CPU kernels (cpu.py), the
numba.cuda kernels (cuda.py; only on a real GPU: the CUDA simulator runs kernels as Python threads
and its times mean nothing, so without a GPU its rows read "not measured: no GPU"), and PyTorch on
the CPU and, with a GPU, on CUDA (skipped cleanly when torch is not installed).

Shapes are the shipped model's sampling job (the training defaults: base 32 channels, levels
(1, 2, 2), attention at 16x16 and 8x8, text width 128): 4 images under classifier-free guidance is
a batch of 8 at 32x32; kernels use the 16x16 level (64 channels) and the text MLP's width.

Validation before timing: every backend's float32 output is compared with the reference run in
float64 on the same float32 inputs, err = max|a - b| / max|b|; a backend over TOLERANCE is reported
as failed and not timed. The U-Net gets fresh parameters with its zero-initialized layers filled
with small noise, so that its output is not identically 0.

Timing: one warm-up call (compiles Numba kernels), then --repeats calls; best and median in ms,
and the ratio best / reference best measured in this same run. CUDA times (numba and torch) are
synchronized and run on arrays already on the device: the device path, no host copies. The U-Net
on CUDA is npdiff.nn.cuda_forward.unet_forward_device. One process: hand-written Numba loops were
seen to vary 1.5-4x between fresh processes (DESIGN.md), so compare runs, not single numbers.

Usage: python benchmarks/bench_backends.py [--repeats 5] [--json benchmarks/results/bench_backends.json]
"""

import os

# two thread pools fighting (Numba's and OpenBLAS's) cost 2-3x on 2 cores (DESIGN.md)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from npdiff import kernels  # noqa: E402
from npdiff.kernels import reference as ref  # noqa: E402
from npdiff.nn.unet import UNetConfig, init_unet, unet_forward  # noqa: E402

TOLERANCE = 1e-4  # float32 against float64: a few hundred unit roundoffs of the largest entry
BACKENDS = ("reference", "cpu", "cuda", "torch-cpu", "torch-cuda")
N, HW = 8, 32  # the CFG batch of 4 images, image side
UNET = UNetConfig(base_channels=32, channel_mult=(1, 2, 2), attention_levels=(1, 2), num_groups=32, context_dim=128)
TEXT_LEN = 24  # tokens per prompt (ModelConfig.max_length)


# ----------------------------------------------------------------------------------------------
# what is available here


def cuda_status():
    """(usable, reason): numba.cuda on a real GPU, never the simulator."""
    try:
        from numba import config, cuda
    except ImportError as e:
        return False, f"not measured: numba.cuda does not import ({e})"
    if config.ENABLE_CUDASIM:
        return False, "not measured: NUMBA_ENABLE_CUDASIM is set (the simulator is not a benchmark)"
    if not cuda.is_available():
        return False, "not measured: no GPU"
    return True, ""


def torch_status():
    try:
        import torch
    except ImportError:
        return None, "not measured: torch is not installed"
    return torch, ""


# ----------------------------------------------------------------------------------------------
# the kernels: one case = inputs, and per backend a function that runs it


def kernel_cases(rng):
    """name -> (float32 inputs, reference function of them, description)."""
    f = np.float32

    def randn(*shape, scale=1.0):
        return (scale * rng.standard_normal(shape)).astype(f)

    C = 64
    x = randn(N, C, 16, 16)
    w = randn(C, C, 3, 3, scale=1.0 / np.sqrt(9 * C))
    b = randn(C)
    tokens = randn(N, 256, C)
    wl, bl = randn(3 * C, C, scale=1.0 / np.sqrt(C)), randn(3 * C)
    q, k, v = randn(N, 4, 256, 16), randn(N, 4, 256, 16), randn(N, 4, 256, 16)
    mlp = randn(N, TEXT_LEN, 512)
    return {
        "conv2d 3x3": ((x, w, b), lambda x, w, b: ref.conv2d_forward(x, w, b, 1, 1), f"x {x.shape}, w {w.shape}"),
        "group_norm": ((x, b, b), lambda x, g, be: ref.group_norm_forward(x, g, be, 32, 1e-5)[0],
                       f"x {x.shape}, 32 groups"),
        "layer_norm": ((tokens, b, b), lambda t, g, be: ref.layer_norm_forward(t, g, be, 1e-5)[0], f"x {tokens.shape}"),
        "linear": ((tokens, wl, bl), ref.linear_forward, f"x {tokens.shape}, w {wl.shape}"),
        "attention": ((q, k, v), lambda q, k, v: ref.attention_forward(q, k, v, None, 0.25)[0], f"q k v {q.shape}"),
        "silu": ((x,), ref.silu_forward, f"x {x.shape}"),
        "gelu": ((mlp,), ref.gelu_forward, f"x {mlp.shape}"),
    }


def host_runner(module, name, args):
    """A kernel of a host backend module (reference or cpu) -> function of no arguments."""
    fns = {
        "conv2d 3x3": lambda: module.conv2d_forward(args[0], args[1], args[2], 1, 1),
        "group_norm": lambda: module.group_norm_forward(args[0], args[1], args[2], 32, 1e-5)[0],
        "layer_norm": lambda: module.layer_norm_forward(args[0], args[1], args[2], 1e-5)[0],
        "linear": lambda: module.linear_forward(*args),
        "attention": lambda: module.attention_forward(args[0], args[1], args[2], None, 0.25)[0],
        "silu": lambda: module.silu_forward(args[0]),
        "gelu": lambda: module.gelu_forward(args[0]),
    }
    return fns[name], (lambda out: out)


def cuda_runner(name, args):
    """A device kernel on inputs already on the device -> (run, to host array in the reference layout)."""
    from numba import cuda

    from npdiff.kernels import cuda as K
    if name == "attention":  # the device kernel works on token layouts (N, L, E*Dh)
        q, k, v = (K.to_device(a.transpose(0, 2, 1, 3).reshape(a.shape[0], a.shape[2], -1)) for a in args)
        E, Dh = args[0].shape[1], args[0].shape[3]

        def run():
            out = K.attention(q, k, v, E, scale=0.25)
            cuda.synchronize()
            return out

        def to_ref(out):
            o = K.to_host(out)
            return o.reshape(o.shape[0], o.shape[1], E, Dh).transpose(0, 2, 1, 3)
        return run, to_ref
    d = [K.to_device(a) for a in args]
    fns = {
        "conv2d 3x3": lambda: K.conv2d(d[0], d[1], d[2], 1, 1),
        "group_norm": lambda: K.group_norm(d[0], d[1], d[2], 32, 1e-5),
        "layer_norm": lambda: K.layer_norm(d[0], d[1], d[2], 1e-5),
        "linear": lambda: K.linear(*d),
        "silu": lambda: K.silu(d[0]),
        "gelu": lambda: K.gelu(d[0]),
    }

    def run():
        out = fns[name]()
        cuda.synchronize()
        return out
    return run, K.to_host


def torch_runner(torch, device, name, args):
    import torch.nn.functional as TF
    t = [torch.from_numpy(a).to(device) for a in args]
    fns = {
        "conv2d 3x3": lambda: TF.conv2d(t[0], t[1], t[2], padding=1),
        "group_norm": lambda: TF.group_norm(t[0], 32, t[1], t[2], 1e-5),
        "layer_norm": lambda: TF.layer_norm(t[0], (t[0].shape[-1],), t[1], t[2], 1e-5),
        "linear": lambda: TF.linear(*t),
        "attention": lambda: TF.scaled_dot_product_attention(t[0], t[1], t[2], scale=0.25),
        "silu": lambda: TF.silu(t[0]),
        "gelu": lambda: TF.gelu(t[0], approximate="tanh"),
    }

    def run():
        with torch.no_grad():
            out = fns[name]()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return run, (lambda out: out.cpu().numpy())


# ----------------------------------------------------------------------------------------------
# the whole U-Net


def unet_inputs(rng):
    p = init_unet(UNET, rng, np.float32)
    # zero-initialized layers (ADM) would make the output 0 and the validation empty
    p = {k: (v if v.any() else (0.02 * rng.standard_normal(v.shape)).astype(np.float32)) for k, v in p.items()}
    x = rng.standard_normal((N, UNET.in_channels, HW, HW)).astype(np.float32)
    t = np.full(N, 500)
    ctx = rng.standard_normal((N, TEXT_LEN, UNET.context_dim)).astype(np.float32)
    mask = np.zeros((N, TEXT_LEN), bool)
    mask[:, :7] = True
    pooled = rng.standard_normal((N, UNET.context_dim)).astype(np.float32)
    return p, (x, t, ctx, mask, pooled)


def unet_reference64(p, inputs):
    kernels.set_backend("reference")
    x, t, ctx, mask, pooled = inputs
    p64 = {k: v.astype(np.float64) for k, v in p.items()}
    return unet_forward(p64, UNET, x.astype(np.float64), t, ctx.astype(np.float64), mask, pooled.astype(np.float64))[0]


def unet_host_runner(backend, p, inputs):
    def run():
        kernels.set_backend(backend)
        return unet_forward(p, UNET, *inputs)[0]
    return run, (lambda out: out)


def unet_cuda_runner(p, inputs):
    from numba import cuda

    from npdiff.kernels import cuda as K
    from npdiff.nn.cuda_forward import unet_forward_device, upload
    dp = upload(p)
    x, t, ctx, mask, pooled = inputs
    dx, dt, dctx, dmask, dpooled = (K.to_device(a) for a in (x, t.astype(np.float64), ctx, mask, pooled))

    def run():
        out = unet_forward_device(dp, UNET, dx, dt, dctx, dmask, dpooled)
        cuda.synchronize()
        return out
    return run, K.to_host


def unet_torch_runner(torch, device, p, inputs):
    sys.path.insert(0, str(Path(__file__).parent))
    from torch_twin import TorchTwin
    from npdiff.model import ModelConfig
    config = ModelConfig(unet=UNET)
    x, t, ctx, mask, pooled = inputs
    with torch.device(device):  # the twin's own tensors (parameters, time embedding, mask) on the device
        twin = TorchTwin(p, {}, config, requires_grad=False)
    tx, tctx, tpooled = (torch.from_numpy(a).to(device) for a in (x, ctx, pooled))

    def run():
        with torch.no_grad(), torch.device(device):
            out = twin.unet(tx, t, tctx, mask, tpooled)
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return run, (lambda out: out.cpu().numpy())


# ----------------------------------------------------------------------------------------------
# measuring


def measure(run, to_ref, want, repeats):
    """Validate, then time. -> dict(status, err, best_ms, median_ms, times_ms)."""
    try:
        out = run()  # warm-up: compiles Numba kernels, loads CUDA modules
        err = ref_err(to_ref(out), want)
    except Exception as e:  # a backend that cannot run this case is reported, not fatal
        return dict(status=f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}")
    if not err <= TOLERANCE:
        return dict(status=f"failed validation: err {err:.1e} > {TOLERANCE:.0e}", err=err)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(1e3 * (time.perf_counter() - start))
    return dict(status="ok", err=err, best_ms=min(times), median_ms=statistics.median(times), times_ms=times)


def ref_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shape {a.shape}, expected {b.shape}")
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def runners_for(name, args, case_is_unet, p=None, inputs=None):
    """backend -> (run, to_ref) or a 'not measured' reason."""
    torch, torch_reason = torch_status()
    cuda_ok, cuda_reason = cuda_status()
    out = {}
    for backend in BACKENDS:
        if backend in ("reference", "cpu"):
            out[backend] = (unet_host_runner(backend, p, inputs) if case_is_unet
                            else host_runner(kernels.get_backend(backend), name, args))
        elif backend == "cuda":
            out[backend] = (cuda_reason if not cuda_ok else
                            unet_cuda_runner(p, inputs) if case_is_unet else cuda_runner(name, args))
        else:
            device = backend.split("-")[1]
            if torch is None:
                out[backend] = torch_reason
            elif device == "cuda" and not torch.cuda.is_available():
                out[backend] = "not measured: no GPU"
            else:
                out[backend] = (unet_torch_runner(torch, device, p, inputs) if case_is_unet
                                else torch_runner(torch, device, name, args))
    return out


def machine():
    info = dict(python=platform.python_version(), machine=platform.machine(), cpus=os.cpu_count(),
                numpy=np.__version__, load_average_1_5_15_min=os.getloadavg())  # other work skews times
    import numba
    info["numba"] = numba.__version__
    torch, _ = torch_status()
    info["torch"] = torch.__version__ if torch is not None else None
    ok, reason = cuda_status()
    if ok:
        from npdiff.kernels import cuda as K
        info["gpu"] = K.device_name()
    else:
        info["gpu"] = reason
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "bench_backends.json"))
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = []
    for name, (inputs, reference, desc) in kernel_cases(rng).items():
        want = reference(*(a.astype(np.float64) for a in inputs))
        for backend, r in runners_for(name, inputs, False).items():
            res = dict(status=r) if isinstance(r, str) else measure(*r, want, args.repeats)
            rows.append(dict(case=name, shape=desc, backend=backend, **res))
            print(f"{name:12s} {backend:10s} {res['status']}", file=sys.stderr)
    p, inputs = unet_inputs(rng)
    want = unet_reference64(p, inputs)
    desc = f"batch {N}, {HW}x{HW}, base {UNET.base_channels}, levels {UNET.channel_mult}"
    for backend, r in runners_for("unet forward", None, True, p, inputs).items():
        res = dict(status=r) if isinstance(r, str) else measure(*r, want, args.repeats)
        rows.append(dict(case="unet forward", shape=desc, backend=backend, **res))
        print(f"{'unet forward':12s} {backend:10s} {res['status']}", file=sys.stderr)
    kernels.set_backend("cpu")

    ref_best = {r["case"]: r.get("best_ms") for r in rows if r["backend"] == "reference"}
    for r in rows:
        if r.get("best_ms") and ref_best.get(r["case"]):
            r["ratio_vs_reference"] = r["best_ms"] / ref_best[r["case"]]
    print_table(rows)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(question=__doc__.splitlines()[0], machine=machine(), repeats=args.repeats,
                                   tolerance=TOLERANCE, results=rows), indent=1))
    print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}; other processes skew every time above")
    print(f"\nwrote {out}")


def print_table(rows):
    cases = list(dict.fromkeys(r["case"] for r in rows))
    by = {(r["case"], r["backend"]): r for r in rows}
    print("\nbest of repeats in ms (x = time / reference time, same run); err = max|a-b|/max|b| vs float64 reference")
    print(f"{'case':14s}" + "".join(f"{b:>24s}" for b in BACKENDS))
    notes = {}
    for c in cases:
        cells = []
        for b in BACKENDS:
            r = by.get((c, b), {})
            if r.get("status") == "ok":
                cells.append(f"{r['best_ms']:9.3f} ({r.get('ratio_vs_reference', float('nan')):6.2f}x)")
            else:
                notes.setdefault(r.get("status", "missing"), []).append(f"{c}/{b}")
                cells.append("-")
        print(f"{c:14s}" + "".join(f"{cell:>24s}" for cell in cells))
    for status, where in notes.items():
        shown = where if len(where) <= 4 else sorted({w.split('/')[1] for w in where})
        print(f"  -: {status} ({', '.join(shown)})")


if __name__ == "__main__":
    main()
