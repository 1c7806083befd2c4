"""Numba CPU kernels: the same functions as `reference.py`, compiled, parallel, and fused.

Design (see DESIGN.md, "Kernel backends" and "Measured anchors"):

- Matrix products stay in BLAS. Numba cannot beat OpenBLAS at sgemm, so every kernel that
  multiplies matrices calls `np.dot` on contiguous blocks from inside the compiled code. What
  Numba wins is everything around the products: im2col, col2im, layout changes, bias, softmax,
  normalization and activations become single passes over memory, and a block of work (a few
  images of a convolution, one attention head) runs from unfold to fold on one thread while its
  buffers are still in cache.
- One thread pool does the work. Parallel loops run over blocks (`prange` over threads, images or
  heads); each iteration calls a single-threaded BLAS on its block and writes a disjoint part of
  the output. Gradients that sum over blocks (conv and linear weights) go to one partial per
  thread, added after the loop. The BLAS Numba calls (SciPy's OpenBLAS, a separate library from
  NumPy's) is set to one thread when this module loads: two nested pools on two cores ran 2-10x
  slower than one. NumPy's own BLAS is left alone.
- Two signatures per kernel, float32 and float64; anything else goes to the reference kernels.
  Optional arguments (a missing bias or mask) become dummy arrays so that no kernel is compiled
  twice for None. All kernels use `cache=True`: compiled once per install, reloaded in well
  under a second afterwards.

Dimension legend:
  N batch, C input channels, K output channels, H W input height and width,
  P Q output height and width, R S kernel height and width, G groups,
  B rows of a linear map, I J its input and output features, L query length, M key length,
  E heads, Dh head width, T worker threads.
"""

import ctypes
import glob
import math
import os

import numba
import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from npdiff.kernels import reference as _ref
from npdiff.kernels.reference import conv2d_output_size  # noqa: F401  (same helper in every backend)

# columns of one im2col block: big enough for an efficient GEMM, small enough to stay in cache
CONV_BLOCK_COLUMNS = 1024
_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
# reassociation lets LLVM vectorize sums, contraction fuses multiply-adds; infinities and NaNs keep
# their IEEE meaning (no "nnan"/"ninf"), which the masked softmax and the exp limits rely on
_FASTMATH = {"reassoc", "contract"}


def _single_threaded_inner_blas():
    """Set the BLAS that Numba's np.dot calls (SciPy's bundled OpenBLAS) to one thread: our
    parallel loops already occupy every core. Returns True when it could be done."""
    try:
        import scipy
        import scipy.linalg.cython_blas  # noqa: F401  (loads the library)
    except ImportError:
        return False
    libdir = os.path.join(os.path.dirname(os.path.dirname(scipy.__file__)), "scipy.libs")
    for path in sorted(glob.glob(os.path.join(libdir, "*openblas*.so*"))):
        lib = ctypes.CDLL(path)
        for symbol in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            fn = getattr(lib, symbol, None)
            if fn is not None:
                fn(1)
                return True
    return False


INNER_BLAS_SINGLE_THREADED = _single_threaded_inner_blas()


def _keep_freed_memory():
    """Let glibc's malloc keep freed memory instead of returning it to the system. By default
    every array over a few MB is a fresh mmap, whose pages fault in, each zeroed by the kernel, on
    first touch: a U-Net forward at batch 16 allocates ~80 MB of activations, ~20,000 page faults,
    about 20% of its time here. With large blocks taken from the heap and the heap never trimmed,
    the next call reuses the same pages. Peak memory is unchanged (it is what the largest call
    needs); the process simply keeps it. Returns True when glibc accepted both settings."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: nothing to do
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


FREED_MEMORY_KEPT = _keep_freed_memory()


# ----------------------------------------------------------------------------------------------
# exp for float32 that LLVM can vectorize (Numba's scalar libm call cannot be); float64 keeps
# math.exp. Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2, then exp(r) by its Taylor series to
# r^7 (truncation error r^8/8! < 2e-8 relative) times 2^k: about 1e-7 relative error, as good as
# NumPy's float32 exp. Below ln(FLT_MIN) the result is 0, above ln(FLT_MAX) it is inf. Two forms:
# fast_exp(v) for one value takes 2^k from a table (a gather, which keeps loops over it scalar on
# AVX2); exp_inplace(row, bits) for a whole row builds 2^k from its bit pattern and runs 8 lanes
# wide: 3-4x faster per value, so the hot loops (softmax, group norm + SiLU) use it.

_POW2 = np.array([0.0] + [2.0 ** k for k in range(-126, 128)] + [np.inf], dtype=np.float32)  # 2^k at k + 127
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split so that k * _LN2_HI is exact for |k| < 2^15
_LN2_LO = np.float32(-2.1219444005469057e-4)
_EXP_XMIN = np.float32(-87.33654)  # ln(FLT_MIN)
_EXP_XMAX = np.float32(88.72283)  # ln(FLT_MAX)
_E2, _E3, _E4, _E5, _E6, _E7 = (np.float32(1.0 / math.factorial(i)) for i in range(2, 8))
_ONE32 = np.float32(1.0)
_HALF32 = np.float32(0.5)
_ZERO32 = np.float32(0.0)
_NEG_INF32 = np.float32(-np.inf)
_INF32 = np.float32(np.inf)
_NAN32 = np.float32(np.nan)
_F127 = np.float32(127.0)
_F2_23 = np.float32(2.0 ** 23)


@njit(inline="always", fastmath=_FASTMATH)
def _exp32_parts(v):
    """(m, k) with exp(v) = m 2^k, for float32 v clamped to the finite range: v = k ln2 + r and
    m = exp(r), except that k = 128 (v in 88.38..88.72, where 2^k alone overflows) is returned
    as k = 127 with m doubled, which is exact."""
    x = min(max(v, _EXP_XMIN), _EXP_XMAX)
    kf = np.floor(x * _LOG2E + _HALF32)
    r = (x - kf * _LN2_HI) - kf * _LN2_LO
    p = _E7 * r + _E6
    p = p * r + _E5
    p = p * r + _E4
    p = p * r + _E3
    p = p * r + _E2
    p = p * r + _ONE32
    k = min(kf, _F127)
    return (p * r + _ONE32) * (kf - k + _ONE32), k


def fast_exp(v):
    """exp(v); compiled code gets the float32 version below."""
    return math.exp(v)


@overload(fast_exp, inline="always")
def _fast_exp_overload(v):
    if isinstance(v, types.Float) and v.bitwidth == 32:
        def exp32(v):
            p, kf = _exp32_parts(v)
            e = p * _POW2[min(max(np.int32(kf) + 127, 0), 255)]  # clamped: NaN converts to any integer
            if v >= _EXP_XMIN and v <= _EXP_XMAX:
                return e
            return _ZERO32 if v < _EXP_XMIN else (_INF32 if v > _EXP_XMAX else v)  # exp(NaN) = NaN
        return exp32
    return lambda v: math.exp(v)


def exp_inplace(a, bits):
    """a[:] = exp(a) for a 1-D array, bits an int32 scratch at least as long. Python callers get
    NumPy; compiled code gets the version below."""
    np.exp(a, out=a)


@overload(exp_inplace, inline="always")
def _exp_inplace_overload(a, bits):
    """The same polynomial as fast_exp, in two passes that both vectorize: the table lookup of 2^k,
    a gather, kept fast_exp's loop scalar (3x slower on AVX2). Here the first pass writes the
    polynomial and the float32 bit pattern of 2^k, (k + 127) << 23, to `bits`; the second
    multiplies by those bits read as float32."""
    if isinstance(a.dtype, types.Float) and a.dtype.bitwidth == 32:
        def exp32_rows(a, bits):
            M = a.shape[0]
            for j in range(M):
                v = a[j]
                p, kf = _exp32_parts(v)
                a[j] = p if v >= _EXP_XMIN and v <= _EXP_XMAX else (
                    _ZERO32 if v < _EXP_XMIN else (_INF32 if v > _EXP_XMAX else _NAN32))  # exp(NaN) = NaN
                bits[j] = np.int32((kf + _F127) * _F2_23)  # (k + 127) << 23, in float: exact
            pow2 = bits.view(np.float32)
            for j in range(M):
                a[j] *= pow2[j]
        return exp32_rows

    def exp_rows(a, bits):
        for j in range(a.shape[0]):
            a[j] = math.exp(a[j])
    return exp_rows


def _threads():
    return numba.get_num_threads()


@njit(cache=True)
def _cache_probe(x):
    """Compiles in a moment; whether its first call here loads it from the disk cache tells
    whether the cache holds this file's kernels (npdiff.kernels.warmup)."""
    return x + 1


def _fast(*arrays):
    """True when every array is float32 or every array is float64 (the compiled signatures)."""
    dt = arrays[0].dtype
    return dt in _FLOATS and all(a.dtype == dt for a in arrays[1:])


# ----------------------------------------------------------------------------------------------
# convolution: block-wise im2col + one GEMM per block, all inside one parallel loop
#
# A block is a run of output rows (n, p) flattened over the batch: rows row0..row1 give the
# column matrix cols (C*R*S, (row1-row0)*Q) in (c, r, s) order, which is exactly the order of
# weight.reshape(K, C*R*S), so no weight is permuted. Forward: Yb = Wmat @ cols, then bias and the
# scatter into NCHW in one pass. Backward blocks hold whole images, so the col2im scatter of a
# block never touches another block's pixels.


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _im2col_rows(x, row0, row1, R, S, stride, padding, P, Q, cols):
    """cols[(c*R + r)*S + s, (row - row0)*Q + q] = xpad[n, c, p*stride + r, q*stride + s],
    row = n*P + p; zero outside the image."""
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    for c in range(C):
        for r in range(R):
            for s in range(S):
                i = (c * R + r) * S + s
                # output columns q whose input column q*stride + s - padding lies in [0, W)
                q0 = 0 if s >= padding else (padding - s + stride - 1) // stride
                q1 = min(Q, (W - 1 + padding - s) // stride + 1) if W - 1 + padding - s >= 0 else 0
                q1 = max(q1, q0)
                for row in range(row0, row1):
                    n, p = row // P, row % P
                    h = p * stride + r - padding
                    o = (row - row0) * Q
                    if h < 0 or h >= H:
                        for q in range(Q):
                            cols[i, o + q] = 0.0
                        continue
                    for q in range(q0):
                        cols[i, o + q] = 0.0
                    w0 = q0 * stride + s - padding
                    for q in range(q0, q1):
                        cols[i, o + q] = x[n, c, h, w0 + (q - q0) * stride]
                    for q in range(q1, Q):
                        cols[i, o + q] = 0.0


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _col2im_rows(dcols, row0, row1, R, S, stride, padding, P, Q, dx):
    """Adjoint of _im2col_rows: dx[n, c, h, w] += dcols[...]; the rows must be whole images and
    dx[n] zeroed beforehand."""
    C, H, W = dx.shape[1], dx.shape[2], dx.shape[3]
    for c in range(C):
        for r in range(R):
            for s in range(S):
                i = (c * R + r) * S + s
                q0 = 0 if s >= padding else (padding - s + stride - 1) // stride
                q1 = min(Q, (W - 1 + padding - s) // stride + 1) if W - 1 + padding - s >= 0 else 0
                q1 = max(q1, q0)
                for row in range(row0, row1):
                    n, p = row // P, row % P
                    h = p * stride + r - padding
                    if h < 0 or h >= H:
                        continue
                    o = (row - row0) * Q
                    w0 = q0 * stride + s - padding
                    for q in range(q0, q1):
                        dx[n, c, h, w0 + (q - q0) * stride] += dcols[i, o + q]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _conv2d_forward(x, wmat, b, R, S, stride, padding, P, Q, rows_per_block, T, y):
    # x (N, C, H, W), wmat (K, C*R*S), b (K,), y (N, K, P, Q)
    N = x.shape[0]
    K, CRS = wmat.shape
    nrows = N * P
    nblocks = (nrows + rows_per_block - 1) // rows_per_block
    for t in prange(T):
        cols = np.empty((CRS, rows_per_block * Q), dtype=x.dtype)
        yb = np.empty((K, rows_per_block * Q), dtype=x.dtype)
        for blk in range(t, nblocks, T):
            row0 = blk * rows_per_block
            row1 = min(nrows, row0 + rows_per_block)
            _im2col_rows(x, row0, row1, R, S, stride, padding, P, Q, cols)
            np.dot(wmat, cols, yb)  # a short last block leaves unused columns: never read
            # y = Yb + b, scattered from (K, rows*Q) to NCHW
            for row in range(row0, row1):
                n, p = row // P, row % P
                o = (row - row0) * Q
                for k in range(K):
                    bk = b[k]
                    for q in range(Q):
                        y[n, k, p, q] = yb[k, o + q] + bk


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _conv2d_backward(dy, x, wmat, R, S, stride, padding, images_per_block, T, need_dx,
                     dw_parts, db_parts, dx):
    # dy (N, K, P, Q), x (N, C, H, W), wmat (K, C*R*S); dw_parts (T, K, C*R*S), db_parts (T, K)
    N, K, P, Q = dy.shape
    CRS = wmat.shape[1]
    wmat_t = np.ascontiguousarray(wmat.T)  # (C*R*S, K)
    nblocks = (N + images_per_block - 1) // images_per_block
    width = images_per_block * P * Q
    for t in prange(T):
        cols = np.empty((CRS, width), dtype=x.dtype)
        dyb = np.empty((K, width), dtype=x.dtype)
        dcols = np.empty((CRS, width), dtype=x.dtype)
        dwt = np.empty((K, CRS), dtype=x.dtype)
        dw_parts[t, :, :] = 0.0
        db_parts[t, :] = 0.0
        for blk in range(t, nblocks, T):
            n0 = blk * images_per_block
            n1 = min(N, n0 + images_per_block)
            ncol = (n1 - n0) * P * Q
            # gather dy into (K, images*P*Q) and sum it for the bias gradient
            for n in range(n0, n1):
                o = (n - n0) * P * Q
                for k in range(K):
                    acc = 0.0
                    for p in range(P):
                        for q in range(Q):
                            v = dy[n, k, p, q]
                            dyb[k, o + p * Q + q] = v
                            acc += v
                    db_parts[t, k] += acc
            if ncol < width:  # the last, short block: zero the unused columns
                dyb[:, ncol:] = 0.0
                cols[:, ncol:] = 0.0
            _im2col_rows(x, n0 * P, n1 * P, R, S, stride, padding, P, Q, cols)
            # forward: Yb = Wmat @ cols  ->  dWmat = dYb @ cols^T,  dcols = Wmat^T @ dYb
            np.dot(dyb, cols.T, dwt)
            dw_parts[t] += dwt
            if need_dx:
                np.dot(wmat_t, dyb, dcols)
                dx[n0:n1] = 0.0
                _col2im_rows(dcols, n0 * P, n1 * P, R, S, stride, padding, P, Q, dx)


# ----------------------------------------------------------------------------------------------
# stride-1 convolution: R GEMMs on a zero-padded image with each kernel row's taps stacked
#
# Pad image n to xp (C, Hp*Wp) (each channel a flat plane). Computing the output over the padded
# width Wp instead of Q (the last S - 1 columns of each row are discarded) makes the input of tap
# (r, s) one strided matrix, the window xp[:, r*Wp + s : r*Wp + s + P*Wp]. One GEMM per tap,
#     ye (K, P*Wp) = sum_{r,s} w[:, :, r, s] (K, C) @ xp[:, r*Wp + s + j],
# has an inner size of only C = 32..64, which keeps OpenBLAS far from its peak, and makes nine
# passes over the output. Stacking the S horizontally shifted copies of the padded image,
#     xs[c*S + s, j] = xp[c, j + s]                         (C*S, Hp*Wp)
# turns each kernel row into one GEMM of inner size C*S:
#     ye (K, P*Wp) += w_r (K, C*S) @ xs[:, r*Wp : r*Wp + P*Wp],  w_r[k, c*S + s] = w[k, c, r, s]
# for an S-fold copy of the input (not the R*S-fold of im2col). The weight gradient is R GEMMs the
# same way, dw_r = dye @ window_r^T, and the input gradient is itself a stride-1 convolution: dy
# padded by R - 1 - padding with the kernel flipped and its channel axes swapped.
# Measured at the U-Net's training shapes: as fast as nine per-tap GEMMs overall (within 2%),
# faster at 64+ channels, slower at 32; full im2col of the padded image (inner size C*R*S) was
# 1.1-2x slower than either. np.dot inside Numba can neither accumulate nor take a window with its
# own row stride, so these GEMMs call numba_xxgemm, the BLAS entry point Numba's np.dot itself uses
# (SciPy's OpenBLAS, single-threaded here), with the full BLAS argument list.

_GEMM_SIG = types.intc(types.char, types.char, types.char, types.intp, types.intp, types.intp,
                       types.voidptr, types.voidptr, types.intp, types.voidptr, types.intp,
                       types.voidptr, types.voidptr, types.intp)
_xxgemm = types.ExternalFunction("numba_xxgemm", _GEMM_SIG)


@njit(cache=True, nogil=True)
def _gemm(trans_a, trans_b, M, N, K, a, lda, b, ldb, beta, c, ldc):
    """Row-major c[:M, :N] = op(a) @ op(b) + beta * c, op(m) = m.T where trans_* is True. a, b and
    c are 1-D views starting at each matrix's first element; lda, ldb, ldc are the distances
    between consecutive stored rows."""
    scalars = np.empty(2, dtype=c.dtype)  # BLAS takes alpha and beta by pointer
    scalars[0] = 1.0
    scalars[1] = beta
    # row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: the operands swap places
    _xxgemm(115 if c.itemsize == 4 else 100,                    # 's' or 'd'
            116 if trans_b else 110, 116 if trans_a else 110,   # 't' or 'n'
            N, M, K, scalars[0:].ctypes, b.ctypes, ldb, a.ctypes, lda, scalars[1:].ctypes, c.ctypes, ldc)


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _pad_planes(x_n, padding, Wp, xp):
    """xp[c, (h + padding) * Wp + padding + w] = x_n[c, h, w]; the border of xp is not written
    (the caller zeroes it once)."""
    C, H, W = x_n.shape
    for c in range(C):
        dst = xp[c]
        for h in range(H):
            src = x_n[c, h]
            o = (h + padding) * Wp + padding
            for w in range(W):
                dst[o + w] = src[w]


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _stack_shifts(x_n, padding, Wp, S, xp, xs):
    """xs[c*S + s, j] = padded image plane c at j + s; xp (C, Hp*Wp + S - 1) has a zero border."""
    _pad_planes(x_n, padding, Wp, xp)
    C = xp.shape[0]
    F = xs.shape[1]
    for c in range(C):
        src = xp[c]
        for s in range(S):
            dst = xs[c * S + s]
            for j in range(F):
                dst[j] = src[j + s]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _conv2d_forward_rows(x, wrows, b, R, S, padding, kblocks, T, y):
    # x (N, C, H, W), wrows (R, K, C*S), b (K,), y (N, K, P, Q); stride 1
    N, C, H, W = x.shape
    K, CS = wrows.shape[1], wrows.shape[2]
    P, Q = y.shape[2], y.shape[3]
    Wp = W + 2 * padding
    F = (H + 2 * padding) * Wp
    L = P * Wp
    kb = (K + kblocks - 1) // kblocks
    wf = wrows.reshape(-1)
    for t in prange(T):
        xp = np.zeros((C, F + S - 1), dtype=x.dtype)
        xs = np.empty((CS, F), dtype=x.dtype)
        ye = np.empty((K, L), dtype=x.dtype)
        xf, yf = xs.reshape(-1), ye.reshape(-1)
        last = -1
        for item in range(t, N * kblocks, T):
            n, k0 = item // kblocks, (item % kblocks) * kb
            k1 = min(K, k0 + kb)
            if k0 >= k1:
                continue
            if n != last:
                _stack_shifts(x[n], padding, Wp, S, xp, xs)
                last = n
            for r in range(R):
                _gemm(False, False, k1 - k0, L, CS, wf[(r * K + k0) * CS:], CS,
                      xf[r * Wp:], F, 0.0 if r == 0 else 1.0, yf[k0 * L:], L)
            for k in range(k0, k1):
                bk = b[k]
                for p in range(P):
                    yr = y[n, k, p]
                    o = p * Wp
                    for q in range(Q):
                        yr[q] = ye[k, o + q] + bk


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _conv2d_dw_rows(dy, x, R, S, padding, T, dw_parts, db_parts):
    # dy (N, K, P, Q), x (N, C, H, W); dw_parts (T, R, K, C*S), db_parts (T, K); stride 1
    N, C, H, W = x.shape
    K, P, Q = dy.shape[1], dy.shape[2], dy.shape[3]
    CS = C * S
    Wp = W + 2 * padding
    F = (H + 2 * padding) * Wp
    L = P * Wp
    for t in prange(T):
        xp = np.zeros((C, F + S - 1), dtype=x.dtype)
        xs = np.empty((CS, F), dtype=x.dtype)
        dye = np.zeros((K, L), dtype=x.dtype)  # the discarded columns q >= Q stay zero
        xf, dyf = xs.reshape(-1), dye.reshape(-1)
        dwf = dw_parts[t].reshape(-1)
        dwf[:] = 0.0
        db_parts[t, :] = 0.0
        for n in range(t, N, T):
            _stack_shifts(x[n], padding, Wp, S, xp, xs)
            for k in range(K):
                acc = 0.0
                for p in range(P):
                    src = dy[n, k, p]
                    o = p * Wp
                    for q in range(Q):
                        v = src[q]
                        dye[k, o + q] = v
                        acc += v
                db_parts[t, k] += acc
            for r in range(R):
                # ye[k, j] = sum_{c,s} w_r[k, c*S + s] xs[c*S + s, j + r*Wp]  ->  dw_r = dye @ window^T
                _gemm(False, True, K, CS, L, dyf, L, xf[r * Wp:], F, 1.0, dwf[r * K * CS:], CS)


# ----------------------------------------------------------------------------------------------
# 3x3 stride-1 convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin and Gray 2016,
# "Fast Algorithms for Convolutional Neural Networks")
#
# Each 2x2 block of outputs (a tile) is computed from the 4x4 input patch d that covers it as
#     Y = A^T [ (G g G^T) * (B^T d B) ] A        (* elementwise, 16 products)
# with g the 3x3 kernel and
#     B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
#     G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
#     A^T = [[1, 1, 1, 0], [0, 1, -1, -1]].
# Summed over input channels, the 16 elementwise products become 16 GEMMs,
#     M[xi] (K, tiles) = U[xi] (K, C) @ V[xi] (C, tiles),  U = G g G^T, V = B^T d B,
# with 16 multiplies per tile and channel pair where direct convolution needs 36: 2.25x fewer
# flops, paid for by the two transforms (adds only, every coefficient 0, +-1 or +-1/2, so float32
# rounding stays that of a sum of a few terms). A work item is one image's run of tile rows,
# up to 256 tiles: its V and M stay in the core's cache between the transforms and the GEMMs.
# Inside an item the channels are the innermost axis (one transposition of the input rows in,
# one of the output rows out), so every transform loop runs along contiguous memory: with the
# tiles innermost instead, the transforms took two thirds of the time at 16x16 (stride-2 reads,
# loops of 8 tiles); channels-last made the U-Net's Winograd convolutions 1.2-1.4x faster.
# Measured against the stacked-row GEMMs at the U-Net's shapes: faster from 8 input channels up
# on 8x8 images too (1.6-2.4x at batch 1-8), slower for the 3-channel input convolution, which
# keeps the rows.

WINOGRAD_MIN_CHANNELS = 8
_WINOGRAD_TILES = 256  # tiles per work item
_WINOGRAD_G = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0.0, 0.0, 1.0]])
_WINOGRAD_GG = np.kron(_WINOGRAD_G, _WINOGRAD_G)  # (16, 9): [4a + b, 3r + s] = G[a, r] G[b, s]


@njit(cache=True, nogil=True)
def _winograd_weights_gemm(GG, w9, U):
    # U (16, K C) = GG (16, 9) @ w9^T, w9 (K C, 9); the inner BLAS is single-threaded
    _gemm(False, True, 16, w9.shape[0], 9, GG.reshape(-1), 9, w9.reshape(-1), 9, 0.0, U.reshape(-1), w9.shape[0])


def _winograd_weights(w):
    """w (K, C, 3, 3) -> U (16, K, C), U[4a + b, k, c] = (G w[k, c] G^T)[a, b]: one GEMM,
    (G kron G) (16, 9) @ w^T (9, K C). Not NumPy's matmul: its BLAS threads would then spin
    beside Numba's (a batch-1 forward went from 21 to 230 ms)."""
    K, C = w.shape[0], w.shape[1]
    U = np.empty((16, K, C), dtype=w.dtype)
    _winograd_weights_gemm(_WINOGRAD_GG.astype(w.dtype), w.reshape(K * C, 9), U)
    return U


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _conv3x3_winograd(x, U, b, padding, rows_per_item, T, y):
    # x (N, C, H, W), U (16, K, C), b (K,), y (N, K, P, Q) with P = H + 2 padding - 2; an item is
    # rows_per_item tile rows of one image. Inside an item the channels are the innermost axis
    # (V (16, tiles, C), M (16, tiles, K)), so both transforms run along contiguous channels.
    N, C, H, W = x.shape
    K = U.shape[1]
    P, Q = y.shape[2], y.shape[3]
    th, tw = (P + 1) // 2, (Q + 1) // 2  # tiles down and across (a last odd row/column is cropped)
    blocks = (th + rows_per_item - 1) // rows_per_item
    Wp = 2 * tw + 2
    Uf = U.reshape(-1)
    for t in prange(T):
        ntb = rows_per_item * tw
        xp = np.zeros((2 * rows_per_item + 2, Wp, C), dtype=x.dtype)  # padded input rows, channels last
        V = np.empty((16, ntb, C), dtype=x.dtype)
        M = np.empty((16, ntb, K), dtype=x.dtype)
        yl = np.empty((2 * rows_per_item, 2 * tw, K), dtype=x.dtype)  # output rows, channels last
        u = np.empty((4, Wp, C), dtype=x.dtype)  # the rows of B^T d for one row of tiles
        sm = np.empty((8, tw, K), dtype=x.dtype)  # the rows of A^T M for one row of tiles
        u0, u1, u2, u3 = u[0].reshape(-1), u[1].reshape(-1), u[2].reshape(-1), u[3].reshape(-1)
        xpf, Vf, Mf, sf = xp.reshape(-1), V.reshape(-1), M.reshape(-1), sm.reshape(-1)
        for item in range(t, N * blocks, T):
            n, blk = item // blocks, item % blocks
            i0 = blk * rows_per_item
            nr = min(th, i0 + rows_per_item) - i0
            nt = nr * tw
            for a in range(2 * nr + 2):  # input rows 2 i0 - padding ... ; the border columns stay zero
                h = 2 * i0 - padding + a
                if 0 <= h < H:
                    row = xp[a]
                    for c0 in range(0, C, 8):  # transposed in blocks of 8 channels
                        c1 = min(C, c0 + 8)
                        for q in range(W):
                            dst = row[padding + q]
                            for c in range(c0, c1):
                                dst[c] = x[n, c, h, q]
                else:
                    xp[a] = 0.0
            L = Wp * C
            for ii in range(nr):  # V = B^T d B: the four rows of B^T d, then B on each
                # whole-row views: indexing them from 0 lets every loop below vectorize (an
                # offset index o + e goes through Numba's negative-index check, which does not)
                d0, d1 = xpf[2 * ii * L:(2 * ii + 1) * L], xpf[(2 * ii + 1) * L:(2 * ii + 2) * L]
                d2, d3 = xpf[(2 * ii + 2) * L:(2 * ii + 3) * L], xpf[(2 * ii + 3) * L:(2 * ii + 4) * L]
                for e in range(L):  # one loop per output stream
                    u0[e] = d0[e] - d2[e]
                for e in range(L):
                    u1[e] = d1[e] + d2[e]
                for e in range(L):
                    u2[e] = d2[e] - d1[e]
                for e in range(L):
                    u3[e] = d1[e] - d3[e]
                for a in range(4):
                    ua = u[a]
                    v0, v1, v2, v3 = V[4 * a], V[4 * a + 1], V[4 * a + 2], V[4 * a + 3]
                    for j in range(tw):
                        tl, q = ii * tw + j, 2 * j
                        for c in range(C):
                            v0[tl, c] = ua[q, c] - ua[q + 2, c]
                        for c in range(C):
                            v1[tl, c] = ua[q + 1, c] + ua[q + 2, c]
                        for c in range(C):
                            v2[tl, c] = ua[q + 2, c] - ua[q + 1, c]
                        for c in range(C):
                            v3[tl, c] = ua[q + 1, c] - ua[q + 3, c]
            for xi in range(16):  # M[xi] (tiles, K) = V[xi] (tiles, C) @ U[xi]^T
                _gemm(False, True, nt, K, C, Vf[xi * ntb * C:], C, Uf[xi * K * C:], C, 0.0,
                      Mf[xi * ntb * K:], K)
            E = tw * K
            for ii in range(nr):  # Y = A^T M A, plus the bias: the two rows of A^T M, then A
                for c4 in range(4):
                    m0, m1 = M[c4, ii * tw:(ii + 1) * tw].reshape(-1), M[4 + c4, ii * tw:(ii + 1) * tw].reshape(-1)
                    m2, m3 = M[8 + c4, ii * tw:(ii + 1) * tw].reshape(-1), M[12 + c4, ii * tw:(ii + 1) * tw].reshape(-1)
                    s0, s1 = sf[2 * c4 * E:(2 * c4 + 1) * E], sf[(2 * c4 + 1) * E:(2 * c4 + 2) * E]
                    for e in range(E):
                        s0[e] = m0[e] + m1[e] + m2[e]
                    for e in range(E):
                        s1[e] = m1[e] - m2[e] - m3[e]
                for rr in range(2):
                    t0, t1, t2, t3 = sm[rr], sm[2 + rr], sm[4 + rr], sm[6 + rr]
                    row = yl[2 * ii + rr]
                    for j in range(tw):
                        for k in range(K):
                            row[2 * j, k] = t0[j, k] + t1[j, k] + t2[j, k] + b[k]
                        for k in range(K):
                            row[2 * j + 1, k] = t1[j, k] - t2[j, k] - t3[j, k] + b[k]
            p0 = 2 * i0
            for k in range(K):
                for rr in range(min(2 * nr, P - p0)):
                    dst, src = y[n, k, p0 + rr], yl[rr]
                    for q in range(Q):
                        dst[q] = src[q, k]


def _conv3x3_stride1_winograd(x, w, bias, padding):
    N, C, H, W = x.shape
    K = w.shape[0]
    P, Q = conv2d_output_size(H, W, 3, 3, 1, padding)
    T = _threads()
    th, tw = (P + 1) // 2, (Q + 1) // 2
    rows = max(1, min(th, _WINOGRAD_TILES // tw))
    if N * -(-th // rows) < T:  # too few items for the threads: split the images finer
        rows = max(1, -(-th // -(-T // N)))
    U = _winograd_weights(w)
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    _conv3x3_winograd(x, U, bias, padding, rows, T, y)
    return y


def _conv_stride1(x, w, bias, padding):
    """y = conv2d(x, w) + bias at stride 1: Winograd for 3x3 kernels on 8+ channels, else the
    stacked-row GEMMs; x, w contiguous, one dtype."""
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q = conv2d_output_size(H, W, R, S, 1, padding)
    if R == 3 and S == 3 and C >= WINOGRAD_MIN_CHANNELS and 0 <= padding <= 2:
        return _conv3x3_stride1_winograd(x, w, bias, padding)
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    T = _threads()
    wrows = np.ascontiguousarray(w.transpose(2, 0, 1, 3)).reshape(R, K, C * S)
    kblocks = min(K, T // math.gcd(N, T))  # split the channels when images alone leave threads idle
    _conv2d_forward_rows(x, wrows, bias, R, S, padding, kblocks, T, y)
    return y


def _rows_per_block(N, P, Q, T):
    """Output rows per forward block: about CONV_BLOCK_COLUMNS columns, and at least T blocks."""
    rows = max(1, CONV_BLOCK_COLUMNS // Q)
    return max(1, min(rows, -(-N * P // T)))


def conv2d_forward(x, w, b, stride, padding):
    """Same as reference.conv2d_forward: x (N, C, H, W), w (K, C, R, S), b (K,) or None ->
    y (N, K, P, Q)."""
    if not _fast(x, w) or (b is not None and b.dtype != x.dtype):
        return _ref.conv2d_forward(x, w, b, stride, padding)
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q = conv2d_output_size(H, W, R, S, stride, padding)
    x = np.ascontiguousarray(x)
    bias = np.zeros(K, dtype=x.dtype) if b is None else np.ascontiguousarray(b)
    if stride == 1:
        return _conv_stride1(x, np.ascontiguousarray(w), bias, padding)
    wmat = np.ascontiguousarray(w).reshape(K, C * R * S)
    y = np.empty((N, K, P, Q), dtype=x.dtype)
    T = _threads()
    _conv2d_forward(x, wmat, bias, R, S, stride, padding, P, Q, _rows_per_block(N, P, Q, T), T, y)
    return y


def conv2d_backward(dy, x, w, stride, padding, need_dx=True):
    """Same as reference.conv2d_backward: -> (dx (N, C, H, W) or None, dw (K, C, R, S), db (K,))."""
    if not _fast(dy, x, w):
        return _ref.conv2d_backward(dy, x, w, stride, padding, need_dx)
    N, C, H, W = x.shape
    K, _, R, S = w.shape
    P, Q = dy.shape[2], dy.shape[3]
    T = _threads()
    if stride == 1 and R == S and padding <= R - 1:  # dx: a square kernel, padding >= 0
        x = np.ascontiguousarray(x)
        dy = np.ascontiguousarray(dy)
        dw_parts = np.empty((T, R, K, C * S), dtype=x.dtype)
        db_parts = np.empty((T, K), dtype=x.dtype)
        _conv2d_dw_rows(dy, x, R, S, padding, T, dw_parts, db_parts)
        dw = np.ascontiguousarray(dw_parts.sum(axis=0).reshape(R, K, C, S).transpose(1, 2, 0, 3))
        dx = None
        if need_dx:  # the transposed convolution: flipped kernel, channel axes swapped
            wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
            dx = _conv_stride1(dy, wflip, np.zeros(C, dtype=x.dtype), R - 1 - padding)
        return dx, dw, db_parts.sum(axis=0)
    per_block = max(1, min(CONV_BLOCK_COLUMNS // (P * Q), -(-N // T)))
    dw_parts = np.empty((T, K, C * R * S), dtype=x.dtype)
    db_parts = np.empty((T, K), dtype=x.dtype)
    dx = np.empty((N, C, H, W), dtype=x.dtype) if need_dx else np.empty((0, C, H, W), dtype=x.dtype)
    _conv2d_backward(np.ascontiguousarray(dy), np.ascontiguousarray(x),
                     np.ascontiguousarray(w).reshape(K, C * R * S), R, S, stride, padding,
                     per_block, T, need_dx, dw_parts, db_parts, dx)
    dw = dw_parts.sum(axis=0).reshape(K, C, R, S)
    return (dx if need_dx else None), dw, db_parts.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# normalization: one parallel item per (n, g) group or per row; statistics accumulate in float64


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _group_stats(xg, eps):
    """(mean, 1 / sqrt(var + eps)) of one group's values xg (channels, F), two passes in float64:
    a one-pass sum of squares would cancel for groups whose mean is large next to their spread."""
    Cg, F = xg.shape
    acc = 0.0
    for cl in range(Cg):
        for i in range(F):
            acc += xg[cl, i]
    mu = acc / (Cg * F)
    acc = 0.0
    for cl in range(Cg):
        for i in range(F):
            d = xg[cl, i] - mu
            acc += d * d
    return mu, 1.0 / math.sqrt(acc / (Cg * F) + eps)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _group_norm_forward(x, gamma, beta, G, eps, y, mean, rstd):
    # x, y (N, C, F) with F = prod(spatial); mean, rstd (N, G)
    N, C, F = x.shape
    Cg = C // G
    for ng in prange(N * G):
        n, g = ng // G, ng % G
        mu, rs = _group_stats(x[n, g * Cg:(g + 1) * Cg], eps)
        mean[n, g] = mu
        rstd[n, g] = rs
        for cl in range(Cg):
            c = g * Cg + cl
            a = rs * gamma[c]
            bb = beta[c] - mu * a
            for i in range(F):
                y[n, c, i] = x[n, c, i] * a + bb


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _group_norm_backward(dy, x, gamma, mean, rstd, G, dx, dgamma_nc, dbeta_nc):
    # dy, x, dx (N, C, F); mean, rstd (N, G); dgamma_nc, dbeta_nc (N, C) partials, summed after
    N, C, F = x.shape
    Cg = C // G
    for ng in prange(N * G):
        n, g = ng // G, ng % G
        mu, rs = mean[n, g], rstd[n, g]
        s1 = 0.0  # sum of dxhat
        s2 = 0.0  # sum of dxhat * xhat
        for cl in range(Cg):
            c = g * Cg + cl
            sdy = 0.0
            sdyx = 0.0
            for i in range(F):
                d = dy[n, c, i]
                xh = (x[n, c, i] - mu) * rs
                sdy += d
                sdyx += d * xh
            dbeta_nc[n, c] = sdy
            dgamma_nc[n, c] = sdyx
            s1 += sdy * gamma[c]
            s2 += sdyx * gamma[c]
        m1 = s1 / (Cg * F)
        m2 = s2 / (Cg * F)
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
        for cl in range(Cg):
            c = g * Cg + cl
            gc = gamma[c]
            for i in range(F):
                xh = (x[n, c, i] - mu) * rs
                dx[n, c, i] = rs * (dy[n, c, i] * gc - m1 - xh * m2)


def group_norm_forward(x, gamma, beta, num_groups, eps):
    """Same as reference.group_norm_forward -> (y, mean (N, G), rstd (N, G))."""
    if not _fast(x, gamma, beta):
        return _ref.group_norm_forward(x, gamma, beta, num_groups, eps)
    N, C = x.shape[0], x.shape[1]
    x3 = np.ascontiguousarray(x).reshape(N, C, -1)
    y = np.empty_like(x3)
    mean = np.empty((N, num_groups), dtype=x.dtype)
    rstd = np.empty((N, num_groups), dtype=x.dtype)
    _group_norm_forward(x3, np.ascontiguousarray(gamma), np.ascontiguousarray(beta), num_groups,
                        float(eps), y, mean, rstd)
    return y.reshape(x.shape), mean, rstd


def group_norm_backward(dy, x, gamma, mean, rstd, num_groups):
    """Same as reference.group_norm_backward -> (dx, dgamma, dbeta)."""
    if not _fast(dy, x, gamma, mean, rstd):
        return _ref.group_norm_backward(dy, x, gamma, mean, rstd, num_groups)
    N, C = x.shape[0], x.shape[1]
    x3 = np.ascontiguousarray(x).reshape(N, C, -1)
    dx = np.empty_like(x3)
    dgamma = np.empty((N, C), dtype=x.dtype)
    dbeta = np.empty((N, C), dtype=x.dtype)
    _group_norm_backward(np.ascontiguousarray(dy).reshape(N, C, -1), x3, np.ascontiguousarray(gamma),
                         np.ascontiguousarray(mean), np.ascontiguousarray(rstd), num_groups,
                         dx, dgamma, dbeta)
    return dx.reshape(x.shape), dgamma.sum(axis=0), dbeta.sum(axis=0)


# group norm fused with the scale-shift and SiLU of a residual block: one pass over x forward,
# two backward (instead of five and eight over memory with the separate kernels and NumPy glue).
# u = (x - mean) a_c + b_c with a_c = rstd gamma_c (1 + scale_c), b_c = beta_c (1 + scale_c) +
# shift_c, and y = u sigmoid(u); the backward recomputes u from x and the saved statistics. u is
# formed in float64: as a x + (b - mean a) in float32 it would lose |mean| a u_r to cancellation
# (0.02 absolute for a group of near-constant values, rstd up to 1/sqrt(eps)), and every gradient
# passes through SiLU'(u).


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _group_norm_silu_forward(x, gamma, beta, ss, has_ss, G, eps, y, mean, rstd):
    # x, y (N, C, F); ss (N, 2C) = [scale, shift] when has_ss; mean, rstd (N, G)
    N, C, F = x.shape
    Cg = C // G
    for ng in prange(N * G):
        n, g = ng // G, ng % G
        mu, rs = _group_stats(x[n, g * Cg:(g + 1) * Cg], eps)
        mean[n, g] = mu
        rstd[n, g] = rs
        e = np.empty(F, dtype=x.dtype)  # exp(-u) of one channel
        bits = np.empty(F, dtype=np.int32)
        for cl in range(Cg):
            c = g * Cg + cl
            m = 1.0 + ss[n, c] if has_ss else 1.0
            a = rs * gamma[c] * m
            b = beta[c] * m + (ss[n, C + c] if has_ss else 0.0)
            yc = y[n, c]
            for i in range(F):
                u = x.dtype.type((x[n, c, i] - mu) * a + b)
                yc[i] = u
                e[i] = -u
            exp_inplace(e, bits)
            for i in range(F):
                yc[i] = yc[i] / (_ONE32 + e[i])


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _group_norm_silu_backward(dy, x, gamma, beta, ss, has_ss, mean, rstd, G, dx, dgamma_nc, dbeta_nc, dss):
    # dy, x, dx (N, C, F); dgamma_nc, dbeta_nc (N, C) partials, summed after; dss (N, 2C)
    N, C, F = x.shape
    Cg = C // G
    for ng in prange(N * G):
        n, g = ng // G, ng % G
        mu, rs = np.float64(mean[n, g]), np.float64(rstd[n, g])
        s1 = 0.0  # sum of dxhat
        s2 = 0.0  # sum of dxhat * xhat
        uc = np.empty(F, dtype=x.dtype)  # u of one channel
        e = np.empty(F, dtype=x.dtype)   # exp(-u)
        bits = np.empty(F, dtype=np.int32)
        for cl in range(Cg):
            c = g * Cg + cl
            gc, bc = gamma[c], beta[c]
            m = 1.0 + ss[n, c] if has_ss else 1.0
            a = rs * gc * m
            b = bc * m + (ss[n, C + c] if has_ss else 0.0)
            for i in range(F):
                u = x.dtype.type((x[n, c, i] - mu) * a + b)
                uc[i] = u
                e[i] = -u
            exp_inplace(e, bits)
            sdu = 0.0
            sduxh = 0.0
            for i in range(F):
                d = x[n, c, i] - mu
                u = uc[i]
                sg = _ONE32 / (_ONE32 + e[i])
                du = dy[n, c, i] * (sg * (_ONE32 + u * (_ONE32 - sg)))
                dx[n, c, i] = du  # d loss / du, kept for the second pass
                sdu += du
                sduxh += du * (d * rs)
            if has_ss:
                dss[n, c] = gc * sduxh + bc * sdu  # sum du * h, h = xhat gamma + beta
                dss[n, C + c] = sdu
            dbeta_nc[n, c] = m * sdu  # dh = du (1 + scale)
            dgamma_nc[n, c] = m * sduxh
            s1 += m * sdu * gc
            s2 += m * sduxh * gc
        m1 = s1 / (Cg * F)
        m2 = s2 / (Cg * F)
        # dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)), dxhat = du (1 + scale) gamma
        for cl in range(Cg):
            c = g * Cg + cl
            k = gamma[c] * (1.0 + ss[n, c] if has_ss else 1.0)
            for i in range(F):
                xh = (x[n, c, i] - mu) * rs
                dx[n, c, i] = rs * (dx[n, c, i] * k - m1 - xh * m2)


def _scale_shift_arg(scale_shift, N, C, dtype):
    """(array, has_ss) for the fused kernels: a dummy when there is no scale-shift."""
    if scale_shift is None:
        return np.zeros((1, 2 * C), dtype=dtype), False
    if scale_shift.shape != (N, 2 * C):
        raise ValueError(f"group norm: scale_shift has shape {scale_shift.shape}, expected {(N, 2 * C)}")
    return np.ascontiguousarray(scale_shift, dtype=dtype), True


def group_norm_silu_forward(x, gamma, beta, num_groups, eps, scale_shift=None):
    """Same as reference.group_norm_silu_forward -> (y, mean (N, G), rstd (N, G))."""
    if not _fast(x, gamma, beta) or (scale_shift is not None and scale_shift.dtype != x.dtype):
        return _ref.group_norm_silu_forward(x, gamma, beta, num_groups, eps, scale_shift)
    N, C = x.shape[0], x.shape[1]
    ss, has_ss = _scale_shift_arg(scale_shift, N, C, x.dtype)
    x3 = np.ascontiguousarray(x).reshape(N, C, -1)
    y = np.empty_like(x3)
    mean = np.empty((N, num_groups), dtype=x.dtype)
    rstd = np.empty((N, num_groups), dtype=x.dtype)
    _group_norm_silu_forward(x3, np.ascontiguousarray(gamma), np.ascontiguousarray(beta), ss, has_ss,
                             num_groups, float(eps), y, mean, rstd)
    return y.reshape(x.shape), mean, rstd


def group_norm_silu_backward(dy, x, gamma, beta, mean, rstd, num_groups, scale_shift=None):
    """Same as reference.group_norm_silu_backward -> (dx, dgamma, dbeta, dscale_shift or None)."""
    if (not _fast(dy, x, gamma, beta, mean, rstd)
            or (scale_shift is not None and scale_shift.dtype != x.dtype)):
        return _ref.group_norm_silu_backward(dy, x, gamma, beta, mean, rstd, num_groups, scale_shift)
    N, C = x.shape[0], x.shape[1]
    ss, has_ss = _scale_shift_arg(scale_shift, N, C, x.dtype)
    x3 = np.ascontiguousarray(x).reshape(N, C, -1)
    dx = np.empty_like(x3)
    dgamma = np.empty((N, C), dtype=x.dtype)
    dbeta = np.empty((N, C), dtype=x.dtype)
    dss = np.empty((N, 2 * C) if has_ss else (1, 2 * C), dtype=x.dtype)
    _group_norm_silu_backward(np.ascontiguousarray(dy).reshape(N, C, -1), x3, np.ascontiguousarray(gamma),
                              np.ascontiguousarray(beta), ss, has_ss, np.ascontiguousarray(mean),
                              np.ascontiguousarray(rstd), num_groups, dx, dgamma, dbeta, dss)
    return dx.reshape(x.shape), dgamma.sum(axis=0), dbeta.sum(axis=0), (dss if has_ss else None)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _layer_norm_forward(x, gamma, beta, eps, y, mean, rstd):
    # x, y (B, D); mean, rstd (B,)
    B, D = x.shape
    for i in prange(B):
        acc = 0.0
        for j in range(D):
            acc += x[i, j]
        mu = acc / D
        acc = 0.0
        for j in range(D):
            d = x[i, j] - mu
            acc += d * d
        rs = 1.0 / math.sqrt(acc / D + eps)
        mean[i] = mu
        rstd[i] = rs
        for j in range(D):
            y[i, j] = (x[i, j] - mu) * rs * gamma[j] + beta[j]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _layer_norm_backward(dy, x, gamma, mean, rstd, T, dx, dgamma_parts, dbeta_parts):
    # dy, x, dx (B, D); dgamma_parts, dbeta_parts (T, D), one per thread
    B, D = x.shape
    per = (B + T - 1) // T
    for t in prange(T):
        dgamma_parts[t, :] = 0.0
        dbeta_parts[t, :] = 0.0
        for i in range(t * per, min(B, (t + 1) * per)):
            mu, rs = mean[i], rstd[i]
            s1 = 0.0
            s2 = 0.0
            for j in range(D):
                xh = (x[i, j] - mu) * rs
                d = dy[i, j]
                dbeta_parts[t, j] += d
                dgamma_parts[t, j] += d * xh
                s1 += d * gamma[j]
                s2 += d * gamma[j] * xh
            m1 = s1 / D
            m2 = s2 / D
            for j in range(D):
                xh = (x[i, j] - mu) * rs
                dx[i, j] = rs * (dy[i, j] * gamma[j] - m1 - xh * m2)


def layer_norm_forward(x, gamma, beta, eps):
    """Same as reference.layer_norm_forward -> (y, mean (B,), rstd (B,))."""
    if not _fast(x, gamma, beta):
        return _ref.layer_norm_forward(x, gamma, beta, eps)
    D = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)
    y = np.empty_like(x2)
    mean = np.empty(x2.shape[0], dtype=x.dtype)
    rstd = np.empty(x2.shape[0], dtype=x.dtype)
    _layer_norm_forward(x2, np.ascontiguousarray(gamma), np.ascontiguousarray(beta), float(eps),
                        y, mean, rstd)
    lead = x.shape[:-1]
    return y.reshape(x.shape), mean.reshape(lead), rstd.reshape(lead)


def layer_norm_backward(dy, x, gamma, mean, rstd):
    """Same as reference.layer_norm_backward -> (dx, dgamma, dbeta)."""
    if not _fast(dy, x, gamma, mean, rstd):
        return _ref.layer_norm_backward(dy, x, gamma, mean, rstd)
    D = x.shape[-1]
    x2 = np.ascontiguousarray(x).reshape(-1, D)
    dx = np.empty_like(x2)
    T = _threads()
    dgamma = np.empty((T, D), dtype=x.dtype)
    dbeta = np.empty((T, D), dtype=x.dtype)
    _layer_norm_backward(np.ascontiguousarray(dy).reshape(-1, D), x2, np.ascontiguousarray(gamma),
                         np.ascontiguousarray(mean).reshape(-1), np.ascontiguousarray(rstd).reshape(-1),
                         T, dx, dgamma, dbeta)
    return dx.reshape(x.shape), dgamma.sum(axis=0), dbeta.sum(axis=0)


# ----------------------------------------------------------------------------------------------
# pointwise activations on flat contiguous arrays


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _silu_forward(x, y):
    for i in prange(x.size):
        v = x[i]
        y[i] = v / (_ONE32 + fast_exp(-v))


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _silu_backward(dy, x, dx):
    for i in prange(x.size):
        v = x[i]
        s = _ONE32 / (_ONE32 + fast_exp(-v))
        dx[i] = dy[i] * (s * (_ONE32 + v * (_ONE32 - s)))


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _gelu_forward(x, y):
    for i in prange(x.size):
        v = x[i]
        u = 0.7978845608028654 * (v + 0.044715 * v * v * v)  # reference.SQRT_2_OVER_PI, GELU_CUBIC
        y[i] = 0.5 * v * (1.0 + math.tanh(u))


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _gelu_backward(dy, x, dx):
    for i in prange(x.size):
        v = x[i]
        v2 = v * v
        th = math.tanh(0.7978845608028654 * (v + 0.044715 * v2 * v))
        dudx = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * v2)
        dx[i] = dy[i] * (0.5 * (1.0 + th) + 0.5 * v * (1.0 - th * th) * dudx)


def _pointwise(kernel, ref, *arrays):
    if not _fast(*arrays):
        return ref(*arrays)
    flat = [np.ascontiguousarray(a).reshape(-1) for a in arrays]
    out = np.empty_like(flat[-1])
    kernel(*flat, out)
    return out.reshape(arrays[-1].shape)


def silu_forward(x):
    """Same as reference.silu_forward."""
    return _pointwise(_silu_forward, _ref.silu_forward, x)


def silu_backward(dy, x):
    """Same as reference.silu_backward."""
    return _pointwise(_silu_backward, _ref.silu_backward, dy, x)


def gelu_forward(x):
    """Same as reference.gelu_forward."""
    return _pointwise(_gelu_forward, _ref.gelu_forward, x)


def gelu_backward(dy, x):
    """Same as reference.gelu_backward."""
    return _pointwise(_gelu_backward, _ref.gelu_backward, dy, x)


# ----------------------------------------------------------------------------------------------
# linear map: row blocks, one GEMM each


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _linear_forward(x, w, b, T, y):
    # x (B, I), w (J, I), b (J,), y (B, J)
    B = x.shape[0]
    J = w.shape[0]
    wt = np.ascontiguousarray(w.T)  # (I, J)
    per = (B + T - 1) // T
    for t in prange(T):
        r0, r1 = t * per, min(B, (t + 1) * per)
        if r0 < r1:
            yb = y[r0:r1]
            np.dot(x[r0:r1], wt, yb)
            for i in range(r1 - r0):
                for j in range(J):
                    yb[i, j] += b[j]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _linear_backward(dy, x, w, T, dx, dw_parts, db_parts):
    # dy (B, J), x (B, I), w (J, I); dx (B, I); dw_parts (T, J, I), db_parts (T, J)
    B, J = dy.shape
    per = (B + T - 1) // T
    for t in prange(T):
        r0, r1 = t * per, min(B, (t + 1) * per)
        dw_parts[t, :, :] = 0.0
        db_parts[t, :] = 0.0
        if r0 < r1:
            dyb = dy[r0:r1]
            np.dot(dyb, w, dx[r0:r1])  # y = x w^T + b  ->  dx = dy w
            np.dot(dyb.T, x[r0:r1], dw_parts[t])  # dw = dy^T x
            for i in range(r1 - r0):
                for j in range(J):
                    db_parts[t, j] += dyb[i, j]


def linear_forward(x, w, b):
    """Same as reference.linear_forward: x (..., I), w (J, I), b (J,) or None -> (..., J)."""
    if not _fast(x, w) or (b is not None and b.dtype != x.dtype):
        return _ref.linear_forward(x, w, b)
    J, I = w.shape
    x2 = np.ascontiguousarray(x).reshape(-1, I)
    y = np.empty((x2.shape[0], J), dtype=x.dtype)
    bias = np.zeros(J, dtype=x.dtype) if b is None else np.ascontiguousarray(b)
    T = min(_threads(), max(1, x2.shape[0]))
    _linear_forward(x2, np.ascontiguousarray(w), bias, T, y)
    return y.reshape(x.shape[:-1] + (J,))


def linear_backward(dy, x, w, need_bias=True):
    """Same as reference.linear_backward -> (dx, dw, db or None)."""
    if not _fast(dy, x, w):
        return _ref.linear_backward(dy, x, w, need_bias)
    J, I = w.shape
    dy2 = np.ascontiguousarray(dy).reshape(-1, J)
    x2 = np.ascontiguousarray(x).reshape(-1, I)
    T = min(_threads(), max(1, dy2.shape[0]))
    dx = np.empty((dy2.shape[0], I), dtype=x.dtype)
    dw = np.empty((T, J, I), dtype=x.dtype)
    db = np.empty((T, J), dtype=x.dtype)
    _linear_backward(dy2, x2, np.ascontiguousarray(w), T, dx, dw, db)
    return dx.reshape(x.shape), dw.sum(axis=0), (db.sum(axis=0) if need_bias else None)


# ----------------------------------------------------------------------------------------------
# attention: one parallel item per (batch, head); scores, softmax and output in one pass
#
# q, k, v arrive as the layers make them, (N, L, E, Dh) projections viewed as (N, E, L, Dh): each
# head is a strided matrix (rows D apart, or 3D inside a stacked qkv projection), which the GEMMs
# read in place. Outputs are allocated (N, L, E, Dh) and returned as (N, E, L, Dh) views, so that
# merging the heads back is free. A key mask becomes an additive bias (0 or -inf): the softmax
# loops then have no branch and vectorize; exp(-inf) is exactly 0, so masked keys get probability 0.


@njit(cache=True, nogil=True, fastmath=_FASTMATH)
def _softmax_row(row, bias, scale, bits):
    """row <- softmax(row * scale + bias) in place; bits is exp_inplace's scratch. Every pass is a
    plain loop that vectorizes (the running maximum included: 30% faster than keeping 16 partial
    maxima by hand)."""
    M = row.shape[0]
    mx = row.dtype.type(-np.inf)
    for j in range(M):
        s = row[j] * scale + bias[j]
        row[j] = s
        mx = max(mx, s)
    for j in range(M):
        row[j] -= mx
    exp_inplace(row, bits)  # masked keys: exp(-inf) = 0; a fully masked row is NaN (0/0)
    tot = row.dtype.type(0.0)
    for j in range(M):
        tot += row[j]
    inv = row.dtype.type(1.0) / tot
    for j in range(M):
        row[j] *= inv


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _attention_forward(q, k, v, key_bias, scale, o, probs):
    # q (N, E, L, Dh), k v (N, E, M, Dh), key_bias (N, M); o like q, probs (N, E, L, M)
    N, E, L, Dh = q.shape
    M = k.shape[2]
    isz = q.itemsize
    lq, lk, lv, lo = q.strides[2] // isz, k.strides[2] // isz, v.strides[2] // isz, o.strides[2] // isz
    for ne in prange(N * E):
        n, e = ne // E, ne % E
        bits = np.empty(M, dtype=np.int32)
        p = probs[n, e]  # (L, M)
        _gemm(False, True, L, M, Dh, q[n, e], lq, k[n, e], lk, 0.0, p, M)  # p = q k^T
        for i in range(L):
            _softmax_row(p[i], key_bias[n], scale, bits)
        _gemm(False, False, L, Dh, M, p, M, v[n, e], lv, 0.0, o[n, e], lo)  # o = p v


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _attention_forward_no_probs(q, k, v, key_bias, scale, T, o):
    # as _attention_forward, but each head's (L, M) scores live in one buffer per thread, small
    # enough to stay in cache, instead of in an (N, E, L, M) array only a backward pass would read
    N, E, L, Dh = q.shape
    M = k.shape[2]
    isz = q.itemsize
    lq, lk, lv, lo = q.strides[2] // isz, k.strides[2] // isz, v.strides[2] // isz, o.strides[2] // isz
    for t in prange(T):
        bits = np.empty(M, dtype=np.int32)
        p = np.empty((L, M), dtype=q.dtype)
        for ne in range(t, N * E, T):
            n, e = ne // E, ne % E
            _gemm(False, True, L, M, Dh, q[n, e], lq, k[n, e], lk, 0.0, p, M)  # p = q k^T
            for i in range(L):
                _softmax_row(p[i], key_bias[n], scale, bits)
            _gemm(False, False, L, Dh, M, p, M, v[n, e], lv, 0.0, o[n, e], lo)  # o = p v


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _attention_backward(do, q, k, v, probs, scale, T, dq, dk, dv):
    N, E, L, Dh = q.shape
    M = k.shape[2]
    isz = q.itemsize
    ldo, lq, lk, lv = do.strides[2] // isz, q.strides[2] // isz, k.strides[2] // isz, v.strides[2] // isz
    ldq, ldk, ldv = dq.strides[2] // isz, dk.strides[2] // isz, dv.strides[2] // isz
    for t in prange(T):
        dp = np.empty((L, M), dtype=q.dtype)
        for ne in range(t, N * E, T):
            n, e = ne // E, ne % E
            p = probs[n, e]
            # o = p v  ->  dv = p^T do,  dp = do v^T
            _gemm(True, False, M, Dh, L, p, M, do[n, e], ldo, 0.0, dv[n, e], ldv)
            _gemm(False, True, L, M, Dh, do[n, e], ldo, v[n, e], lv, 0.0, dp, M)
            # p = softmax(s): ds = p (dp - sum_m dp p); s = scale q k^T
            for i in range(L):
                prow, drow = p[i], dp[i]
                acc = 0.0
                for j in range(M):
                    acc += drow[j] * prow[j]
                for j in range(M):
                    drow[j] = prow[j] * (drow[j] - acc) * scale
            _gemm(False, False, L, Dh, M, dp, M, k[n, e], lk, 0.0, dq[n, e], ldq)  # dq = ds k
            _gemm(True, False, M, Dh, L, dp, M, q[n, e], lq, 0.0, dk[n, e], ldk)  # dk = ds^T q


def _rows_in_place(a):
    """a (N, E, L, Dh) as the attention kernels read it: unit stride along Dh and row strides that
    BLAS accepts; anything else is copied."""
    isz = a.itemsize
    st = a.strides
    if st[3] == isz and all(x >= 0 and x % isz == 0 for x in st) and st[2] >= a.shape[3] * isz:
        return a
    return np.ascontiguousarray(a)


def _heads_merged(N, E, L, Dh, dtype):
    """An (N, E, L, Dh) output whose memory is (N, L, E, Dh): merging its heads is a reshape."""
    return np.empty((N, L, E, Dh), dtype=dtype).transpose(0, 2, 1, 3)


def attention_forward(q, k, v, key_mask, scale, need_probs=True):
    """Same as reference.attention_forward -> (o (N, E, L, Dh), probs (N, E, L, M) or None)."""
    if not _fast(q, k, v):
        return _ref.attention_forward(q, k, v, key_mask, scale, need_probs)
    N, E, L, Dh = q.shape
    M = k.shape[2]
    if key_mask is None:
        bias = np.zeros((N, M), dtype=q.dtype)
    else:
        bias = np.where(np.asarray(key_mask, dtype=np.bool_), 0.0, -np.inf).astype(q.dtype)  # (N, M)
    o = _heads_merged(N, E, L, Dh, q.dtype)
    if not need_probs:
        _attention_forward_no_probs(_rows_in_place(q), _rows_in_place(k), _rows_in_place(v), bias,
                                    q.dtype.type(scale), min(_threads(), N * E), o)
        return o, None
    probs = np.empty((N, E, L, M), dtype=q.dtype)
    _attention_forward(_rows_in_place(q), _rows_in_place(k), _rows_in_place(v), bias, q.dtype.type(scale),
                       o, probs)
    return o, probs


def attention_backward(do, q, k, v, probs, scale):
    """Same as reference.attention_backward -> (dq, dk, dv)."""
    if not _fast(do, q, k, v, probs):
        return _ref.attention_backward(do, q, k, v, probs, scale)
    N, E, L, Dh = q.shape
    M = k.shape[2]
    dq = _heads_merged(N, E, L, Dh, q.dtype)
    dk = _heads_merged(N, E, M, Dh, q.dtype)
    dv = _heads_merged(N, E, M, Dh, q.dtype)
    T = min(_threads(), N * E)
    _attention_backward(_rows_in_place(do), _rows_in_place(q), _rows_in_place(k), _rows_in_place(v),
                        np.ascontiguousarray(probs), q.dtype.type(scale), T, dq, dk, dv)
    return dq, dk, dv
