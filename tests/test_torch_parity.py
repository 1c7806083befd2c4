"""Parity with PyTorch autograd in float32: every layer's forward pass and gradients, the whole
U-Net and text encoder through independently written PyTorch twins loading the same parameter
dict, and AdamW against torch.optim.AdamW. Tolerance: relative error (norm of the difference over
the norm of the reference) at most 1e-4, about a thousand float32 roundings of slack.

Skips when torch is not importable (`pip install torch==2.13.0` installs the CPU wheel on disk).
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
TF = torch.nn.functional

from npdiff.nn import attention as A  # noqa: E402
from npdiff.nn import layers as L  # noqa: E402
from npdiff.nn import optim  # noqa: E402
from npdiff.nn.gradcheck import relative_error  # noqa: E402
from npdiff.nn.text_encoder import (TextEncoderConfig, init_text_encoder, text_encoder_backward,  # noqa: E402
                                    text_encoder_forward)
from npdiff.nn.unet import (UNetConfig, coord_maps, init_unet, query_position_features, unet_backward,  # noqa: E402
                            unet_forward)

TOL = 1e-4


def f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def check_layer(np_forward, np_backward, torch_forward, arrays, rng, label):
    """Run npdiff forward + backward and torch forward + autograd on the same float32 arrays
    (None entries are not differentiated); compare output and every gradient."""
    y, cache = np_forward(*arrays)
    dy = f32(rng, *y.shape)
    grads = np_backward(dy, cache)
    ts = [None if a is None else torch.tensor(a, requires_grad=True) for a in arrays]
    ty = torch_forward(*ts)
    ty.backward(torch.tensor(dy))
    report = {"y": relative_error(y, ty.detach().numpy())}
    assert y.dtype == np.float32
    for i, (g, t) in enumerate(zip(grads, ts)):
        if g is None or t is None:
            continue
        assert g.dtype == np.float32
        report[f"d{i}"] = relative_error(g, t.grad.numpy())
    worst = max(report.values())
    print(f"{label}: max relative error {worst:.2e}")
    assert worst <= TOL, (label, report)
    return worst


@pytest.mark.parametrize("k,stride,padding", [(3, 1, 1), (3, 2, 1), (1, 1, 0), (3, 1, 0), (3, 2, 0)])
def test_conv2d(k, stride, padding):
    rng = np.random.default_rng(0)
    x, w, b = f32(rng, 3, 5, 9, 7), f32(rng, 6, 5, k, k), f32(rng, 6)
    check_layer(lambda x, w, b: L.conv2d_forward(x, w, b, stride, padding), L.conv2d_backward,
                lambda x, w, b: TF.conv2d(x, w, b, stride=stride, padding=padding), [x, w, b], rng,
                f"conv2d k={k} s={stride} p={padding}")


def test_norms_and_activations():
    rng = np.random.default_rng(1)
    x, g, b = f32(rng, 4, 12, 5, 6), f32(rng, 12), f32(rng, 12)
    check_layer(lambda x, g, b: L.group_norm_forward(x, g, b, 3), L.group_norm_backward,
                lambda x, g, b: TF.group_norm(x, 3, g, b, 1e-5), [x, g, b], rng, "group_norm")
    x, g, b = f32(rng, 3, 7, 10), f32(rng, 10), f32(rng, 10)
    check_layer(L.layer_norm_forward, L.layer_norm_backward,
                lambda x, g, b: TF.layer_norm(x, (10,), g, b, 1e-5), [x, g, b], rng, "layer_norm")
    x = 4 * f32(rng, 5, 6, 7)
    check_layer(L.silu_forward, L.silu_backward, TF.silu, [x], rng, "silu")
    check_layer(L.gelu_forward, L.gelu_backward, lambda x: TF.gelu(x, approximate="tanh"), [x], rng, "gelu")


def test_linear_embedding_upsample_concat():
    rng = np.random.default_rng(2)
    x, w, b = f32(rng, 3, 4, 6), f32(rng, 5, 6), f32(rng, 5)
    check_layer(L.linear_forward, L.linear_backward, TF.linear, [x, w, b], rng, "linear")
    ids = rng.integers(0, 7, size=(3, 5))
    check_layer(lambda w: L.embedding_forward(ids, w), lambda dy, c: (L.embedding_backward(dy, c)[1],),
                lambda w: TF.embedding(torch.tensor(ids), w), [f32(rng, 7, 4)], rng, "embedding")
    x = f32(rng, 2, 3, 4, 5)
    check_layer(L.upsample_nearest2x_forward, L.upsample_nearest2x_backward,
                lambda x: TF.interpolate(x, scale_factor=2, mode="nearest"), [x], rng, "upsample")
    a, c = f32(rng, 2, 3, 4, 4), f32(rng, 2, 5, 4, 4)
    check_layer(lambda a, c: L.concat_forward([a, c]), lambda dy, cache: tuple(L.concat_backward(dy, cache)[0]),
                lambda a, c: torch.cat([a, c], 1), [a, c], rng, "concat")


def test_timestep_embedding():
    t = np.array([0, 1, 17, 500, 999])
    y, _ = L.timestep_embedding_forward(t, 64)
    half = 32
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float64) / half)
    args = torch.tensor(t, dtype=torch.float64)[:, None] * freqs[None]
    ref = torch.cat([torch.cos(args), torch.sin(args)], 1).float().numpy()
    assert relative_error(y, ref) <= 1e-6


def _heads(x, E):  # (N, L, D) -> (N, E, L, Dh)
    N, Lq, D = x.shape
    return x.reshape(N, Lq, E, D // E).transpose(1, 2)


def _merge(x):  # (N, E, L, Dh) -> (N, L, D)
    N, E, Lq, Dh = x.shape
    return x.transpose(1, 2).reshape(N, Lq, E * Dh)


def test_self_attention_matches_nn_multihead_attention():
    rng = np.random.default_rng(3)
    N, Lq, D, E = 3, 6, 8, 2
    x, wqkv, bqkv, wo, bo = f32(rng, N, Lq, D), f32(rng, 3 * D, D), f32(rng, 3 * D), f32(rng, D, D), f32(rng, D)
    mask = rng.random((N, Lq)) < 0.6
    mask[:, 0] = True

    def torch_mha(x, wqkv, bqkv, wo, bo):
        out, _ = TF.multi_head_attention_forward(
            x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), D, E, wqkv, bqkv, None, None, False,
            0.0, wo, bo, training=False, key_padding_mask=torch.tensor(~mask), need_weights=False)
        return out.transpose(0, 1)

    check_layer(lambda *a: A.self_attention_forward(*a, num_heads=E, key_mask=mask), A.self_attention_backward,
                torch_mha, [x, wqkv, bqkv, wo, bo], rng, "self_attention")


def test_cross_attention():
    rng = np.random.default_rng(4)
    N, Lq, M, D, Dc, E = 2, 10, 5, 8, 6, 4
    arrays = [f32(rng, N, Lq, D), f32(rng, N, M, Dc), f32(rng, D, D), f32(rng, D, Dc), f32(rng, D, Dc),
              f32(rng, D, D), f32(rng, D)]
    mask = np.array([[True, True, False, False, False], [True, False, True, True, False]])

    def torch_cross(x, c, wq, wk, wv, wo, bo):
        q, k, v = _heads(x @ wq.T, E), _heads(c @ wk.T, E), _heads(c @ wv.T, E)
        o = TF.scaled_dot_product_attention(q, k, v, attn_mask=torch.tensor(mask)[:, None, None, :])
        return TF.linear(_merge(o), wo, bo)

    check_layer(lambda *a: A.cross_attention_forward(*a, num_heads=E, context_mask=mask),
                A.cross_attention_backward, torch_cross, arrays, rng, "cross_attention")


# ----------------------------------------------------------------------------------------------
# whole networks: PyTorch twins written from the architecture description, not from npdiff's code


def torch_unet(P, cfg, x, t, ctx, mask, pooled):
    G, eps, E = cfg.num_groups, cfg.norm_eps, cfg.num_heads
    tmask = torch.tensor(mask)[:, None, None, :]

    def conv(h, name, stride=1):
        w = P[f"{name}.weight"]
        return TF.conv2d(h, w, P[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)

    def gn(h, name):
        return TF.group_norm(h, G, P[f"{name}.weight"], P[f"{name}.bias"], eps)

    def lin(h, name):
        return TF.linear(h, P[f"{name}.weight"], P.get(f"{name}.bias"))

    half = cfg.base_channels // 2
    freqs = torch.exp(-math.log(cfg.max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = torch.tensor(t, dtype=torch.float64)[:, None] * freqs[None]
    temb = torch.cat([torch.cos(args), torch.sin(args)], 1).float()
    emb = lin(TF.silu(lin(temb, "time_embed.0")), "time_embed.2") + lin(pooled, "text_embed")
    emb = TF.silu(emb)

    def res(h, name):
        r = conv(TF.silu(gn(h, f"{name}.norm1")), f"{name}.conv1")
        scale, shift = lin(emb, f"{name}.emb")[:, :, None, None].chunk(2, dim=1)
        r = conv(TF.silu(gn(r, f"{name}.norm2") * (1 + scale) + shift), f"{name}.conv2")
        return (conv(h, f"{name}.skip") if f"{name}.skip.weight" in P else h) + r

    def attn(h, name, xname):
        N, C, H, W = h.shape
        tok = gn(h, f"{name}.norm").flatten(2).transpose(1, 2)
        q, k, v = lin(tok, f"{name}.qkv").chunk(3, dim=-1)
        o = lin(_merge(TF.scaled_dot_product_attention(_heads(q, E), _heads(k, E), _heads(v, E))), f"{name}.proj")
        h = h + o.transpose(1, 2).reshape(N, C, H, W)
        tok = TF.layer_norm(h.flatten(2).transpose(1, 2), (C,), P[f"{xname}.norm.weight"], P[f"{xname}.norm.bias"], eps)
        if cfg.query_coords:
            tok = tok + torch.tensor(query_position_features(H, W)) @ P[f"{xname}.pos.weight"].T
        q = _heads(lin(tok, f"{xname}.q"), E)
        k, v = _heads(lin(ctx, f"{xname}.k"), E), _heads(lin(ctx, f"{xname}.v"), E)
        o = lin(_merge(TF.scaled_dot_product_attention(q, k, v, attn_mask=tmask)), f"{xname}.proj")
        return h + o.transpose(1, 2).reshape(N, C, H, W)

    nlev = len(cfg.channel_mult)
    if cfg.coord_channels:
        N, _, H, W = x.shape
        x = torch.cat([x, torch.as_tensor(np.ascontiguousarray(coord_maps(N, H, W))).to(x.dtype)], 1)
    h = conv(x, "conv_in")
    hs = [h]
    for i in range(nlev):
        for j in range(cfg.num_res_blocks):
            h = res(h, f"down.{i}.res.{j}")
            if i in cfg.attention_levels:
                h = attn(h, f"down.{i}.attn.{j}", f"down.{i}.xattn.{j}")
            hs.append(h)
        if i < nlev - 1:
            h = conv(h, f"down.{i}.downsample", stride=2)
            hs.append(h)
    h = res(attn(res(h, "mid.res.0"), "mid.attn", "mid.xattn"), "mid.res.1")
    for i in reversed(range(nlev)):
        for j in range(cfg.num_res_blocks + 1):
            h = res(torch.cat([h, hs.pop()], 1), f"up.{i}.res.{j}")
            if i in cfg.attention_levels:
                h = attn(h, f"up.{i}.attn.{j}", f"up.{i}.xattn.{j}")
        if i > 0:
            h = conv(TF.interpolate(h, scale_factor=2, mode="nearest"), f"up.{i}.upsample")
    return conv(TF.silu(gn(h, "norm_out")), "conv_out")


def _torch_params(p):
    return {k: torch.tensor(v, requires_grad=True) for k, v in p.items()}


@pytest.mark.parametrize("cfg,H,W", [
    (UNetConfig(in_channels=3, base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=2, attention_levels=(1, 2),
                num_heads=4, context_dim=12, num_groups=8, learn_sigma=True), 16, 24),
    (UNetConfig(in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(0,),
                num_heads=2, context_dim=6, num_groups=4, coord_channels=True, query_coords=True), 8, 8),
])
def test_unet_matches_torch_twin(cfg, H, W):
    rng = np.random.default_rng(5)
    p = {k: (v + 0.2 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init_unet(cfg, rng).items()}
    N, Lc = 3, 5
    x, ctx, pooled = f32(rng, N, cfg.in_channels, H, W), f32(rng, N, Lc, cfg.context_dim), f32(rng, N, cfg.context_dim)
    t = rng.integers(0, 1000, N)
    mask = np.array([[True] * 5, [True, True, False, False, False], [True, False, False, False, False]])
    out, cache = unet_forward(p, cfg, x, t, ctx, mask, pooled)
    dout = f32(rng, *out.shape)
    grads, dctx, dpooled = unet_backward(p, cfg, dout, cache)

    P = _torch_params(p)
    tctx, tpooled = torch.tensor(ctx, requires_grad=True), torch.tensor(pooled, requires_grad=True)
    tout = torch_unet(P, cfg, torch.tensor(x), t, tctx, mask, tpooled)
    tout.backward(torch.tensor(dout))
    errors = {"out": relative_error(out, tout.detach().numpy()),
              "dcontext": relative_error(dctx, tctx.grad.numpy()),
              "dpooled": relative_error(dpooled, tpooled.grad.numpy())}
    errors.update({k: relative_error(grads[k], P[k].grad.numpy()) for k in p})
    worst = max(errors, key=errors.get)
    print(f"unet {H}x{W}: max relative error {errors[worst]:.2e} ({worst}), output {errors['out']:.2e}")
    assert errors[worst] <= TOL, (worst, errors[worst])


def torch_text_encoder(P, cfg, ids, mask):
    D, E, eps = cfg.width, cfg.num_heads, cfg.norm_eps
    Lq = ids.shape[1]
    h = TF.embedding(torch.tensor(ids), P["token_embed.weight"]) + P["pos_embed.weight"][:Lq]
    kpm = torch.tensor(mask)[:, None, None, :]
    for i in range(cfg.num_layers):
        b = f"blocks.{i}."
        a = TF.layer_norm(h, (D,), P[b + "ln1.weight"], P[b + "ln1.bias"], eps)
        q, k, v = TF.linear(a, P[b + "attn.qkv.weight"], P[b + "attn.qkv.bias"]).chunk(3, dim=-1)
        scores_mask = kpm
        if cfg.rel_pos:  # T5-style: a float mask is added to the scores; -inf keeps padding out
            pos = torch.arange(Lq)
            col = (pos[None, :] - pos[:, None]).clamp(-cfg.rel_pos, cfg.rel_pos) + cfg.rel_pos  # (L, L)
            bias = P[b + "attn.rel_bias"][:, col]  # (E, L, L)
            scores_mask = bias[None].masked_fill(~kpm, float("-inf"))
        o = TF.scaled_dot_product_attention(_heads(q, E), _heads(k, E), _heads(v, E), attn_mask=scores_mask)
        h = h + TF.linear(_merge(o), P[b + "attn.proj.weight"], P[b + "attn.proj.bias"])
        m = TF.layer_norm(h, (D,), P[b + "ln2.weight"], P[b + "ln2.bias"], eps)
        m = TF.gelu(TF.linear(m, P[b + "mlp.fc1.weight"], P[b + "mlp.fc1.bias"]), approximate="tanh")
        h = h + TF.linear(m, P[b + "mlp.fc2.weight"], P[b + "mlp.fc2.bias"])
    tokens = TF.layer_norm(h, (D,), P["ln_final.weight"], P["ln_final.bias"], eps)
    tm = torch.tensor(mask, dtype=torch.float32)[:, :, None]
    return tokens, (tokens * tm).sum(1) / tm.sum(1)


@pytest.mark.parametrize("rel_pos", [0, 3])
def test_text_encoder_matches_torch_twin(rel_pos):
    cfg = TextEncoderConfig(vocab_size=30, max_length=8, width=16, num_layers=2, num_heads=4, rel_pos=rel_pos)
    rng = np.random.default_rng(6)
    p = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in init_text_encoder(cfg, rng).items()}
    ids = rng.integers(1, 30, size=(3, 7))
    mask = np.arange(7)[None] < np.array([[7], [3], [1]])
    ids[~mask] = 0
    tokens, pooled, cache = text_encoder_forward(p, cfg, ids, mask)
    dt, dp = f32(rng, *tokens.shape), f32(rng, *pooled.shape)
    grads = text_encoder_backward(p, cfg, dt, dp, cache)
    P = _torch_params(p)
    ttok, tpool = torch_text_encoder(P, cfg, ids, mask)
    ((ttok * torch.tensor(dt)).sum() + (tpool * torch.tensor(dp)).sum()).backward()
    errors = {"tokens": relative_error(tokens, ttok.detach().numpy()),
              "pooled": relative_error(pooled, tpool.detach().numpy())}
    errors.update({k: relative_error(grads[k], P[k].grad.numpy()) for k in p})
    worst = max(errors, key=errors.get)
    print(f"text encoder: max relative error {errors[worst]:.2e} ({worst})")
    assert errors[worst] <= TOL, (worst, errors[worst])


def test_adamw_and_clipping_match_torch():
    rng = np.random.default_rng(7)
    params = {"w": f32(rng, 4, 3), "b": f32(rng, 3)}
    tparams = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    topt = torch.optim.AdamW([{"params": [tparams["w"]], "weight_decay": 0.05},
                              {"params": [tparams["b"]], "weight_decay": 0.0}],
                             lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    state = optim.adamw_init(params)
    for step in range(20):
        grads = {k: 3 * f32(rng, *v.shape) for k, v in params.items()}
        for k, v in tparams.items():
            v.grad = torch.tensor(grads[k])
        tnorm = torch.nn.utils.clip_grad_norm_(list(tparams.values()), 1.0)
        norm = optim.clip_grad_norm(grads, 1.0)
        assert abs(norm - float(tnorm)) <= 1e-5 * norm
        topt.step()
        optim.adamw_step(params, grads, state, 1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    for k in params:
        assert relative_error(params[k], tparams[k].detach().numpy()) <= 1e-6, k
