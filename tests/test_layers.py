"""Every layer's backward pass against central finite differences in float64, over
hypothesis-drawn small shapes, for the input and every parameter (tolerance 1e-6 relative, see
npdiff/nn/gradcheck.py for why that is loose enough never to flake and tight enough to catch a
wrong term); plus forward-pass closed forms and the kernel-backend switch."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from npdiff import kernels
from npdiff.nn import attention as A
from npdiff.nn import layers as L
from npdiff.nn.gradcheck import numerical_gradient, relative_error

TOL = 1e-6
SETTINGS = settings(max_examples=12, deadline=None)


def assert_gradients(forward, backward, arrays, rng, names=None):
    """forward(*arrays) -> (y, cache); backward(dy, cache) -> tuple of gradients aligned with
    arrays (None where an array is not differentiated). Checks each against finite differences."""
    y, cache = forward(*arrays)
    R = rng.standard_normal(np.shape(y))  # l = sum(y * R), so dl/dy = R
    grads = backward(R, cache)
    loss = lambda: float(np.sum(forward(*arrays)[0] * R))  # noqa: E731
    errors = {}
    for i, (a, g) in enumerate(zip(arrays, grads)):
        if g is None:
            continue
        name = names[i] if names else str(i)
        assert g.shape == a.shape, f"{name}: gradient shape {g.shape} != {a.shape}"
        err = relative_error(g, numerical_gradient(loss, a))
        errors[name] = err
        assert err <= TOL, f"{name}: relative error {err:.2e}"
    return errors


def seeded(seed):
    return np.random.default_rng(seed)


seeds = st.integers(0, 2**31 - 1)


@SETTINGS
@given(N=st.integers(1, 2), C=st.integers(1, 3), K=st.integers(1, 3), H=st.integers(2, 6),
       W=st.integers(2, 6), k=st.sampled_from([1, 3]), stride=st.sampled_from([1, 2]),
       bias=st.booleans(), seed=seeds)
def test_conv2d_gradients(N, C, K, H, W, k, stride, bias, seed):
    rng = seeded(seed)
    x = rng.standard_normal((N, C, H, W))
    w = rng.standard_normal((K, C, k, k))
    b = rng.standard_normal(K) if bias else None
    arrays = [x, w] + ([b] if bias else [])
    fwd = lambda x, w, b=None: L.conv2d_forward(x, w, b, stride=stride)  # noqa: E731
    assert_gradients(fwd, L.conv2d_backward, arrays, rng, ["x", "w", "b"])


@pytest.mark.parametrize("stride,padding", [(1, 0), (1, 1), (2, 1), (2, 0), (1, 2)])
def test_conv2d_matches_direct_sum(stride, padding):
    """The im2col result equals the defining sum, written out with loops."""
    rng = seeded(0)
    x = rng.standard_normal((2, 3, 5, 6))
    w = rng.standard_normal((4, 3, 3, 3))
    b = rng.standard_normal(4)
    y, _ = L.conv2d_forward(x, w, b, stride=stride, padding=padding)
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    P, Q = (5 + 2 * padding - 3) // stride + 1, (6 + 2 * padding - 3) // stride + 1
    ref = np.zeros((2, 4, P, Q))
    for p in range(P):
        for q in range(Q):
            patch = xp[:, :, p * stride:p * stride + 3, q * stride:q * stride + 3]  # (N, C, 3, 3)
            ref[:, :, p, q] = np.einsum("ncrs,kcrs->nk", patch, w) + b
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(N=st.integers(1, 2), G=st.integers(1, 3), cpg=st.integers(1, 3), H=st.integers(1, 4),
       W=st.integers(1, 4), seed=seeds)
def test_group_norm_gradients(N, G, cpg, H, W, seed):
    rng = seeded(seed)
    C = G * cpg
    if cpg * H * W < 3:  # groups of 1 or 2 values normalize to constants (0 or +-1): degenerate
        H = 3
    x = rng.standard_normal((N, C, H, W))
    g, b = rng.standard_normal(C), rng.standard_normal(C)
    fwd = lambda x, g, b: L.group_norm_forward(x, g, b, G)  # noqa: E731
    assert_gradients(fwd, L.group_norm_backward, [x, g, b], rng, ["x", "gamma", "beta"])


def test_group_norm_normalizes_each_group():
    rng = seeded(1)
    x = 3 + 5 * rng.standard_normal((2, 6, 4, 4))
    y, _ = L.group_norm_forward(x, np.ones(6), np.zeros(6), 3, eps=0.0)
    yg = y.reshape(2, 3, -1)
    np.testing.assert_allclose(yg.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(yg.var(-1), 1, atol=1e-12)


@SETTINGS
@given(shape=st.lists(st.integers(1, 3), min_size=0, max_size=2), D=st.integers(3, 6), seed=seeds)
def test_layer_norm_gradients(shape, D, seed):
    rng = seeded(seed)  # D >= 3: two values always normalize to +-1, a constant (degenerate)
    x = rng.standard_normal(tuple(shape) + (D,))
    g, b = rng.standard_normal(D), rng.standard_normal(D)
    assert_gradients(L.layer_norm_forward, L.layer_norm_backward, [x, g, b], rng,
                     ["x", "gamma", "beta"])


@SETTINGS
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=3), seed=seeds,
       act=st.sampled_from(["silu", "gelu"]))
def test_activation_gradients(shape, seed, act):
    rng = seeded(seed)
    x = 3 * rng.standard_normal(shape)
    fwd, bwd = getattr(L, f"{act}_forward"), getattr(L, f"{act}_backward")
    assert_gradients(fwd, bwd, [x], rng, ["x"])


def test_activation_closed_forms():
    """The reference kernels against the formulas, to float64 rounding. (Fast backends answer to
    the reference in their own parity tests, with their own tolerance.)"""
    ref = kernels.get_backend("reference")
    x = np.linspace(-30, 30, 601)
    np.testing.assert_allclose(ref.silu_forward(x), x / (1 + np.exp(-x)), rtol=1e-12, atol=1e-300)
    y = ref.gelu_forward(x)
    np.testing.assert_allclose(y, 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
                               rtol=1e-12, atol=1e-300)
    # the tanh approximation stays within 1e-3 of the exact erf form x * Phi(x)
    from math import erf
    exact = np.array([0.5 * v * (1 + erf(v / np.sqrt(2))) for v in x])
    assert np.max(np.abs(y - exact)) < 1e-3
    with np.errstate(over="raise"):
        L.silu_forward(np.array([-1e4, 1e4], dtype=np.float32))  # no overflow warning


@SETTINGS
@given(N=st.integers(1, 3), I=st.integers(1, 5), J=st.integers(1, 5), lead=st.integers(0, 2),
       bias=st.booleans(), seed=seeds)
def test_linear_gradients(N, I, J, lead, bias, seed):
    rng = seeded(seed)
    x = rng.standard_normal((N,) + (2,) * lead + (I,))
    w = rng.standard_normal((J, I))
    arrays = [x, w] + ([rng.standard_normal(J)] if bias else [])
    assert_gradients(L.linear_forward, L.linear_backward, arrays, rng, ["x", "w", "b"])


@SETTINGS
@given(N=st.integers(1, 3), Lq=st.integers(1, 5), V=st.integers(1, 6), D=st.integers(1, 4), seed=seeds)
def test_embedding_gradients(N, Lq, V, D, seed):
    rng = seeded(seed)
    ids = rng.integers(0, V, size=(N, Lq))  # repeats are likely: they must accumulate
    w = rng.standard_normal((V, D))
    fwd = lambda w: L.embedding_forward(ids, w)  # noqa: E731
    bwd = lambda dy, c: (L.embedding_backward(dy, c)[1],)  # noqa: E731
    assert_gradients(fwd, bwd, [w], rng, ["weight"])


def test_embedding_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="vocab_size"):
        L.embedding_forward(np.array([[0, 7]]), np.zeros((5, 2)))


@SETTINGS
@given(N=st.integers(1, 4), dim=st.integers(1, 9), seed=seeds)
def test_timestep_embedding(N, dim, seed):
    rng = seeded(seed)
    t = rng.uniform(0, 50, size=N)
    fwd = lambda t: L.timestep_embedding_forward(t, dim, dtype=np.float64)  # noqa: E731
    assert_gradients(fwd, L.timestep_embedding_backward, [t], rng, ["t"])
    y, _ = fwd(t)
    half = dim // 2
    if half:
        f0 = 1.0  # first frequency is max_period^0
        np.testing.assert_allclose(y[:, 0], np.cos(t * f0), rtol=1e-12)
        np.testing.assert_allclose(y[:, half], np.sin(t * f0), rtol=1e-12, atol=1e-15)


@SETTINGS
@given(N=st.integers(1, 2), C=st.integers(1, 3), H=st.integers(1, 4), W=st.integers(1, 4), seed=seeds)
def test_upsample_gradients_and_values(N, C, H, W, seed):
    rng = seeded(seed)
    x = rng.standard_normal((N, C, H, W))
    assert_gradients(L.upsample_nearest2x_forward, L.upsample_nearest2x_backward, [x], rng, ["x"])
    y, _ = L.upsample_nearest2x_forward(x)
    np.testing.assert_array_equal(y, x.repeat(2, axis=2).repeat(2, axis=3))


@SETTINGS
@given(sizes=st.lists(st.integers(1, 3), min_size=1, max_size=3), seed=seeds)
def test_concat_gradients(sizes, seed):
    rng = seeded(seed)
    xs = [rng.standard_normal((2, c, 2, 3)) for c in sizes]
    fwd = lambda *xs: L.concat_forward(list(xs))  # noqa: E731
    bwd = lambda dy, c: tuple(L.concat_backward(dy, c)[0])  # noqa: E731
    assert_gradients(fwd, bwd, xs, rng)


def test_dropout():
    rng = seeded(3)
    x = rng.standard_normal((64, 64))
    y, cache = L.dropout_forward(x, 0.25, np.random.default_rng(7))
    kept = y != 0
    assert abs(kept.mean() - 0.75) < 0.03  # 4096 Bernoulli(0.75): sd 0.0068, so > 4 sd margin
    np.testing.assert_allclose(y[kept], x[kept] / 0.75)
    # with the mask fixed dropout is linear, so its gradient is exact: check it anyway
    fwd = lambda x: L.dropout_forward(x, 0.25, np.random.default_rng(7))  # noqa: E731
    assert_gradients(fwd, L.dropout_backward, [x[:4, :5].copy()], rng)
    y, cache = L.dropout_forward(x, 0.25, None)  # inference: identity
    assert y is x and L.dropout_backward(x, cache)[0] is x


# ----------------------------------------------------------------------------------------------
# attention


def random_mask(rng, N, M):
    mask = rng.random((N, M)) < 0.6
    mask[np.arange(N), rng.integers(0, M, N)] = True  # at least one real key per row
    return mask


@SETTINGS
@given(N=st.integers(1, 2), Lq=st.integers(1, 4), E=st.integers(1, 3), Dh=st.integers(1, 3),
       masked=st.booleans(), seed=seeds)
def test_self_attention_gradients(N, Lq, E, Dh, masked, seed):
    rng = seeded(seed)
    D = E * Dh
    x = rng.standard_normal((N, Lq, D))
    # weights at the usual 1/sqrt(fan_in) scale: with unit weights the softmax saturates, its
    # gradients become tiny and finite differences measure mostly their own truncation error
    wqkv, bqkv = rng.standard_normal((3 * D, D)) / np.sqrt(D), rng.standard_normal(3 * D)
    wo, bo = rng.standard_normal((D, D)), rng.standard_normal(D)
    mask = random_mask(rng, N, Lq) if masked else None
    fwd = lambda *a: A.self_attention_forward(*a, num_heads=E, key_mask=mask)  # noqa: E731
    assert_gradients(fwd, A.self_attention_backward, [x, wqkv, bqkv, wo, bo], rng,
                     ["x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias"])


@SETTINGS
@given(N=st.integers(1, 2), Lq=st.integers(1, 5), E=st.integers(1, 2), Dh=st.integers(1, 3),
       K=st.integers(1, 3), masked=st.booleans(), seed=seeds)
def test_self_attention_with_relative_bias_gradients(N, Lq, E, Dh, K, masked, seed):
    rng = seeded(seed)
    D = E * Dh
    x = rng.standard_normal((N, Lq, D))
    wqkv, bqkv = rng.standard_normal((3 * D, D)) / np.sqrt(D), rng.standard_normal(3 * D)
    wo, bo = rng.standard_normal((D, D)), rng.standard_normal(D)
    table = rng.standard_normal((E, 2 * K + 1))
    mask = random_mask(rng, N, Lq) if masked else None
    fwd = lambda *a: A.self_attention_forward(*a[:5], num_heads=E, key_mask=mask, rel_bias=a[5])  # noqa: E731
    assert_gradients(fwd, A.self_attention_backward, [x, wqkv, bqkv, wo, bo, table], rng,
                     ["x", "qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "rel_bias"])


def test_relative_bias_is_one_scalar_per_head_and_clipped_offset():
    table = np.arange(2 * 5, dtype=float).reshape(2, 5)  # E = 2 heads, K = 2
    bias = A.relative_bias(table, 4)  # (E, L, L), bias[e, i, j] = table[e, clip(j - i, -2, 2) + 2]
    assert bias[0, 0, 0] == 2 and bias[0, 0, 1] == 3 and bias[0, 0, 3] == 4  # offset 3 clips to 2
    assert bias[1, 3, 0] == 5 and bias[1, 2, 1] == 6 and bias[1, 1, 0] == 6
    # a zero table leaves attention exactly as it is without one
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s) for s in [(2, 4, 4), (12, 4), (12,), (4, 4), (4,)]]
    y0, _ = A.self_attention_forward(*args, num_heads=2)
    y1, _ = A.self_attention_forward(*args, num_heads=2, rel_bias=np.zeros((2, 5)))
    np.testing.assert_allclose(y1, y0, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(N=st.integers(1, 2), Lq=st.integers(1, 4), M=st.integers(1, 4), E=st.integers(1, 3),
       Dh=st.integers(1, 3), Dc=st.integers(1, 4), seed=seeds)
def test_cross_attention_gradients(N, Lq, M, E, Dh, Dc, seed):
    rng = seeded(seed)
    D = E * Dh
    x, ctx = rng.standard_normal((N, Lq, D)), rng.standard_normal((N, M, Dc))
    wq, wk = rng.standard_normal((D, D)) / np.sqrt(D), rng.standard_normal((D, Dc)) / np.sqrt(Dc)
    wv = rng.standard_normal((D, Dc))
    wo, bo = rng.standard_normal((D, D)), rng.standard_normal(D)
    mask = random_mask(rng, N, M)
    fwd = lambda *a: A.cross_attention_forward(*a, num_heads=E, context_mask=mask)  # noqa: E731
    assert_gradients(fwd, A.cross_attention_backward, [x, ctx, wq, wk, wv, wo, bo], rng,
                     ["x", "context", "q.weight", "k.weight", "v.weight", "proj.weight", "proj.bias"])


def test_attention_ignores_masked_keys():
    """Changing a padding token's features changes nothing; the output equals attention over the
    real tokens alone."""
    rng = seeded(4)
    D, E = 4, 2
    x, ctx = rng.standard_normal((1, 3, D)), rng.standard_normal((1, 5, 6))
    ws = [rng.standard_normal((D, D)), rng.standard_normal((D, 6)), rng.standard_normal((D, 6)),
          rng.standard_normal((D, D)), rng.standard_normal(D)]
    mask = np.array([[True, True, False, True, False]])
    y, _ = A.cross_attention_forward(x, ctx, *ws, num_heads=E, context_mask=mask)
    ctx2 = ctx.copy()
    ctx2[:, ~mask[0]] = 1e3 * rng.standard_normal((1, 2, 6))
    y2, _ = A.cross_attention_forward(x, ctx2, *ws, num_heads=E, context_mask=mask)
    y3, _ = A.cross_attention_forward(x, ctx[:, mask[0]], *ws, num_heads=E)
    np.testing.assert_allclose(y, y2, rtol=1e-12)
    np.testing.assert_allclose(y, y3, rtol=1e-12)


def test_attention_rejects_empty_rows():
    x, ctx = np.zeros((2, 3, 4)), np.zeros((2, 2, 4))
    ws = [np.zeros((4, 4))] * 3 + [np.zeros((4, 4)), np.zeros(4)]
    with pytest.raises(ValueError, match="rows \\[1\\] have no True"):
        A.cross_attention_forward(x, ctx, *ws, num_heads=2,
                                  context_mask=np.array([[True, False], [False, False]]))


def test_layers_keep_float32():
    rng = seeded(5)
    f32 = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x = f32(2, 4, 6, 6)
    assert L.conv2d_forward(x, f32(3, 4, 3, 3), f32(3), stride=2)[0].dtype == np.float32
    assert L.group_norm_forward(x, f32(4), f32(4), 2)[0].dtype == np.float32
    assert L.layer_norm_forward(f32(2, 3, 4), f32(4), f32(4))[0].dtype == np.float32
    assert L.silu_forward(x)[0].dtype == np.float32
    assert L.gelu_forward(x)[0].dtype == np.float32
    assert L.dropout_forward(x, 0.1, rng)[0].dtype == np.float32
    y, c = A.self_attention_forward(f32(2, 3, 4), f32(12, 4), f32(12), f32(4, 4), f32(4), num_heads=2)
    assert y.dtype == np.float32
    assert all(g.dtype == np.float32 for g in A.self_attention_backward(y, c))
    y, c = L.conv2d_forward(x, f32(3, 4, 3, 3), f32(3))
    assert all(g.dtype == np.float32 for g in L.conv2d_backward(y, c))


# ----------------------------------------------------------------------------------------------
# backend selection


def test_backend_selection(monkeypatch):
    saved = kernels._active
    try:
        assert kernels.get_backend("reference").__name__ == "npdiff.kernels.reference"
        with pytest.raises(ValueError, match="reference, cpu, cuda"):
            kernels.get_backend("gpu")
        with pytest.raises(ValueError, match="reference, cpu, cuda"):
            kernels.set_backend("fast")
        monkeypatch.setenv("NPDIFF_BACKEND", "nope")
        kernels._active = None
        with pytest.raises(ValueError, match="NPDIFF_BACKEND='nope'"):
            kernels.get_backend()
        monkeypatch.setenv("NPDIFF_BACKEND", "reference")
        kernels._active = None
        assert kernels.backend_name() == "reference"
        kernels.set_backend("cpu")  # the compiled backend, or the reference while it is absent
        assert kernels.backend_name() == "cpu"
        assert hasattr(kernels.get_backend(), "conv2d_forward")
    finally:
        kernels._active = saved


def test_gradient_check_catches_a_wrong_backward():
    """The checker itself can fail: a backward pass missing one term is rejected."""
    rng = seeded(6)
    x = rng.standard_normal((2, 5))
    g, b = rng.standard_normal(5), rng.standard_normal(5)

    def wrong_backward(dy, cache):  # drops the mean-of-dxhat term of layer norm
        x, gamma, mean, rstd = cache
        xhat = (x - mean[..., None]) * rstd[..., None]
        dxhat = dy * gamma
        dx = rstd[..., None] * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdims=True))
        return dx, None, None

    with pytest.raises(AssertionError, match="relative error"):
        assert_gradients(L.layer_norm_forward, wrong_backward, [x, g, b], rng, ["x"])
