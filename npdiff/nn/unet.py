"""The denoising U-Net, forward and backward by hand.

Architecture after Ho et al. 2020 and Dhariwal & Nichol 2021 ("ADM"), with text conditioning as
in Rombach et al. 2022 (cross-attention to text tokens) and Saharia et al. 2022 (the pooled text
vector added to the timestep embedding):

    emb    = MLP(sinusoidal(t)) + Linear(pooled)                         (N, E)
    h      = conv_in(x)                                                  (N, c0, H, W)
             with coord_channels, conv_in sees [x, X, Y]: two more channels holding each pixel's
             x and y in [-1, 1] (CoordConv, Liu et al. 2018), so that "left" and "top" are
             something a translation-equivariant network can see away from the borders
             with query_coords, every cross-attention query also sees where it is: its layer-normed
             features get P f added, f = [X, Y, cos(pi X), cos(pi Y)] at that position and P a
             learned (C, 4) map starting at zero, so "the blue square on the left" can be read by
             the positions on the left and not by those on the right
    down:  per level i: num_res_blocks x [ResBlock -> (self-attn -> cross-attn)], then a
           stride-2 conv (all levels but the last); every output is kept for a skip connection
    mid:   ResBlock -> self-attn -> cross-attn -> ResBlock
    up:    per level i, deepest first: (num_res_blocks + 1) x [concat skip -> ResBlock ->
           (self-attn -> cross-attn)], then nearest 2x upsample + conv (all levels but level 0)
    out    = conv_out(SiLU(GroupNorm(h)))                                (N, C_out, H, W)

    ResBlock(x, emb): h = conv1(SiLU(GN1(x)))
                      h = GN2(h) * (1 + scale) + shift,  [scale, shift] = Linear(SiLU(emb))
                      h = conv2(Dropout(SiLU(h)))
                      y = skip(x) + h          skip = 1x1 conv when channels change, else identity

The last conv of every residual branch and of the output starts at zero (ADM), so a new network
is the identity on its skip paths and predicts 0.

Parameter names (dotted, the safetensors keys; level i counts from 0 at full resolution):
  time_embed.0, time_embed.2, text_embed, conv_in,
  down.{i}.res.{j}.{norm1,conv1,emb,norm2,conv2,skip}, down.{i}.attn.{j}.{norm,qkv,proj},
  down.{i}.xattn.{j}.{norm,q,k,v,proj,pos}, down.{i}.downsample,       (pos: with query_coords)
  mid.res.{0,1}, mid.attn, mid.xattn,
  up.{i}.res.{j}, up.{i}.attn.{j}, up.{i}.xattn.{j}, up.{i}.upsample,
  norm_out, conv_out        each followed by .weight / .bias

Dimension legend:
  N batch, C channels, H W height and width, E embedding width, L text tokens, D context width.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from npdiff.nn import layers as F
from npdiff.nn.attention import (attention_probs, check_key_mask, cross_attention_backward,
                                 cross_attention_forward, self_attention_backward, self_attention_forward)


@dataclass
class UNetConfig:
    in_channels: int = 3                         # RGB images in [-1, 1]
    base_channels: int = 64                      # width of level 0; level i is base * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)    # 32x32 -> 16x16 -> 8x8 for the default 32x32 images
    num_res_blocks: int = 1                      # residual blocks per level going down (+1 going up)
    attention_levels: tuple[int, ...] = (1, 2)   # levels with self- and cross-attention (16x16, 8x8)
    num_heads: int = 4                           # attention heads (head width = channels / heads)
    context_dim: int = 128                       # width of the text encoder's tokens and pooled vector
    num_groups: int = 32                         # group-norm groups (Wu & He 2018's default); with one
                                                 # channel per group a feature constant over the image
                                                 # (a flat background) cannot pass a norm
    dropout: float = 0.0                         # in residual blocks; active only when unet_forward gets an rng
    learn_sigma: bool = False                    # 2x channels out: prediction and variance v (Nichol & Dhariwal 2021)
    time_embed_mult: int = 4                     # embedding width E = base_channels * this (ADM)
    max_period: float = 10000.0                  # longest wavelength of the sinusoidal timestep embedding
    norm_eps: float = 1e-5                       # epsilon of group and layer norms (PyTorch's default)
    coord_channels: bool = False                 # conv_in also sees each pixel's x and y (CoordConv)
    query_coords: bool = False                   # cross-attention queries also see their position

    @property
    def conv_in_channels(self) -> int:
        return self.in_channels + (2 if self.coord_channels else 0)

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def embed_dim(self) -> int:
        return self.base_channels * self.time_embed_mult

    @property
    def level_channels(self) -> list[int]:
        return [self.base_channels * m for m in self.channel_mult]

    def validate(self) -> None:
        widths = [self.base_channels] + self.level_channels
        for c in widths:
            if c % self.num_groups:
                raise ValueError(f"UNetConfig: {c} channels do not split into num_groups={self.num_groups}")
        for i in self.attention_levels:
            if not 0 <= i < len(self.channel_mult):
                raise ValueError(f"UNetConfig: attention level {i} does not exist "
                                 f"(levels 0..{len(self.channel_mult) - 1})")
        for c in [self.level_channels[i] for i in self.attention_levels] + [self.level_channels[-1]]:
            if c % self.num_heads:
                raise ValueError(f"UNetConfig: {c} attention channels do not split into "
                                 f"num_heads={self.num_heads}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"UNetConfig: unknown fields {unknown}; known fields are {sorted(names)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


# ----------------------------------------------------------------------------------------------
# initialization (PyTorch's defaults: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases)


def _init_conv(p, name, rng, dtype, K, C, k, zero=False):
    bound = 1.0 / np.sqrt(C * k * k)
    p[f"{name}.weight"] = (np.zeros((K, C, k, k)) if zero
                           else rng.uniform(-bound, bound, (K, C, k, k))).astype(dtype)
    p[f"{name}.bias"] = (np.zeros(K) if zero else rng.uniform(-bound, bound, K)).astype(dtype)


def _init_linear(p, name, rng, dtype, J, I, bias=True, zero=False):
    bound = 1.0 / np.sqrt(I)
    p[f"{name}.weight"] = (np.zeros((J, I)) if zero else rng.uniform(-bound, bound, (J, I))).astype(dtype)
    if bias:
        p[f"{name}.bias"] = (np.zeros(J) if zero else rng.uniform(-bound, bound, J)).astype(dtype)


def _init_norm(p, name, dtype, C):
    p[f"{name}.weight"] = np.ones(C, dtype=dtype)
    p[f"{name}.bias"] = np.zeros(C, dtype=dtype)


def _init_res(p, name, rng, dtype, cin, cout, E):
    _init_norm(p, f"{name}.norm1", dtype, cin)
    _init_conv(p, f"{name}.conv1", rng, dtype, cout, cin, 3)
    _init_linear(p, f"{name}.emb", rng, dtype, 2 * cout, E)
    _init_norm(p, f"{name}.norm2", dtype, cout)
    _init_conv(p, f"{name}.conv2", rng, dtype, cout, cout, 3, zero=True)
    if cin != cout:
        _init_conv(p, f"{name}.skip", rng, dtype, cout, cin, 1)


def _init_attn(p, name, rng, dtype, C, D):
    _init_norm(p, f"{name}.norm", dtype, C)  # self-attention on group-normed features
    _init_linear(p, f"{name}.qkv", rng, dtype, 3 * C, C)
    _init_linear(p, f"{name}.proj", rng, dtype, C, C, zero=True)


def _init_xattn(p, name, rng, dtype, C, D, query_coords=False):
    _init_norm(p, f"{name}.norm", dtype, C)  # cross-attention on layer-normed tokens
    _init_linear(p, f"{name}.q", rng, dtype, C, C, bias=False)
    _init_linear(p, f"{name}.k", rng, dtype, C, D, bias=False)
    _init_linear(p, f"{name}.v", rng, dtype, C, D, bias=False)
    _init_linear(p, f"{name}.proj", rng, dtype, C, C, zero=True)
    if query_coords:
        _init_linear(p, f"{name}.pos", rng, dtype, C, QUERY_FEATURES, bias=False, zero=True)


def init_unet(config: UNetConfig, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """Fresh parameters for `config`: a flat dict of dotted names (see the module docstring)."""
    config.validate()
    p = {}
    c0, E, D = config.base_channels, config.embed_dim, config.context_dim
    _init_linear(p, "time_embed.0", rng, dtype, E, c0)
    _init_linear(p, "time_embed.2", rng, dtype, E, E)
    _init_linear(p, "text_embed", rng, dtype, E, D)
    _init_conv(p, "conv_in", rng, dtype, c0, config.conv_in_channels, 3)
    for name, cin, cout, attn in _res_plan(config):
        _init_res(p, name, rng, dtype, cin, cout, E)
        if attn:
            _init_attn(p, attn[0], rng, dtype, cout, D)
            _init_xattn(p, attn[1], rng, dtype, cout, D, config.query_coords)
    chans = config.level_channels
    for i in range(len(chans) - 1):
        _init_conv(p, f"down.{i}.downsample", rng, dtype, chans[i], chans[i], 3)
        _init_conv(p, f"up.{i + 1}.upsample", rng, dtype, chans[i + 1], chans[i + 1], 3)
    _init_norm(p, "norm_out", dtype, chans[0])
    _init_conv(p, "conv_out", rng, dtype, config.out_channels, chans[0], 3, zero=True)
    return p


def _res_plan(config):
    """Every residual block in forward order: (name, in channels, out channels, attention names or
    None). The up path's input channels include the concatenated skip."""
    chans = config.level_channels
    plan, skips = [], [config.base_channels]  # channels of each tensor kept for a skip
    c = config.base_channels
    for i, ci in enumerate(chans):
        for j in range(config.num_res_blocks):
            attn = (f"down.{i}.attn.{j}", f"down.{i}.xattn.{j}") if i in config.attention_levels else None
            plan.append((f"down.{i}.res.{j}", c, ci, attn))
            c = ci
            skips.append(c)
        if i < len(chans) - 1:
            skips.append(c)  # downsample keeps the width
    plan.append(("mid.res.0", c, c, ("mid.attn", "mid.xattn")))
    plan.append(("mid.res.1", c, c, None))
    for i in reversed(range(len(chans))):
        for j in range(config.num_res_blocks + 1):
            attn = (f"up.{i}.attn.{j}", f"up.{i}.xattn.{j}") if i in config.attention_levels else None
            plan.append((f"up.{i}.res.{j}", c + skips.pop(), chans[i], attn))
            c = chans[i]
    return plan


# ----------------------------------------------------------------------------------------------
# building blocks


def _put(grads, name, dweight, dbias=None):
    grads[f"{name}.weight"] = dweight
    if dbias is not None:
        grads[f"{name}.bias"] = dbias


def resblock_forward(p, name, x, emb_act, config, rng):
    """x (N, Cin, H, W), emb_act = SiLU(emb) (N, E) -> y (N, Cout, H, W)."""
    G, eps = config.num_groups, config.norm_eps
    h, c_n1 = F.group_norm_silu_forward(x, p[f"{name}.norm1.weight"], p[f"{name}.norm1.bias"], G, eps)
    h, c_c1 = F.conv2d_forward(h, p[f"{name}.conv1.weight"], p[f"{name}.conv1.bias"])
    ss, c_e = F.linear_forward(emb_act, p[f"{name}.emb.weight"], p[f"{name}.emb.bias"])  # (N, 2Cout)
    # ADM's scale-shift norm: SiLU(GroupNorm(h) (1 + scale) + shift), ss = [scale, shift]
    h, c_n2 = F.group_norm_silu_forward(h, p[f"{name}.norm2.weight"], p[f"{name}.norm2.bias"], G, eps,
                                        scale_shift=ss)
    h, c_d = F.dropout_forward(h, config.dropout, rng)
    h, c_c2 = F.conv2d_forward(h, p[f"{name}.conv2.weight"], p[f"{name}.conv2.bias"])
    if f"{name}.skip.weight" in p:
        s, c_s = F.conv2d_forward(x, p[f"{name}.skip.weight"], p[f"{name}.skip.bias"])
    else:
        s, c_s = x, None
    return s + h, (name, c_n1, c_c1, c_e, c_n2, c_d, c_c2, c_s)


def resblock_backward(dy, cache, grads):
    """-> (dx, demb_act); parameter gradients go into grads."""
    name, c_n1, c_c1, c_e, c_n2, c_d, c_c2, c_s = cache
    # y = s + h
    if c_s is not None:
        dx, dw, db = F.conv2d_backward(dy, c_s)
        _put(grads, f"{name}.skip", dw, db)
    else:
        dx = dy
    dh, dw, db = F.conv2d_backward(dy, c_c2)
    _put(grads, f"{name}.conv2", dw, db)
    (dh,) = F.dropout_backward(dh, c_d)
    dh, dw, db, dss = F.group_norm_silu_backward(dh, c_n2)
    _put(grads, f"{name}.norm2", dw, db)
    demb_act, dw, db = F.linear_backward(dss, c_e)
    _put(grads, f"{name}.emb", dw, db)
    dh, dw, db = F.conv2d_backward(dh, c_c1)
    _put(grads, f"{name}.conv1", dw, db)
    dxn, dw, db, _ = F.group_norm_silu_backward(dh, c_n1)
    _put(grads, f"{name}.norm1", dw, db)
    return dx + dxn, demb_act


def _to_tokens(x):
    """(N, C, H, W) -> (N, H*W, C)."""
    N, C, H, W = x.shape
    return x.reshape(N, C, H * W).transpose(0, 2, 1)


def _from_tokens(t, shape):
    """(N, H*W, C) -> (N, C, H, W), contiguous."""
    return np.ascontiguousarray(t.transpose(0, 2, 1)).reshape(shape)


def spatial_self_attention_forward(p, name, x, config):
    """y = x + proj(SelfAttention(GroupNorm(x))) over the H*W positions (ADM's AttentionBlock)."""
    h, c_n = F.group_norm_forward(x, p[f"{name}.norm.weight"], p[f"{name}.norm.bias"],
                                  config.num_groups, config.norm_eps)
    a, c_a = self_attention_forward(_to_tokens(h), p[f"{name}.qkv.weight"], p[f"{name}.qkv.bias"],
                                    p[f"{name}.proj.weight"], p[f"{name}.proj.bias"], config.num_heads)
    return x + _from_tokens(a, x.shape), (name, c_n, c_a)


def spatial_self_attention_backward(dy, cache, grads):
    name, c_n, c_a = cache
    dtok, dqkv_w, dqkv_b, dproj_w, dproj_b = self_attention_backward(_to_tokens(dy), c_a)
    _put(grads, f"{name}.qkv", dqkv_w, dqkv_b)
    _put(grads, f"{name}.proj", dproj_w, dproj_b)
    dh, dw, db = F.group_norm_backward(_from_tokens(dtok, dy.shape), c_n)
    _put(grads, f"{name}.norm", dw, db)
    return dy + dh


def spatial_cross_attention_forward(p, name, x, context, context_mask, config):
    """y = x + proj(CrossAttention(LayerNorm(tokens of x) [+ P f], context)) (Rombach et al. 2022);
    the position term P f (see query_position_features) only with config.query_coords."""
    h, c_n = F.layer_norm_forward(_to_tokens(x), p[f"{name}.norm.weight"], p[f"{name}.norm.bias"],
                                  config.norm_eps)  # (N, HW, C)
    feats = None
    if config.query_coords:
        feats = query_position_features(x.shape[2], x.shape[3], x.dtype)  # (HW, 4)
        h = h + feats @ p[f"{name}.pos.weight"].T
    a, c_a = cross_attention_forward(h, context, p[f"{name}.q.weight"], p[f"{name}.k.weight"],
                                     p[f"{name}.v.weight"], p[f"{name}.proj.weight"],
                                     p[f"{name}.proj.bias"], config.num_heads, context_mask)
    return x + _from_tokens(a, x.shape), (name, c_n, c_a, feats, x.shape[2:])


def spatial_cross_attention_backward(dy, cache, grads, dprobs=None):
    """-> (dx, dcontext). dprobs: a further gradient on this layer's attention weights (N, E, H*W, L)."""
    name, c_n, c_a, feats, _ = cache
    dh, dctx, dq, dk, dv, dproj_w, dproj_b = cross_attention_backward(_to_tokens(dy), c_a, dprobs)
    for part, g in (("q", dq), ("k", dk), ("v", dv)):
        _put(grads, f"{name}.{part}", g)
    if feats is not None:
        _put(grads, f"{name}.pos", dh.sum(axis=0).T @ feats)  # h gained feats @ P^T at every image
    _put(grads, f"{name}.proj", dproj_w, dproj_b)
    dtok, dw, db = F.layer_norm_backward(dh, c_n)
    _put(grads, f"{name}.norm", dw, db)
    return dy + _from_tokens(dtok, dy.shape), dctx


def _stage_forward(p, spec, h, emb_act, context, context_mask, config, rng):
    """One residual block and, where configured, its self- and cross-attention."""
    name, _, _, attn = spec
    h, c_r = resblock_forward(p, name, h, emb_act, config, rng)
    c_s = c_x = None
    if attn:
        h, c_s = spatial_self_attention_forward(p, attn[0], h, config)
        h, c_x = spatial_cross_attention_forward(p, attn[1], h, context, context_mask, config)
    return h, (c_r, c_s, c_x)


def _stage_backward(dh, cache, grads, dprobs):
    """-> (dh, demb_act, dcontext or None). dprobs: {cross-attention name: gradient on its weights}."""
    c_r, c_s, c_x = cache
    dctx = None
    if c_x is not None:
        dh, dctx = spatial_cross_attention_backward(dh, c_x, grads, dprobs.get(c_x[0]))
        dh = spatial_self_attention_backward(dh, c_s, grads)
    dh, demb = resblock_backward(dh, c_r, grads)
    return dh, demb, dctx


# ----------------------------------------------------------------------------------------------
# the network


def coord_maps(N: int, H: int, W: int, dtype=np.float32) -> np.ndarray:
    """(N, 2, H, W): channel 0 is each pixel centre's x, channel 1 its y, both from -1 at the left
    (top) edge to +1 at the right (bottom) edge: X[j] = (2 j + 1) / W - 1."""
    xs = (2 * np.arange(W) + 1) / W - 1
    ys = (2 * np.arange(H) + 1) / H - 1
    maps = np.stack([np.broadcast_to(xs[None, :], (H, W)), np.broadcast_to(ys[:, None], (H, W))])
    return np.broadcast_to(maps.astype(dtype), (N, 2, H, W))


QUERY_FEATURES = 4  # what a cross-attention query learns its position from (query_position_features)


@functools.lru_cache(maxsize=64)
def query_position_features(H: int, W: int, dtype=np.float32) -> np.ndarray:
    """(H*W, 4), rows in token order (row-major): [X, Y, cos(pi X), cos(pi Y)] of each position,
    X and Y as in coord_maps. X and Y grow towards the right and the bottom; the cosines peak in
    the centre, so a linear read-out scores "left", "right", "top", "bottom" and "center" alike.
    Functions of the relative position only: any canvas size gets the same meaning.
    Made once per size and dtype (every cross-attention call asks for it) and read-only."""
    X, Y = coord_maps(1, H, W, np.float64)[0].reshape(2, H * W)
    feats = np.stack([X, Y, np.cos(np.pi * X), np.cos(np.pi * Y)], axis=1).astype(dtype)
    feats.setflags(write=False)
    return feats


def with_coord_channels(x: np.ndarray) -> np.ndarray:
    """x (N, C, H, W) -> (N, C + 2, H, W): x followed by its coordinate maps."""
    N, _, H, W = x.shape
    return np.concatenate([x, coord_maps(N, H, W, x.dtype)], axis=1)


def _check_inputs(params, config, x, t, context, context_mask, pooled):
    dtype = params["conv_in.weight"].dtype
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] != config.in_channels:
        raise ValueError(f"unet: x has shape {x.shape}, expected (N, {config.in_channels}, H, W)")
    N, _, H, W = x.shape
    m = 2 ** (len(config.channel_mult) - 1)
    if H % m or W % m:
        raise ValueError(f"unet: image sides must be multiples of {m} for {len(config.channel_mult)} "
                         f"levels, got {H}x{W}; crop or pad to a multiple of 8")
    t = np.asarray(t)
    if t.shape != (N,):
        raise ValueError(f"unet: t has shape {t.shape}, expected ({N},) (one timestep per image)")
    context = np.asarray(context, dtype=dtype)
    if context.ndim != 3 or context.shape[0] != N or context.shape[2] != config.context_dim:
        raise ValueError(f"unet: context has shape {context.shape}, expected ({N}, L, {config.context_dim})")
    pooled = np.asarray(pooled, dtype=dtype)
    if pooled.shape != (N, config.context_dim):
        raise ValueError(f"unet: pooled has shape {pooled.shape}, expected ({N}, {config.context_dim})")
    context_mask = check_key_mask(context_mask, N, context.shape[1], "context_mask")
    return x.astype(dtype, copy=False), t, context, context_mask, pooled


def unet_forward(params, config, x, t, context, context_mask, pooled, *, rng=None):
    """Predict from a noisy image. x (N, C, H, W) with H and W multiples of 2^(levels-1);
    t (N,) timesteps (the original 0-based indices, any real values work); context (N, L, D) text
    tokens; context_mask (N, L) bool, True for real tokens, at least one per row; pooled (N, D).
    rng: a numpy Generator turns dropout on (training); None is inference.
    Computes in the parameters' dtype. Returns (out (N, C_out, H, W), cache for unet_backward)."""
    x, t, context, context_mask, pooled = _check_inputs(params, config, x, t, context, context_mask, pooled)
    dtype = x.dtype
    plan = iter(_res_plan(config))
    nlev = len(config.channel_mult)

    # conditioning: emb = MLP(sinusoidal(t)) + Linear(pooled)
    s, c_t = F.timestep_embedding_forward(t, config.base_channels, config.max_period, dtype)
    e, c_e0 = F.linear_forward(s, params["time_embed.0.weight"], params["time_embed.0.bias"])
    e, c_e1 = F.silu_forward(e)
    e, c_e2 = F.linear_forward(e, params["time_embed.2.weight"], params["time_embed.2.bias"])
    ep, c_p = F.linear_forward(pooled, params["text_embed.weight"], params["text_embed.bias"])
    emb_act, c_ea = F.silu_forward(e + ep)  # every block applies Linear(SiLU(emb)): SiLU once here

    # down: each op's output is kept for a skip connection
    x_in = with_coord_channels(x) if config.coord_channels else x
    h, c_in = F.conv2d_forward(x_in, params["conv_in.weight"], params["conv_in.bias"])
    skips, down = [h], []
    for i in range(nlev):
        for _ in range(config.num_res_blocks):
            h, c = _stage_forward(params, next(plan), h, emb_act, context, context_mask, config, rng)
            skips.append(h)
            down.append(("stage", c))
        if i < nlev - 1:
            h, c = F.conv2d_forward(h, params[f"down.{i}.downsample.weight"],
                                    params[f"down.{i}.downsample.bias"], stride=2, padding=1)
            skips.append(h)
            down.append(("downsample", (f"down.{i}.downsample", c)))

    # middle
    h, c_m0 = _stage_forward(params, next(plan), h, emb_act, context, context_mask, config, rng)
    h, c_m1 = _stage_forward(params, next(plan), h, emb_act, context, context_mask, config, rng)

    # up: concatenate the skips in reverse order
    up = []
    for i in reversed(range(nlev)):
        for _ in range(config.num_res_blocks + 1):
            h, c_cat = F.concat_forward([h, skips.pop()], axis=1)
            h, c = _stage_forward(params, next(plan), h, emb_act, context, context_mask, config, rng)
            up.append(("stage", (c_cat, c)))
        if i > 0:
            h, c_us = F.upsample_nearest2x_forward(h)
            h, c = F.conv2d_forward(h, params[f"up.{i}.upsample.weight"], params[f"up.{i}.upsample.bias"])
            up.append(("upsample", (f"up.{i}.upsample", c_us, c)))

    # out
    h, c_no = F.group_norm_silu_forward(h, params["norm_out.weight"], params["norm_out.bias"],
                                        config.num_groups, config.norm_eps)
    out, c_out = F.conv2d_forward(h, params["conv_out.weight"], params["conv_out.bias"])
    cache = (c_t, c_e0, c_e1, c_e2, c_p, c_ea, c_in, down, c_m0, c_m1, up, c_no, c_out)
    return out, cache


def cross_attention_maps(cache) -> dict[str, tuple[np.ndarray, tuple[int, int]]]:
    """Where every cross-attention of a training forward looked: {layer name ("down.1.xattn.0", ...):
    (weights (N, E, H*W, L), (H, W))}, the queries in row-major pixel order. A loss on these weights
    goes back through unet_backward's dprobs."""
    _, _, _, _, _, _, _, down, c_m0, c_m1, up, _, _ = cache
    stages = [c for kind, c in down if kind == "stage"] + [c_m0, c_m1]
    stages += [c[1] for kind, c in up if kind == "stage"]     # an up stage is (concat cache, stage cache)
    out = {}
    for _, _, c_x in stages:
        if c_x is not None:
            name, _, c_a, _, hw = c_x
            out[name] = (attention_probs(c_a[3]), tuple(hw))
    return out


def unet_backward(params, config, dout, cache, dprobs=None):
    """Gradients of sum(out * dout) [+ sum over layers of sum(weights * dprobs[layer])].
    Returns (grads: one array per parameter name, dcontext (N, L, D), dpooled (N, D)).
    dprobs: {cross-attention name: (N, E, H*W, L)} gradients on attention weights (cross_attention_maps)."""
    c_t, c_e0, c_e1, c_e2, c_p, c_ea, c_in, down, c_m0, c_m1, up, c_no, c_out = cache
    dprobs = dprobs or {}
    grads = {}
    demb = 0.0  # accumulates d loss / d emb_act over all residual blocks
    dctx = 0.0  # accumulates d loss / d context over all cross-attentions

    def stage(dh, c):
        nonlocal demb, dctx
        dh, de, dc = _stage_backward(dh, c, grads, dprobs)
        demb = demb + de
        if dc is not None:
            dctx = dctx + dc
        return dh

    # out
    dh, dw, db = F.conv2d_backward(dout.astype(c_out[0].dtype, copy=False), c_out)
    _put(grads, "conv_out", dw, db)
    dh, dw, db, _ = F.group_norm_silu_backward(dh, c_no)
    _put(grads, "norm_out", dw, db)

    # up, last op first; skip gradients come out in the order the skips were made
    dskips = []
    for kind, c in reversed(up):
        if kind == "upsample":
            name, c_us, c_conv = c
            dh, dw, db = F.conv2d_backward(dh, c_conv)
            _put(grads, name, dw, db)
            (dh,) = F.upsample_nearest2x_backward(dh, c_us)
        else:
            c_cat, c_stage = c
            dh = stage(dh, c_stage)
            (dh, dskip) = F.concat_backward(dh, c_cat)[0]
            dskips.append(dskip)

    # middle
    dh = stage(dh, c_m1)
    dh = stage(dh, c_m0)

    # down: the k-th kept tensor is the output of the k-th op (conv_in first)
    for k in reversed(range(len(dskips))):
        dh = dh + dskips[k]
        if k == 0:
            _, dw, db = F.conv2d_backward(dh, c_in, need_dx=False)
            _put(grads, "conv_in", dw, db)
        else:
            kind, c = down[k - 1]
            if kind == "downsample":
                name, c_conv = c
                dh, dw, db = F.conv2d_backward(dh, c_conv)
                _put(grads, name, dw, db)
            else:
                dh = stage(dh, c)

    # conditioning
    (de,) = F.silu_backward(demb, c_ea)
    dpooled, dw, db = F.linear_backward(de, c_p)
    _put(grads, "text_embed", dw, db)
    de, dw, db = F.linear_backward(de, c_e2)
    _put(grads, "time_embed.2", dw, db)
    (de,) = F.silu_backward(de, c_e1)
    _, dw, db = F.linear_backward(de, c_e0)
    _put(grads, "time_embed.0", dw, db)
    return grads, dctx, dpooled
