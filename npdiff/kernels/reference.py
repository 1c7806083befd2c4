"""Reference kernels: plain vectorized NumPy, the oracle every fast backend is tested against.

Every function here works in float32 and float64 and returns arrays of its inputs' dtype. A
faster backend (`cpu.py`, `cuda.py`) exposes the same names with the same signatures; it may
re-export any function from this module that it does not accelerate.

Kernels know nothing of layers: they take arrays and return arrays, hold no state, and leave
caching to the caller.

Dimension legend:
  N batch, C input channels, K output channels, H W input height and width,
  P Q output height and width, R S kernel height and width, G groups,
  B any leading batch dimensions, L query length, M key length, E head count, Dh head width,
  I J input and output features of a linear map.
"""

import numpy as np

SQRT_2_OVER_PI = 0.7978845608028654  # sqrt(2 / pi), GELU tanh approximation
GELU_CUBIC = 0.044715  # Hendrycks & Gimpel 2016, eq. for the tanh approximation


# ----------------------------------------------------------------------------------------------
# convolution: im2col + one matrix multiply


def conv2d_output_size(H, W, R, S, stride, padding):
    """Output height and width of a convolution (floor division, as in PyTorch)."""
    return (H + 2 * padding - R) // stride + 1, (W + 2 * padding - S) // stride + 1


def _im2col(x, R, S, stride, padding):
    """Unfold x (N, C, H, W) into rows of patches: (N*P*Q, R*S*C), patch order (r, s, c).

    The (r, s, c) order keeps every write below a contiguous run of C values; the weight is
    permuted to match (a tiny copy) instead of the large patch matrix.
    """
    N, C, H, W = x.shape
    P, Q = conv2d_output_size(H, W, R, S, stride, padding)
    if R == 1 and S == 1 and stride == 1 and padding == 0:
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(N * H * W, C), P, Q
    xp = np.zeros((N, H + 2 * padding, W + 2 * padding, C), dtype=x.dtype)  # (N, Hp, Wp, C)
    xp[:, padding:padding + H, padding:padding + W, :] = x.transpose(0, 2, 3, 1)
    cols = np.empty((N, P, Q, R, S, C), dtype=x.dtype)
    for r in range(R):  # R*S strided copies, each of a whole (N, P, Q, C) slab
        for s in range(S):
            cols[:, :, :, r, s, :] = xp[:, r:r + stride * P:stride, s:s + stride * Q:stride, :]
    return cols.reshape(N * P * Q, R * S * C), P, Q


def _col2im(dcols, x_shape, R, S, stride, padding, P, Q):
    """Adjoint of _im2col: scatter-add patch rows (N*P*Q, R*S*C) back to (N, C, H, W)."""
    N, C, H, W = x_shape
    if R == 1 and S == 1 and stride == 1 and padding == 0:
        return np.ascontiguousarray(dcols.reshape(N, H, W, C).transpose(0, 3, 1, 2))
    dcols = dcols.reshape(N, P, Q, R, S, C)
    dxp = np.zeros((N, H + 2 * padding, W + 2 * padding, C), dtype=dcols.dtype)  # (N, Hp, Wp, C)
    for r in range(R):
        for s in range(S):
            dxp[:, r:r + stride * P:stride, s:s + stride * Q:stride, :] += dcols[:, :, :, r, s, :]
    dx = dxp[:, padding:padding + H, padding:padding + W, :]  # (N, H, W, C)
    return np.ascontiguousarray(dx.transpose(0, 3, 1, 2))


def conv2d_forward(x, w, b, stride, padding):
    """y[n, k, p, q] = b[k] + sum_{c,r,s} w[k, c, r, s] * xpad[n, c, stride*p + r, stride*q + s].

    x (N, C, H, W), w (K, C, R, S), b (K,) or None; zero padding on all four sides.
    Returns y (N, K, P, Q).
    """
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    cols, P, Q = _im2col(x, R, S, stride, padding)  # (N*P*Q, R*S*C)
    wmat = w.transpose(0, 2, 3, 1).reshape(K, R * S * C)  # (K, R*S*C), patch order (r, s, c)
    y = cols @ wmat.T  # (N*P*Q, K)
    if b is not None:
        y += b
    return np.ascontiguousarray(y.reshape(N, P, Q, K).transpose(0, 3, 1, 2))


def conv2d_backward(dy, x, w, stride, padding, need_dx=True):
    """Gradients of conv2d_forward. dy (N, K, P, Q) -> (dx (N, C, H, W) or None, dw, db).

    The patch matrix is rebuilt here rather than kept from the forward pass: it is R*S times
    the size of x, and rebuilding it costs one memory pass against two matrix multiplies.
    """
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q = dy.shape[2], dy.shape[3]
    dy2 = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).reshape(N * P * Q, K)  # (N*P*Q, K)
    db = dy2.sum(axis=0)  # (K,)
    cols, _, _ = _im2col(x, R, S, stride, padding)  # (N*P*Q, R*S*C)
    # forward: y = cols @ wmat.T
    dwmat = dy2.T @ cols  # (K, R*S*C)
    dw = np.ascontiguousarray(dwmat.reshape(K, R, S, C).transpose(0, 3, 1, 2))  # (K, C, R, S)
    dx = None
    if need_dx:
        wmat = w.transpose(0, 2, 3, 1).reshape(K, R * S * C)
        dcols = dy2 @ wmat  # (N*P*Q, R*S*C)
        dx = _col2im(dcols, x.shape, R, S, stride, padding, P, Q)
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# normalization


def _group_view(x, G):
    """x (N, C, *spatial) -> (N, G, C/G * prod(spatial)) view."""
    return x.reshape(x.shape[0], G, -1)


def _channel_shape(x):
    """Broadcast shape of a per-channel vector against x (N, C, *spatial)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


def group_norm_forward(x, gamma, beta, num_groups, eps):
    """Group normalization (Wu & He 2018): normalize each group of C/G channels over the group's
    channels and all spatial positions, then scale and shift per channel.

    x (N, C, *spatial), gamma (C,), beta (C,). Returns y like x, mean (N, G), rstd (N, G).
    """
    xg = _group_view(x, num_groups)  # (N, G, C/G*HW)
    mean = xg.mean(axis=-1)  # (N, G)
    xc = xg - mean[..., None]
    var = np.mean(xc * xc, axis=-1)  # (N, G), biased, as in the paper
    rstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)  # (N, G)
    xhat = (xc * rstd[..., None]).reshape(x.shape)
    y = xhat * gamma.reshape(_channel_shape(x)) + beta.reshape(_channel_shape(x))
    return y, mean, rstd


def group_norm_backward(dy, x, gamma, mean, rstd, num_groups):
    """Gradients of group_norm_forward: (dx, dgamma, dbeta)."""
    axes = (0,) + tuple(range(2, x.ndim))
    xg = _group_view(x, num_groups)
    xhat_g = (xg - mean[..., None]) * rstd[..., None]  # (N, G, C/G*HW)
    xhat = xhat_g.reshape(x.shape)
    dbeta = dy.sum(axis=axes)  # y = xhat * gamma + beta
    dgamma = (dy * xhat).sum(axis=axes)
    dxhat_g = _group_view(dy * gamma.reshape(_channel_shape(x)), num_groups)
    # xhat = (x - mean) * rstd over each group:
    # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
    dx = rstd[..., None] * (dxhat_g - dxhat_g.mean(axis=-1, keepdims=True)
                            - xhat_g * (dxhat_g * xhat_g).mean(axis=-1, keepdims=True))
    return dx.reshape(x.shape), dgamma, dbeta


def _modulation(scale_shift, x):
    """(1 + scale, shift) shaped to broadcast against x (N, C, *spatial); scale_shift (N, 2C)."""
    N, C = x.shape[0], x.shape[1]
    shape = (N, C) + (1,) * (x.ndim - 2)
    return 1.0 + scale_shift[:, :C].reshape(shape), scale_shift[:, C:].reshape(shape)


def group_norm_silu_forward(x, gamma, beta, num_groups, eps, scale_shift=None):
    """The normalization of a residual block (Dhariwal & Nichol 2021, "AdaGN"), in one kernel:
    y = silu(group_norm(x) * (1 + scale) + shift), scale_shift (N, 2C) = [scale, shift] per image
    and channel, or None for y = silu(group_norm(x)). Returns y, mean (N, G), rstd (N, G)."""
    h, mean, rstd = group_norm_forward(x, gamma, beta, num_groups, eps)
    if scale_shift is not None:
        m, shift = _modulation(scale_shift, x)
        h = h * m + shift
    return silu_forward(h), mean, rstd


def group_norm_silu_backward(dy, x, gamma, beta, mean, rstd, num_groups, scale_shift=None):
    """Gradients of group_norm_silu_forward: (dx, dgamma, dbeta, dscale_shift (N, 2C) or None).
    The normalized h and the SiLU input u are recomputed from x and the saved statistics."""
    xhat = ((_group_view(x, num_groups) - mean[..., None]) * rstd[..., None]).reshape(x.shape)
    h = xhat * gamma.reshape(_channel_shape(x)) + beta.reshape(_channel_shape(x))
    u, m = h, None
    if scale_shift is not None:
        m, shift = _modulation(scale_shift, x)
        u = h * m + shift
    du = silu_backward(dy, u)
    dss = None
    if scale_shift is not None:
        spatial = tuple(range(2, x.ndim))
        dss = np.concatenate([(du * h).sum(axis=spatial), du.sum(axis=spatial)], axis=1)  # (N, 2C)
        du = du * m
    dx, dgamma, dbeta = group_norm_backward(du, x, gamma, mean, rstd, num_groups)
    return dx, dgamma, dbeta, dss


def layer_norm_forward(x, gamma, beta, eps):
    """Layer normalization (Ba et al. 2016) over the last axis. x (B, D), gamma and beta (D,).
    Returns y like x, mean (B,), rstd (B,) (B is all leading axes)."""
    mean = x.mean(axis=-1)  # (B,)
    xc = x - mean[..., None]
    var = np.mean(xc * xc, axis=-1)
    rstd = (1.0 / np.sqrt(var + eps)).astype(x.dtype)
    xhat = xc * rstd[..., None]
    return xhat * gamma + beta, mean, rstd


def layer_norm_backward(dy, x, gamma, mean, rstd):
    """Gradients of layer_norm_forward: (dx, dgamma, dbeta)."""
    axes = tuple(range(x.ndim - 1))
    xhat = (x - mean[..., None]) * rstd[..., None]
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dxhat = dy * gamma
    dx = rstd[..., None] * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                            - xhat * (dxhat * xhat).mean(axis=-1, keepdims=True))
    return dx, dgamma, dbeta


# ----------------------------------------------------------------------------------------------
# pointwise activations


def _sigmoid(x):
    # for x << 0, exp(-x) overflows to inf and 1 / (1 + inf) = 0, the correct limit; elsewhere
    # the formula keeps full relative precision
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def silu_forward(x):
    """SiLU / swish (Elfwing et al. 2018; Ramachandran et al. 2017): y = x * sigmoid(x)."""
    return x * _sigmoid(x)


def silu_backward(dy, x):
    """dy/dx = s + x s (1 - s), s = sigmoid(x)."""
    s = _sigmoid(x)
    return dy * (s * (1.0 + x * (1.0 - s)))


def gelu_forward(x):
    """GELU, tanh approximation (Hendrycks & Gimpel 2016; PyTorch `approximate='tanh'`):
    y = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    u = SQRT_2_OVER_PI * (x + GELU_CUBIC * x * x * x)
    return 0.5 * x * (1.0 + np.tanh(u))


def gelu_backward(dy, x):
    """dy/dx = 0.5 (1 + tanh u) + 0.5 x (1 - tanh^2 u) sqrt(2/pi) (1 + 3 * 0.044715 x^2)."""
    x2 = x * x
    th = np.tanh(SQRT_2_OVER_PI * (x + GELU_CUBIC * x2 * x))
    dudx = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_CUBIC * x2)
    return dy * (0.5 * (1.0 + th) + 0.5 * x * (1.0 - th * th) * dudx)


# ----------------------------------------------------------------------------------------------
# linear map


def linear_forward(x, w, b):
    """y = x w^T + b. x (B, I), w (J, I) (PyTorch layout), b (J,) or None. Returns (B, J)."""
    y = x @ w.T
    if b is not None:
        y += b
    return y


def linear_backward(dy, x, w, need_bias=True):
    """Gradients of linear_forward: (dx (B, I), dw (J, I), db (J,) or None)."""
    J, I = w.shape
    dy2 = dy.reshape(-1, J)  # (B, J)
    x2 = x.reshape(-1, I)  # (B, I)
    dx = dy @ w  # (B, I)
    dw = dy2.T @ x2  # (J, I)
    db = dy2.sum(axis=0) if need_bias else None
    return dx, dw, db


# ----------------------------------------------------------------------------------------------
# scaled dot-product attention (Vaswani et al. 2017, eq. 1)


def attention_forward(q, k, v, key_mask, scale, need_probs=True):
    """O = softmax(scale * Q K^T + mask) V over E heads.

    q (N, E, L, Dh), k and v (N, E, M, Dh), key_mask (N, M) bool (True = attend) or None.
    Every row of key_mask must have at least one True (the caller checks).
    Returns (o (N, E, L, Dh), probs (N, E, L, M)); probs is what the backward pass needs, None
    when need_probs is False (a backend may then skip storing it).
    """
    s = (q @ k.transpose(0, 1, 3, 2)) * scale  # (N, E, L, M)
    if key_mask is not None:
        s = np.where(key_mask[:, None, None, :], s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)  # exp(-inf) = 0 for masked keys
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v, (p if need_probs else None)


def attention_backward(do, q, k, v, probs, scale):
    """Gradients of attention_forward: (dq, dk, dv), each shaped like its input."""
    # o = p v
    dv = probs.transpose(0, 1, 3, 2) @ do  # (N, E, M, Dh)
    dp = do @ v.transpose(0, 1, 3, 2)  # (N, E, L, M)
    # p = softmax(s): ds = p * (dp - sum_m dp * p); masked keys have p = 0 and get ds = 0
    ds = probs * (dp - (dp * probs).sum(axis=-1, keepdims=True))
    ds *= scale  # s = scale * q k^T
    dq = ds @ k  # (N, E, L, Dh)
    dk = ds.transpose(0, 1, 3, 2) @ q  # (N, E, M, Dh)
    return dq, dk, dv
