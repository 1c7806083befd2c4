"""Sampling: prompts in, images out; from noise (txt2img), from an image (img2img) or around a kept
region (inpainting and outpainting).

    prompt, negative prompt --text encoder--> two conditionings, encoded once
    x_T ~ N(0, I), one generator per image (seed, seed+1, ...): image i's starting noise depends on
        its own seed only, so a remix with the same seed starts from the same noise
    sampler(model_fn, schedule, x_T) where model_fn runs the U-Net on [x; x] with
        [prompt; negative] conditioning in one call and combines them by classifier-free guidance,
        each image with its own guidance scale (chaos spreads them, see chaos_scales)
    x_0 -> uint8

Dimension letters: N batch, L tokens, D text width, C channels, H height, W width.
"""

from __future__ import annotations

import numpy as np

from npdiff.imaging import from_uint8, to_uint8
from npdiff.model import Model
from npdiff.nn.mode import inference
from npdiff.samplers import get_sampler, img2img, img2img_schedule, repaint_moves, sample_repaint
from npdiff.samplers.guidance import classifier_free_guidance

DEFAULT_SAMPLER = "dpmpp-2m"
DEFAULT_STEPS = 25
DEFAULT_CFG = 3.0
REPAINT_JUMP_LENGTH = 5        # RePaint (Lugmayr et al. 2022, Sec. 4.2): go back up this many steps ...
REPAINT_JUMP_N_SAMPLE = 2      # ... so each block of steps is walked twice and the new region blends in


def chaos_scales(cfg: float, chaos: int, n: int) -> np.ndarray:
    """Per-image guidance scales (n,) for --chaos 0..100.

    Guidance trades diversity for fidelity: at scale 1 an image is an ordinary sample of the
    conditional model, and larger scales push every image toward the prompt's most typical look.
    Chaos undoes that push for some of the batch: the n scales are spread evenly from `cfg` (the
    first image, always faithful) down to cfg - chaos/100 * (cfg - 1) (the last one). At chaos 0
    all images share `cfg`; at chaos 100 the last image is drawn without guidance, so the batch
    ranges from the prompt's typical look to the model's free reading of it.
    """
    frac = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    return 1.0 + (float(cfg) - 1.0) * (1.0 - (chaos / 100.0) * frac)


def initial_noise(seeds: list[int], shape: tuple[int, int, int], dtype=np.float32) -> np.ndarray:
    """One standard normal (C, H, W) per seed -> (N, C, H, W)."""
    return np.stack([np.random.default_rng(s).standard_normal(shape).astype(dtype) for s in seeds])


def _on_cuda() -> bool:
    from npdiff.kernels import backend_name
    return backend_name() == "cuda"


class Pipeline:
    def __init__(self, model: Model):
        self.model = model
        self.schedule = model.config.schedule()
        self.dtype = next(iter(model.params.values())).dtype.type if model.params else np.float32
        self._device_model = None

    def _device(self):
        """The model on the CUDA device (npdiff/cuda_pipeline.py), its parameters copied in once."""
        if self._device_model is None:
            from npdiff.cuda_pipeline import DeviceModel
            self._device_model = DeviceModel(self.model)
        return self._device_model

    # -- the guided model function --------------------------------------------------------------
    def model_fn(self, prompts: list[str], negative_prompt: str, guidance_scale, rescale: float = 0.0):
        """The function samplers call: x (N, C, H, W), t (N,) -> prediction (N, C, H, W).
        guidance_scale: one float, or one per prompt (N,)."""
        n = len(prompts)
        scales = np.broadcast_to(np.asarray(guidance_scale, dtype=np.float64), (n,))
        if _on_cuda() and not rescale:                      # the same function, its forward pass on the device
            return self._device().host_model_fn(prompts, negative_prompt, scales)
        with inference():                                   # no backward follows: keep nothing for one
            context, mask, pooled, _ = self.model.encode_text(list(prompts) + [negative_prompt] * n)

        if np.all(scales == 1.0):                           # no guidance: the conditional half only
            def cond_only(x, t):
                with inference():
                    out, _ = self.model.unet(x, t, context[:n], mask[:n], pooled[:n])
                return out
            return cond_only

        def both(x2, t2):                                   # x2: (2N, C, H, W) = [x; x]
            with inference():
                out, _ = self.model.unet(x2, t2, context, mask, pooled)
            return out

        scale = scales[0] if np.all(scales == scales[0]) else scales.reshape(n, 1, 1, 1).astype(self.dtype)
        return classifier_free_guidance(both, scale, rescale)

    # -- txt2img ---------------------------------------------------------------------------------
    def generate(self, prompts: list[str], *, negative_prompt: str = "", seed: int = 0,
                 steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER, guidance_scale: float = DEFAULT_CFG,
                 chaos: int = 0, width: int | None = None, height: int | None = None, callback=None,
                 progress: bool = True, return_float: bool = False):
        """Draw len(prompts) images from noise -> (N, H, W, 3) uint8 (or x_0 in [-1, 1] when return_float)."""
        res = self.model.config.resolution
        width, height = width or res, height or res
        n = len(prompts)
        x_T = initial_noise([seed + i for i in range(n)], (self.model.config.unet.in_channels, height, width),
                            self.dtype)
        rng = np.random.default_rng([seed, 1])              # the sampler's own noise (ancestral samplers)
        scales = chaos_scales(guidance_scale, chaos, n)
        if _on_cuda():                                      # the whole loop on the device: x_T in, x_0 out
            with _Progress(steps, progress, callback) as cb:
                x0 = self._device().sample(sampler, prompts, negative_prompt, scales, x_T, rng, self.schedule,
                                           steps=steps, prediction=self.model.config.prediction_type,
                                           clip_x0=True, callback=cb, copy_steps=callback is not None)
            return x0 if return_float else to_uint8(x0)
        model_fn = self.model_fn(prompts, negative_prompt, scales)
        with _Progress(steps, progress, callback) as cb:
            x0 = get_sampler(sampler)(model_fn, self.schedule, x_T, rng, steps=steps,
                                      prediction=self.model.config.prediction_type, clip_x0=True, callback=cb)
        return x0 if return_float else to_uint8(x0)

    # -- img2img (SDEdit) --------------------------------------------------------------------------
    def img2img(self, image: np.ndarray, prompts: list[str], *, strength: float, negative_prompt: str = "",
                seed: int = 0, steps: int = DEFAULT_STEPS, sampler: str = DEFAULT_SAMPLER,
                guidance_scale: float = DEFAULT_CFG, chaos: int = 0, callback=None, progress: bool = True,
                return_float: bool = False):
        """Noise `image` (H, W, 3) uint8 to the level `strength` picks and denoise it once per prompt,
        image i with the noise of seed + i -> (N, H, W, 3) uint8."""
        n = len(prompts)
        x0 = np.repeat(from_uint8(image, self.dtype)[None], n, axis=0)      # (N, C, H, W)
        noise = initial_noise([seed + i for i in range(n)], x0.shape[1:], self.dtype)
        rng = np.random.default_rng([seed, 1])
        model_fn = self.model_fn(prompts, negative_prompt, chaos_scales(guidance_scale, chaos, n))
        total = len(img2img_schedule(self.schedule, steps, strength))
        with _Progress(total, progress, callback) as cb:
            out = img2img(sampler, model_fn, self.schedule, x0, rng, strength=strength, steps=steps, noise=noise,
                          prediction=self.model.config.prediction_type, clip_x0=True, callback=cb)
        return out if return_float else to_uint8(out)

    # -- inpainting and outpainting (RePaint) ------------------------------------------------------
    def inpaint(self, image: np.ndarray, keep: np.ndarray, prompts: list[str], *, negative_prompt: str = "",
                seed: int = 0, steps: int = DEFAULT_STEPS, guidance_scale: float = DEFAULT_CFG, chaos: int = 0,
                jump_length: int = REPAINT_JUMP_LENGTH, jump_n_sample: int = REPAINT_JUMP_N_SAMPLE,
                callback=None, progress: bool = True, return_float: bool = False):
        """Keep `image` (H, W, 3) uint8 where `keep` (H, W) is True and draw the rest, once per prompt.
        The U-Net is fully convolutional, so the canvas may be larger than the training images."""
        n = len(prompts)
        known = np.repeat(from_uint8(image, self.dtype)[None], n, axis=0)   # (N, C, H, W)
        keep_mask = np.asarray(keep, dtype=self.dtype)[None, None]          # (1, 1, H, W)
        x_T = initial_noise([seed + i for i in range(n)], known.shape[1:], self.dtype)
        rng = np.random.default_rng([seed, 1])
        model_fn = self.model_fn(prompts, negative_prompt, chaos_scales(guidance_scale, chaos, n))
        total = sum(1 for m in repaint_moves(steps, jump_length, jump_n_sample) if m[0] == "down")
        with _Progress(total, progress, callback) as cb:
            out = sample_repaint(model_fn, self.schedule, x_T, rng, steps=steps, known=known, keep_mask=keep_mask,
                                 jump_length=jump_length, jump_n_sample=jump_n_sample,
                                 prediction=self.model.config.prediction_type, clip_x0=True, callback=cb)
        return out if return_float else to_uint8(out)


class _Progress:
    """A tqdm bar on stderr advanced by the sampler's per-step callback, which it also forwards."""

    def __init__(self, total: int, enabled: bool, callback):
        self.total, self.enabled, self.callback, self.bar = total, enabled, callback, None

    def __enter__(self):
        if self.enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=self.total, unit="step", leave=False, dynamic_ncols=True)
        return self.step

    def step(self, i, x_t, x0_pred):
        if self.bar is not None:
            self.bar.update(1)
        if self.callback is not None:
            self.callback(i, x_t, x0_pred)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
