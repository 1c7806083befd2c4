"""Finite-difference gradient checks, used by the tests and handy when writing a new layer.

A layer is checked through the scalar loss l = sum(y * R) for a fixed random R of y's shape: its
backward pass called with dy = R must return dl/dx, which central differences approximate to
O(h^2): (l(x + h e) - l(x - h e)) / 2h. In float64 with h = 1e-5 both the truncation error
(~h^2) and the rounding error (~1e-16 / h) sit near 1e-10, far below the 1e-6 the tests demand.
"""

import numpy as np


def numerical_gradient(f, x, h=1e-5):
    """Central-difference gradient of the scalar function f() with respect to the array x, which
    f reads and which is perturbed in place (and restored)."""
    grad = np.zeros_like(x, dtype=np.float64)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + h
        fp = f()
        flat[i] = old - h
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * h)
    return grad


def relative_error(a, b):
    """||a - b|| / max(||a||, ||b||), 0 when both are 0."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b))
    return 0.0 if scale == 0 else float(np.linalg.norm(a - b) / scale)


def directional_check(f, arrays, grads, rng, h=1e-5, along_gradient=False):
    """Compare <grad, d> with (f(theta + h d) - f(theta - h d)) / 2h along one direction d over
    all arrays at once (perturbed in place and restored). Returns the relative error.

    d is a random normal direction, or with along_gradient=True the analytic gradient itself
    (normalized). The latter is the better-conditioned test: the analytic side is ||g||, the
    numeric side <g_true, g> / ||g||, and by Cauchy-Schwarz the two agree only if g = g_true;
    a random d can be nearly orthogonal to g, and then the finite-difference noise is large
    relative to the small derivative it measures."""
    if along_gradient:
        norm = np.sqrt(sum(float(np.sum(np.square(g))) for g in grads))
        dirs = [np.asarray(g, np.float64) / norm for g in grads] if norm > 0 else None
    if not along_gradient or dirs is None:
        dirs = [rng.standard_normal(a.shape) for a in arrays]
    saved = [a.copy() for a in arrays]
    analytic = sum(float(np.sum(g * d)) for g, d in zip(grads, dirs))
    for a, a0, d in zip(arrays, saved, dirs):
        a[...] = a0 + h * d
    fp = f()
    for a, a0, d in zip(arrays, saved, dirs):
        a[...] = a0 - h * d
    fm = f()
    for a, a0 in zip(arrays, saved):
        a[...] = a0
    numeric = (fp - fm) / (2 * h)
    return abs(analytic - numeric) / max(abs(analytic), abs(numeric), 1e-300)
