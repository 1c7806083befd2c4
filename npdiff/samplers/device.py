"""The sampling loops with their state on a CUDA device: x_t, the x0 estimates and the noise stay
there from x_T to x_0, and the host computes only scalars.

Dimensions: N = batch, "..." = data dimensions.

Once the network's prediction is in hand, every step of the samplers in this package is a fixed
element-wise linear combination of its array arguments, with coefficients that depend on the
schedule and the step only:

    x0     = a x_t + b prediction                              (predict_x0_eps, any Prediction)
    DDIM   x_s = c0 x_t + c1 x0                                 (eta = 0)
    DDPM   x_s = c0 x_t + c1 x0 + c2 z                          (fixed-small variance)
    DPM-Solver++(2M)  x_s = c0 x_t + c1 x0 + c2 x0_last
    Euler, Euler ancestral, Heun on Karras sigmas: likewise in (x, D, z) and (x, D, D_next)

`step_coefficients` reads these coefficients off the host step functions themselves, by calling them
on unit vectors, and the device forms the same combination with one `lincomb` kernel. So this file
holds loops, not formulas: a step's math lives in one place, and tests/cuda_cases.py checks the loops
against the host samplers. The one non-linear operation, clipping the x0 estimate, is its own kernel.

Supported: every sampler in SAMPLERS with its default settings (linspace spacing, DDIM eta = 0,
DPM-Solver++ order 2, DDPM fixed-small variance, Karras rho = 7, Euler-ancestral eta = 1) and
clip_x0; not dynamic thresholding (a per-image quantile). The model's variance channels, if any,
are not used (no default uses them).

Noise: the ancestral samplers draw from the host generator in the host loop's order, shape and
dtype, all draws before the loop and copied in at once; the same seed gives the same noise as on
the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..diffusion.forward import Prediction, as_prediction, predict_x0_eps, x0_eps_from_prediction
from ..diffusion.schedule import Schedule
from ..kernels import cuda as K
from .common import respaced
from .ddim import ddim_step
from .ddpm import ddpm_step
from .dpm_solver import dpmpp_2m_step
from .karras import ancestral_sigmas, euler_step, heun_step, karras_timesteps

DEVICE_SAMPLERS = ("ddpm", "ddim", "dpmpp-2m", "euler", "heun", "euler-a")


def step_coefficients(step, n: int) -> tuple[float, ...]:
    """(c_1, ..., c_n) of an element-wise linear step(a_1, ..., a_n) = sum_j c_j a_j, read by calling
    it on the unit vectors of R^n: argument j is e_j, so component j of the result is c_j."""
    out = np.asarray(step(*np.eye(n)), dtype=np.float64)  # (n,)
    return tuple(float(c) for c in out)


@dataclass
class Denoise:
    """One network evaluation: x_in = scale x (scale None: x itself), prediction = model(x_in, t),
    x0 = a x_in + b prediction, clipped to [-1, 1] when the sampler clips."""
    t: int
    a: float
    b: float
    scale: float | None = None


@dataclass
class Step:
    """One sampler step: a denoise, then x_next = sum of coef * array over `update`, whose names are
    "x", "x0" (this step's estimate), "x0_last" (the previous step's), "noise" (draw `noise`),
    "x0_next" (a second denoise, Heun's, at x_pred = sum over `predictor`)."""
    denoise: Denoise
    update: list[tuple[str, float]]
    noise: int | None = None
    predictor: list[tuple[str, float]] = field(default_factory=list)
    denoise_next: Denoise | None = None


# ----------------------------------------------------------------------------------------------
# plans: every scalar of a loop, computed on the host before it starts


def _vp_denoise(sched: Schedule, i: int, prediction) -> Denoise:
    a, b = step_coefficients(lambda xt, out: predict_x0_eps(sched, xt, i, out, prediction)[0], 2)
    return Denoise(int(sched.timesteps[i]), a, b)


def _vp_plan(name: str, schedule: Schedule, steps: int, prediction) -> tuple[float, list[Step]]:
    """DDPM, DDIM and DPM-Solver++(2M) on the respaced schedule (sample_ddpm, sample_ddim,
    sample_dpmpp_2m). x0 enters each update already clipped: the host steps' process_x0 is
    replaced by calling them with prediction=X0 on the clipped estimate, which is what they do."""
    sched = respaced(schedule, steps, "linspace", prediction)
    x0_kind = Prediction.X0
    plan, last_i, n_noise = [], None, 0
    for i in range(len(sched) - 1, -1, -1):
        noise = None
        if name == "ddim":
            c = step_coefficients(lambda xt, x0: ddim_step(sched, xt, i, x0, prediction=x0_kind)[0], 2)
            update = [("x", c[0]), ("x0", c[1])]
        elif name == "ddpm":
            c = step_coefficients(lambda xt, x0, z: ddpm_step(sched, xt, i, x0, z, prediction=x0_kind)[0], 3)
            update = [("x", c[0]), ("x0", c[1]), ("noise", c[2])]
            if i > 0:  # sample_ddpm draws noise at every step but the last
                noise, n_noise = n_noise, n_noise + 1
        elif last_i is None:  # DPM-Solver++: no history yet, first order
            c = step_coefficients(lambda xt, x0: dpmpp_2m_step(sched, xt, i, x0), 2)
            update = [("x", c[0]), ("x0", c[1])]
        else:
            c = step_coefficients(lambda xt, x0, x0l: dpmpp_2m_step(sched, xt, i, x0, x0l, last_i), 3)
            update = [("x", c[0]), ("x0", c[1]), ("x0_last", c[2])]
        plan.append(Step(_vp_denoise(sched, i, prediction), update, noise))
        last_i = i
    return 1.0, plan


def _karras_denoise(sigma: float, t: int, prediction) -> Denoise:
    scale = float(1.0 / np.sqrt(1.0 + sigma**2))  # alpha_t: the network sees x_vp = alpha_t x
    a, b = step_coefficients(
        lambda xv, out: x0_eps_from_prediction(xv, out, scale, sigma * scale, prediction)[0], 2)
    return Denoise(int(t), a, b, scale)


def _karras_plan(name: str, schedule: Schedule, steps: int, prediction) -> tuple[float, list[Step]]:
    """Euler, Heun and Euler ancestral on Karras sigmas (karras._karras_loop, rho = 7)."""
    sig, ts = karras_timesteps(schedule, steps)
    sig = np.append(sig, 0.0)  # (n + 1,)
    start = float(np.sqrt(1.0 + sig[0] ** 2))  # x_T is variance-preserving: x = x_T / alpha
    plan, n_noise = [], 0
    for k in range(len(ts)):
        s, sn = float(sig[k]), float(sig[k + 1])
        den = _karras_denoise(s, ts[k], prediction)
        if name == "euler":
            c = step_coefficients(lambda x, d: euler_step(x, d, s, sn), 2)
            plan.append(Step(den, [("x", c[0]), ("x0", c[1])]))
        elif name == "euler-a":
            down, up = ancestral_sigmas(s, sn)
            c = step_coefficients(lambda x, d: euler_step(x, d, s, down), 2)  # the deterministic part
            update, noise = [("x", c[0]), ("x0", c[1])], None
            if up > 0:  # sample_euler_a draws only then
                update.append(("noise", up))
                noise, n_noise = n_noise, n_noise + 1
            plan.append(Step(den, update, noise))
        else:  # heun: the correction evaluates the denoiser at the Euler prediction, at the next level
            seen = []

            def redo(y):
                seen.append(np.array(y, dtype=np.float64))  # the Euler prediction, in (x, D, D_next)
                return np.array([0.0, 0.0, 1.0])  # D_next itself
            last = k + 1 == len(ts)  # _karras_loop passes no redo at the last level
            c = step_coefficients(lambda x, d, d2: heun_step(x, d, s, sn, None if last else redo), 3)
            step = Step(den, [("x", c[0]), ("x0", c[1]), ("x0_next", c[2])])
            if seen:
                step.predictor = [("x", float(seen[0][0])), ("x0", float(seen[0][1]))]
                step.denoise_next = _karras_denoise(sn, ts[k + 1], prediction)
            plan.append(step)
    return start, plan


def plan_sampler(name: str, schedule: Schedule, steps: int, prediction) -> tuple[float, list[Step]]:
    """(start, steps): the loop starts from start * x_T and walks the steps."""
    if name not in DEVICE_SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(DEVICE_SAMPLERS)}")
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    prediction = as_prediction(prediction)
    if name in ("euler", "heun", "euler-a"):
        return _karras_plan(name, schedule, steps, prediction)
    return _vp_plan(name, schedule, steps, prediction)


# ----------------------------------------------------------------------------------------------
# the loop, on the device


def _combine(terms, arrays):
    """sum coef * arrays[name], skipping zero coefficients (a step to x_0 keeps only x0)."""
    pairs = [(c, arrays[name]) for name, c in terms if c != 0.0]
    if not pairs:  # cannot happen for a sampler step; keep the shapes right regardless
        return K.lincomb((0.0, arrays["x"]))
    return K.lincomb(*pairs)


def _denoise(model_fn, x, den: Denoise, clip: bool):
    """-> (x0 estimate, the network's input)."""
    x_in = x if den.scale is None else K.lincomb((den.scale, x))
    pred = model_fn(x_in, den.t)
    if tuple(pred.shape) != tuple(x.shape):
        raise ValueError(f"the device model returned shape {tuple(pred.shape)} for a batch {tuple(x.shape)}")
    x0 = K.lincomb((den.a, x_in), (den.b, pred))
    return (K.clip(x0, -1.0, 1.0) if clip else x0), x_in


def sample_device(name: str, model_fn, schedule: Schedule, x_T, rng: np.random.Generator, *, steps: int,
                  prediction=Prediction.EPS, clip_x0: bool = False, callback=None):
    """Run sampler `name` from x_T (N, ...) (a float32 or float64 device array) to x_0, on the device.

    model_fn(x, t) takes a device array (N, ...) and one original timestep t (int) and returns the
    prediction (N, ...) on the device. callback(i, x_t, x0_pred), if given, receives device arrays
    (for the Karras samplers x_t is the network's variance-preserving input, as on the host).
    Returns x_0 as a device array; the result matches get_sampler(name) on the host to rounding.
    """
    if x_T.dtype not in (np.float32, np.float64) or len(x_T.shape) < 2:
        raise ValueError(f"x_T must be a float32 or float64 batch (N, ...), got {x_T.dtype} {tuple(x_T.shape)}")
    start, plan = plan_sampler(name, schedule, steps, prediction)
    n_noise = sum(1 for st in plan if st.noise is not None)
    noises = None
    if n_noise:  # every draw the host loop would make, in its order, copied in once
        shape = tuple(x_T.shape)
        noises = K.to_device(np.stack([rng.standard_normal(shape, dtype=x_T.dtype) for _ in range(n_noise)]))
    x = x_T if start == 1.0 else K.lincomb((start, x_T))
    x0_last = None
    for k, st in enumerate(plan):
        x0, x_in = _denoise(model_fn, x, st.denoise, clip_x0)
        if callback is not None:
            callback(k, x_in, x0)
        arrays = {"x": x, "x0": x0, "x0_last": x0_last}
        if st.noise is not None:
            arrays["noise"] = noises[st.noise]
        if st.denoise_next is not None:
            arrays["x0_next"], _ = _denoise(model_fn, _combine(st.predictor, arrays), st.denoise_next, clip_x0)
        x = _combine(st.update, arrays)
        x0_last = x0
    return x
