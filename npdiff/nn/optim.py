"""Optimization: AdamW, an exponential moving average of the weights, gradient clipping by global
norm, and a learning rate with linear warmup and cosine decay.

Everything works on flat dicts of arrays keyed by parameter name and updates in place, so no
array is reallocated between steps. The optimizer state is a plain dict
{"step": int, "m": {name: array}, "v": {name: array}}; `flatten_state` turns it into one flat
dict of arrays ("m.<name>", "v.<name>") for a safetensors file and `state_meta` into JSON.
"""

from __future__ import annotations

import math

import numpy as np


# ----------------------------------------------------------------------------------------------
# AdamW (Loshchilov & Hutter 2019, Algorithm 2; Kingma & Ba 2015 for the moments)


def adamw_init(params: dict[str, np.ndarray]) -> dict:
    """Zero first and second moments, one per parameter, in the parameter's dtype."""
    return {"step": 0,
            "m": {k: np.zeros_like(v) for k, v in params.items()},
            "v": {k: np.zeros_like(v) for k, v in params.items()}}


def default_decay_filter(name: str, param: np.ndarray) -> bool:
    """Weight decay applies to matrices and kernels (ndim >= 2), not to biases or norm scales."""
    return param.ndim >= 2


def adamw_step(params, grads, state, lr, *, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
               decay_filter=default_decay_filter, lr_scale=None):
    """One AdamW update of `params` in place (as torch.optim.AdamW does):

        theta <- theta (1 - lr wd)                     (decoupled weight decay)
        m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2
        theta <- theta - lr / (1 - b1^k) * m / (sqrt(v) / sqrt(1 - b2^k) + eps)

    Parameters without a gradient in `grads` are left alone (frozen). `lr_scale(name)`, when given,
    multiplies lr for that parameter (a parameter group with its own learning rate)."""
    unknown = sorted(set(grads) - set(params))
    if unknown:
        raise ValueError(f"adamw_step: gradients for unknown parameters {unknown[:5]}")
    b1, b2 = float(betas[0]), float(betas[1])
    state["step"] = k = int(state["step"]) + 1
    step_size = float(lr) / (1.0 - b1 ** k)
    rsqrt_bc2 = 1.0 / math.sqrt(1.0 - b2 ** k)
    for name, g in grads.items():
        p, m, v = params[name], state["m"][name], state["v"][name]
        scale = 1.0 if lr_scale is None else float(lr_scale(name))
        if weight_decay and decay_filter(name, p):
            p *= 1.0 - scale * float(lr) * weight_decay
        m *= b1
        m += (1.0 - b1) * g
        v *= b2
        v += (1.0 - b2) * (g * g)
        denom = np.sqrt(v) * rsqrt_bc2
        denom += eps
        p -= scale * step_size * (m / denom)


def flatten_state(state: dict) -> dict[str, np.ndarray]:
    """{"m": {...}, "v": {...}} -> {"m.<name>": .., "v.<name>": ..} for a tensor file."""
    return {**{f"m.{k}": v for k, v in state["m"].items()}, **{f"v.{k}": v for k, v in state["v"].items()}}


def state_meta(state: dict) -> dict:
    """The JSON part of the state (everything but the moment arrays)."""
    return {"step": int(state["step"])}


def unflatten_state(tensors: dict[str, np.ndarray], meta: dict) -> dict:
    """Inverse of flatten_state + state_meta."""
    state = {"step": int(meta["step"]), "m": {}, "v": {}}
    for key, arr in tensors.items():
        kind, _, name = key.partition(".")
        if kind not in ("m", "v") or not name:
            raise ValueError(f"optimizer state has an unexpected tensor {key!r} (expected 'm.*' or 'v.*')")
        state[kind][name] = arr
    if set(state["m"]) != set(state["v"]):
        raise ValueError("optimizer state: first and second moments name different parameters: "
                         f"{sorted(set(state['m']) ^ set(state['v']))[:5]}")
    return state


# ----------------------------------------------------------------------------------------------
# gradient clipping, EMA, learning rate


def global_norm(grads: dict[str, np.ndarray]) -> float:
    """sqrt(sum over all gradients of their squared entries), accumulated in float64."""
    return math.sqrt(sum(float(np.dot(g.ravel().astype(np.float64, copy=False),
                                      g.ravel().astype(np.float64, copy=False))) for g in grads.values()))


def clip_grad_norm(grads: dict[str, np.ndarray], max_norm: float) -> float:
    """Scale all gradients in place so their global norm is at most max_norm (Pascanu et al.
    2013), as torch.nn.utils.clip_grad_norm_: factor min(1, max_norm / (norm + 1e-6)).
    Returns the norm before clipping; a non-finite norm is returned untouched for the caller to
    handle."""
    norm = global_norm(grads)
    if math.isfinite(norm) and max_norm is not None and max_norm > 0:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            for g in grads.values():
                g *= coef
    return norm


def ema_init(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The EMA starts as a copy of the weights."""
    return {k: v.copy() for k, v in params.items()}


def ema_update(ema: dict[str, np.ndarray], params: dict[str, np.ndarray], decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place (Polyak averaging; Ho et al. 2020 use
    decay 0.9999)."""
    for k, p in params.items():
        e = ema[k]
        e *= decay
        e += (1.0 - decay) * p


def ema_warmup_decay(step: int, max_decay: float) -> float:
    """min(max_decay, (1 + step) / (10 + step)): a short effective horizon early in training, so
    the average is not dominated by the random initialization."""
    return min(max_decay, (1.0 + step) / (10.0 + step))


def warmup_cosine(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Learning rate for the 0-based update `step`: linear warmup to base_lr over warmup_steps
    (step 0 already gets base_lr / warmup_steps, never 0), then half a cosine down to min_lr at
    total_steps (Loshchilov & Hutter 2017, without restarts); min_lr after that."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
