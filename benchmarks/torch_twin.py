"""A PyTorch twin of npdiff's text encoder and U-Net, loading npdiff's own parameter dicts.

It exists so that the benchmarks can run the same network with the same weights in both engines
and compare times (benchmarks/bench_unet.py); it checks nothing by itself. It is written from the
architecture description in npdiff/nn/unet.py and npdiff/nn/text_encoder.py with plain
torch.nn.functional calls, the way a PyTorch user would write it: NCHW tensors, autograd for the
backward pass, torch.optim.AdamW for the update.

    twin = TorchTwin(model.unet_params, model.text_params, model.config, requires_grad=False)
    tokens, pooled = twin.text(ids, mask)             # (N, L, D), (N, D)
    out = twin.unet(x, t, tokens, mask, pooled)       # (N, C_out, H, W)

Dimension legend: N batch, C channels, H W height and width, L text tokens, D text width,
E heads, Dh head width.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as TF

from npdiff.nn.unet import coord_maps, query_position_features


def _heads(x, E):
    """(N, L, D) -> (N, E, L, Dh)."""
    N, L, D = x.shape
    return x.reshape(N, L, E, D // E).transpose(1, 2)


def _merge(x):
    """(N, E, L, Dh) -> (N, L, E*Dh)."""
    N, E, L, Dh = x.shape
    return x.transpose(1, 2).reshape(N, L, E * Dh)


class TorchTwin:
    """The two networks of an npdiff Model as PyTorch functions of one parameter dict."""

    def __init__(self, unet_params: dict[str, np.ndarray], text_params: dict[str, np.ndarray], config,
                 requires_grad: bool = False):
        self.ucfg, self.tcfg = config.unet, config.text_encoder
        # copies, so that an optimizer step on the twin never touches npdiff's arrays
        self.U = {k: torch.tensor(np.array(v), requires_grad=requires_grad) for k, v in unet_params.items()}
        self.T = {k: torch.tensor(np.array(v), requires_grad=requires_grad) for k, v in text_params.items()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.U.values()) + list(self.T.values())

    # -- text encoder ----------------------------------------------------------------------------
    def text(self, ids: np.ndarray, mask: np.ndarray):
        """ids (N, L) int, mask (N, L) bool -> tokens (N, L, D), pooled (N, D)."""
        P, cfg = self.T, self.tcfg
        D, E, eps = cfg.width, cfg.num_heads, cfg.norm_eps
        L = ids.shape[1]
        tmask = torch.from_numpy(np.asarray(mask))
        h = TF.embedding(torch.from_numpy(np.asarray(ids, dtype=np.int64)), P["token_embed.weight"])
        h = h + P["pos_embed.weight"][:L]
        for i in range(cfg.num_layers):
            b = f"blocks.{i}."
            a = TF.layer_norm(h, (D,), P[b + "ln1.weight"], P[b + "ln1.bias"], eps)
            q, k, v = TF.linear(a, P[b + "attn.qkv.weight"], P[b + "attn.qkv.bias"]).chunk(3, dim=-1)
            o = TF.scaled_dot_product_attention(_heads(q, E), _heads(k, E), _heads(v, E),
                                                attn_mask=tmask[:, None, None, :])
            h = h + TF.linear(_merge(o), P[b + "attn.proj.weight"], P[b + "attn.proj.bias"])
            m = TF.layer_norm(h, (D,), P[b + "ln2.weight"], P[b + "ln2.bias"], eps)
            m = TF.gelu(TF.linear(m, P[b + "mlp.fc1.weight"], P[b + "mlp.fc1.bias"]), approximate="tanh")
            h = h + TF.linear(m, P[b + "mlp.fc2.weight"], P[b + "mlp.fc2.bias"])
        tokens = TF.layer_norm(h, (D,), P["ln_final.weight"], P["ln_final.bias"], eps)
        w = tmask.to(tokens.dtype)[:, :, None]  # (N, L, 1)
        return tokens, (tokens * w).sum(1) / w.sum(1)

    # -- U-Net -----------------------------------------------------------------------------------
    def _conv(self, h, name, stride=1):
        w = self.U[f"{name}.weight"]
        return TF.conv2d(h, w, self.U[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2)

    def _gn(self, h, name):
        return TF.group_norm(h, self.ucfg.num_groups, self.U[f"{name}.weight"], self.U[f"{name}.bias"],
                             self.ucfg.norm_eps)

    def _lin(self, h, name):
        return TF.linear(h, self.U[f"{name}.weight"], self.U.get(f"{name}.bias"))

    def _res(self, h, name, emb):
        r = self._conv(TF.silu(self._gn(h, f"{name}.norm1")), f"{name}.conv1")
        scale, shift = self._lin(emb, f"{name}.emb")[:, :, None, None].chunk(2, dim=1)
        r = self._conv(TF.silu(self._gn(r, f"{name}.norm2") * (1 + scale) + shift), f"{name}.conv2")
        skip = self._conv(h, f"{name}.skip") if f"{name}.skip.weight" in self.U else h
        return skip + r

    def _attn(self, h, name, xname, ctx, kmask):
        """Self-attention over the H*W positions, then cross-attention to the text tokens."""
        N, C, H, W = h.shape
        E = self.ucfg.num_heads
        tok = self._gn(h, f"{name}.norm").flatten(2).transpose(1, 2)  # (N, HW, C)
        q, k, v = self._lin(tok, f"{name}.qkv").chunk(3, dim=-1)
        o = self._lin(_merge(TF.scaled_dot_product_attention(_heads(q, E), _heads(k, E), _heads(v, E))),
                      f"{name}.proj")
        h = h + o.transpose(1, 2).reshape(N, C, H, W)
        tok = TF.layer_norm(h.flatten(2).transpose(1, 2), (C,), self.U[f"{xname}.norm.weight"],
                            self.U[f"{xname}.norm.bias"], self.ucfg.norm_eps)
        if self.ucfg.query_coords:                   # the queries' position term (unet.query_position_features)
            f = torch.tensor(query_position_features(H, W)).to(tok.dtype)
            tok = tok + f @ self.U[f"{xname}.pos.weight"].T
        q = _heads(self._lin(tok, f"{xname}.q"), E)
        k, v = _heads(self._lin(ctx, f"{xname}.k"), E), _heads(self._lin(ctx, f"{xname}.v"), E)
        o = self._lin(_merge(TF.scaled_dot_product_attention(q, k, v, attn_mask=kmask)), f"{xname}.proj")
        return h + o.transpose(1, 2).reshape(N, C, H, W)

    def _time_embedding(self, t):
        half = self.ucfg.base_channels // 2
        freqs = torch.exp(-math.log(self.ucfg.max_period) * torch.arange(half, dtype=torch.float64) / half)
        args = torch.as_tensor(np.asarray(t), dtype=torch.float64)[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], 1).float()  # (N, base_channels)

    def unet(self, x, t, ctx, mask, pooled):
        """x (N, C, H, W) tensor, t (N,) timesteps, ctx (N, L, D), mask (N, L) bool, pooled (N, D)."""
        cfg = self.ucfg
        kmask = torch.as_tensor(np.asarray(mask))[:, None, None, :]
        emb = self._lin(TF.silu(self._lin(self._time_embedding(t), "time_embed.0")), "time_embed.2")
        emb = TF.silu(emb + self._lin(pooled, "text_embed"))
        nlev = len(cfg.channel_mult)
        if cfg.coord_channels:                       # [x, X, Y], the maps npdiff builds
            N, _, H, W = x.shape
            x = torch.cat([x, torch.tensor(coord_maps(N, H, W), dtype=x.dtype)], 1)
        h = self._conv(x, "conv_in")
        skips = [h]
        for i in range(nlev):
            for j in range(cfg.num_res_blocks):
                h = self._res(h, f"down.{i}.res.{j}", emb)
                if i in cfg.attention_levels:
                    h = self._attn(h, f"down.{i}.attn.{j}", f"down.{i}.xattn.{j}", ctx, kmask)
                skips.append(h)
            if i < nlev - 1:
                h = self._conv(h, f"down.{i}.downsample", stride=2)
                skips.append(h)
        h = self._res(h, "mid.res.0", emb)
        h = self._attn(h, "mid.attn", "mid.xattn", ctx, kmask)
        h = self._res(h, "mid.res.1", emb)
        for i in reversed(range(nlev)):
            for j in range(cfg.num_res_blocks + 1):
                h = self._res(torch.cat([h, skips.pop()], 1), f"up.{i}.res.{j}", emb)
                if i in cfg.attention_levels:
                    h = self._attn(h, f"up.{i}.attn.{j}", f"up.{i}.xattn.{j}", ctx, kmask)
            if i > 0:
                h = self._conv(TF.interpolate(h, scale_factor=2, mode="nearest"), f"up.{i}.upsample")
        return self._conv(TF.silu(self._gn(h, "norm_out")), "conv_out")
