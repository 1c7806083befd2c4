"""numba.cuda kernels: what the U-Net forward pass, the text encoder and the samplers need on a GPU.

Two layers of API:

- Device functions (`conv2d`, `group_norm`, `linear`, `attention`, `lincomb`, ...) take and return
  numba device arrays and never copy to or from the host. `npdiff.nn.cuda_forward` builds the whole
  U-Net and text encoder forward passes from them, and `npdiff.samplers.device` the sampling loops,
  so that an image stays on the device from x_T to x_0 (one copy in, one copy out).
- The host kernels of every backend (`KERNEL_NAMES` in `npdiff.kernels`, with reference.py's
  signatures) take NumPy arrays: each forward copies its inputs in and its result out. They make
  "cuda" a complete backend for the layers in `npdiff.nn`, one round trip per layer. The backward
  kernels are not implemented on the GPU: they run the Numba CPU kernels on the host arrays, so
  training works with this backend but computes its gradients on the CPU.

The kernels are the naive ones, written to be read: one output element (or one row of
normalization statistics) per loop iteration, no shared memory, no barriers. Every loop is a
grid-stride loop, so a launch of any size covers any array; the CUDA simulator
(NUMBA_ENABLE_CUDASIM=1, which runs every thread as a Python thread, and where a __syncthreads__
costs milliseconds) gets a tiny grid and walks the same code paths.

Float constants reach the kernels as arguments in the arrays' dtype (`one`, `eps`, coefficients):
numba types a float literal as float64, and float64 arithmetic in a float32 kernel runs at a small
fraction of float32 speed on most GPUs.

Dimension legend:
  N batch, C input channels, K output channels, H W input height and width,
  P Q output height and width, R S kernel height and width, G groups, S2 positions per channel,
  B rows of a linear map, I J its input and output features, L query length, M key length,
  E heads, Dh head width, D token width.
"""

import math

import numpy as np

try:
    from numba import config as _numba_config
    from numba import cuda
except ImportError as err:  # a numba build without its CUDA target
    raise RuntimeError(f"kernel backend 'cuda' needs numba.cuda, which does not import here ({err}); "
                       "install numba (or numba-cuda) with CUDA support, or use --backend cpu") from None

from npdiff.kernels.reference import conv2d_output_size  # noqa: F401  (same helper in every backend)

# ----------------------------------------------------------------------------------------------
# launch configuration: the only constants that tune these kernels

SIMULATOR = bool(_numba_config.ENABLE_CUDASIM)
if SIMULATOR:
    # one Python thread per simulated thread: a few threads walk the same grid-stride loops
    THREADS_PER_BLOCK = 4  # threads of a block
    MAX_BLOCKS = 2  # grid-stride loops cover everything past MAX_BLOCKS * THREADS_PER_BLOCK
else:
    THREADS_PER_BLOCK = 256
    MAX_BLOCKS = 4096

GELU_C1 = 0.7978845608028654  # sqrt(2 / pi), the tanh approximation of GELU (as in reference.py)
GELU_C2 = 0.044715


class CudaUnavailableError(RuntimeError):
    """numba.cuda finds no GPU and the simulator is off."""


def check_available():
    """Raise CudaUnavailableError, with what to do, unless kernels can run here (a GPU with a
    working driver, or the CUDA simulator). The backend registry calls this on load."""
    if not cuda.is_available():
        raise CudaUnavailableError(
            "kernel backend 'cuda' found no usable NVIDIA GPU (numba.cuda.is_available() is False: no "
            "device or no driver); use --backend cpu, or set NUMBA_ENABLE_CUDASIM=1 before starting "
            "Python to run the CUDA kernels on numba's simulator (correct but very slow)")


def device_name() -> str:
    """'simulator', or the GPU's name."""
    if SIMULATOR:
        return "simulator"
    name = cuda.get_current_device().name
    return name.decode() if isinstance(name, bytes) else str(name)


# ----------------------------------------------------------------------------------------------
# launching and memory


def _launch(kernel, blocks, threads, *args):
    """Every launch goes through here (one place to time, log or check them)."""
    kernel[blocks, threads](*args)


def _over_items(n):
    """(blocks, threads) for a grid-stride loop over n items."""
    return max(1, min(MAX_BLOCKS, -(-n // THREADS_PER_BLOCK))), THREADS_PER_BLOCK


def empty(shape, dtype):
    """An uninitialized device array."""
    return cuda.device_array(shape, dtype=np.dtype(dtype))


def to_device(a):
    """Copy a host array to the device (C order)."""
    return cuda.to_device(np.ascontiguousarray(a))


def to_host(d):
    """Copy a device array to a new host array."""
    return d.copy_to_host()


_dummies = {}


def _dummy(dtype, ndim):
    """A one-element device array standing in for a missing optional argument (bias, residual,
    mask), so that a kernel is not compiled once per combination of Nones."""
    key = (np.dtype(dtype), ndim)
    if key not in _dummies:
        _dummies[key] = cuda.to_device(np.zeros((1,) * ndim, dtype=key[0]))
    return _dummies[key]


def _typed(dtype, *values):
    """Python floats as scalars of `dtype` (see the module docstring)."""
    t = np.dtype(dtype).type
    return tuple(t(v) for v in values)


def _flat(d):
    """1-D view of a C-contiguous device array."""
    return d.reshape(d.size)


# ----------------------------------------------------------------------------------------------
# device helpers


@cuda.jit(device=True)
def _sigmoid(v, one):
    """1 / (1 + e^-v) without overflow for large |v|."""
    if v >= 0:
        return one / (one + math.exp(-v))
    e = math.exp(v)
    return e / (one + e)


# ----------------------------------------------------------------------------------------------
# convolution


@cuda.jit
def _conv2d_kernel(x, w, b, res, y, stride, padding, has_bias, has_res, one):
    """y[n, k, p, q] = b[k] + sum_{c,r,s} w[k, c, r, s] xpad[n, c, stride p + r, stride q + s]
    (+ res[n, k, p, q]); one output element per iteration, zero padding by bounds checks."""
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q = y.shape[2], y.shape[3]
    for idx in range(cuda.grid(1), N * K * P * Q, cuda.gridsize(1)):
        q = idx % Q
        p = (idx // Q) % P
        k = (idx // (P * Q)) % K
        n = idx // (K * P * Q)
        acc = one - one
        for c in range(C):
            for r in range(R):
                h = stride * p + r - padding
                if h >= 0 and h < H:
                    for s in range(S):
                        col = stride * q + s - padding
                        if col >= 0 and col < W:
                            acc += w[k, c, r, s] * x[n, c, h, col]
        if has_bias:
            acc += b[k]
        if has_res:
            acc += res[n, k, p, q]
        y[n, k, p, q] = acc


def conv2d(x, w, b, stride=1, padding=None, residual=None):
    """x (N, C, H, W), w (K, C, R, S), b (K,) or None, residual (N, K, P, Q) or None, added to the
    result. padding defaults to R // 2. -> y (N, K, P, Q)."""
    if padding is None:
        padding = w.shape[2] // 2
    N, C, H, W = x.shape
    K, Cw, R, S = w.shape
    if Cw != C:
        raise ValueError(f"conv2d: input has {C} channels, weight {tuple(w.shape)} expects {Cw}")
    P, Q = conv2d_output_size(H, W, R, S, stride, padding)
    y = empty((N, K, P, Q), x.dtype)  # (N, K, P, Q)
    if residual is not None and tuple(residual.shape) != (N, K, P, Q):
        raise ValueError(f"conv2d: residual has shape {tuple(residual.shape)}, expected {(N, K, P, Q)}")
    _launch(_conv2d_kernel, *_over_items(y.size), x, w,
            b if b is not None else _dummy(x.dtype, 1),
            residual if residual is not None else _dummy(x.dtype, 4),
            y, stride, padding, b is not None, residual is not None, *_typed(x.dtype, 1.0))
    return y


# ----------------------------------------------------------------------------------------------
# linear map


@cuda.jit
def _linear_kernel(x, w, b, res, y, has_bias, has_res, one):
    """y[i, j] = sum_k x[i, k] w[j, k] + b[j] (+ res[i, j]); x (B, I), w (J, I), y (B, J)."""
    B, I = x.shape
    J = w.shape[0]
    for idx in range(cuda.grid(1), B * J, cuda.gridsize(1)):
        i, j = idx // J, idx % J
        acc = one - one
        for k in range(I):
            acc += x[i, k] * w[j, k]
        if has_bias:
            acc += b[j]
        if has_res:
            acc += res[i, j]
        y[i, j] = acc


def linear(x, w, b=None, residual=None):
    """y = x w^T + b (+ residual). x (..., I) C-contiguous, w (J, I), b (J,) or None,
    residual shaped like y. -> y (..., J)."""
    *lead, I = tuple(x.shape)
    lead = tuple(lead)
    J = w.shape[0]
    if w.shape[1] != I:
        raise ValueError(f"linear: input has {I} features, weight {tuple(w.shape)} expects {w.shape[1]}")
    B = int(np.prod(lead))
    y = empty((B, J), x.dtype)  # (B, J)
    res = _dummy(x.dtype, 2) if residual is None else residual.reshape(B, J)
    _launch(_linear_kernel, *_over_items(B * J), x.reshape(B, I), w,
            b if b is not None else _dummy(x.dtype, 1), res, y, b is not None, residual is not None,
            *_typed(x.dtype, 1.0))
    return y.reshape(lead + (J,))


# ----------------------------------------------------------------------------------------------
# normalization (Wu & He 2018; Ba et al. 2016): row statistics, then an element-wise pass that
# applies them, fused with ADM's scale-shift and SiLU for group norm


@cuda.jit
def _row_stats_kernel(x, mean, rstd, inv_count, eps, one):
    """mean and 1 / sqrt(biased variance + eps) of each row of x (R, M), in two passes as in
    reference.py; one row per thread (no shared memory, no barriers: simple, and latency-bound on a
    GPU when rows are few and long; a block-per-row tree reduction is the next step)."""
    R, M = x.shape
    zero = one - one
    for row in range(cuda.grid(1), R, cuda.gridsize(1)):
        acc = zero
        for j in range(M):
            acc += x[row, j]
        m = acc * inv_count
        acc = zero
        for j in range(M):
            d = x[row, j] - m
            acc += d * d
        mean[row] = m
        rstd[row] = one / math.sqrt(acc * inv_count + eps)


@cuda.jit
def _group_norm_apply_kernel(x, gamma, beta, ss, mean, rstd, y, has_ss, act, one):
    """y = (x - mean[n, g]) rstd[n, g] gamma[c] + beta[c], g = c // (C/G);
    then y = y (1 + ss[n, c]) + ss[n, C + c] if has_ss, then y = y sigmoid(y) if act (SiLU).
    x, y (N, C, S2); ss (N, 2C); mean, rstd (N, G)."""
    N, C, S2 = x.shape
    Cg = C // mean.shape[1]
    for idx in range(cuda.grid(1), N * C * S2, cuda.gridsize(1)):
        s = idx % S2
        c = (idx // S2) % C
        n = idx // (C * S2)
        g = c // Cg
        v = (x[n, c, s] - mean[n, g]) * rstd[n, g] * gamma[c] + beta[c]
        if has_ss:
            v = v * (one + ss[n, c]) + ss[n, C + c]
        if act:
            v = v * _sigmoid(v, one)
        y[n, c, s] = v


def group_norm(x, gamma, beta, num_groups, eps, scale_shift=None, silu=False, stats=False):
    """Group norm of x (N, C, *spatial) C-contiguous; then optionally h (1 + scale) + shift with
    scale_shift (N, 2C) = [scale, shift], then optionally SiLU. -> y like x
    (and mean, rstd (N, G) when stats)."""
    N, C = x.shape[0], x.shape[1]
    if C % num_groups:
        raise ValueError(f"group norm: {C} channels do not split into {num_groups} groups")
    S2 = x.size // max(N * C, 1)
    G, group = num_groups, C // num_groups * S2  # a group's channels are contiguous: one row each
    mean, rstd = empty((N * G,), x.dtype), empty((N * G,), x.dtype)
    _launch(_row_stats_kernel, *_over_items(N * G), x.reshape(N * G, group), mean, rstd,
            *_typed(x.dtype, 1.0 / max(group, 1), eps, 1.0))
    mean, rstd = mean.reshape(N, G), rstd.reshape(N, G)  # (N, G) each
    y = empty(x.shape, x.dtype)
    _launch(_group_norm_apply_kernel, *_over_items(x.size), x.reshape(N, C, S2), gamma, beta,
            scale_shift if scale_shift is not None else _dummy(x.dtype, 2), mean, rstd, y.reshape(N, C, S2),
            scale_shift is not None, silu, *_typed(x.dtype, 1.0))
    return (y, mean, rstd) if stats else y


@cuda.jit
def _layer_norm_apply_kernel(x, gamma, beta, mean, rstd, y):
    """y = (x - mean[b]) rstd[b] gamma[j] + beta[j]; x, y (B, D), mean, rstd (B,)."""
    B, D = x.shape
    for idx in range(cuda.grid(1), B * D, cuda.gridsize(1)):
        b, j = idx // D, idx % D
        y[b, j] = (x[b, j] - mean[b]) * rstd[b] * gamma[j] + beta[j]


def layer_norm(x, gamma, beta, eps, stats=False):
    """Layer norm over the last axis of x (..., D) C-contiguous -> y like x (and mean, rstd (...,))."""
    *lead, D = tuple(x.shape)
    lead = tuple(lead)
    B = int(np.prod(lead))
    mean, rstd = empty((B,), x.dtype), empty((B,), x.dtype)  # (B,) each
    _launch(_row_stats_kernel, *_over_items(B), x.reshape(B, D), mean, rstd,
            *_typed(x.dtype, 1.0 / max(D, 1), eps, 1.0))
    y = empty(x.shape, x.dtype)
    _launch(_layer_norm_apply_kernel, *_over_items(B * D), x.reshape(B, D), gamma, beta, mean, rstd, y.reshape(B, D))
    return (y, mean.reshape(lead), rstd.reshape(lead)) if stats else y


# ----------------------------------------------------------------------------------------------
# scaled dot-product attention (Vaswani et al. 2017, eq. 1)


@cuda.jit
def _attention_kernel(q, k, v, mask, bias, probs, o, q_off, k_off, v_off, scale, has_mask, has_bias, one):
    """For each (n, e, l): s_m = scale q[n, l, head e] . k[n, m, head e] (+ bias[e, l, m]) over the
    keys m that the mask keeps, p = softmax(s) (masked keys get p = 0), o[n, l, head e] = sum_m p_m
    v[n, m, head e]. bias (E, L, M) is an additive score bias (a relative position bias).
    Head e of q is the columns q_off + e Dh ... q_off + (e+1) Dh - 1 (likewise k, v), so the three
    can be slices of one (N, L, 3D) projection. q (N, L, *), k v (N, M, *), mask (N, M) bool,
    probs (N, E, L, M) (the softmax, kept for the host API), o (N, L, E Dh)."""
    N, E, L, M = probs.shape
    Dh = o.shape[2] // E
    zero = one - one
    for idx in range(cuda.grid(1), N * E * L, cuda.gridsize(1)):
        l = idx % L  # noqa: E741
        e = (idx // L) % E
        n = idx // (E * L)
        qc, kc, vc = q_off + e * Dh, k_off + e * Dh, v_off + e * Dh
        smax = zero
        found = False
        for m in range(M):
            if has_mask and not mask[n, m]:
                continue
            s = zero
            for d in range(Dh):
                s += q[n, l, qc + d] * k[n, m, kc + d]
            s *= scale
            if has_bias:
                s += bias[e, l, m]
            probs[n, e, l, m] = s
            if not found or s > smax:
                smax = s
                found = True
        total = zero
        for m in range(M):
            if has_mask and not mask[n, m]:
                probs[n, e, l, m] = zero
            else:
                pe = math.exp(probs[n, e, l, m] - smax)
                probs[n, e, l, m] = pe
                total += pe
        for m in range(M):
            probs[n, e, l, m] = probs[n, e, l, m] / total
        for d in range(Dh):
            acc = zero
            for m in range(M):
                acc += probs[n, e, l, m] * v[n, m, vc + d]
            o[n, l, e * Dh + d] = acc


def attention(q, k, v, num_heads, key_mask=None, offsets=(0, 0, 0), width=None, scale=None, probs=False,
              bias=None):
    """Multi-head attention on token layouts: q (N, L, *), k and v (N, M, *) device arrays (may be
    the same array, read at different column offsets), key_mask (N, M) bool device array or None,
    bias (E, L, M) device array added to the scores, or None.
    width: D, the attended width (default: q's last axis); scale defaults to 1/sqrt(D / heads).
    -> o (N, L, D) (and probs (N, E, L, M))."""
    N, L = q.shape[0], q.shape[1]
    M = k.shape[1]
    D = width if width is not None else q.shape[2]
    if D % num_heads:
        raise ValueError(f"attention width {D} does not split into {num_heads} heads")
    if scale is None:
        scale = 1.0 / math.sqrt(D // num_heads)
    o = empty((N, L, D), q.dtype)  # (N, L, D)
    p = empty((N, num_heads, L, M), q.dtype)  # (N, E, L, M)
    _launch(_attention_kernel, *_over_items(N * num_heads * L), q, k, v,
            key_mask if key_mask is not None else _dummy(np.bool_, 2),
            bias if bias is not None else _dummy(q.dtype, 3), p, o, *offsets,
            *_typed(q.dtype, scale), key_mask is not None, bias is not None, *_typed(q.dtype, 1.0))
    return (o, p) if probs else o


# ----------------------------------------------------------------------------------------------
# element-wise: activations and linear combinations


@cuda.jit
def _silu_kernel(x, y, one):
    """y = x sigmoid(x) on flat arrays."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = x[i] * _sigmoid(x[i], one)


@cuda.jit
def _gelu_kernel(x, y, c1, c2, one):
    """y = 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = c1 (x + c2 x^3) (GELU, tanh approximation)."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        u = c1 * (x[i] + c2 * x[i] * x[i] * x[i])
        y[i] = x[i] * _sigmoid(u + u, one)


def silu(x):
    y = empty(x.shape, x.dtype)
    _launch(_silu_kernel, *_over_items(x.size), _flat(x), _flat(y), *_typed(x.dtype, 1.0))
    return y


def gelu(x):
    y = empty(x.shape, x.dtype)
    _launch(_gelu_kernel, *_over_items(x.size), _flat(x), _flat(y), *_typed(x.dtype, GELU_C1, GELU_C2, 1.0))
    return y


@cuda.jit
def _lincomb_kernel(a, ca, b, cb, c, cc, y, terms):
    """y = ca a (+ cb b) (+ cc c) on flat arrays, with the first `terms` terms."""
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        v = ca * a[i]
        if terms > 1:
            v += cb * b[i]
        if terms > 2:
            v += cc * c[i]
        y[i] = v


def lincomb(*pairs):
    """sum_j c_j a_j for pairs (c_0, a_0), (c_1, a_1), ... (1 to 3 of them) of Python floats and
    C-contiguous device arrays of one shape: the sampler updates and residual adds."""
    if not 1 <= len(pairs) <= 3:
        raise ValueError(f"lincomb takes 1 to 3 terms, got {len(pairs)}")
    a0 = pairs[0][1]
    for _, a in pairs:
        if tuple(a.shape) != tuple(a0.shape) or a.dtype != a0.dtype:
            raise ValueError(f"lincomb: arrays {tuple(a.shape)} {a.dtype} and {tuple(a0.shape)} {a0.dtype} differ")
    y = empty(a0.shape, a0.dtype)
    padded = list(pairs) + [(0.0, a0)] * (3 - len(pairs))
    args = []
    for coef, a in padded:
        args += [_flat(a), *_typed(a0.dtype, coef)]
    _launch(_lincomb_kernel, *_over_items(a0.size), *args, _flat(y), len(pairs))
    return y


@cuda.jit
def _clip_kernel(x, y, lo, hi):
    """y = x clipped to [lo, hi] (NaN stays NaN, as in np.clip)."""
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        v = x[i]
        if v < lo:
            v = lo
        if v > hi:
            v = hi
        y[i] = v


def clip(x, lo, hi):
    """y = min(max(x, lo), hi)."""
    y = empty(x.shape, x.dtype)
    _launch(_clip_kernel, *_over_items(x.size), _flat(x), _flat(y), *_typed(x.dtype, lo, hi))
    return y


@cuda.jit
def _fill_kernel(y, value):
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        y[i] = value


def full(shape, value, dtype):
    """A device array filled with `value` (no host copy)."""
    y = empty(shape, dtype)
    _launch(_fill_kernel, *_over_items(y.size), _flat(y), *_typed(dtype, value))
    return y


@cuda.jit
def _guidance_kernel(out, scales, y):
    """Classifier-free guidance (Ho & Salimans 2021) on a batch out (2N, C', H, W) = [cond; uncond]:
    y[i, c] = uncond + scales[i] (cond - uncond) for the first C = y.shape[1] channels."""
    N, C, H, W = y.shape
    for idx in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        w = idx % W
        h = (idx // W) % H
        c = (idx // (H * W)) % C
        i = idx // (C * H * W)
        u = out[N + i, c, h, w]
        y[i, c, h, w] = u + scales[i] * (out[i, c, h, w] - u)


def guidance(out, scales, channels):
    """out (2N, C', H, W) = [cond; uncond], scales (N,) device array in out's dtype -> guided
    prediction (N, channels, H, W)."""
    N2, _, H, W = out.shape
    y = empty((N2 // 2, channels, H, W), out.dtype)
    _launch(_guidance_kernel, *_over_items(y.size), out, scales, y)
    return y


# ----------------------------------------------------------------------------------------------
# layouts: copies between strided views, tokens, upsampling


@cuda.jit
def _copy4d_kernel(src, dst):
    """dst[...] = src[...] for two 4-D arrays of one shape, either of them a strided view."""
    A, B, C, D = src.shape
    for idx in range(cuda.grid(1), A * B * C * D, cuda.gridsize(1)):
        d = idx % D
        c = (idx // D) % C
        b = (idx // (C * D)) % B
        a = idx // (B * C * D)
        dst[a, b, c, d] = src[a, b, c, d]


def copy_into(src, dst):
    """Copy a 4-D device array (or view) into a 4-D view of the same shape."""
    if tuple(src.shape) != tuple(dst.shape):
        raise ValueError(f"copy: shapes {tuple(src.shape)} and {tuple(dst.shape)} differ")
    _launch(_copy4d_kernel, *_over_items(int(np.prod(src.shape))), src, dst)
    return dst


def concat(arrays, axis):
    """Concatenate 4-D device arrays along axis 0 (batch) or 1 (channels)."""
    shape = list(arrays[0].shape)
    shape[axis] = sum(a.shape[axis] for a in arrays)
    y = empty(tuple(shape), arrays[0].dtype)
    start = 0
    for a in arrays:
        stop = start + a.shape[axis]
        copy_into(a, y[start:stop] if axis == 0 else y[:, start:stop])
        start = stop
    return y


def contiguous(a):
    """A C-contiguous copy of a 4-D device view."""
    return copy_into(a, empty(tuple(a.shape), a.dtype))


@cuda.jit
def _to_tokens_kernel(x, t):
    """t[n, h W + w, c] = x[n, c, h, w]: (N, C, H, W) -> (N, H W, C)."""
    N, C, H, W = x.shape
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        c = idx % C
        hw = (idx // C) % (H * W)
        n = idx // (C * H * W)
        t[n, hw, c] = x[n, c, hw // W, hw % W]


@cuda.jit
def _add_tokens_kernel(x, a, y):
    """y[n, c, h, w] = x[n, c, h, w] + a[n, h W + w, c]: a residual branch in token layout."""
    N, C, H, W = x.shape
    for idx in range(cuda.grid(1), N * C * H * W, cuda.gridsize(1)):
        w = idx % W
        h = (idx // W) % H
        c = (idx // (H * W)) % C
        n = idx // (C * H * W)
        y[n, c, h, w] = x[n, c, h, w] + a[n, h * W + w, c]


def to_tokens(x):
    """(N, C, H, W) -> (N, H*W, C)."""
    N, C, H, W = x.shape
    t = empty((N, H * W, C), x.dtype)
    _launch(_to_tokens_kernel, *_over_items(x.size), x, t)
    return t


def add_tokens(x, a):
    """x (N, C, H, W) + a (N, H*W, C) transposed back -> (N, C, H, W)."""
    y = empty(x.shape, x.dtype)
    _launch(_add_tokens_kernel, *_over_items(x.size), x, a, y)
    return y


@cuda.jit
def _upsample2x_kernel(x, y):
    """y[n, c, i, j] = x[n, c, i // 2, j // 2] (nearest neighbour)."""
    N, C, H2, W2 = y.shape
    for idx in range(cuda.grid(1), N * C * H2 * W2, cuda.gridsize(1)):
        j = idx % W2
        i = (idx // W2) % H2
        c = (idx // (H2 * W2)) % C
        n = idx // (C * H2 * W2)
        y[n, c, i, j] = x[n, c, i // 2, j // 2]


def upsample2x(x):
    """Nearest 2x upsampling (N, C, H, W) -> (N, C, 2H, 2W)."""
    N, C, H, W = x.shape
    y = empty((N, C, 2 * H, 2 * W), x.dtype)
    _launch(_upsample2x_kernel, *_over_items(y.size), x, y)
    return y


# ----------------------------------------------------------------------------------------------
# embeddings and pooling


@cuda.jit
def _embedding_kernel(ids, table, pos, y, has_pos):
    """y[n, l, d] = table[ids[n, l], d] (+ pos[l, d]). ids (N, L) int, table (V, D), y (N, L, D)."""
    N, L, D = y.shape
    for idx in range(cuda.grid(1), N * L * D, cuda.gridsize(1)):
        d = idx % D
        l = (idx // D) % L  # noqa: E741
        n = idx // (L * D)
        v = table[ids[n, l], d]
        if has_pos:
            v += pos[l, d]
        y[n, l, d] = v


def embedding(ids, table, pos=None):
    """Token lookup ids (N, L) -> (N, L, D), plus position rows pos[:L] (Lmax, D) when given.
    The ids must already be checked to lie in [0, V) (a device cannot raise)."""
    N, L = ids.shape
    y = empty((N, L, table.shape[1]), table.dtype)
    _launch(_embedding_kernel, *_over_items(y.size), ids, table,
            pos if pos is not None else _dummy(table.dtype, 2), y, pos is not None)
    return y


@cuda.jit
def _timestep_embedding_kernel(t, y, half, log_max_period):
    """y[n, i] = cos(t[n] f_i) and y[n, half + i] = sin(t[n] f_i), f_i = max_period^(-i / half),
    i < half; a zero last column when the width is odd. In float64, as on the host (t f reaches 1e3:
    float32 would lose three digits of the phase); stored in y's dtype."""
    N, dim = y.shape
    for idx in range(cuda.grid(1), N * dim, cuda.gridsize(1)):
        n, i = idx // dim, idx % dim
        val = 0.0
        if i < 2 * half:
            j = i % half
            arg = t[n] * math.exp(-log_max_period * j / half)
            val = math.cos(arg) if i < half else math.sin(arg)
        y[n, i] = val


def timestep_embedding(t, dim, max_period, dtype):
    """Sinusoidal embedding of timesteps t (N,) float64 device array -> (N, dim) in dtype
    (npdiff.nn.layers.timestep_embedding_forward)."""
    y = empty((t.shape[0], dim), dtype)
    _launch(_timestep_embedding_kernel, *_over_items(y.size), t, y, dim // 2, math.log(max_period))
    return y


@cuda.jit
def _masked_mean_kernel(x, mask, y, one):
    """y[n, d] = sum_l w[n, l] x[n, l, d], w = mask / sum_l mask: the mean over real tokens."""
    N, L, D = x.shape
    zero = one - one
    for idx in range(cuda.grid(1), N * D, cuda.gridsize(1)):
        n, d = idx // D, idx % D
        count = zero
        for l in range(L):  # noqa: E741
            if mask[n, l]:
                count += one
        w = one / count
        acc = zero
        for l in range(L):  # noqa: E741
            if mask[n, l]:
                acc += w * x[n, l, d]
        y[n, d] = acc


def masked_mean(x, mask):
    """x (N, L, D), mask (N, L) bool with a True in every row -> (N, D)."""
    N, _, D = x.shape
    y = empty((N, D), x.dtype)
    _launch(_masked_mean_kernel, *_over_items(N * D), x, mask, y, *_typed(x.dtype, 1.0))
    return y


# ----------------------------------------------------------------------------------------------
# the host kernels every backend defines (reference.py's signatures): copy in, run, copy out.
# Backward passes run on the host with the Numba CPU kernels (training on CUDA is not implemented).


def conv2d_forward(x, w, b, stride, padding):
    """reference.conv2d_forward on the device."""
    bd = to_device(b) if b is not None else None
    return to_host(conv2d(to_device(x), to_device(w), bd, stride, padding))


def group_norm_forward(x, gamma, beta, num_groups, eps):
    """reference.group_norm_forward on the device: (y, mean (N, G), rstd (N, G))."""
    y, mean, rstd = group_norm(to_device(x), to_device(gamma), to_device(beta), num_groups, eps, stats=True)
    return to_host(y), to_host(mean), to_host(rstd)


def group_norm_silu_forward(x, gamma, beta, num_groups, eps, scale_shift=None):
    """reference.group_norm_silu_forward on the device: (y, mean (N, G), rstd (N, G))."""
    ss = to_device(np.ascontiguousarray(scale_shift)) if scale_shift is not None else None
    y, mean, rstd = group_norm(to_device(x), to_device(gamma), to_device(beta), num_groups, eps,
                               scale_shift=ss, silu=True, stats=True)
    return to_host(y), to_host(mean), to_host(rstd)


def layer_norm_forward(x, gamma, beta, eps):
    """reference.layer_norm_forward on the device: (y, mean (B,), rstd (B,))."""
    y, mean, rstd = layer_norm(to_device(x), to_device(gamma), to_device(beta), eps, stats=True)
    return to_host(y), to_host(mean), to_host(rstd)


def silu_forward(x):
    return to_host(silu(to_device(x)))


def gelu_forward(x):
    return to_host(gelu(to_device(x)))


def linear_forward(x, w, b):
    """reference.linear_forward on the device."""
    return to_host(linear(to_device(x), to_device(w), to_device(b) if b is not None else None))


def attention_forward(q, k, v, key_mask, scale, need_probs=True):
    """reference.attention_forward on the device: q (N, E, L, Dh), k v (N, E, M, Dh) ->
    (o (N, E, L, Dh), probs (N, E, L, M)); the kernel works on token layouts (N, L, E*Dh)."""
    N, E, L, Dh = q.shape

    def tokens(a):  # (N, E, X, Dh) -> (N, X, E*Dh)
        return to_device(a.transpose(0, 2, 1, 3).reshape(N, a.shape[2], E * Dh))

    mask = to_device(key_mask) if key_mask is not None else None
    o, p = attention(tokens(q), tokens(k), tokens(v), E, mask, scale=scale, probs=True)
    o = to_host(o).reshape(N, L, E, Dh).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(o), (to_host(p) if need_probs else None)


def _cpu():
    from npdiff.kernels import get_backend
    return get_backend("cpu")


def conv2d_backward(dy, x, w, stride, padding, need_dx=True):
    """On the host (Numba CPU kernels)."""
    return _cpu().conv2d_backward(dy, x, w, stride, padding, need_dx)


def group_norm_backward(dy, x, gamma, mean, rstd, num_groups):
    """On the host (Numba CPU kernels)."""
    return _cpu().group_norm_backward(dy, x, gamma, mean, rstd, num_groups)


def group_norm_silu_backward(dy, x, gamma, beta, mean, rstd, num_groups, scale_shift=None):
    """On the host (Numba CPU kernels)."""
    return _cpu().group_norm_silu_backward(dy, x, gamma, beta, mean, rstd, num_groups, scale_shift)


def layer_norm_backward(dy, x, gamma, mean, rstd):
    """On the host (Numba CPU kernels)."""
    return _cpu().layer_norm_backward(dy, x, gamma, mean, rstd)


def silu_backward(dy, x):
    """On the host (Numba CPU kernels)."""
    return _cpu().silu_backward(dy, x)


def gelu_backward(dy, x):
    """On the host (Numba CPU kernels)."""
    return _cpu().gelu_backward(dy, x)


def linear_backward(dy, x, w, need_bias=True):
    """On the host (Numba CPU kernels)."""
    return _cpu().linear_backward(dy, x, w, need_bias)


def attention_backward(do, q, k, v, probs, scale):
    """On the host (Numba CPU kernels)."""
    return _cpu().attention_backward(do, q, k, v, probs, scale)
