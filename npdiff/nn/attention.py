"""Multi-head self-attention and cross-attention (Vaswani et al. 2017, section 3.2.2).

Self-attention projects all three of queries, keys and values from the same tokens with one
stacked weight (3D, D), rows [q; k; v] — PyTorch's `nn.MultiheadAttention.in_proj_weight`
layout. Cross-attention takes queries from image features and keys and values from text tokens
(Rombach et al. 2022, section 3.3), with a key padding mask so that padding tokens are never
attended to. Heads split the feature axis into E contiguous chunks of Dh = D / E.

Self-attention may add a learned relative position bias to its scores (Shaw et al. 2018; Raffel
et al. 2020, section 2.1): one scalar per head and per offset j - i between key and query, the
offsets clipped to [-K, K], so that a head can learn "look at the words just after me" whatever
the absolute positions are. The table is (E, 2K+1), column clip(j - i, -K, K) + K.

Dimension legend:
  N batch, L query length, M key length, D model width, Dc context width, E heads, Dh head width.
"""

import math

import numpy as np

from npdiff.kernels import get_backend
from npdiff.nn.layers import linear_backward, linear_forward
from npdiff.nn.mode import inference_active


def check_key_mask(key_mask, N, M, what="key_mask"):
    """Validate a key padding mask (N, M) bool: every row needs at least one True key, otherwise
    softmax over no keys is 0/0."""
    if key_mask is None:
        return None
    key_mask = np.asarray(key_mask)
    if key_mask.dtype != np.bool_:
        raise ValueError(f"{what} must be a boolean array (True = real token), got {key_mask.dtype}")
    if key_mask.shape != (N, M):
        raise ValueError(f"{what} has shape {key_mask.shape}, expected {(N, M)}")
    empty = np.flatnonzero(~key_mask.any(axis=1))
    if empty.size:
        raise ValueError(f"{what} rows {empty.tolist()} have no True entry: every sequence needs at "
                         "least one real token (prepend a BOS token to empty captions)")
    return key_mask


def _split_heads(x, E):
    """(N, L, D) -> (N, E, L, Dh)."""
    N, L, D = x.shape
    return x.reshape(N, L, E, D // E).transpose(0, 2, 1, 3)


def _merge_heads(x):
    """(N, E, L, Dh) -> (N, L, E*Dh), contiguous."""
    N, E, L, Dh = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(N, L, E * Dh)


def attention_heads_forward(q, k, v, num_heads, key_mask=None):
    """Scaled dot-product attention over heads. q (N, L, D), k and v (N, M, D) -> o (N, L, D)."""
    D = q.shape[-1]
    if D % num_heads:
        raise ValueError(f"attention width {D} does not split into {num_heads} heads")
    scale = 1.0 / math.sqrt(D // num_heads)  # a Python float keeps float32 arrays float32
    qh, kh, vh = (_split_heads(a, num_heads) for a in (q, k, v))  # (N, E, L|M, Dh)
    need_probs = not inference_active()  # only the backward pass reads them
    oh, probs = get_backend().attention_forward(qh, kh, vh, key_mask, scale, need_probs)
    return _merge_heads(oh), (qh, kh, vh, probs, scale)


def attention_probs(cache):
    """The attention weights a forward kept, (N, E, L, M): row l of head e sums to 1 over the keys."""
    return cache[3]


def attention_heads_backward(do, cache, dprobs=None):
    """-> (dq, dk, dv), each (N, L|M, D). dprobs (N, E, L, M), when given, is a further gradient on
    the attention weights themselves (a loss on where attention goes, as train.py's grounding loss):
    through the softmax it becomes dS = P * (dP - sum_m P dP) on the scores S = scale Q K^T."""
    qh, kh, vh, probs, scale = cache
    if probs is None:
        raise RuntimeError("attention backward: this forward ran inside npdiff.nn.mode.inference(), "
                           "which keeps no attention probabilities; run it outside to train")
    E = qh.shape[1]
    dqh, dkh, dvh = get_backend().attention_backward(_split_heads(do, E), qh, kh, vh, probs, scale)
    if dprobs is not None:
        ds = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) * scale  # (N, E, L, M)
        dqh = dqh + ds @ kh
        dkh = dkh + ds.transpose(0, 1, 3, 2) @ qh
    return _merge_heads(dqh), _merge_heads(dkh), _merge_heads(dvh)


def relative_offsets(L: int, max_offset: int) -> np.ndarray:
    """(L, L) int: the bias table's column for query i and key j, clip(j - i, -K, K) + K."""
    i = np.arange(L)
    return np.clip(i[None, :] - i[:, None], -max_offset, max_offset) + max_offset


def relative_bias(table, L):
    """table (E, 2K+1) -> the additive score bias (E, L, L)."""
    return table[:, relative_offsets(L, (table.shape[1] - 1) // 2)]


def relative_bias_backward(dbias, num_columns):
    """dbias (E, L, L) -> dtable (E, 2K+1): each column sums the score gradients of its offsets."""
    cols = relative_offsets(dbias.shape[1], (num_columns - 1) // 2).ravel()
    return np.stack([np.bincount(cols, weights=d.ravel(), minlength=num_columns) for d in dbias]
                    ).astype(dbias.dtype)


def _biased_attention_forward(q, k, v, key_mask, scale, bias):
    """attention_heads_forward's softmax(scale Q K^T + bias + mask) V, in NumPy (text lengths are
    short, so this is cheap). q (N, E, L, Dh), k v (N, E, M, Dh), bias (E, L, M)."""
    s = (q @ k.transpose(0, 1, 3, 2)) * scale + bias  # (N, E, L, M)
    if key_mask is not None:
        s = np.where(key_mask[:, None, None, :], s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v, p


def _score_bias_backward(do, v, probs):
    """The gradient of an additive score bias (E, L, M): the score gradient summed over the batch.
    do (N, E, L, Dh), v (N, E, M, Dh), probs (N, E, L, M). Given the softmax, q k and v's gradients
    do not depend on the bias, so attention_heads_backward gives them as it does without one."""
    dp = do @ v.transpose(0, 1, 3, 2)
    return (probs * (dp - (dp * probs).sum(axis=-1, keepdims=True))).sum(axis=0)  # masked keys 0


def self_attention_forward(x, qkv_weight, qkv_bias, proj_weight, proj_bias, num_heads, key_mask=None,
                           rel_bias=None):
    """y = proj(Attention(x Wq, x Wk, x Wv)). x (N, L, D), qkv_weight (3D, D), proj_weight (D, D),
    key_mask (N, L) bool or None, rel_bias (E, 2K+1) a relative position bias table or None.
    Returns y (N, L, D)."""
    N, L, D = x.shape
    key_mask = check_key_mask(key_mask, N, L)
    qkv, c_qkv = linear_forward(x, qkv_weight, qkv_bias)  # (N, L, 3D)
    q, k, v = qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:]
    columns = None
    if rel_bias is None:
        o, c_att = attention_heads_forward(q, k, v, num_heads, key_mask)  # (N, L, D)
    else:
        if rel_bias.shape[0] != num_heads or rel_bias.ndim != 2 or rel_bias.shape[1] % 2 != 1:
            raise ValueError(f"relative position bias: table of shape {rel_bias.shape}, expected "
                             f"({num_heads}, 2K+1)")
        scale = 1.0 / math.sqrt(D // num_heads)
        qh, kh, vh = (_split_heads(a, num_heads) for a in (q, k, v))  # (N, E, L, Dh)
        oh, probs = _biased_attention_forward(qh, kh, vh, key_mask, scale,
                                              relative_bias(rel_bias, L).astype(q.dtype))
        o, c_att = _merge_heads(oh), (qh, kh, vh, probs, scale)  # attention_heads_forward's cache
        columns = rel_bias.shape[1]
    y, c_proj = linear_forward(o, proj_weight, proj_bias)
    return y, (c_qkv, c_att, c_proj, columns)


def self_attention_backward(dy, cache):
    """-> (dx, dqkv_weight, dqkv_bias, dproj_weight, dproj_bias), and drel_bias last when the
    forward had a relative position bias."""
    c_qkv, c_att, c_proj, columns = cache
    do, dproj_w, dproj_b = linear_backward(dy, c_proj)
    dq, dk, dv = attention_heads_backward(do, c_att)
    extra = ()
    if columns is not None:
        _, _, vh, probs, _ = c_att
        dbias = _score_bias_backward(_split_heads(do, vh.shape[1]), vh, probs)
        extra = (relative_bias_backward(dbias, columns),)
    dqkv = np.concatenate([dq, dk, dv], axis=-1)  # (N, L, 3D)
    dx, dqkv_w, dqkv_b = linear_backward(dqkv, c_qkv)
    return (dx, dqkv_w, dqkv_b, dproj_w, dproj_b) + extra


def cross_attention_forward(x, context, q_weight, k_weight, v_weight, proj_weight, proj_bias,
                            num_heads, context_mask=None):
    """y = proj(Attention(x Wq, c Wk, c Wv)) with padding keys masked out.
    x (N, L, D) image tokens, context (N, M, Dc) text tokens, q_weight (D, D), k_weight and
    v_weight (D, Dc), proj_weight (D, D), context_mask (N, M) bool. Returns y (N, L, D).
    The q, k and v maps have no bias (as in Stable Diffusion's cross-attention)."""
    N, M, _ = context.shape
    context_mask = check_key_mask(context_mask, N, M, "context_mask")
    q, c_q = linear_forward(x, q_weight)  # (N, L, D)
    k, c_k = linear_forward(context, k_weight)  # (N, M, D)
    v, c_v = linear_forward(context, v_weight)  # (N, M, D)
    o, c_att = attention_heads_forward(q, k, v, num_heads, context_mask)  # (N, L, D)
    y, c_proj = linear_forward(o, proj_weight, proj_bias)
    return y, (c_q, c_k, c_v, c_att, c_proj)


def cross_attention_backward(dy, cache, dprobs=None):
    """-> (dx, dcontext, dq_weight, dk_weight, dv_weight, dproj_weight, dproj_bias). dprobs: a further
    gradient on the attention weights (N, E, L, M), see attention_heads_backward."""
    c_q, c_k, c_v, c_att, c_proj = cache
    do, dproj_w, dproj_b = linear_backward(dy, c_proj)
    dq, dk, dv = attention_heads_backward(do, c_att, dprobs)
    dx, dq_w, _ = linear_backward(dq, c_q)
    dctx_k, dk_w, _ = linear_backward(dk, c_k)
    dctx_v, dv_w, _ = linear_backward(dv, c_v)
    return dx, dctx_k + dctx_v, dq_w, dk_w, dv_w, dproj_w, dproj_b
