"""Sampling on a CUDA device: what `Pipeline` uses when the kernel backend is "cuda".

    parameters        copied to the device once, when the pipeline first samples
    prompt            tokenized on the host; ids and mask copied in; encoded on the device
    x_T               drawn on the host (the same seeds as on the CPU), copied in once
    sampling loop     U-Net on [x; x], guidance, x0 estimate, sampler update: all on the device
                      (npdiff/nn/cuda_forward.py, npdiff/samplers/device.py)
    x_0               copied out once

img2img, inpainting and `Pipeline.model_fn` keep the host samplers and call `host_model_fn`, which
copies x in and the prediction out once per network evaluation (the forward pass itself stays on
the device). A progress callback that wants the intermediate images costs one copy out per step.

Dimension letters: N batch, L tokens, D text width, C channels, H height, W width.
"""

from __future__ import annotations

import numpy as np

from npdiff.kernels import cuda as K
from npdiff.nn.cuda_forward import text_encoder_forward_device, unet_forward_device, upload
from npdiff.nn.text_encoder import add_phrase_tokens
from npdiff.samplers.device import sample_device


class DeviceModel:
    """A Model whose parameters live on the device: its text encoder and U-Net run there."""

    def __init__(self, model):
        self.model = model
        self.dtype = model.params["unet.conv_in.weight"].dtype
        self.unet_params = upload(model.unet_params)
        self.text_params = upload(model.text_params)

    def encode_text(self, prompts: list[str]):
        """prompts -> (context (N, L + C, D), mask (N, L + C), pooled (N, D)) on the device, C phrase
        tokens (none unless the config asks for them; their small mean is taken on the host)."""
        ids, mask = self.model.tokenizer.encode_batch(prompts, self.model.config.max_length)
        ids, mask = np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=bool)
        V = self.model.config.text_encoder.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise ValueError(f"embedding: token ids must lie in [0, {V}), got range [{ids.min()}, {ids.max()}]; "
                             "is the tokenizer's vocabulary larger than the model's vocab_size?")
        if not mask.any(axis=1).all():
            raise ValueError("text mask: every prompt needs at least one real token (the tokenizer adds BOS)")
        config = self.model.config.text_encoder
        tokens, pooled = text_encoder_forward_device(self.text_params, config, K.to_device(ids), K.to_device(mask))
        if config.phrase_tokens:
            context, mask, _ = add_phrase_tokens(config, K.to_host(tokens), ids, mask)
            tokens = K.to_device(context)
        return tokens, K.to_device(mask), pooled

    def unet(self, x, t, context, mask, pooled):
        """U-Net forward on device arrays; t is one timestep for the whole batch or a host array (N,)."""
        N = x.shape[0]
        t_d = (K.full((N,), float(t), np.float64) if np.ndim(t) == 0
               else K.to_device(np.asarray(t, dtype=np.float64)))
        return unet_forward_device(self.unet_params, self.model.config.unet, x, t_d, context, mask, pooled)

    # -- the guided model function, as Pipeline.model_fn builds it on the host ------------------
    def guided_model_fn(self, prompts: list[str], negative_prompt: str, scales):
        """model_fn(x, t) on device arrays: the U-Net on [x; x] with [prompt; negative] conditioning in
        one call, combined by classifier-free guidance with one scale per image (scales (N,)).
        Returns the prediction's C channels (a learned variance, if any, is dropped)."""
        n = len(prompts)
        scales = np.broadcast_to(np.asarray(scales, dtype=np.float64), (n,))
        context, mask, pooled = self.encode_text(list(prompts) + [negative_prompt] * n)
        C = self.model.config.unet.in_channels

        if np.all(scales == 1.0):  # no guidance: the conditional half only
            def cond_only(x, t):
                out = self.unet(x, t, context[:n], mask[:n], pooled[:n])  # (N, C_out, H, W)
                return out if out.shape[1] == C else K.contiguous(out[:, :C])
            return cond_only

        scales_d = K.to_device(scales.astype(self.dtype))

        def guided(x, t):
            out = self.unet(K.concat([x, x], axis=0), t, context, mask, pooled)  # (2N, C_out, H, W)
            return K.guidance(out, scales_d, C)  # (N, C, H, W)
        return guided

    def host_model_fn(self, prompts: list[str], negative_prompt: str, scales):
        """The same model function for the host samplers: x (N, C, H, W) and t (N,) NumPy arrays in,
        the prediction out (one copy each way per call)."""
        fn = self.guided_model_fn(prompts, negative_prompt, scales)

        def model_fn(x, t):
            t = np.asarray(t)
            t = t.flat[0] if np.all(t == t.flat[0]) else t  # the samplers ask about one t at a time
            return K.to_host(fn(K.to_device(np.asarray(x, dtype=self.dtype)), t))
        return model_fn

    def sample(self, sampler: str, prompts: list[str], negative_prompt: str, scales, x_T: np.ndarray,
               rng: np.random.Generator, schedule, *, steps: int, prediction, clip_x0: bool = True,
               callback=None, copy_steps: bool = False) -> np.ndarray:
        """x_T (N, C, H, W) host array -> x_0 host array, the whole loop on the device.
        callback(i, x_t, x0_pred) per step gets host copies when copy_steps, else None for both."""
        fn = self.guided_model_fn(prompts, negative_prompt, scales)
        step_cb = None
        if callback is not None:
            def step_cb(i, x_t, x0):
                callback(i, *((K.to_host(x_t), K.to_host(x0)) if copy_steps else (None, None)))
        x0 = sample_device(sampler, fn, schedule, K.to_device(x_T.astype(self.dtype, copy=False)), rng,
                           steps=steps, prediction=prediction, clip_x0=clip_x0, callback=step_cb)
        return K.to_host(x0)
