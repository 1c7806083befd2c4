"""Training: captions and images in, a model folder out.

One step (Ho et al. 2020, Algorithm 1, with text conditioning):

    images, captions  <- data            (a caption becomes "" with probability 0.1,
                                           so one network also learns the unconditional
                                           prediction classifier-free guidance needs)
    context, pooled   <- text encoder(tokenizer(captions))
    t ~ U{0..T-1}, noise ~ N(0, I),  x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise
    out               <- U-Net(x_t, t, context, pooled)
    loss, dout        <- objective(out, x0, noise, t)        (eps, x0 or v; min-SNR weights)
                         [+ W grounding loss on the cross-attention weights, grounding.py]
    grads             <- U-Net backward, then text-encoder backward
    clip by global norm, AdamW with warmup + cosine learning rate, EMA of the weights
    (decay min(ema_decay, (1 + step) / (10 + step)), so early averages forget the random init)

Everything random comes from one numpy Generator whose state is saved in each
checkpoint, so a resumed run continues exactly as if it had never stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from npdiff import checkpoint as ckpt
from npdiff import grounding
from npdiff.diffusion.forward import q_sample
from npdiff.diffusion.losses import training_loss
from npdiff.model import PHRASE_SEPARATORS, Model, ModelConfig
from npdiff.nn import optim
from npdiff.nn.text_encoder import TextEncoderConfig
from npdiff.nn.unet import UNetConfig, cross_attention_maps
from npdiff.text.tokenizer import load_tokenizer, train_tokenizer

CAPTION_DROPOUT = 0.1  # probability that a caption is replaced by "" (classifier-free guidance)


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, unusable data)."""


@dataclass
class TrainArgs:
    data: str = "shapes"                  # "shapes" (procedural) or a folder of images with captions
    output_dir: str = "runs/shapes"       # checkpoints, logs, validation grids and the final model
    # the defaults below are the shipped model's recipe (npdiff/weights/, see the README)
    resolution: int = 32                  # image side in pixels (a multiple of 8)
    train_batch_size: int = 32
    learning_rate: float = 1e-3
    lr_warmup_steps: int = 200
    max_train_steps: int = 7000
    use_ema: bool = True
    ema_decay: float = 0.999              # the ceiling; early steps use (1 + step) / (10 + step)
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    checkpointing_steps: int = 500
    resume_from_checkpoint: str | None = None   # a checkpoint folder, or "latest"
    validation_prompts: tuple[str, ...] = ()
    min_snr_gamma: float | None = 5.0     # loss weight min(snr, gamma) on the x0 error (Hang et al. 2023)
    snr_floor: float | None = None        # ... and at least this much (truncated SNR, Salimans & Ho 2022)
    multiscale_snr: bool = False          # each Haar band of the error weighted with its own snr (losses.py)
    # model shape
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_levels: tuple[int, ...] = (1, 2)
    num_groups: int = 32
    coord_channels: bool = True           # conv_in also sees each pixel's x and y (UNetConfig)
    query_coords: bool = True             # cross-attention queries also see their position (UNetConfig)
    text_width: int = 128
    text_layers: int = 2
    text_rel_pos: int = 8                 # text attention's relative position bias reach K (0 = none)
    text_rel_slope: float = 0.5           # its start: heads 0 and 1 read forward / backward (0 = flat)
    phrase_tokens: int = 0                # context also holds one mean feature per "and" phrase, up to this many
    grounding_loss: float = 0.0           # weight of the cross-attention grounding loss (grounding.py; shapes only)
    freeze_text_encoder: bool = False     # keep the text encoder at its random initialization
    text_encoder_lr_scale: float = 1.0    # the text encoder learns at this times the learning rate
    text_embed_std: float = 1.0           # initial scale of the token and position embeddings
    vocab_size: int = 256
    beta_schedule: str = "cosine"
    prediction: str = "v"
    log_every: int = 10


# ----------------------------------------------------------------------------
# data

class ShapesSource:
    """Endless procedural batches from npdiff.data.shapes."""

    def __init__(self, resolution: int):
        from npdiff.data import shapes
        self.shapes = shapes
        self.resolution = resolution

    def captions_for_tokenizer(self, rng: np.random.Generator) -> list[str]:
        return self.shapes.caption_corpus(20000)

    def batch(self, rng: np.random.Generator, n: int, masks: bool = False):
        """-> (images, captions), and with masks each object's coverage (N, 2, H, W) last."""
        if masks:
            images, captions, _, coverage = self.shapes.sample_batch(rng, n, resolution=self.resolution,
                                                                     return_masks=True)
            return images, captions, coverage
        images, captions, _ = self.shapes.sample_batch(rng, n, resolution=self.resolution)
        return images, captions


class FolderSource:
    """Random batches from a folder of captioned images, all held in memory."""

    def __init__(self, path: str, resolution: int):
        from npdiff.data.imagefolder import ImageFolder
        folder = ImageFolder(path, resolution)
        self.images, self.captions = folder.load_all()

    def captions_for_tokenizer(self, rng) -> list[str]:
        return list(self.captions)

    def batch(self, rng: np.random.Generator, n: int):
        idx = rng.integers(0, len(self.captions), size=n)
        return self.images[idx], [self.captions[i] for i in idx]


GROUNDING_NEEDS_SHAPES = ("--grounding-loss needs the objects' masks, which only --data shapes draws; "
                          "pass --grounding-loss 0 for a folder of images")


def make_source(args: TrainArgs):
    if args.data == "shapes":
        return ShapesSource(args.resolution)
    if args.grounding_loss:
        raise TrainingError(GROUNDING_NEEDS_SHAPES)
    return FolderSource(args.data, args.resolution)


# ----------------------------------------------------------------------------
# one step

def train_step(model: Model, args: TrainArgs, schedule, images: np.ndarray, captions: list[str],
               rng: np.random.Generator, masks: np.ndarray | None = None, stats: dict | None = None):
    """Forward, loss and backward for one batch -> (loss, grads with the model's names).

    With args.grounding_loss and the objects' masks (N, 2, H, W), the loss also holds that weight
    times the grounding loss (grounding.py), which `stats`, when given, receives as "grounding"."""
    from npdiff.imaging import from_uint8
    n = images.shape[0]
    drop = rng.random(n) < CAPTION_DROPOUT
    captions = ["" if d else c for d, c in zip(drop, captions)]
    x0 = from_uint8(images, np.float32)                                  # (N, C, H, W)
    t = rng.integers(0, len(schedule), size=n)                           # (N,)
    noise = rng.standard_normal(x0.shape, dtype=np.float32)              # (N, C, H, W)
    x_t = q_sample(schedule, x0, t, noise).astype(np.float32)

    context, mask, pooled, tcache = model.encode_text(captions)
    out, ucache = model.unet(x_t, schedule.timesteps[t], context, mask, pooled)
    loss, dout = training_loss(schedule, out, x0, noise, t, model.config.prediction_type,
                               min_snr_gamma=args.min_snr_gamma, snr_floor=args.snr_floor,
                               multiscale=args.multiscale_snr)
    dprobs = None
    if args.grounding_loss and masks is not None:
        groups = grounding.token_groups(model.tokenizer, captions, model.config.max_length,
                                        model.config.text_encoder.phrase_tokens)
        ground, dprobs = grounding.grounding_loss(cross_attention_maps(ucache), groups, grounding.regions(masks))
        loss = loss + args.grounding_loss * ground
        dprobs = {k: args.grounding_loss * d for k, d in dprobs.items()}
        if stats is not None:
            stats["grounding"] = ground
    ugrads, dcontext, dpooled = model.unet_backward(dout.astype(np.float32), ucache, dprobs)
    grads = {f"unet.{k}": g for k, g in ugrads.items()}
    if not args.freeze_text_encoder:   # frozen: no text gradients, so AdamW leaves those weights alone
        tgrads = model.encode_text_backward(dcontext, dpooled, tcache)
        grads.update({f"text.{k}": g for k, g in tgrads.items()})
    return float(loss), grads


# ----------------------------------------------------------------------------
# checkpoints

def state_files(model: Model, opt_state: dict, ema: dict | None, step: int, rng, args: TrainArgs,
                last_loss: float) -> dict[str, bytes]:
    files = model.folder_files()
    files[ckpt.OPTIMIZER_FILE] = ckpt.tensor_bytes(optim.flatten_state(opt_state))
    if ema is not None:
        files[ckpt.EMA_FILE] = ckpt.tensor_bytes(ema)
    files[ckpt.STATE_FILE] = ckpt.json_bytes({
        "step": step,
        "rng": rng.bit_generator.state,
        "args": _json_args(args),
        "last_loss": last_loss,
        "optimizer_meta": optim.state_meta(opt_state),
    })
    return files


def export_model(model: Model, ema: dict | None, path: Path) -> None:
    """The folder `sample --model` loads: EMA weights when there are some."""
    ckpt.write_folder(path, model.folder_files(ema if ema is not None else model.params))


def resolve_resume(args: TrainArgs) -> Path | None:
    if not args.resume_from_checkpoint:
        return None
    if args.resume_from_checkpoint == "latest":
        return ckpt.latest_checkpoint(args.output_dir)   # None: start fresh, as diffusers does
    path = Path(args.resume_from_checkpoint)
    if not (path / ckpt.STATE_FILE).is_file():
        raise ckpt.CheckpointError(f"{path} is not a training checkpoint (no {ckpt.STATE_FILE}); "
                                   f"pass a checkpoint-STEP folder or 'latest'")
    return path


# ----------------------------------------------------------------------------
# the loop

def model_config(args: TrainArgs) -> ModelConfig:
    """The network a run trains (the text encoder's vocabulary size comes from its tokenizer)."""
    return ModelConfig(
        resolution=args.resolution, beta_schedule=args.beta_schedule, prediction=args.prediction,
        unet=UNetConfig(base_channels=args.base_channels, channel_mult=tuple(args.channel_mult),
                        num_res_blocks=args.num_res_blocks, attention_levels=tuple(args.attention_levels),
                        num_groups=args.num_groups, context_dim=args.text_width,
                        coord_channels=args.coord_channels, query_coords=args.query_coords),
        text_encoder=TextEncoderConfig(width=args.text_width, num_layers=args.text_layers,
                                       rel_pos=args.text_rel_pos, phrase_tokens=args.phrase_tokens),
    )


def build_model(args: TrainArgs, source, rng) -> Model:
    tokenizer = train_tokenizer(source.captions_for_tokenizer(rng), vocab_size=args.vocab_size)
    model = Model.init(model_config(args), tokenizer, rng, text_embed_std=args.text_embed_std,
                       text_rel_slope=args.text_rel_slope)
    if args.phrase_tokens and not model.config.text_encoder.phrase_separators:
        from npdiff.data.imagefolder import DataError
        raise DataError(f"--phrase-tokens {args.phrase_tokens} cuts captions at {' or '.join(map(repr, PHRASE_SEPARATORS))}, "
                        "which the tokenizer trained on these captions does not hold as one word; "
                        "train with --phrase-tokens 0")
    return model


def _load_training_state(resume: Path, model: Model, state: dict, use_ema: bool):
    """(optimizer state, EMA or None) of a checkpoint, each checked against the model's
    parameters, so that a damaged or mismatched file is one CheckpointError, not a traceback."""
    opt_path = resume / ckpt.OPTIMIZER_FILE
    tensors = ckpt.load_tensors(opt_path)
    expected = {f"{kind}.{k}": v for kind in ("m", "v") for k, v in model.params.items()}
    ckpt.check_tensors(tensors, expected, str(opt_path))
    opt_state = optim.unflatten_state(tensors, state["optimizer_meta"])
    ema = None
    if use_ema:
        ema_path = resume / ckpt.EMA_FILE
        if not ema_path.is_file():
            raise ckpt.CheckpointError(f"{resume} has no {ckpt.EMA_FILE} (it was trained without EMA); "
                                       f"resume with --no-use-ema or start a new run")
        ema = ckpt.load_tensors(ema_path)
        ckpt.check_tensors(ema, model.params, str(ema_path))
    return opt_state, ema


# TrainArgs fields a resumed run may change: where it writes, how far it goes and what it reports (and the
# vocabulary size, which comes with the checkpoint's tokenizer). Every other field is the recipe, which a
# resumed run must keep to continue the stopped run exactly.
RUN_CONTROL = ("output_dir", "resume_from_checkpoint", "max_train_steps", "checkpointing_steps",
               "validation_prompts", "log_every", "vocab_size")
_FLAG_NAMES = {"min_snr_gamma": "snr-gamma"}              # fields whose flag is not the field's own name


def recipe_flag(name: str, value) -> str:
    """The `train` flag that sets TrainArgs field `name` to `value`: "--snr-floor 0.15", "--no-use-ema"."""
    flag = "--" + _FLAG_NAMES.get(name, name.replace("_", "-"))
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    if isinstance(value, (list, tuple)):
        return f"{flag} {','.join(map(str, value))}"
    if value is None:                                       # an unset loss weight is the flag's 0
        return f"{flag} 0"
    return f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}"


def _check_same_recipe(resume: Path, state: dict, args: TrainArgs) -> None:
    """A resumed run must train what the stopped run trained, or it would not continue it exactly:
    every recipe flag that differs from the checkpoint's is named, with the value to pass."""
    saved, now = state["args"], _json_args(args)
    differ = [name for name in now if name in saved and name not in RUN_CONTROL and saved[name] != now[name]]
    if differ:
        flags = " ".join(recipe_flag(name, saved[name]) for name in differ)
        raise ckpt.CheckpointError(f"{resume} was trained with other settings; resume with {flags} "
                                   f"or start a new run in another --output-dir")


def _json_args(args: TrainArgs) -> dict:
    """The arguments as a checkpoint's state.json holds them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(args).items()}


def _lr_scale(args: TrainArgs):
    """The per-parameter learning-rate factor for AdamW, or None when every parameter gets lr."""
    if args.text_encoder_lr_scale == 1.0:
        return None
    text = float(args.text_encoder_lr_scale)
    return lambda name: text if name.startswith("text.") else 1.0


def learning_rate(args: TrainArgs, step: int) -> float:
    return optim.warmup_cosine(step, args.learning_rate, args.lr_warmup_steps, args.max_train_steps)


def train(args: TrainArgs, progress: bool = True) -> Path:
    """Run training; returns the folder of the exported model."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = make_source(args)
    resume = resolve_resume(args)
    if resume is not None:
        model = Model.load(resume)
        state = ckpt.load_json(resume / ckpt.STATE_FILE)
        step = int(state["step"])
        rng = np.random.default_rng()
        rng.bit_generator.state = state["rng"]
        opt_state, ema = _load_training_state(resume, model, state, args.use_ema)
        _check_same_recipe(resume, state, args)
        _truncate_log(out / "train_log.jsonl", step)
    else:
        rng = np.random.default_rng(args.seed)
        model = build_model(args, source, rng)
        step = 0
        opt_state = optim.adamw_init(model.params)
        ema = {k: v.copy() for k, v in model.params.items()} if args.use_ema else None
        _truncate_log(out / "train_log.jsonl", 0)

    schedule = model.config.schedule()
    lr_scale = _lr_scale(args)
    last_good = resume
    bar = _progress(args.max_train_steps, step, progress)
    log = open(out / "train_log.jsonl", "a")
    window, ground, tic = [], [], time.perf_counter()
    try:
        while step < args.max_train_steps:
            stats = {}
            if args.grounding_loss:
                images, captions, masks = source.batch(rng, args.train_batch_size, masks=True)
            else:
                (images, captions), masks = source.batch(rng, args.train_batch_size), None
            loss, grads = train_step(model, args, schedule, images, captions, rng, masks, stats)
            if not math.isfinite(loss):
                where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
                raise TrainingError(f"loss became {loss} at step {step + 1}; {where}. "
                                    f"Lower --learning-rate or --max-grad-norm and resume from it.")
            grad_norm = optim.clip_grad_norm(grads, args.max_grad_norm)
            lr = learning_rate(args, step)
            optim.adamw_step(model.params, grads, opt_state, lr=lr, weight_decay=args.weight_decay,
                             lr_scale=lr_scale)
            model.set_params(model.params)
            if ema is not None:
                optim.ema_update(ema, model.params, optim.ema_warmup_decay(step, args.ema_decay))
            step += 1
            window.append(loss)
            if "grounding" in stats:
                ground.append(stats["grounding"])
            if step % args.log_every == 0 or step == args.max_train_steps:
                toc = time.perf_counter()
                rate = len(window) * args.train_batch_size / (toc - tic)
                entry = {"step": step, "loss": float(np.mean(window)), "lr": lr, "grad_norm": grad_norm,
                         "images_per_s": rate}
                if ground:
                    entry["grounding"] = float(np.mean(ground))
                log.write(json.dumps(entry) + "\n")
                log.flush()
                if bar is not None:
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", img_s=f"{rate:.0f}")
                window, ground, tic = [], [], time.perf_counter()
            if bar is not None:
                bar.update(1)
            if step % args.checkpointing_steps == 0 or step == args.max_train_steps:
                path = out / f"checkpoint-{step}"
                ckpt.write_folder(path, state_files(model, opt_state, ema, step, rng, args, loss))
                last_good = path
                if args.validation_prompts:
                    _validate(model, ema, args, out / "validation" / f"step-{step:06d}.png")
    finally:
        log.close()
        if bar is not None:
            bar.close()
    final = out / "model"
    export_model(model, ema, final)
    return final


def _truncate_log(path: Path, step: int) -> None:
    """Keep only log lines up to `step` (a resumed run rewrites what came after)."""
    if not path.exists():
        return
    keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= step]
    ckpt.atomic_write_bytes(path, ("\n".join(keep) + ("\n" if keep else "")).encode())


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _validate(model: Model, ema: dict | None, args: TrainArgs, path: Path) -> None:
    """A grid of one image per validation prompt, from the EMA weights."""
    from npdiff.imaging import make_grid, save_png
    from npdiff.pipeline import Pipeline
    path.parent.mkdir(parents=True, exist_ok=True)
    m = Model(model.config, model.tokenizer, ema if ema is not None else model.params)
    pipe = Pipeline(m)
    images = pipe.generate(list(args.validation_prompts), seed=args.seed, steps=20, progress=False)
    save_png(path, make_grid(images, rows=1, pad=2))
