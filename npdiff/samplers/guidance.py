"""Classifier-free guidance (Ho & Salimans 2021), with optional guidance rescale (Lin et al. 2023).

Dimensions: N = batch, C = data channels, "..." = data dimensions.

The conditional and the unconditional predictions come from ONE network call on the batch [x; x]: the
caller's batched model function puts the prompt's conditioning on the first half and the empty (or
negative) prompt's on the second. A negative prompt is nothing more than that second conditioning.

    guided = uncond + scale (cond - uncond)

scale = 1 is the conditional model, scale = 0 the unconditional one. A large scale inflates the
prediction's magnitude (over-exposed images); guidance rescale (Lin et al. 2023, "Common diffusion noise
schedules and sample steps are flawed", Sec. 3.4, eq. 15-16) matches the per-sample standard deviation
of the guided prediction to the conditional one, and mixes that with the plain guided prediction:

    rescaled = guided * std(cond) / std(guided);  out = phi rescaled + (1 - phi) guided
"""

from __future__ import annotations

import numpy as np


def _std(a):  # (N, ...) -> (N, 1, ...) standard deviation over all but the batch axis
    axes = tuple(range(1, a.ndim))
    return a.std(axis=axes, keepdims=True)


def guidance_combine(cond, uncond, scale: float, rescale: float = 0.0):
    """Combine conditional and unconditional predictions of the same shape."""
    guided = uncond + scale * (cond - uncond)
    if rescale:
        rescaled = guided * (_std(cond) / _std(guided))
        guided = rescale * rescaled + (1.0 - rescale) * guided
    return guided


def classifier_free_guidance(model_fn_batched, scale: float, rescale: float = 0.0):
    """A model_fn(x, t) that makes one call model_fn_batched([x; x], [t; t]) -> [cond; uncond] and
    returns the guided prediction. If the network also outputs variance channels (2C on axis 1 for C
    data channels), only the prediction channels are guided; the variance is the conditional one's."""
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale phi must be in [0, 1], got {rescale}")

    def model_fn(x, t):
        n, c = x.shape[0], x.shape[1]
        out = np.asarray(model_fn_batched(np.concatenate([x, x]), np.concatenate([t, t])))
        if out.shape[0] != 2 * n:
            raise ValueError(f"the batched model returned {out.shape[0]} rows for a batch of {2 * n}")
        cond, uncond = out[:n], out[n:]
        if out.shape[1] == 2 * c and out.shape[1:] != x.shape[1:]:  # learned variance channels
            guided = guidance_combine(cond[:, :c], uncond[:, :c], scale, rescale)
            return np.concatenate([guided, cond[:, c:]], axis=1).astype(x.dtype, copy=False)
        return guidance_combine(cond, uncond, scale, rescale).astype(x.dtype, copy=False)

    return model_fn
