"""Layers as forward/backward pairs with explicit caches.

`xxx_forward(...) -> (y, cache)` saves what the backward pass needs;
`xxx_backward(dy, cache) -> (dx, dparam1, dparam2, ...)` consumes it, returning the gradient with
respect to the input first and then one gradient per parameter, in the order the forward takes
them. Layers hold no state; parameters are passed in as arrays. Heavy arithmetic goes through the
active kernel backend (`npdiff.kernels.get_backend()`).

Parameter layouts follow PyTorch so that a PyTorch twin loads the same arrays: conv weight
(K, C, R, S), linear weight (out, in), norm weight and bias (C,).

Dimension legend:
  N batch, C input channels, K output channels, H W height and width, P Q output height and width,
  R S kernel height and width, L sequence length, D features, V vocabulary size.
"""

import math

import numpy as np

from npdiff.kernels import get_backend


# ----------------------------------------------------------------------------------------------
# convolution


def conv2d_forward(x, weight, bias, stride=1, padding=None):
    """2-D convolution. x (N, C, H, W), weight (K, C, R, S), bias (K,) or None.
    padding defaults to R // 2 ("same" size at stride 1 for odd kernels)."""
    if padding is None:
        padding = weight.shape[2] // 2
    if x.shape[1] != weight.shape[1]:
        raise ValueError(f"conv2d: input has {x.shape[1]} channels, weight {weight.shape} "
                         f"expects {weight.shape[1]}")
    y = get_backend().conv2d_forward(x, weight, bias, stride, padding)  # (N, K, P, Q)
    return y, (x, weight, bias is not None, stride, padding)


def conv2d_backward(dy, cache, need_dx=True):
    """-> (dx or None, dweight, dbias or None). need_dx=False skips the input gradient (first
    layer of a network)."""
    x, weight, has_bias, stride, padding = cache
    dx, dw, db = get_backend().conv2d_backward(dy, x, weight, stride, padding, need_dx)
    return dx, dw, (db if has_bias else None)


# ----------------------------------------------------------------------------------------------
# normalization


def group_norm_forward(x, weight, bias, num_groups, eps=1e-5):
    """Group norm (Wu & He 2018). x (N, C, *spatial), weight and bias (C,)."""
    if x.shape[1] % num_groups:
        raise ValueError(f"group norm: {x.shape[1]} channels do not split into {num_groups} groups")
    y, mean, rstd = get_backend().group_norm_forward(x, weight, bias, num_groups, eps)
    return y, (x, weight, mean, rstd, num_groups)


def group_norm_backward(dy, cache):
    """-> (dx, dweight, dbias)."""
    x, weight, mean, rstd, num_groups = cache
    return get_backend().group_norm_backward(dy, x, weight, mean, rstd, num_groups)


def group_norm_silu_forward(x, weight, bias, num_groups, eps=1e-5, scale_shift=None):
    """SiLU(GroupNorm(x) (1 + scale) + shift) in one kernel: the normalization of a residual block
    with its timestep modulation (Dhariwal & Nichol 2021's AdaGN; scale_shift (N, 2C) =
    [scale, shift]), or SiLU(GroupNorm(x)) when scale_shift is None."""
    if x.shape[1] % num_groups:
        raise ValueError(f"group norm: {x.shape[1]} channels do not split into {num_groups} groups")
    y, mean, rstd = get_backend().group_norm_silu_forward(x, weight, bias, num_groups, eps, scale_shift)
    return y, (x, weight, bias, mean, rstd, num_groups, scale_shift)


def group_norm_silu_backward(dy, cache):
    """-> (dx, dweight, dbias, dscale_shift or None)."""
    x, weight, bias, mean, rstd, num_groups, scale_shift = cache
    return get_backend().group_norm_silu_backward(dy, x, weight, bias, mean, rstd, num_groups, scale_shift)


def layer_norm_forward(x, weight, bias, eps=1e-5):
    """Layer norm (Ba et al. 2016) over the last axis. x (..., D), weight and bias (D,)."""
    y, mean, rstd = get_backend().layer_norm_forward(x, weight, bias, eps)
    return y, (x, weight, mean, rstd)


def layer_norm_backward(dy, cache):
    """-> (dx, dweight, dbias)."""
    x, weight, mean, rstd = cache
    return get_backend().layer_norm_backward(dy, x, weight, mean, rstd)


# ----------------------------------------------------------------------------------------------
# activations, dropout


def silu_forward(x):
    """y = x * sigmoid(x)."""
    return get_backend().silu_forward(x), x


def silu_backward(dy, cache):
    """-> (dx,)."""
    return (get_backend().silu_backward(dy, cache),)


def gelu_forward(x):
    """GELU with the tanh approximation (PyTorch `gelu(x, approximate='tanh')`), not the exact
    erf form: NumPy has no erf, and the two differ by less than 1e-3 everywhere."""
    return get_backend().gelu_forward(x), x


def gelu_backward(dy, cache):
    """-> (dx,)."""
    return (get_backend().gelu_backward(dy, cache),)


def dropout_forward(x, p, rng):
    """Inverted dropout (Srivastava et al. 2014): zero each entry with probability p and scale the
    rest by 1/(1-p), so the expectation is unchanged. rng=None or p=0 is the identity (inference)."""
    if rng is None or p == 0.0:
        return x, None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    mask = (rng.random(x.shape) >= p).astype(x.dtype) * x.dtype.type(1.0 / (1.0 - p))  # like x
    return x * mask, mask


def dropout_backward(dy, cache):
    """-> (dx,)."""
    mask = cache
    return (dy if mask is None else dy * mask,)


# ----------------------------------------------------------------------------------------------
# linear maps and embeddings


def linear_forward(x, weight, bias=None):
    """y = x weight^T + bias. x (..., I), weight (J, I), bias (J,) or None -> y (..., J)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, weight {weight.shape} "
                         f"expects {weight.shape[1]}")
    return get_backend().linear_forward(x, weight, bias), (x, weight, bias is not None)


def linear_backward(dy, cache):
    """-> (dx, dweight, dbias or None)."""
    x, weight, has_bias = cache
    return get_backend().linear_backward(dy, x, weight, has_bias)


def embedding_forward(ids, weight):
    """Table lookup. ids (N, L) integers in [0, V), weight (V, D) -> (N, L, D)."""
    V = weight.shape[0]
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        raise ValueError(f"embedding: token ids must lie in [0, {V}), got range "
                         f"[{ids.min()}, {ids.max()}]; is the tokenizer's vocabulary larger than "
                         "the model's vocab_size?")
    return weight[ids], (ids, weight.shape)


def embedding_backward(dy, cache):
    """-> (None, dweight): integer ids have no gradient; repeated ids accumulate."""
    ids, wshape = cache
    dw = np.zeros(wshape, dtype=dy.dtype)  # (V, D)
    np.add.at(dw, ids.reshape(-1), dy.reshape(-1, wshape[1]))
    return None, dw


def timestep_embedding_forward(t, dim, max_period=10000.0, dtype=np.float32):
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, section 3.5;
    the cos-then-sin layout of Dhariwal & Nichol 2021):
      f_i = max_period^(-i / half), i = 0..half-1, half = dim // 2
      y = [cos(t f), sin(t f)] (+ a zero column when dim is odd).
    t (N,) -> y (N, dim)."""
    half = dim // 2
    freqs = np.exp(-math.log(max_period) * np.arange(half, dtype=np.float64) / half)  # (half,)
    t64 = np.asarray(t, dtype=np.float64)
    args = t64[:, None] * freqs[None, :]  # (N, half), in float64: t * f up to ~1e3 needs it
    y = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    if dim % 2:
        y = np.concatenate([y, np.zeros_like(y[:, :1])], axis=1)
    return y.astype(dtype), (args, freqs, dim)


def timestep_embedding_backward(dy, cache):
    """-> (dt,): d cos(t f)/dt = -f sin(t f), d sin(t f)/dt = f cos(t f)."""
    args, freqs, dim = cache
    half = freqs.shape[0]
    dt = (-(dy[:, :half] * (freqs * np.sin(args))).sum(axis=1)
          + (dy[:, half:2 * half] * (freqs * np.cos(args))).sum(axis=1))
    return (dt.astype(dy.dtype),)


# ----------------------------------------------------------------------------------------------
# resampling and skip connections


def upsample_nearest2x_forward(x):
    """Nearest-neighbour 2x upsampling: y[n, c, 2i + a, 2j + b] = x[n, c, i, j]. (N,C,H,W) -> (N,C,2H,2W)."""
    N, C, H, W = x.shape
    y = np.empty((N, C, 2 * H, 2 * W), dtype=x.dtype)
    y6 = y.reshape(N, C, H, 2, W, 2)   # (n, c, i, a, j, b)
    y6[:, :, :, 0, :, 0] = x
    y6[:, :, :, 0, :, 1] = x
    y6[:, :, :, 1] = y6[:, :, :, 0]    # copy whole rows: 5x faster than one broadcast copy
    return y, x.shape


def upsample_nearest2x_backward(dy, cache):
    """-> (dx,): each input pixel receives the sum of its four copies."""
    N, C, H, W = cache
    d6 = dy.reshape(N, C, H, 2, W, 2)
    # four strided adds: 5x faster than sum(axis=(3, 5)), which reduces over tiny inner axes
    return ((d6[:, :, :, 0, :, 0] + d6[:, :, :, 0, :, 1]) + (d6[:, :, :, 1, :, 0] + d6[:, :, :, 1, :, 1]),)


def concat_forward(xs, axis=1):
    """Concatenate along `axis` (channels for U-Net skips)."""
    sizes = [x.shape[axis] for x in xs]
    return np.concatenate(xs, axis=axis), (sizes, axis)


def concat_backward(dy, cache):
    """-> (list of dx, one per input)."""
    sizes, axis = cache
    return (np.split(dy, np.cumsum(sizes)[:-1], axis=axis),)
