"""Pieces every sampler shares: calling the model, processing the x0 estimate, respacing.

Dimensions: N = batch, "..." = data dimensions (C, H, W for images).

A model function is model_fn(x (N, ...), t (N,) int64) -> (N, ...) prediction, or twice the channels on
axis 1 for a learned variance; t are the ORIGINAL 0-based timesteps of the base schedule.
"""

from __future__ import annotations

import numpy as np

from ..diffusion.forward import Prediction, as_prediction
from ..diffusion.reverse import split_model_output
from ..diffusion.schedule import Schedule, respace, space_timesteps


def respaced(schedule: Schedule, steps: int, spacing: str, prediction=None) -> Schedule:
    """The schedule a sampler walks: `steps` steps of `schedule` picked with the given spacing.
    With a prediction given, also checks that it can be converted to x0 at every step."""
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > len(schedule):
        raise ValueError(f"steps={steps} exceeds the {len(schedule)} steps of the schedule")
    sched = respace(schedule, space_timesteps(len(schedule), steps, spacing))
    if prediction is not None and as_prediction(prediction) is Prediction.EPS and sched.alphas_cumprod[-1] == 0:
        raise ValueError("an eps-prediction model cannot start at SNR 0 (a zero-terminal-SNR schedule): x0 "
                         "cannot be recovered from eps there; use a v- or x0-prediction model")
    return sched


def call_model(model_fn, x: np.ndarray, t: int):
    """Evaluate the model at one original timestep t for the whole batch; returns (prediction, variance
    values or None), the prediction in x's dtype."""
    out = np.asarray(model_fn(x, np.full(x.shape[0], int(t), dtype=np.int64)))
    pred, var = split_model_output(out, x)
    return pred.astype(x.dtype, copy=False), var


def dynamic_threshold(x0: np.ndarray, percentile: float = 0.995, max_value: float | None = None) -> np.ndarray:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", Sec. 2.3): per sample, s = the given
    percentile of |x0|, s = max(s, 1); clip x0 to [-s, s] and divide by s. Pixels saturated by a large
    guidance scale are pulled back inside [-1, 1] instead of being clipped flat.
    max_value optionally caps s (diffusers' sample_max_value).
    """
    if not 0.0 < percentile <= 1.0:
        raise ValueError(f"dynamic threshold percentile must be in (0, 1], got {percentile}")
    N = x0.shape[0]
    s = np.quantile(np.abs(x0).reshape(N, -1), percentile, axis=1)  # (N,)
    s = np.maximum(s, 1.0)
    if max_value is not None:
        s = np.minimum(s, max_value)
    s = s.reshape((N,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return np.clip(x0, -s, s) / s


def make_process_x0(clip_x0: bool = False, dynamic_threshold_percentile: float | None = None):
    """The x0 post-processing a sampler applies before using its estimate (None when there is none)."""
    if dynamic_threshold_percentile is not None:
        return lambda x0: dynamic_threshold(x0, dynamic_threshold_percentile)
    if clip_x0:
        return lambda x0: np.clip(x0, -1.0, 1.0)
    return None


def check_start(x_T: np.ndarray) -> np.ndarray:
    x_T = np.asarray(x_T)
    if x_T.ndim < 2 or x_T.dtype not in (np.float32, np.float64):
        raise ValueError(f"x_T must be a float32 or float64 batch (N, ...), got {x_T.dtype} {x_T.shape}")
    return x_T
