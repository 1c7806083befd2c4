"""AdamW, clipping, EMA and the learning-rate schedule against their closed forms (exact to
float64 rounding), plus a state round trip. PyTorch parity for AdamW is in test_torch_parity.py."""

import math

import numpy as np
import pytest

from npdiff.nn import optim


def adamw_closed_form(p0, gs, lr, b1, b2, eps, wd):
    """AdamW written out from the paper's Algorithm 2, one step at a time, in float64."""
    p, m, v = p0.copy(), 0 * p0, 0 * p0
    for k, g in enumerate(gs, start=1):
        p = p * (1 - lr * wd)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** k), v / (1 - b2 ** k)
        p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p


def test_adamw_matches_closed_form():
    rng = np.random.default_rng(0)
    params = {"w": rng.standard_normal((3, 4)), "b": rng.standard_normal(4)}
    p0 = {k: v.copy() for k, v in params.items()}
    gs = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(5)]
    state = optim.adamw_init(params)
    for g in gs:
        optim.adamw_step(params, g, state, 1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    assert state["step"] == 5
    np.testing.assert_allclose(params["w"], adamw_closed_form(p0["w"], [g["w"] for g in gs],
                                                              1e-2, 0.8, 0.95, 1e-6, 0.1), rtol=1e-12)
    # the bias is not decayed by the default filter
    np.testing.assert_allclose(params["b"], adamw_closed_form(p0["b"], [g["b"] for g in gs],
                                                              1e-2, 0.8, 0.95, 1e-6, 0.0), rtol=1e-12)


def test_adamw_first_step_moves_each_entry_by_lr():
    """With bias correction the first step is lr * g / (|g| + eps): lr * sign(g)."""
    params = {"w": np.zeros(5, np.float32)}
    g = {"w": np.array([3.0, -2.0, 0.5, -1e-3, 7.0], np.float32)}
    optim.adamw_step(params, g, optim.adamw_init(params), 0.1, eps=0.0)
    assert params["w"].dtype == np.float32
    np.testing.assert_allclose(params["w"], -0.1 * np.sign(g["w"]), rtol=1e-6)


def test_adamw_lr_scale_is_a_parameter_group_with_its_own_lr():
    """lr_scale(name) = s gives that parameter exactly the closed form at s * lr, decay included."""
    rng = np.random.default_rng(2)
    params = {"text.w": rng.standard_normal((2, 3)), "unet.w": rng.standard_normal((3, 2))}
    p0 = {k: v.copy() for k, v in params.items()}
    gs = [{k: rng.standard_normal(v.shape) for k, v in params.items()} for _ in range(4)]
    state = optim.adamw_init(params)
    for g in gs:
        optim.adamw_step(params, g, state, 1e-2, weight_decay=0.1,
                         lr_scale=lambda name: 0.25 if name.startswith("text.") else 1.0)
    for name, lr in (("text.w", 2.5e-3), ("unet.w", 1e-2)):
        np.testing.assert_allclose(params[name], adamw_closed_form(p0[name], [g[name] for g in gs],
                                                                   lr, 0.9, 0.999, 1e-8, 0.1), rtol=1e-12)


def test_state_round_trip_and_frozen_parameters():
    rng = np.random.default_rng(1)
    params = {"a.weight": rng.standard_normal((2, 2)), "b": rng.standard_normal(3)}
    state = optim.adamw_init(params)
    optim.adamw_step(params, {"a.weight": np.ones((2, 2))}, state, 0.1)  # "b" has no gradient
    before_b = params["b"].copy()
    back = optim.unflatten_state(optim.flatten_state(state), optim.state_meta(state))
    assert back["step"] == 1 and set(optim.flatten_state(state)) == {"m.a.weight", "m.b", "v.a.weight", "v.b"}
    for kind in ("m", "v"):
        for k in params:
            np.testing.assert_array_equal(back[kind][k], state[kind][k])
    np.testing.assert_array_equal(params["b"], before_b)
    with pytest.raises(ValueError, match="unknown parameters"):
        optim.adamw_step(params, {"zzz": np.ones(1)}, state, 0.1)
    with pytest.raises(ValueError, match="unexpected tensor"):
        optim.unflatten_state({"w.x": np.ones(1)}, {"step": 0})


def test_clip_grad_norm():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert optim.clip_grad_norm(grads, 10.0) == 5.0
    np.testing.assert_array_equal(grads["a"], [3.0, 0.0])  # below the limit: untouched
    assert optim.clip_grad_norm(grads, 1.0) == 5.0
    assert math.isclose(optim.global_norm(grads), 1.0, rel_tol=1e-6)
    np.testing.assert_allclose(grads["b"], [[0.8]], rtol=1e-6)
    bad = {"a": np.array([np.inf, 1.0])}
    assert math.isinf(optim.clip_grad_norm(bad, 1.0)) and bad["a"][1] == 1.0


def test_ema():
    params = {"w": np.array([1.0, 2.0])}
    ema = optim.ema_init(params)
    params["w"][:] = [3.0, 6.0]
    optim.ema_update(ema, params, 0.75)
    np.testing.assert_allclose(ema["w"], [1.5, 3.0])
    assert ema["w"] is not params["w"]
    assert optim.ema_warmup_decay(0, 0.999) == 0.1 and optim.ema_warmup_decay(10**7, 0.999) == 0.999


def test_warmup_cosine():
    lr = lambda s: optim.warmup_cosine(s, 1.0, 10, 110, min_lr=0.1)  # noqa: E731
    assert lr(0) == 0.1 and lr(4) == 0.5 and lr(9) == 1.0
    assert lr(10) == 1.0
    assert math.isclose(lr(60), 0.55)  # halfway through the cosine
    assert math.isclose(lr(110), 0.1) and math.isclose(lr(500), 0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 120))
    assert optim.warmup_cosine(0, 2.0, 0, 100) == 2.0
