"""The text-to-image model: tokenizer + text encoder + U-Net + diffusion schedule.

    prompt --tokenizer--> ids (N, L) --text encoder--> context (N, L [+ C phrases], D), pooled (N, D)
    (x_t, t, context, pooled) --U-Net--> prediction (eps, x0 or v)

This file holds the pieces together and moves them to and from a model folder
(see checkpoint.py). Training (train.py) and sampling (pipeline.py) both use it.

Dimension letters: N batch, L tokens, D text width, C channels, H height, W width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npdiff import checkpoint as ckpt
from npdiff.diffusion.forward import Prediction
from npdiff.diffusion.schedule import Schedule
from npdiff.nn.text_encoder import (TextEncoderConfig, add_phrase_tokens, add_phrase_tokens_backward,
                                    init_text_encoder, text_encoder_backward, text_encoder_forward)
from npdiff.nn.unet import UNetConfig, init_unet, unet_backward, unet_forward
from npdiff.text.tokenizer import Tokenizer, load_tokenizer

FORMAT = "npdiff-model"
PHRASE_SEPARATORS = ("and",)   # words that end a phrase, for TextEncoderConfig.phrase_tokens
DEFAULT_MODEL_DIR = Path(__file__).parent / "weights"


@dataclass
class ModelConfig:
    resolution: int = 32                 # training side length in pixels; sampling may use other multiples of 8
    max_length: int = 24                 # tokens per prompt, [BOS] included; longer prompts are truncated
    beta_schedule: str = "cosine"        # see diffusion/schedule.py
    num_timesteps: int = 1000            # T of the base process
    prediction: str = "v"                # what the U-Net predicts: "eps", "x0" or "v"
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)

    def to_dict(self) -> dict:
        d = {k.name: getattr(self, k.name) for k in dataclasses.fields(self) if k.name not in ("unet", "text_encoder")}
        return {"format": FORMAT, **d, "unet": self.unet.to_dict(), "text_encoder": self.text_encoder.to_dict()}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        if d.get("format") != FORMAT:
            raise ckpt.CheckpointError(f"config.json has format {d.get('format')!r}, expected {FORMAT!r}")
        nested = ("unet", "text_encoder")
        plain = {k.name: d[k.name] for k in dataclasses.fields(cls) if k.name in d and k.name not in nested}
        return cls(**plain, unet=UNetConfig.from_dict(d["unet"]),
                   text_encoder=TextEncoderConfig.from_dict(d["text_encoder"]))

    def validate(self) -> None:
        """Raise ValueError (or TypeError, for a value of the wrong kind) unless this config describes a
        model that can be built: a hand-edited or damaged config.json is caught here, not mid-sample."""
        for name in ("resolution", "max_length", "num_timesteps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive whole number, not {value!r}")
        if self.resolution % 8:
            raise ValueError(f"resolution {self.resolution} is not a multiple of 8")
        if self.prediction not in ("eps", "x0", "v"):
            raise ValueError(f"prediction {self.prediction!r} is not one of eps, x0, v")
        self.schedule()
        self.unet.validate()
        self.text_encoder.validate()

    @property
    def prediction_type(self) -> Prediction:
        return {"eps": Prediction.EPS, "x0": Prediction.X0, "v": Prediction.V}[self.prediction]

    def schedule(self) -> Schedule:
        return Schedule.from_name(self.beta_schedule, self.num_timesteps)


def split_params(params: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """{"unet.a": .., "text.b": ..} -> ({"a": ..}, {"b": ..})."""
    unet = {k[5:]: v for k, v in params.items() if k.startswith("unet.")}
    text = {k[5:]: v for k, v in params.items() if k.startswith("text.")}
    return unet, text


def join_params(unet: dict, text: dict) -> dict[str, np.ndarray]:
    return {**{f"unet.{k}": v for k, v in unet.items()}, **{f"text.{k}": v for k, v in text.items()}}


class Model:
    """A loaded model: config, tokenizer and one flat parameter dict ("unet.*", "text.*")."""

    def __init__(self, config: ModelConfig, tokenizer: Tokenizer, params: dict[str, np.ndarray]):
        self.config = config
        self.tokenizer = tokenizer
        self.params = params
        self.unet_params, self.text_params = split_params(params)

    # -- construction ---------------------------------------------------------
    @classmethod
    def init(cls, config: ModelConfig, tokenizer: Tokenizer, rng: np.random.Generator, dtype=np.float32,
             text_embed_std: float = 0.02, text_rel_slope: float = 0.0) -> "Model":
        config.text_encoder.vocab_size = tokenizer.vocab_size
        config.text_encoder.max_length = config.max_length
        if config.text_encoder.phrase_tokens:
            config.text_encoder.phrase_separators = tuple(
                i for i in map(tokenizer.word_id, PHRASE_SEPARATORS) if i is not None)
        params = join_params(init_unet(config.unet, rng, dtype),
                             init_text_encoder(config.text_encoder, rng, dtype, embed_std=text_embed_std,
                                               rel_slope=text_rel_slope))
        return cls(config, tokenizer, params)

    def expected_shapes(self) -> dict[str, np.ndarray]:
        """Zero-size stand-ins with the shapes the config implies (for checking a checkpoint)."""
        rng = np.random.default_rng(0)
        ref = join_params(init_unet(self.config.unet, rng, np.float32),
                          init_text_encoder(self.config.text_encoder, rng, np.float32))
        return ref

    # -- folders --------------------------------------------------------------
    def folder_files(self, params: dict[str, np.ndarray] | None = None) -> dict[str, bytes]:
        return {
            ckpt.MODEL_FILE: ckpt.tensor_bytes(params if params is not None else self.params),
            ckpt.CONFIG_FILE: ckpt.json_bytes(self.config.to_dict()),
            ckpt.TOKENIZER_FILE: self.tokenizer.to_str().encode(),
        }

    def save(self, path) -> None:
        ckpt.write_folder(path, self.folder_files())

    @classmethod
    def load(cls, path=DEFAULT_MODEL_DIR, weights_file: str = ckpt.MODEL_FILE, dtype=np.float32) -> "Model":
        path = Path(path)
        if not path.is_dir():
            raise ckpt.CheckpointError(f"model folder {path} does not exist; "
                                       "pass --model with a folder made by `npdiff train`")
        raw = ckpt.load_json(path / ckpt.CONFIG_FILE)
        try:
            config = ModelConfig.from_dict(raw)
            config.validate()
            expected = cls(config, None, {}).expected_shapes()
        except ckpt.CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path / ckpt.CONFIG_FILE} is missing or has a wrong field ({e}); "
                                       "re-save the model") from None
        tok_path = path / ckpt.TOKENIZER_FILE
        if not tok_path.is_file():
            raise ckpt.CheckpointError(f"{tok_path} does not exist; a model folder needs its tokenizer.json")
        tokenizer = load_tokenizer(tok_path)
        if tokenizer.vocab_size != config.text_encoder.vocab_size:
            raise ckpt.CheckpointError(f"{tok_path} has {tokenizer.vocab_size} tokens, {path / ckpt.CONFIG_FILE} "
                                       f"expects {config.text_encoder.vocab_size}; use the tokenizer.json saved with "
                                       "this model")
        params = ckpt.load_tensors(path / weights_file)
        ckpt.check_tensors(params, expected, str(path / weights_file))
        params = {k: v.astype(dtype, copy=False) for k, v in params.items()}
        return cls(config, tokenizer, params)

    # -- the two networks -----------------------------------------------------
    def encode_text(self, prompts: list[str]):
        """prompts -> context (N, L + C, D), mask (N, L + C), pooled (N, D), cache; C is the number of
        phrase tokens (text_encoder.py), 0 unless the config asks for them."""
        ids, mask = self.tokenizer.encode_batch(prompts, self.config.max_length)
        tokens, pooled, cache = text_encoder_forward(self.text_params, self.config.text_encoder, ids, mask)
        context, mask, P = add_phrase_tokens(self.config.text_encoder, tokens, ids, mask)
        return context, mask, pooled, (cache, P)

    def encode_text_backward(self, dcontext, dpooled, cache) -> dict[str, np.ndarray]:
        cache, P = cache
        dtokens = add_phrase_tokens_backward(dcontext, P)
        return text_encoder_backward(self.text_params, self.config.text_encoder, dtokens, dpooled, cache)

    def unet(self, x, t, context, mask, pooled):
        """x (N, C, H, W), t (N,) original 0-based timesteps -> prediction, cache."""
        return unet_forward(self.unet_params, self.config.unet, x, t, context, mask, pooled)

    def unet_backward(self, dout, cache, dprobs=None):
        return unet_backward(self.unet_params, self.config.unet, dout, cache, dprobs)

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        self.params = params
        self.unet_params, self.text_params = split_params(params)

    def num_parameters(self) -> int:
        return int(sum(v.size for v in self.params.values()))
