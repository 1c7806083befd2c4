"""The U-Net: a directional-derivative check of the whole backward pass in float64 (relative error
<= 1e-6), the parameter naming contract, shapes (non-square, learned variance), dtypes, config
round trips and input errors."""

import json

import numpy as np
import pytest

from npdiff.nn.gradcheck import directional_check
from npdiff.nn.unet import UNetConfig, coord_maps, init_unet, unet_backward, unet_forward

TINY = UNetConfig(in_channels=2, base_channels=4, channel_mult=(1, 2), num_res_blocks=1,
                  attention_levels=(1,), num_heads=2, context_dim=3, num_groups=2)


def perturbed_params(config, rng, scale=0.3):
    """Fresh parameters plus noise: the zero-initialized output convs would otherwise hide most of
    the network from a gradient check."""
    p = init_unet(config, rng, np.float64)
    return {k: v + scale * rng.standard_normal(v.shape) for k, v in p.items()}


def inputs(config, rng, N=2, H=4, W=6, L=3):
    x = rng.standard_normal((N, config.in_channels, H, W))
    t = rng.integers(0, 1000, N)
    ctx = rng.standard_normal((N, L, config.context_dim))
    mask = rng.random((N, L)) < 0.5
    mask[:, 0] = True
    pooled = rng.standard_normal((N, config.context_dim))
    return x, t, ctx, mask, pooled


@pytest.mark.parametrize("config", [
    TINY,
    UNetConfig(in_channels=1, base_channels=4, channel_mult=(1, 1, 2), num_res_blocks=2,
               attention_levels=(0, 2), num_heads=1, context_dim=2, num_groups=2, learn_sigma=True,
               coord_channels=True, query_coords=True),
    # (groups of one channel would make conv1.bias exactly irrelevant: GN2 removes it)
])
def test_unet_directional_derivative(config):
    rng = np.random.default_rng(0)
    p = perturbed_params(config, rng)
    x, t, ctx, mask, pooled = inputs(config, rng, H=4, W=8)
    out, cache = unet_forward(p, config, x, t, ctx, mask, pooled)
    R = rng.standard_normal(out.shape)
    grads, dctx, dpooled = unet_backward(p, config, R, cache)
    names = sorted(p)
    loss = lambda: float(np.sum(unet_forward(p, config, x, t, ctx, mask, pooled)[0] * R))  # noqa: E731
    # all parameters and the differentiable inputs along one random direction ...
    arrays, analytic = [p[k] for k in names] + [ctx, pooled], [grads[k] for k in names] + [dctx, dpooled]
    for along_gradient in (False, True):
        err = directional_check(loss, arrays, analytic, rng, along_gradient=along_gradient)
        assert err <= 1e-6, (along_gradient, err)
    # ... and each parameter on its own, so that one wrong gradient cannot hide among many. A norm
    # bias deep in the network can have a gradient of norm ~1e-4, so that at h = 1e-5 the forward's
    # rounding (~1e-9 of the loss) is a part in 1e5 of the difference; h = 1e-4 puts it far below,
    # while truncation (~h^2) takes over elsewhere. A wrong gradient fails at both steps.
    def check(k):
        return min(directional_check(loss, [p[k]], [grads[k]], rng, h=h, along_gradient=True) for h in (1e-5, 1e-4))
    worst = max((check(k), k) for k in names)
    assert worst[0] <= 1e-6, worst


def test_unet_parameter_names_and_gradients_match():
    rng = np.random.default_rng(1)
    p = init_unet(TINY, rng, np.float32)
    x, t, ctx, mask, pooled = inputs(TINY, rng)
    out, cache = unet_forward(p, TINY, x, t, ctx, mask, pooled)
    grads, _, _ = unet_backward(p, TINY, np.ones_like(out), cache)
    assert set(grads) == set(p)
    for k, v in p.items():
        assert grads[k].shape == v.shape and grads[k].dtype == np.float32, k
    # PyTorch layouts: conv (K, C, R, S), linear (out, in)
    assert p["conv_in.weight"].shape == (4, 2, 3, 3)
    assert p["down.0.downsample.weight"].shape == (4, 4, 3, 3)
    assert p["down.1.res.0.skip.weight"].shape == (8, 4, 1, 1)
    assert p["down.1.res.0.emb.weight"].shape == (16, 16)  # 2 * 8 channels from E = 4 * 4
    assert p["down.1.attn.0.qkv.weight"].shape == (24, 8)
    assert p["down.1.xattn.0.k.weight"].shape == (8, 3)
    assert p["up.0.res.1.conv1.weight"].shape == (4, 8, 3, 3)  # 4 channels + a 4-channel skip
    assert p["time_embed.0.weight"].shape == (16, 4) and p["text_embed.weight"].shape == (16, 3)
    assert "mid.attn.proj.bias" in p and "mid.xattn.q.weight" in p and "mid.res.1.conv2.bias" in p


def test_coord_channels_tell_left_from_right():
    """conv_in sees x, then X (left -1 .. right +1) and Y (top -1 .. bottom +1) at pixel centres."""
    maps = coord_maps(2, 2, 4, np.float64)
    assert maps.shape == (2, 2, 2, 4)
    np.testing.assert_array_equal(maps[1, 0], [[-0.75, -0.25, 0.25, 0.75]] * 2)
    np.testing.assert_array_equal(maps[0, 1], [[-0.5] * 4, [0.5] * 4])
    config = UNetConfig(**{**TINY.to_dict(), "coord_channels": True})
    rng = np.random.default_rng(3)
    p = perturbed_params(config, rng)
    assert p["conv_in.weight"].shape == (4, 4, 3, 3)      # 2 image channels + X, Y
    x, t, ctx, mask, pooled = inputs(config, rng, N=1, H=4, W=8)
    out, cache = unet_forward(p, config, x, t, ctx, mask, pooled)
    # the coordinates enter as two constant input channels: the same as the image channels
    # [x, X, Y] through a network that has no coordinate channels of its own
    wide = UNetConfig(**{**TINY.to_dict(), "in_channels": 4})
    xin = np.concatenate([x, coord_maps(1, 4, 8, np.float64)], axis=1)
    out_wide = unet_forward(p, wide, xin, t, ctx, mask, pooled)[0]
    np.testing.assert_allclose(out, out_wide[:, :2], rtol=0, atol=1e-12)


def test_fresh_unet_predicts_zero_and_keeps_dtype():
    rng = np.random.default_rng(2)
    for dtype in (np.float32, np.float64):
        p = init_unet(TINY, rng, dtype)
        x, t, ctx, mask, pooled = inputs(TINY, rng)
        out, _ = unet_forward(p, TINY, x, t, ctx, mask, pooled)
        assert out.dtype == dtype and out.shape == x.shape
        np.testing.assert_array_equal(out, 0)  # zero-initialized conv_out (ADM)


def test_non_square_and_learned_variance():
    rng = np.random.default_rng(3)
    config = UNetConfig(**{**TINY.to_dict(), "channel_mult": (1, 2, 2), "learn_sigma": True})
    p = perturbed_params(config, rng, 0.1)
    for H, W in [(8, 24), (16, 8), (8, 8)]:
        x, t, ctx, mask, pooled = inputs(config, rng, N=1, H=H, W=W, L=5)
        out, cache = unet_forward(p, config, x, t, ctx, mask, pooled)
        assert out.shape == (1, 4, H, W) and np.all(np.isfinite(out))
        grads, dctx, dpooled = unet_backward(p, config, out, cache)
        assert dctx.shape == ctx.shape and dpooled.shape == pooled.shape
        # padding tokens get no gradient: they never take part
        np.testing.assert_array_equal(dctx[~mask], 0)


def test_config_json_round_trip():
    config = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(2,), learn_sigma=True)
    back = UNetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert back == config and isinstance(back.channel_mult, tuple)
    with pytest.raises(ValueError, match="unknown fields \\['channels'\\]"):
        UNetConfig.from_dict({"channels": 3})


def test_dropout_only_with_rng():
    rng = np.random.default_rng(4)
    config = UNetConfig(**{**TINY.to_dict(), "dropout": 0.5})
    p = perturbed_params(config, rng)
    args = inputs(config, rng)
    a, _ = unet_forward(p, config, *args)
    b, _ = unet_forward(p, config, *args)
    c, _ = unet_forward(p, config, *args, rng=np.random.default_rng(0))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_input_errors_are_clear():
    rng = np.random.default_rng(5)
    p = init_unet(TINY, rng, np.float32)
    x, t, ctx, mask, pooled = inputs(TINY, rng)
    with pytest.raises(ValueError, match="multiples of 2"):
        unet_forward(p, TINY, x[:, :, :3], t, ctx, mask, pooled)
    with pytest.raises(ValueError, match="expected \\(2, 2, H, W\\)|expected \\(N, 2, H, W\\)"):
        unet_forward(p, TINY, x[:, :1], t, ctx, mask, pooled)
    bad = mask.copy()
    bad[1] = False
    with pytest.raises(ValueError, match="at least one real token"):
        unet_forward(p, TINY, x, t, ctx, bad, pooled)
    with pytest.raises(ValueError, match="pooled"):
        unet_forward(p, TINY, x, t, ctx, mask, pooled[:, :2])
    with pytest.raises(ValueError, match="num_groups"):
        init_unet(UNetConfig(base_channels=48), rng)


def test_tiny_unet_overfits_one_batch():
    """Eight 16x16 images with fixed noise and timesteps: AdamW drives the noise-prediction loss
    down at least 100x in 120 steps (measured: about 210x, in 3-4 s on an idle 2-core machine). A wrong
    gradient anywhere shows up here as a stalled or diverging loss."""
    from npdiff.nn import optim
    config = UNetConfig(in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(1,), num_heads=2, context_dim=8, num_groups=4)
    rng = np.random.default_rng(0)
    p = init_unet(config, rng, np.float32)
    N, S = 8, 16
    x0 = np.clip(rng.standard_normal((N, 3, 1, 1)), -1, 1) * np.ones((N, 3, S, S))  # flat colours
    yy, xx = np.mgrid[:S, :S]
    for n in range(N):  # ... each with a disc of the inverted colour
        cy, cx, r = rng.integers(4, 12, 3)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (r / 2 + 2) ** 2
        x0[n][:, disc] *= -1
    noise = rng.standard_normal(x0.shape)
    t = rng.integers(0, 1000, N)
    abar = (np.cos(t / 1000 * np.pi / 2) ** 2)[:, None, None, None]
    x_t = (np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise).astype(np.float32)
    ctx, pooled = rng.standard_normal((N, 4, 8)), rng.standard_normal((N, 8))
    mask = np.ones((N, 4), bool)
    state = optim.adamw_init(p)
    losses = []
    for _ in range(120):
        out, cache = unet_forward(p, config, x_t, t, ctx, mask, pooled)
        diff = out - noise.astype(np.float32)
        losses.append(float(np.mean(diff ** 2)))
        grads, _, _ = unet_backward(p, config, (2.0 / diff.size) * diff, cache)
        optim.adamw_step(p, grads, state, 5e-3)
    assert losses[0] / min(losses[-5:]) >= 100, (losses[0], losses[-5:])


def test_directional_check_catches_one_wrong_entry():
    """A single wrong gradient entry among thousands fails the per-parameter check."""
    rng = np.random.default_rng(6)
    p = perturbed_params(TINY, rng)
    x, t, ctx, mask, pooled = inputs(TINY, rng)
    out, cache = unet_forward(p, TINY, x, t, ctx, mask, pooled)
    R = rng.standard_normal(out.shape)
    grads, _, _ = unet_backward(p, TINY, R, cache)
    loss = lambda: float(np.sum(unet_forward(p, TINY, x, t, ctx, mask, pooled)[0] * R))  # noqa: E731
    name = "up.1.res.0.conv1.weight"
    wrong = grads[name].copy()
    wrong.flat[7] += 0.01 * np.abs(wrong).max()
    assert directional_check(loss, [p[name]], [grads[name]], rng, along_gradient=True) <= 1e-6
    assert directional_check(loss, [p[name]], [wrong], rng, along_gradient=True) > 1e-6


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_inference_mode_same_output_and_no_backward(backend):
    """Inside npdiff.nn.mode.inference() the U-Net gives the same bits and keeps no attention
    probabilities; a backward pass through that cache is a clear error."""
    from npdiff import kernels
    from npdiff.nn.mode import inference, inference_active
    rng = np.random.default_rng(5)
    p = {k: v.astype(np.float32) for k, v in perturbed_params(TINY, rng).items()}
    x, t, ctx, mask, pooled = inputs(TINY, rng)
    previous = kernels.backend_name()
    kernels.set_backend(backend)
    try:
        out, _ = unet_forward(p, TINY, x, t, ctx, mask, pooled)
        assert not inference_active()
        with inference():
            assert inference_active()
            out_i, cache = unet_forward(p, TINY, x, t, ctx, mask, pooled)
        assert not inference_active()
        np.testing.assert_array_equal(out_i, out)
        with pytest.raises(RuntimeError, match="inference"):
            unet_backward(p, TINY, np.ones_like(out_i), cache)
    finally:
        kernels.set_backend(previous)


def test_attention_weight_gradients_reach_every_parameter_and_the_context():
    """unet_backward's dprobs: the gradient of sum(out * R) + sum over cross-attention layers of
    sum(weights * G), as a loss on where attention goes (the grounding loss) needs."""
    from npdiff.nn.unet import cross_attention_maps
    config = UNetConfig(in_channels=1, base_channels=4, channel_mult=(1, 2), num_res_blocks=1,
                        attention_levels=(0, 1), num_heads=2, context_dim=3, num_groups=2, query_coords=True)
    rng = np.random.default_rng(4)
    p = perturbed_params(config, rng)
    x, t, ctx, mask, pooled = inputs(config, rng, H=4, W=4)
    out, cache = unet_forward(p, config, x, t, ctx, mask, pooled)
    maps = cross_attention_maps(cache)
    assert sorted(maps) == ["down.0.xattn.0", "down.1.xattn.0", "mid.xattn", "up.0.xattn.0", "up.0.xattn.1",
                            "up.1.xattn.0", "up.1.xattn.1"]
    assert maps["down.0.xattn.0"][1] == (4, 4) and maps["mid.xattn"][0].shape == (2, 2, 4, 3)
    np.testing.assert_allclose(maps["up.0.xattn.1"][0].sum(axis=-1), 1.0, rtol=1e-12)
    R = rng.standard_normal(out.shape)
    G = {name: rng.standard_normal(P.shape) for name, (P, _) in maps.items()}
    grads, dctx, _ = unet_backward(p, config, R, cache, G)

    def loss():
        o, c = unet_forward(p, config, x, t, ctx, mask, pooled)
        return float(np.sum(o * R) + sum(np.sum(P * G[k]) for k, (P, _) in cross_attention_maps(c).items()))

    names = sorted(p)
    for along_gradient in (False, True):
        err = directional_check(loss, [p[k] for k in names] + [ctx], [grads[k] for k in names] + [dctx], rng,
                                along_gradient=along_gradient)
        assert err <= 1e-6, (along_gradient, err)
    plain, _, _ = unet_backward(p, config, R, cache)
    assert not np.allclose(plain["up.1.xattn.1.q.weight"], grads["up.1.xattn.1.q.weight"])
