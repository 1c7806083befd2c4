"""Backend parity: every kernel of the Numba CPU backend (npdiff/kernels/cpu.py) against the NumPy
reference (npdiff/kernels/reference.py), forward and backward, on hypothesis-drawn shapes plus
explicit awkward ones (batch 1, odd sides, channel counts that are not multiples of 8, stride 1
and 2, padding 0 and 1, 1x1 and 3x3 kernels, masked attention keys, non-contiguous views).

Error measure, per output array: err(a, b) = max|a - b| / max|b|, with b the reference.
- Why not elementwise |a - b| / |b|: float32 rounding in a sum of products is proportional to the
  size of the terms, not of the result, so an entry that happens to cancel to near 0 (a gradient,
  SiLU near 0) shows a huge elementwise ratio with nothing wrong. Dividing by the array's largest
  entry measures the error in units of the array's own magnitude, which is what the next layer
  sees.
- Where an output is exactly 0 or nearly so by construction, max|b| is no measure of the terms it
  is made of, and the denominator is max(max|b|, size of those terms): a norm's input gradient
  dx = rstd dxhat - (two mean terms) is 0 when a group holds one value, so its floor is
  max|rstd gamma dy|; a norm's output carries the rounding of its mean, u |mean|, through
  rstd gamma, so its floor is max|mean rstd gamma|; a mean's floor is max|x|.
- A float32 kernel is compared with the reference run in float64 on the same float32 values, so
  the number is the fast kernel's own rounding error, not the sum of two implementations' errors.
  Backward kernels get the very same saved statistics (mean, rstd, probs) as the oracle.
- Tolerances: float32 1e-5, about 170 unit roundoffs (u = 6e-8) of the largest entry; the longest
  sums here have a few hundred terms, whose rounding grows like sqrt(n) u typically and n u at
  worst. float64 1e-12: the same argument with u = 1.1e-16 leaves a margin of 1e3 or more.
  Measured worst over all kernels and outputs: float32 5.5e-7 (conv2d y), float64 3.6e-15.
- Examples are derandomized: the same draws on every run, so a reduction that cancels to nearly 0
  by chance (where err is ill-conditioned) cannot make CI flaky. Each test prints its worst
  measured error per output (`pytest -s tests/test_kernels.py` shows them).

Fully masked attention rows: the layers refuse them (`check_key_mask`, tested in test_layers.py);
at the kernel level both backends agree that such a row is NaN and leaves the other rows alone.
"""

import importlib

import numpy as np
import pytest
from hypothesis import assume, example, given, settings, strategies as st

from npdiff import kernels
from npdiff.kernels import reference as ref

cpu = importlib.import_module("npdiff.kernels.cpu")  # the compiled module itself, never a fallback

TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]
EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True)
seeds = st.integers(0, 2**31 - 1)
sizes = st.sampled_from([1, 2, 3, 5, 7, 9, 12])  # odd sizes and widths that are not multiples of 8


def rel_err(a, b, floor=0.0):
    """max|a - b| / max(max|b|, floor) (0 when both are all zero, inf when only b is)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = max(float(np.max(np.abs(b))) if b.size else 0.0, floor)
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def size(t):
    """max|t| in float64: the size of the terms an output is made of (see the module docstring)."""
    return float(np.max(np.abs(np.asarray(t, np.float64))))


def oracle(*arrays):
    """The reference's inputs: float arrays in float64 (same values), others unchanged."""
    return [a.astype(np.float64) if isinstance(a, np.ndarray) and a.dtype.kind == "f" else a
            for a in arrays]


class Worst:
    """Largest error seen per output over all examples of one test, and the check itself."""

    def __init__(self, label, dtype):
        self.label, self.dtype, self.errors = label, dtype, {}

    def check(self, name, fast, slow, floor=0.0):
        assert fast.shape == slow.shape, f"{self.label} {name}: shape {fast.shape} != {slow.shape}"
        assert fast.dtype == self.dtype, f"{self.label} {name}: dtype {fast.dtype}, expected {self.dtype}"
        err = rel_err(fast, slow, floor)
        self.errors[name] = max(self.errors.get(name, 0.0), err)
        tol = TOL[self.dtype]
        assert err <= tol, f"{self.label} {name}: relative error {err:.2e} > {tol:.0e}"

    def report(self):
        parts = ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items())
        print(f"{self.label} [{np.dtype(self.dtype).name}]: max relative error {parts} "
              f"(tolerance {TOL[self.dtype]:.0e})")
        assert self.errors, "no example ran"


def randn(rng, shape, dtype, scale=1.0, loc=0.0):
    return (loc + scale * rng.standard_normal(shape)).astype(dtype)


def strided(rng, a):
    """The same values as a, as a non-contiguous view (the layers pass sliced and transposed
    arrays to the kernels)."""
    big = np.empty(a.shape[:-1] + (a.shape[-1] + 3,), dtype=a.dtype)
    big[..., :a.shape[-1]] = a
    big[..., a.shape[-1]:] = rng.standard_normal(big[..., a.shape[-1]:].shape)
    return big[..., :a.shape[-1]]


# ----------------------------------------------------------------------------------------------
# convolution


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d(dtype):
    worst = Worst("conv2d", dtype)

    @EXAMPLES
    @given(N=st.sampled_from([1, 2, 3]), C=sizes, K=sizes, H=st.integers(1, 11), W=st.integers(1, 11),
           k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]), padding=st.sampled_from([0, 1]),
           bias=st.booleans(), need_dx=st.booleans(), seed=seeds)
    @example(N=1, C=3, K=5, H=9, W=7, k=3, stride=2, padding=1, bias=True, need_dx=True, seed=0)
    @example(N=1, C=7, K=1, H=1, W=1, k=3, stride=1, padding=1, bias=True, need_dx=True, seed=1)
    @example(N=3, C=2, K=3, H=34, W=33, k=3, stride=1, padding=1, bias=True, need_dx=True, seed=2)
    @example(N=2, C=32, K=32, H=8, W=8, k=3, stride=1, padding=1, bias=True, need_dx=True, seed=3)
    @example(N=3, C=5, K=12, H=6, W=10, k=1, stride=2, padding=0, bias=False, need_dx=False, seed=4)
    @example(N=1, C=3, K=2, H=3, W=4, k=3, stride=2, padding=0, bias=True, need_dx=True, seed=5)
    @example(N=2, C=8, K=5, H=16, W=17, k=3, stride=1, padding=1, bias=True, need_dx=True, seed=6)
    def check(N, C, K, H, W, k, stride, padding, bias, need_dx, seed):
        assume(H + 2 * padding >= k and W + 2 * padding >= k)
        rng = np.random.default_rng(seed)
        x = randn(rng, (N, C, H, W), dtype)
        w = randn(rng, (K, C, k, k), dtype, 1 / np.sqrt(C * k * k))
        b = randn(rng, (K,), dtype) if bias else None
        y = cpu.conv2d_forward(x, w, b, stride, padding)
        worst.check("y", y, ref.conv2d_forward(*oracle(x, w, b), stride, padding))
        dy = randn(rng, y.shape, dtype)
        dx, dw, db = cpu.conv2d_backward(dy, x, w, stride, padding, need_dx)
        rdx, rdw, rdb = ref.conv2d_backward(*oracle(dy, x, w), stride, padding, need_dx)
        if need_dx:
            worst.check("dx", dx, rdx)
        else:
            assert dx is None
        worst.check("dw", dw, rdw)
        worst.check("db", db, rdb)

    check()
    worst.report()


# ----------------------------------------------------------------------------------------------
# normalization


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm(dtype):
    worst = Worst("group_norm", dtype)

    @EXAMPLES
    @given(N=st.sampled_from([1, 2, 3]), G=st.integers(1, 4), cpg=st.sampled_from([1, 2, 3, 5]),
           spatial=st.lists(st.integers(1, 9), min_size=0, max_size=2), loc=st.sampled_from([0.0, 3.0]),
           seed=seeds)
    @example(N=1, G=3, cpg=5, spatial=[7, 5], loc=3.0, seed=0)
    @example(N=2, G=32, cpg=1, spatial=[4, 4], loc=0.0, seed=1)
    @example(N=1, G=1, cpg=1, spatial=[1, 1], loc=0.0, seed=2)  # one value per group: xhat = 0
    def check(N, G, cpg, spatial, loc, seed):
        rng = np.random.default_rng(seed)
        C = G * cpg
        x = randn(rng, (N, C, *spatial), dtype, 2.0, loc)
        gamma, beta = randn(rng, (C,), dtype, 1.0, 1.0), randn(rng, (C,), dtype)
        y, mean, rstd = cpu.group_norm_forward(x, gamma, beta, G, 1e-5)
        ry, rmean, rrstd = ref.group_norm_forward(*oracle(x, gamma, beta), G, 1e-5)
        per_channel = lambda s: np.repeat(s.astype(np.float64), cpg, axis=1).reshape(  # noqa: E731
            (N, C) + (1,) * len(spatial))  # (N, G) -> (N, C, 1, ...)
        g = gamma.reshape((C,) + (1,) * len(spatial))
        worst.check("y", y, ry, floor=size(per_channel(mean) * per_channel(rstd) * g))
        worst.check("mean", mean, rmean, floor=size(x))
        worst.check("rstd", rstd, rrstd)
        dy = randn(rng, x.shape, dtype)
        # both backends get the statistics the float32 forward saved
        fast = cpu.group_norm_backward(dy, x, gamma, mean, rstd, G)
        slow = ref.group_norm_backward(*oracle(dy, x, gamma, mean, rstd), G)
        worst.check("dx", fast[0], slow[0], floor=size(per_channel(rstd) * g * dy))
        worst.check("dgamma", fast[1], slow[1])
        worst.check("dbeta", fast[2], slow[2])

    check()
    worst.report()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("modulated", [False, True])
def test_group_norm_silu(dtype, modulated):
    """The fused residual-block normalization against the reference composition of group norm,
    (1 + scale) h + shift and SiLU, forward and backward."""
    worst = Worst(f"group_norm_silu scale_shift={modulated}", dtype)

    @EXAMPLES
    @given(N=st.sampled_from([1, 2, 3]), G=st.integers(1, 4), cpg=st.sampled_from([1, 2, 3, 5]),
           spatial=st.lists(st.integers(1, 9), min_size=0, max_size=2), loc=st.sampled_from([0.0, 3.0]),
           seed=seeds)
    @example(N=2, G=32, cpg=2, spatial=[8, 8], loc=0.0, seed=1)  # a U-Net block at 8x8
    @example(N=1, G=1, cpg=1, spatial=[1, 1], loc=0.0, seed=2)  # one value per group: xhat = 0
    @example(N=1, G=2, cpg=3, spatial=[5], loc=3.0, seed=3)
    def check(N, G, cpg, spatial, loc, seed):
        rng = np.random.default_rng(seed)
        C = G * cpg
        x = randn(rng, (N, C, *spatial), dtype, 2.0, loc)
        gamma, beta = randn(rng, (C,), dtype, 1.0, 1.0), randn(rng, (C,), dtype)
        ss = randn(rng, (N, 2 * C), dtype, 3.0) if modulated else None  # SiLU on both sides of 0
        y, mean, rstd = cpu.group_norm_silu_forward(x, gamma, beta, G, 1e-5, ss)
        ry, rmean, rrstd = ref.group_norm_silu_forward(*oracle(x, gamma, beta), G, 1e-5,
                                                       *oracle(ss))
        # the kernel forms u = (x - mean) rstd gamma (1 + scale) + beta (1 + scale) + shift in float64,
        # so y needs no floor; dx = rstd (dxhat - two mean terms) is 0 for one value per group, and
        # its floor is max|a dy|, a = rstd gamma (1 + scale) (as for group_norm)
        expand = (N, C) + (1,) * len(spatial)
        m = 1.0 + ss[:, :C].astype(np.float64) if modulated else np.ones((N, C))
        a = np.repeat(rrstd, cpg, axis=1) * gamma * m  # (N, C)
        worst.check("y", y, ry)
        worst.check("mean", mean, rmean, floor=size(x))
        worst.check("rstd", rstd, rrstd)
        dy = randn(rng, x.shape, dtype)
        fast = cpu.group_norm_silu_backward(dy, x, gamma, beta, mean, rstd, G, ss)
        slow = ref.group_norm_silu_backward(*oracle(dy, x, gamma, beta, mean, rstd), G, *oracle(ss))
        worst.check("dx", fast[0], slow[0], floor=size(a.reshape(expand) * dy))
        worst.check("dgamma", fast[1], slow[1])
        worst.check("dbeta", fast[2], slow[2])
        if modulated:
            worst.check("dscale_shift", fast[3], slow[3])
        else:
            assert fast[3] is None and slow[3] is None

    check()
    worst.report()


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype):
    worst = Worst("layer_norm", dtype)

    @EXAMPLES
    @given(lead=st.lists(st.integers(1, 7), min_size=1, max_size=3), D=st.sampled_from([1, 2, 5, 7, 12, 33]),
           loc=st.sampled_from([0.0, 3.0]), seed=seeds)
    @example(lead=[1], D=7, loc=3.0, seed=0)
    @example(lead=[2, 9], D=1, loc=0.0, seed=1)  # D = 1: xhat = 0
    @example(lead=[3, 64], D=64, loc=0.0, seed=2)  # U-Net cross-attention tokens at 8x8
    def check(lead, D, loc, seed):
        rng = np.random.default_rng(seed)
        x = randn(rng, (*lead, D), dtype, 2.0, loc)
        gamma, beta = randn(rng, (D,), dtype, 1.0, 1.0), randn(rng, (D,), dtype)
        y, mean, rstd = cpu.layer_norm_forward(x, gamma, beta, 1e-5)
        ry, rmean, rrstd = ref.layer_norm_forward(*oracle(x, gamma, beta), 1e-5)
        rstd64 = rstd.astype(np.float64)[..., None]
        worst.check("y", y, ry, floor=size(mean[..., None] * rstd64 * gamma))
        worst.check("mean", mean, rmean, floor=size(x))
        worst.check("rstd", rstd, rrstd)
        dy = randn(rng, x.shape, dtype)
        fast = cpu.layer_norm_backward(dy, x, gamma, mean, rstd)
        slow = ref.layer_norm_backward(*oracle(dy, x, gamma, mean, rstd))
        worst.check("dx", fast[0], slow[0], floor=size(rstd64 * gamma * dy))
        worst.check("dgamma", fast[1], slow[1])
        worst.check("dbeta", fast[2], slow[2])

    check()
    worst.report()


# ----------------------------------------------------------------------------------------------
# pointwise activations


@pytest.mark.parametrize("act", ["silu", "gelu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_activation(act, dtype):
    worst = Worst(act, dtype)
    forward, backward = f"{act}_forward", f"{act}_backward"

    @EXAMPLES
    @given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), scale=st.sampled_from([1.0, 8.0, 40.0]),
           view=st.booleans(), seed=seeds)
    @example(shape=[1], scale=1.0, view=False, seed=0)
    @example(shape=[2, 3, 5, 7], scale=40.0, view=True, seed=1)
    def check(shape, scale, view, seed):
        rng = np.random.default_rng(seed)
        x = randn(rng, shape, dtype, scale)
        x.reshape(-1)[:3] = [0.0, -87.0, 87.0][:x.size]  # 0 and the edges of float32 exp's range
        xin = strided(rng, x) if view else x
        worst.check("y", getattr(cpu, forward)(xin), getattr(ref, forward)(*oracle(x)))
        dy = randn(rng, shape, dtype)
        worst.check("dx", getattr(cpu, backward)(dy, xin), getattr(ref, backward)(*oracle(dy, x)))

    check()
    worst.report()


def test_float32_exp_forms():
    """The compiled float32 exp, in both of its forms (fast_exp per value, exp_inplace on a row,
    which builds 2^k from its bit pattern instead of a table): relative error at most 2e-7 against
    float64 exp across the whole finite range, the same bits as each other, and IEEE limits:
    exp(-inf) = 0, exp(inf) = inf, exp(NaN) = NaN, 0 below ln(FLT_MIN)."""
    from numba import njit

    @njit
    def both(x):
        scalar = np.empty_like(x)
        for i in range(x.shape[0]):
            scalar[i] = cpu.fast_exp(x[i])
        row = x.copy()
        cpu.exp_inplace(row, np.empty(x.shape[0], dtype=np.int32))
        return scalar, row

    rng = np.random.default_rng(0)
    x = np.concatenate([np.linspace(-87.3, 88.72, 20001), rng.uniform(-87.3, 88.72, 20001),
                        rng.standard_normal(999) * 3]).astype(np.float32)
    scalar, row = both(x)
    exact = np.exp(x.astype(np.float64))
    worst = np.max(np.abs(row - exact) / exact)
    print(f"float32 exp: worst relative error {worst:.2e}")
    assert worst <= 2e-7
    assert np.array_equal(scalar, row)
    special = np.array([-np.inf, np.inf, np.nan, -88.0, -100.0, 0.0, 88.73, 1e30], dtype=np.float32)
    for got in both(special):
        assert got[0] == 0.0 and got[1] == np.inf and np.isnan(got[2])
        assert got[3] == 0.0 and got[4] == 0.0 and got[5] == 1.0
        assert got[6] == np.inf and got[7] == np.inf


# ----------------------------------------------------------------------------------------------
# linear map


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(dtype):
    worst = Worst("linear", dtype)

    @EXAMPLES
    @given(lead=st.lists(st.integers(1, 9), min_size=0, max_size=2), I=sizes, J=sizes, bias=st.booleans(),
           view=st.booleans(), seed=seeds)
    @example(lead=[1], I=5, J=7, bias=True, view=False, seed=0)
    @example(lead=[3, 64], I=64, J=192, bias=True, view=True, seed=1)  # U-Net qkv at 8x8
    @example(lead=[3], I=128, J=1, bias=False, view=False, seed=2)
    def check(lead, I, J, bias, view, seed):
        rng = np.random.default_rng(seed)
        x = randn(rng, (*lead, I), dtype)
        w = randn(rng, (J, I), dtype, 1 / np.sqrt(I))
        b = randn(rng, (J,), dtype) if bias else None
        xin = strided(rng, x) if view else x
        y = cpu.linear_forward(xin, w, b)
        worst.check("y", y, ref.linear_forward(*oracle(x, w, b)))
        dy = randn(rng, y.shape, dtype)
        dx, dw, db = cpu.linear_backward(dy, xin, w, bias)
        rdx, rdw, rdb = ref.linear_backward(*oracle(dy, x, w), bias)
        worst.check("dx", dx, rdx)
        worst.check("dw", dw, rdw)
        if bias:
            worst.check("db", db, rdb)
        else:
            assert db is None

    check()
    worst.report()


# ----------------------------------------------------------------------------------------------
# attention


def key_mask(rng, kind, N, M):
    """None, a random mask with at least one real key per row, or exactly one real key per row."""
    if kind == "none":
        return None
    mask = rng.random((N, M)) < 0.5 if kind == "random" else np.zeros((N, M), dtype=bool)
    mask[np.arange(N), rng.integers(0, M, N)] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention(dtype):
    worst = Worst("attention", dtype)

    @EXAMPLES
    @given(N=st.sampled_from([1, 2, 3]), E=st.integers(1, 3), L=st.integers(1, 9), M=st.integers(1, 9),
           Dh=st.sampled_from([1, 2, 3, 5, 8, 16]), mask=st.sampled_from(["none", "random", "one"]),
           sharp=st.sampled_from([1.0, 3.0]), view=st.booleans(), seed=seeds)
    @example(N=1, E=1, L=1, M=1, Dh=1, mask="none", sharp=1.0, view=False, seed=0)
    @example(N=2, E=4, L=64, M=24, Dh=16, mask="random", sharp=1.0, view=True, seed=1)  # cross-attn at 8x8
    @example(N=3, E=2, L=7, M=9, Dh=5, mask="one", sharp=3.0, view=True, seed=2)
    def check(N, E, L, M, Dh, mask, sharp, view, seed):
        rng = np.random.default_rng(seed)
        q, k, v = (randn(rng, (N, E, n, Dh), dtype) for n in (L, M, M))
        m = key_mask(rng, mask, N, M)
        scale = sharp / np.sqrt(Dh)
        if view:  # the layers hand over (N, L, E, Dh) arrays transposed to (N, E, L, Dh)
            q, k, v = (np.ascontiguousarray(a.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3) for a in (q, k, v))
        o, probs = cpu.attention_forward(q, k, v, m, scale)
        ro, rprobs = ref.attention_forward(*oracle(q, k, v), m, scale)
        worst.check("o", o, ro)
        worst.check("probs", probs, rprobs)
        o_inference, none = cpu.attention_forward(q, k, v, m, scale, need_probs=False)
        assert none is None and np.array_equal(o_inference, o), "the no-probs kernel differs"
        if m is not None:
            padding = ~np.broadcast_to(m[:, None, None, :], probs.shape)  # (N, E, L, M)
            assert np.all(probs[padding] == 0), "a masked key was attended to"
        do = randn(rng, o.shape, dtype)
        fast = cpu.attention_backward(do, q, k, v, probs, scale)
        slow = ref.attention_backward(*oracle(do, q, k, v, probs), scale)
        for name, a, b in zip(("dq", "dk", "dv"), fast, slow):
            worst.check(name, a, b)

    check()
    worst.report()


def test_attention_fully_masked_row_stays_in_its_row():
    """A batch entry with no real key is 0/0 in both backends (NaN) and touches no other entry.
    The layers never get here: check_key_mask refuses such masks."""
    rng = np.random.default_rng(7)
    q, k, v = (randn(rng, (3, 2, 4, 5), np.float32) for _ in range(3))
    m = np.array([[True, False, True, True], [False] * 4, [True] * 4])
    o, probs = cpu.attention_forward(q, k, v, m, 0.5)
    with np.errstate(invalid="ignore"):
        ro, _ = ref.attention_forward(*oracle(q, k, v), m, 0.5)
    assert np.isnan(o[1]).all() and np.isnan(ro[1]).all()
    err = rel_err(o[[0, 2]], ro[[0, 2]])
    print(f"attention with a fully masked entry: other entries' max relative error {err:.1e}")
    assert err <= TOL[np.float32]


# ----------------------------------------------------------------------------------------------
# coverage


PARITY_TESTS = {
    "conv2d_forward": test_conv2d, "conv2d_backward": test_conv2d,
    "group_norm_forward": test_group_norm, "group_norm_backward": test_group_norm,
    "group_norm_silu_forward": test_group_norm_silu, "group_norm_silu_backward": test_group_norm_silu,
    "layer_norm_forward": test_layer_norm, "layer_norm_backward": test_layer_norm,
    "silu_forward": test_activation, "silu_backward": test_activation,
    "gelu_forward": test_activation, "gelu_backward": test_activation,
    "linear_forward": test_linear, "linear_backward": test_linear,
    "attention_forward": test_attention, "attention_backward": test_attention,
}


def test_every_kernel_has_a_parity_test():
    """A kernel added to KERNEL_NAMES needs a test here before this passes."""
    assert set(PARITY_TESTS) == set(kernels.KERNEL_NAMES)
    assert cpu.__name__ == "npdiff.kernels.cpu"
