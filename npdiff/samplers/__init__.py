"""Samplers: functions of a model function, a schedule, a starting x_T and a random generator.

They know nothing of networks. model_fn(x (N, ...), t (N,) int64 original timesteps) returns the
network's prediction (eps, x0 or v; twice the channels on axis 1 with a learned variance).

Common keyword arguments: prediction (Prediction or "eps"/"x0"/"v"), callback(i, x_t, x0_pred) once per
step, clip_x0 (clip the x0 estimate to [-1, 1]), dynamic_threshold (a percentile, Imagen's thresholding).
The DDPM, DDIM and DPM-Solver++ samplers also take spacing ("linspace", "leading", "trailing"); the
Karras samplers (euler, heun, euler-a) take rho instead.
"""

from .common import dynamic_threshold, make_process_x0, respaced
from .ddim import ddim_sigma, ddim_step, sample_ddim
from .ddpm import ddpm_step, sample_ddpm
from .dpm_solver import dpmpp_2m_step, sample_dpmpp_2m
from .editing import img2img, img2img_schedule, repaint_moves, sample_repaint
from .guidance import classifier_free_guidance, guidance_combine
from .karras import (ancestral_sigmas, base_sigmas, euler_step, heun_step, karras_sigmas, karras_timesteps,
                     sample_euler, sample_euler_a, sample_heun)

SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "dpmpp-2m": sample_dpmpp_2m,
    "euler": sample_euler,
    "heun": sample_heun,
    "euler-a": sample_euler_a,
}


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(SAMPLERS)}") from None


def sample(name: str, model_fn, schedule, x_T, rng, steps: int, **kw):
    """Run the sampler registered under `name` (see SAMPLERS) and return x_0."""
    return get_sampler(name)(model_fn, schedule, x_T, rng, steps=steps, **kw)


__all__ = [
    "SAMPLERS", "get_sampler", "sample", "sample_ddpm", "sample_ddim", "sample_dpmpp_2m", "sample_euler",
    "sample_heun", "sample_euler_a", "sample_repaint", "img2img", "img2img_schedule", "repaint_moves",
    "classifier_free_guidance", "guidance_combine", "ddpm_step", "ddim_step", "ddim_sigma", "dpmpp_2m_step",
    "euler_step", "heun_step", "ancestral_sigmas", "karras_sigmas", "karras_timesteps", "base_sigmas",
    "dynamic_threshold", "make_process_x0", "respaced",
]
