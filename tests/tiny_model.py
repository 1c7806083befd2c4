"""A tiny random model folder for command-line and pipeline tests: fast, and independent of the
shipped weights. Its images are noise-like, which is all these tests need: they check plumbing,
provenance and determinism, not picture quality."""

from pathlib import Path

import numpy as np

from npdiff.data.shapes import caption_corpus
from npdiff.model import Model, ModelConfig
from npdiff.nn.text_encoder import TextEncoderConfig
from npdiff.nn.unet import UNetConfig
from npdiff.text.tokenizer import train_tokenizer


def tiny_model(seed: int = 0, resolution: int = 16) -> Model:
    tokenizer = train_tokenizer(caption_corpus(300, seed=0), vocab_size=128)
    config = ModelConfig(resolution=resolution, max_length=16,
                         unet=UNetConfig(base_channels=8, channel_mult=(1, 2), attention_levels=(1,), num_groups=4,
                                         context_dim=16, num_heads=2),
                         text_encoder=TextEncoderConfig(width=16, num_layers=1))
    rng = np.random.default_rng(seed)
    model = Model.init(config, tokenizer, rng)
    # the U-Net's output convolution and residual branches start at zero (ADM); fill them so that the
    # prompt, the seed and every setting visibly change the pixels
    params = {k: (rng.normal(0.0, 0.3, v.shape).astype(v.dtype) if not v.any() else v) for k, v in model.params.items()}
    model.set_params(params)
    return model


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    tiny_model(seed).save(folder)
    return folder
