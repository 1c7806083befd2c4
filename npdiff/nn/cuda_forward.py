"""The U-Net and the text encoder forward passes on a CUDA device, with every intermediate there.

They walk the same parameters and configs as `unet_forward` (unet.py) and `text_encoder_forward`
(text_encoder.py), op for op, with the device functions of `npdiff.kernels.cuda`; only the inputs
come in and only the outputs go back, and the caller decides when (see npdiff/cuda_pipeline.py).
Where the host code takes two steps the device takes one kernel: group norm + scale-shift + SiLU,
a convolution or a projection + its residual add. Inference only: no caches, no dropout.
tests/cuda_cases.py holds both to the host versions on the reference backend.

Importing this module imports numba.cuda.

Dimension legend:
  N batch, C channels, H W height and width, E embedding width, L tokens, D token width.
"""

from __future__ import annotations

import numpy as np

from npdiff.kernels import cuda as K
from npdiff.nn.attention import relative_bias
from npdiff.nn.text_encoder import TextEncoderConfig
from npdiff.nn.unet import UNetConfig, _res_plan, coord_maps, query_position_features


def upload(params: dict[str, np.ndarray]) -> dict:
    """Copy a parameter dict to the device once: name -> device array."""
    return {k: K.to_device(v) for k, v in params.items()}


def _w(dp, name):
    return dp[f"{name}.weight"], dp.get(f"{name}.bias")


# ----------------------------------------------------------------------------------------------
# U-Net blocks (unet.py: resblock_forward, spatial_self_attention_forward, ...)


def _resblock(dp, name, x, emb_act, config):
    """x (N, Cin, H, W), emb_act = SiLU(emb) (N, E) -> (N, Cout, H, W)."""
    G, eps = config.num_groups, config.norm_eps
    h = K.group_norm(x, *_w(dp, f"{name}.norm1"), G, eps, silu=True)
    h = K.conv2d(h, *_w(dp, f"{name}.conv1"))  # (N, Cout, H, W)
    ss = K.linear(emb_act, *_w(dp, f"{name}.emb"))  # (N, 2 Cout) = [scale, shift]
    h = K.group_norm(h, *_w(dp, f"{name}.norm2"), G, eps, scale_shift=ss, silu=True)  # ADM's scale-shift norm
    skip = K.conv2d(x, *_w(dp, f"{name}.skip")) if f"{name}.skip.weight" in dp else x
    return K.conv2d(h, *_w(dp, f"{name}.conv2"), residual=skip)  # skip(x) + conv2(h)


def _self_attention(dp, name, x, config):
    """x + proj(SelfAttention(GroupNorm(x))) over the H*W positions."""
    C = x.shape[1]
    h = K.group_norm(x, *_w(dp, f"{name}.norm"), config.num_groups, config.norm_eps)
    qkv = K.linear(K.to_tokens(h), *_w(dp, f"{name}.qkv"))  # (N, HW, 3C), columns [q; k; v]
    o = K.attention(qkv, qkv, qkv, config.num_heads, offsets=(0, C, 2 * C), width=C)  # (N, HW, C)
    return K.add_tokens(x, K.linear(o, *_w(dp, f"{name}.proj")))


def _cross_attention(dp, name, x, context, context_mask, config):
    """x + proj(CrossAttention(LayerNorm(tokens of x), context)), padding keys masked."""
    N, _, H, W = x.shape
    h = K.layer_norm(K.to_tokens(x), *_w(dp, f"{name}.norm"), config.norm_eps)  # (N, HW, C)
    if config.query_coords:  # h + f P^T, f the position features of every token of every image
        f = np.tile(query_position_features(H, W, h.dtype), (N, 1)).reshape(N, H * W, -1)
        h = K.linear(K.to_device(f), dp[f"{name}.pos.weight"], residual=h)
    q = K.linear(h, dp[f"{name}.q.weight"])  # (N, HW, C)
    k = K.linear(context, dp[f"{name}.k.weight"])  # (N, L, C)
    v = K.linear(context, dp[f"{name}.v.weight"])
    o = K.attention(q, k, v, config.num_heads, key_mask=context_mask)  # (N, HW, C)
    return K.add_tokens(x, K.linear(o, *_w(dp, f"{name}.proj")))


def _stage(dp, spec, h, emb_act, context, context_mask, config):
    name, _, _, attn = spec
    h = _resblock(dp, name, h, emb_act, config)
    if attn:
        h = _self_attention(dp, attn[0], h, config)
        h = _cross_attention(dp, attn[1], h, context, context_mask, config)
    return h


def unet_forward_device(dp: dict, config: UNetConfig, x, t, context, context_mask, pooled):
    """unet_forward on the device, inference only. dp = upload(params); x (N, C, H, W) with H and W
    multiples of 2^(levels-1); t (N,) float64; context (N, L, D); context_mask (N, L) bool with a
    True in every row; pooled (N, D): device arrays in the parameters' dtype (t aside), checked by
    the caller (see unet._check_inputs). Returns out (N, C_out, H, W) on the device."""
    N, C, H, W = x.shape
    m = 2 ** (len(config.channel_mult) - 1)
    if C != config.in_channels or H % m or W % m:
        raise ValueError(f"unet: x has shape {tuple(x.shape)}, expected (N, {config.in_channels}, H, W) "
                         f"with H and W multiples of {m}")
    dtype = dp["conv_in.weight"].dtype
    plan = iter(_res_plan(config))
    nlev = len(config.channel_mult)

    # conditioning: emb = MLP(sinusoidal(t)) + Linear(pooled); every block uses SiLU(emb)
    s = K.timestep_embedding(t, config.base_channels, config.max_period, dtype)  # (N, c0)
    e = K.silu(K.linear(s, *_w(dp, "time_embed.0")))  # (N, E)
    e = K.linear(e, *_w(dp, "time_embed.2"))
    emb_act = K.silu(K.linear(pooled, *_w(dp, "text_embed"), residual=e))  # (N, E)

    # down: each op's output is kept for a skip connection
    if config.coord_channels:  # [x, X, Y] (see unet.coord_maps)
        x = K.concat([x, K.to_device(np.ascontiguousarray(coord_maps(N, H, W, dtype)))], axis=1)
    h = K.conv2d(x, *_w(dp, "conv_in"))  # (N, c0, H, W)
    skips = [h]
    for i in range(nlev):
        for _ in range(config.num_res_blocks):
            h = _stage(dp, next(plan), h, emb_act, context, context_mask, config)
            skips.append(h)
        if i < nlev - 1:
            h = K.conv2d(h, *_w(dp, f"down.{i}.downsample"), stride=2, padding=1)
            skips.append(h)

    # middle
    h = _stage(dp, next(plan), h, emb_act, context, context_mask, config)
    h = _stage(dp, next(plan), h, emb_act, context, context_mask, config)

    # up: concatenate the skips in reverse order
    for i in reversed(range(nlev)):
        for _ in range(config.num_res_blocks + 1):
            h = K.concat([h, skips.pop()], axis=1)
            h = _stage(dp, next(plan), h, emb_act, context, context_mask, config)
        if i > 0:
            h = K.conv2d(K.upsample2x(h), *_w(dp, f"up.{i}.upsample"))

    # out
    h = K.group_norm(h, *_w(dp, "norm_out"), config.num_groups, config.norm_eps, silu=True)
    return K.conv2d(h, *_w(dp, "conv_out"))  # (N, C_out, H, W)


# ----------------------------------------------------------------------------------------------
# text encoder (text_encoder.py: text_encoder_forward)


def text_encoder_forward_device(dp: dict, config: TextEncoderConfig, ids, mask):
    """text_encoder_forward on the device. ids (N, L) int64 with every id in [0, vocab_size) and
    mask (N, L) bool with a True in every row: device arrays, checked by the caller.
    Returns (tokens (N, L, D), pooled (N, D)) on the device."""
    L = ids.shape[1]
    if L > config.max_length:
        raise ValueError(f"text encoder: {L} tokens exceed max_length={config.max_length}")
    D, eps = config.width, config.norm_eps
    h = K.embedding(ids, dp["token_embed.weight"], dp["pos_embed.weight"])  # (N, L, D), positions added
    for i in range(config.num_layers):
        b = f"blocks.{i}."
        a = K.layer_norm(h, *_w(dp, b + "ln1"), eps)
        qkv = K.linear(a, *_w(dp, b + "attn.qkv"))  # (N, L, 3D)
        bias = None
        if config.rel_pos:  # the (E, L, L) score bias, gathered from its small table on the host
            bias = K.to_device(relative_bias(K.to_host(dp[b + "attn.rel_bias"]), L))
        o = K.attention(qkv, qkv, qkv, config.num_heads, key_mask=mask, offsets=(0, D, 2 * D), width=D,
                        bias=bias)
        h = K.linear(o, *_w(dp, b + "attn.proj"), residual=h)  # h + proj(attention)
        m = K.linear(K.layer_norm(h, *_w(dp, b + "ln2"), eps), *_w(dp, b + "mlp.fc1"))  # (N, L, 4D)
        h = K.linear(K.gelu(m), *_w(dp, b + "mlp.fc2"), residual=h)  # h + MLP
    tokens = K.layer_norm(h, *_w(dp, "ln_final"), eps)
    return tokens, K.masked_mean(tokens, mask)
