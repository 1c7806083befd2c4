"""The CUDA backend against the NumPy reference on tiny shapes: every device kernel, the host kernels
of the backend registry, a whole U-Net and text-encoder forward pass, every sampler loop, and the
pipeline's txt2img on the device.

These need numba.cuda to run kernels: a GPU, or the CUDA simulator, which must be switched on
(NUMBA_ENABLE_CUDASIM=1) before numba is first imported. tests/test_cuda.py runs this file in a
subprocess with the simulator on (pytest has imported numba long before), and on a machine with a
GPU also imports these tests into its own process, where they run unchanged on the device. Without
either the whole file is skipped. The file name keeps plain `pytest` from collecting it twice.

Error measure, per output array: err(a, b) = max|a - b| / max|b| with b the reference (in units of
the array's own magnitude; see tests/test_kernels.py for why not elementwise). A float32 kernel is
compared with the reference run in float64 on the same float32 values. Tolerances: float32 1e-5
(about 170 unit roundoffs of the largest entry; the longest sums here have under a hundred terms),
float64 1e-12. Sampler loops and the pipeline run in float64: a sampler step divides by small
noise levels, which turns float32 rounding into differences far above any fixed tolerance, while
in float64 a wrong coefficient or a missing term still shows as an O(1) error. Each test prints its
errors ("cuda parity ..." lines; test_cuda.py repeats them with -s).
"""

import os

import numpy as np
import pytest

from numba import cuda

if not cuda.is_available():
    pytest.skip("numba.cuda has no GPU here and NUMBA_ENABLE_CUDASIM is not set", allow_module_level=True)

from npdiff import kernels  # noqa: E402
from npdiff.kernels import cuda as K  # noqa: E402
from npdiff.kernels import reference as ref  # noqa: E402

TOL = {np.float32: 1e-5, np.float64: 1e-12}
DTYPES = [np.float32, np.float64]
LAUNCH_LOG = os.environ.get("NPDIFF_CUDA_LAUNCH_LOG")


def _record_launches(path):
    """Write every kernel launch's argument types to `path` (JSON) at exit, for test_cuda.py to
    compile each one to PTX with the real CUDA compiler (the simulator runs kernels as Python and
    would accept code that numba.cuda cannot compile)."""
    import atexit
    import json

    import numba
    seen = set()
    real = K._launch

    def describe(a):
        if hasattr(a, "copy_to_host"):  # a device array, the simulator's or a GPU's
            return ["array", str(np.dtype(a.dtype)), len(a.shape), "C" if a.is_c_contiguous() else "A"]
        return ["scalar", str(numba.typeof(a))]

    def launch(kernel, blocks, threads, *args):
        name = getattr(kernel, "py_func", getattr(kernel, "fn", None)).__name__
        seen.add(json.dumps([name, [describe(a) for a in args]]))
        real(kernel, blocks, threads, *args)

    K._launch = launch
    atexit.register(lambda: open(path, "w").write(json.dumps(sorted(json.loads(s) for s in seen))))


if LAUNCH_LOG:
    _record_launches(LAUNCH_LOG)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return diff / scale if scale else (0.0 if diff == 0.0 else float("inf"))


def check(name, dtype, got, want, tol=None):
    """Assert err(got, want) <= tol and print the measured error."""
    tol = TOL[dtype] if tol is None else tol
    err = rel_err(got, want)
    print(f"cuda parity {name} {np.dtype(dtype).name}: {err:.2e} (tolerance {tol:.0e})")
    assert err <= tol, (name, err)
    return err


def draw(rng, shape, dtype, scale=1.0, shift=0.0):
    return (shift + scale * rng.standard_normal(shape)).astype(dtype)


def to64(*arrays):
    return [None if a is None else np.asarray(a, np.float64) for a in arrays]


def dev(a):
    return None if a is None else K.to_device(a)


# ----------------------------------------------------------------------------------------------
# kernels


CONV_CASES = [  # N, C, H, W, K, R, stride, padding, bias, residual
    (1, 3, 5, 7, 2, 3, 1, 1, True, False),
    (2, 4, 6, 5, 3, 3, 2, 1, True, False),  # a downsample with odd sides
    (2, 5, 4, 4, 6, 1, 1, 0, False, True),  # a 1x1 skip, no bias, a residual added
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d(case, dtype):
    N, C, H, W, Kout, R, stride, padding, bias, residual = case
    rng = np.random.default_rng(1)
    x, w = draw(rng, (N, C, H, W), dtype), draw(rng, (Kout, C, R, R), dtype)
    b = draw(rng, (Kout,), dtype) if bias else None
    want = ref.conv2d_forward(*to64(x, w, b), stride, padding)
    res = draw(rng, want.shape, dtype) if residual else None
    if residual:
        want = want + res
    got = K.to_host(K.conv2d(dev(x), dev(w), dev(b), stride, padding, residual=dev(res)))
    assert got.dtype == dtype
    check(f"conv2d {case[:8]}", dtype, got, want)


def _scale_shift_silu(y, ss, silu):
    C = y.shape[1]
    if ss is not None:
        y = y * (1.0 + ss[:, :C, None, None]) + ss[:, C:, None, None]
    return ref.silu_forward(y) if silu else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fused", [(False, False), (True, True)])
def test_group_norm(fused, dtype):
    with_ss, silu = fused
    rng = np.random.default_rng(2)
    N, C, H, W, G = 2, 6, 3, 5, 3
    x, g, b = draw(rng, (N, C, H, W), dtype, 2.0, 0.5), draw(rng, (C,), dtype), draw(rng, (C,), dtype)
    ss = draw(rng, (N, 2 * C), dtype, 0.5) if with_ss else None
    want, mean, rstd = ref.group_norm_forward(*to64(x, g, b), G, 1e-5)
    want = _scale_shift_silu(want, None if ss is None else ss.astype(np.float64), silu)
    y, m, r = K.group_norm(dev(x), dev(g), dev(b), G, 1e-5, scale_shift=dev(ss), silu=silu, stats=True)
    check(f"group_norm scale_shift={with_ss} silu={silu} y", dtype, K.to_host(y), want)
    check("group_norm mean", dtype, K.to_host(m), mean)
    check("group_norm rstd", dtype, K.to_host(r), rstd)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm(dtype):
    rng = np.random.default_rng(3)
    x, g, b = draw(rng, (2, 3, 7), dtype, 1.5, -0.3), draw(rng, (7,), dtype), draw(rng, (7,), dtype)
    want = ref.layer_norm_forward(*to64(x, g, b), 1e-5)
    got = K.layer_norm(dev(x), dev(g), dev(b), 1e-5, stats=True)
    for part, a, w in zip(("y", "mean", "rstd"), got, want):
        check(f"layer_norm {part}", dtype, K.to_host(a), w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear(dtype):
    rng = np.random.default_rng(4)
    x, w, b = draw(rng, (2, 3, 7), dtype), draw(rng, (5, 7), dtype), draw(rng, (5,), dtype)
    res = draw(rng, (2, 3, 5), dtype)
    check("linear", dtype, K.to_host(K.linear(dev(x), dev(w), dev(b))), ref.linear_forward(*to64(x, w, b)))
    check("linear no bias + residual", dtype, K.to_host(K.linear(dev(x), dev(w), residual=dev(res))),
          ref.linear_forward(*to64(x, w), None) + res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_attention(masked, dtype):
    """Packed [q; k; v] columns of one projection (self-attention) and a masked cross-attention."""
    rng = np.random.default_rng(5)
    N, L, M, E, Dh = 2, 3, 5, 2, 3
    D = E * Dh
    mask = None
    if masked:
        mask = rng.random((N, M)) < 0.5
        mask[:, 0] = True
    scale = 1.0 / np.sqrt(Dh)

    def heads(t):  # (N, X, D) -> (N, E, X, Dh)
        return t.reshape(t.shape[0], t.shape[1], E, Dh).transpose(0, 2, 1, 3)

    # cross-attention: separate q (N, L, D) and k, v (N, M, D)
    q, k, v = draw(rng, (N, L, D), dtype), draw(rng, (N, M, D), dtype), draw(rng, (N, M, D), dtype)
    o_ref, p_ref = ref.attention_forward(*to64(heads(q), heads(k), heads(v)), mask, scale)
    o, p = K.attention(dev(q), dev(k), dev(v), E, key_mask=dev(mask), probs=True)
    check(f"attention masked={masked} out", dtype, K.to_host(o), o_ref.transpose(0, 2, 1, 3).reshape(N, L, D))
    check(f"attention masked={masked} probs", dtype, K.to_host(p), p_ref)
    if masked:
        assert np.all(K.to_host(p)[~np.broadcast_to(mask[:, None, None, :], p_ref.shape)] == 0)
    # self-attention: one (N, M, 3D) array read at column offsets 0, D, 2D
    qkv = draw(rng, (N, M, 3 * D), dtype)
    o_ref, _ = ref.attention_forward(*to64(heads(qkv[..., :D]), heads(qkv[..., D:2 * D]), heads(qkv[..., 2 * D:])),
                                     mask, scale)
    qkv_d = dev(qkv)
    o = K.attention(qkv_d, qkv_d, qkv_d, E, key_mask=dev(mask), offsets=(0, D, 2 * D), width=D)
    check(f"attention packed qkv masked={masked}", dtype, K.to_host(o), o_ref.transpose(0, 2, 1, 3).reshape(N, M, D))


@pytest.mark.parametrize("dtype", DTYPES)
def test_activations(dtype):
    rng = np.random.default_rng(6)
    x = draw(rng, (3, 11), dtype, 3.0)
    x[0, :4] = [-800.0, -60.0, 60.0, 800.0]  # exp(800) overflows: the kernel must not
    check("silu", dtype, K.to_host(K.silu(dev(x))), ref.silu_forward(x.astype(np.float64)))
    check("gelu", dtype, K.to_host(K.gelu(dev(x))), ref.gelu_forward(x.astype(np.float64)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_embeddings_and_pooling(dtype):
    from npdiff.nn.layers import timestep_embedding_forward
    rng = np.random.default_rng(7)
    table, pos = draw(rng, (10, 4), dtype), draw(rng, (6, 4), dtype)
    ids = rng.integers(0, 10, (2, 5))
    got = K.to_host(K.embedding(dev(ids), dev(table), dev(pos)))
    check("embedding + positions", dtype, got, table[ids].astype(np.float64) + pos[:5])
    t = np.array([0.0, 17.0, 999.0, 431.5])
    for dim in (6, 7):  # an odd width gets a zero column
        want, _ = timestep_embedding_forward(t, dim, 10000.0, np.float64)
        got = K.to_host(K.timestep_embedding(dev(t), dim, 10000.0, dtype))
        check(f"timestep_embedding dim={dim}", dtype, got, want)
    x = draw(rng, (2, 5, 3), dtype)
    mask = np.array([[True, True, False, True, False], [True, False, False, False, False]])
    w = mask / mask.sum(axis=1, keepdims=True)
    check("masked_mean", dtype, K.to_host(K.masked_mean(dev(x), dev(mask))), np.einsum("nl,nld->nd", w, x))


@pytest.mark.parametrize("dtype", DTYPES)
def test_layout_and_elementwise_kernels(dtype):
    rng = np.random.default_rng(8)
    x, y = draw(rng, (2, 3, 4, 5), dtype), draw(rng, (2, 2, 4, 5), dtype)
    xd, yd = dev(x), dev(y)
    tok = K.to_tokens(xd)
    assert np.array_equal(K.to_host(tok), x.reshape(2, 3, 20).transpose(0, 2, 1))
    a = draw(rng, (2, 20, 3), dtype)
    check("add_tokens", dtype, K.to_host(K.add_tokens(xd, dev(a))), x + a.transpose(0, 2, 1).reshape(x.shape))
    assert np.array_equal(K.to_host(K.concat([xd, yd], axis=1)), np.concatenate([x, y], axis=1))
    assert np.array_equal(K.to_host(K.concat([xd, xd], axis=0)), np.concatenate([x, x], axis=0))
    assert np.array_equal(K.to_host(K.contiguous(xd[:, 1:3])), x[:, 1:3])
    assert np.array_equal(K.to_host(K.upsample2x(xd)), x.repeat(2, axis=2).repeat(2, axis=3))
    check("lincomb", dtype, K.to_host(K.lincomb((0.5, xd), (-2.0, xd), (3.0, xd))), 1.5 * x.astype(np.float64))
    assert np.array_equal(K.to_host(K.clip(xd, -1.0, 0.5)), np.clip(x, -1.0, 0.5))
    assert np.array_equal(K.to_host(K.full((3, 2), 7.0, dtype)), np.full((3, 2), 7.0, dtype))
    out = draw(rng, (4, 6, 4, 5), dtype)  # [cond; uncond] with 6 channels, 3 of them guided
    scales = np.array([3.0, 1.5], dtype)
    want = out[2:, :3] + scales[:, None, None, None] * (out[:2, :3] - out[2:, :3])
    check("guidance", dtype, K.to_host(K.guidance(dev(out), dev(scales), 3)), want.astype(np.float64))


def test_host_kernels_of_the_registry(monkeypatch):
    """kernels.get_backend('cuda') gives the host kernels: forward ones on the device, backward ones
    handed to the CPU backend with the same arguments (training on CUDA computes its gradients on
    the host). The hand-off is checked against the reference kernels standing in for the CPU ones,
    so that this process compiles no CPU kernel."""
    be = kernels.get_backend("cuda")
    assert be is K
    rng = np.random.default_rng(9)
    dtype = np.float32
    x, w, b = draw(rng, (2, 3, 5, 4), dtype), draw(rng, (4, 3, 3, 3), dtype), draw(rng, (4,), dtype)
    check("host conv2d_forward", dtype, be.conv2d_forward(x, w, b, 2, 1), ref.conv2d_forward(*to64(x, w, b), 2, 1))
    g, beta = draw(rng, (3,), dtype), draw(rng, (3,), dtype)
    gn = be.group_norm_forward(x, g, beta, 3, 1e-5)
    for got, want in zip(gn, ref.group_norm_forward(*to64(x, g, beta), 3, 1e-5)):
        check("host group_norm_forward", dtype, got, want)
    ss = draw(rng, (2, 6), dtype)
    gns = be.group_norm_silu_forward(x, g, beta, 3, 1e-5, ss)
    for got, want in zip(gns, ref.group_norm_silu_forward(*to64(x, g, beta), 3, 1e-5, ss.astype(np.float64))):
        check("host group_norm_silu_forward", dtype, got, want)
    t, g4, b4 = draw(rng, (2, 3, 4), dtype), draw(rng, (4,), dtype), draw(rng, (4,), dtype)
    ln = be.layer_norm_forward(t, g4, b4, 1e-5)
    for got, want in zip(ln, ref.layer_norm_forward(*to64(t, g4, b4), 1e-5)):
        check("host layer_norm_forward", dtype, got, want)
    check("host silu_forward", dtype, be.silu_forward(t), ref.silu_forward(t.astype(np.float64)))
    check("host gelu_forward", dtype, be.gelu_forward(t), ref.gelu_forward(t.astype(np.float64)))
    lw, lb = draw(rng, (5, 4), dtype), draw(rng, (5,), dtype)
    check("host linear_forward", dtype, be.linear_forward(t, lw, lb), ref.linear_forward(*to64(t, lw, lb)))
    q, k, v = draw(rng, (2, 2, 3, 4), dtype), draw(rng, (2, 2, 5, 4), dtype), draw(rng, (2, 2, 5, 4), dtype)
    mask = np.array([[True, False, True, True, False], [False, False, False, True, False]])
    att = be.attention_forward(q, k, v, mask, 0.3)
    for got, want in zip(att, ref.attention_forward(*to64(q, k, v), mask, 0.3)):
        check("host attention_forward", dtype, got, want)

    monkeypatch.setattr(K, "_cpu", lambda: ref)
    dy = draw(rng, (2, 4, 3, 2), dtype)
    dt, dl, do = draw(rng, t.shape, dtype), draw(rng, (2, 3, 5), dtype), draw(rng, q.shape, dtype)
    for got, want in [
        (be.conv2d_backward(dy, x, w, 2, 1, False), ref.conv2d_backward(dy, x, w, 2, 1, False)),
        (be.group_norm_backward(x, x, g, gn[1], gn[2], 3), ref.group_norm_backward(x, x, g, gn[1], gn[2], 3)),
        (be.group_norm_silu_backward(x, x, g, beta, gns[1], gns[2], 3, ss),
         ref.group_norm_silu_backward(x, x, g, beta, gns[1], gns[2], 3, ss)),
        (be.layer_norm_backward(dt, t, g4, ln[1], ln[2]), ref.layer_norm_backward(dt, t, g4, ln[1], ln[2])),
        ((be.silu_backward(dt, t),), (ref.silu_backward(dt, t),)),
        ((be.gelu_backward(dt, t),), (ref.gelu_backward(dt, t),)),
        (be.linear_backward(dl, t, lw, False), ref.linear_backward(dl, t, lw, False)),
        (be.attention_backward(do, q, k, v, att[1], 0.3), ref.attention_backward(do, q, k, v, att[1], 0.3)),
    ]:
        assert len(got) == len(want)
        for a, b_ in zip(got, want):
            assert (a is None and b_ is None) or np.array_equal(a, b_)


# ----------------------------------------------------------------------------------------------
# whole networks


UNET_CONFIGS = {  # test_unet.py's TINY, and a variant with learned variance, a 1x1 skip, three levels and
    # the coordinate channels and the queries' position term
    "tiny": dict(in_channels=2, base_channels=4, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,),
                 num_heads=2, context_dim=3, num_groups=2),
    "three-level": dict(in_channels=1, base_channels=4, channel_mult=(1, 1, 2), num_res_blocks=1,
                        attention_levels=(0, 2), num_heads=1, context_dim=2, num_groups=2, learn_sigma=True,
                        coord_channels=True, query_coords=True),
}


def _perturbed(params, rng, dtype):
    """Fresh parameters plus noise: the zero-initialized output convs would hide most of the network."""
    return {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(dtype) for k, v in params.items()}


@pytest.mark.parametrize("name, dtype", [("tiny", np.float32), ("tiny", np.float64), ("three-level", np.float64)])
def test_unet_forward(name, dtype):
    from npdiff.nn.cuda_forward import unet_forward_device, upload
    from npdiff.nn.unet import UNetConfig, init_unet, unet_forward
    config = UNetConfig(**UNET_CONFIGS[name])
    rng = np.random.default_rng(10)
    p = _perturbed(init_unet(config, rng, np.float64), rng, dtype)
    N, L = 2, 3
    H, W = (2, 4) if len(config.channel_mult) == 2 else (4, 4)  # sides: multiples of 2^(levels-1)
    x = draw(rng, (N, config.in_channels, H, W), dtype)
    t = np.array([3, 870])
    ctx, pooled = draw(rng, (N, L, config.context_dim), dtype), draw(rng, (N, config.context_dim), dtype)
    mask = np.array([[True, False, True], [True, True, False]])
    before = kernels.backend_name()
    try:
        kernels.set_backend("reference")
        want, _ = unet_forward({k: v.astype(np.float64) for k, v in p.items()}, config, *to64(x), t,
                               *to64(ctx), mask, *to64(pooled))
    finally:
        kernels.set_backend(before)
    out = unet_forward_device(upload(p), config, dev(x), dev(t.astype(np.float64)), dev(ctx), dev(mask), dev(pooled))
    got = K.to_host(out)
    assert got.dtype == dtype and got.shape == (N, config.out_channels, H, W)
    check(f"unet_forward {name}", dtype, got, want)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rel_pos", [0, 2])
def test_text_encoder_forward(dtype, rel_pos):
    from npdiff.nn.cuda_forward import text_encoder_forward_device, upload
    from npdiff.nn.text_encoder import TextEncoderConfig, init_text_encoder, text_encoder_forward
    config = TextEncoderConfig(vocab_size=20, max_length=6, width=6, num_layers=2, num_heads=2, rel_pos=rel_pos)
    rng = np.random.default_rng(11)
    p = {k: v.astype(dtype) for k, v in init_text_encoder(config, rng, np.float64).items()}
    for k in p:
        if k.endswith("rel_bias"):  # a trained-looking bias; init's zeros would test nothing
            p[k] = rng.standard_normal(p[k].shape).astype(dtype)
    ids = rng.integers(0, 20, (2, 5))
    mask = np.array([[True, True, True, False, False], [True, True, True, True, True]])
    before = kernels.backend_name()
    try:
        kernels.set_backend("reference")
        p64 = {k: v.astype(np.float64) for k, v in p.items()}
        tok_ref, pooled_ref, _ = text_encoder_forward(p64, config, ids, mask)
    finally:
        kernels.set_backend(before)
    tok, pooled = text_encoder_forward_device(upload(p), config, dev(ids), dev(mask))
    check("text_encoder tokens", dtype, K.to_host(tok), tok_ref)
    check("text_encoder pooled", dtype, K.to_host(pooled), pooled_ref)


# ----------------------------------------------------------------------------------------------
# sampler loops and the pipeline


SAMPLER_TOL = 1e-9  # float64 (see the module docstring); measured worst is printed


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp-2m", "euler", "heun", "euler-a"])
def test_sampler_loop_matches_host(sampler, prediction):
    """The device loop against the host sampler with the same stand-in network, a linear map whose
    gain depends on t (cheap; its x0 estimates leave [-1, 1], so clipping matters), same seed."""
    from npdiff.diffusion.schedule import Schedule
    from npdiff.samplers import get_sampler
    from npdiff.samplers.device import sample_device
    schedule = Schedule.from_name("linear", 1000)
    x_T = np.random.default_rng(12).standard_normal((2, 3, 2, 3))

    def gain(t):
        return 0.6 + 0.3 * np.cos(t / 150.0)

    def host_fn(x, t):
        return gain(float(t[0])) * x

    def device_fn(x, t):
        return K.lincomb((gain(float(t)), x))

    steps = []
    want = get_sampler(sampler)(host_fn, schedule, x_T, np.random.default_rng(13), steps=4, prediction=prediction,
                                clip_x0=True, callback=lambda i, xt, x0: steps.append(x0))
    seen = []
    got = sample_device(sampler, device_fn, schedule, K.to_device(x_T), np.random.default_rng(13), steps=4,
                        prediction=prediction, clip_x0=True, callback=lambda i, xt, x0: seen.append(K.to_host(x0)))
    assert len(seen) == len(steps)
    check(f"sampler {sampler} {prediction} x_0", np.float64, K.to_host(got), want, SAMPLER_TOL)
    check(f"sampler {sampler} {prediction} per-step x0", np.float64, np.stack(seen), np.stack(steps), SAMPLER_TOL)


def _tiny_float64_model():
    from npdiff.data.shapes import caption_corpus
    from npdiff.model import Model, ModelConfig
    from npdiff.nn.text_encoder import TextEncoderConfig
    from npdiff.nn.unet import UNetConfig
    from npdiff.text.tokenizer import train_tokenizer
    tokenizer = train_tokenizer(caption_corpus(200, seed=0), vocab_size=128)
    config = ModelConfig(resolution=4, max_length=6,
                         unet=UNetConfig(base_channels=4, channel_mult=(1, 2), attention_levels=(1,), num_groups=2,
                                         context_dim=4, num_heads=2),
                         text_encoder=TextEncoderConfig(width=4, num_layers=1, num_heads=2, phrase_tokens=2))
    rng = np.random.default_rng(14)
    model = Model.init(config, tokenizer, rng, dtype=np.float64)
    model.set_params(_perturbed(model.params, rng, np.float64))
    return model


def test_pipeline_generate_on_the_device_matches_the_host():
    """txt2img with guidance (two scales: chaos) and two DPM-Solver++ steps: prompts encoded, U-Net on
    [x; x], guidance and sampler updates all on the device; against the reference backend."""
    from npdiff.pipeline import Pipeline
    pipe = Pipeline(_tiny_float64_model())
    kw = dict(seed=5, steps=2, guidance_scale=3.0, chaos=50, progress=False, return_float=True)
    before = kernels.backend_name()
    try:
        kernels.set_backend("reference")
        want = pipe.generate(["a red circle", "a blue square and a red"], **kw)
        kernels.set_backend("cuda")
        frames = []
        got = pipe.generate(["a red circle", "a blue square and a red"], callback=lambda i, xt, x0: frames.append(x0), **kw)
    finally:
        kernels.set_backend(before)
    assert got.dtype == np.float64 and len(frames) == 2 and frames[-1].shape == got.shape
    check("pipeline generate dpmpp-2m x_0", np.float64, got, want, SAMPLER_TOL)
