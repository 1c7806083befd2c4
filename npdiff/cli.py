"""Command line: python -m npdiff {sample, train, ...}.

Every user mistake ends in one line on stderr, "npdiff: error: ...", and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

class UsageError(ValueError):
    """A bad argument or input file, reported in one line with exit code 2."""


def _usage_errors() -> tuple[type[Exception], ...]:
    """Error classes that mean "the user asked for something we cannot do" (exit code 2)."""
    from npdiff.checkpoint import CheckpointError
    from npdiff.imaging import ImageError
    errors = [UsageError, CheckpointError, ImageError]
    from npdiff.data.imagefolder import DataError
    from npdiff.text.prompt import PromptError
    from npdiff.text.tokenizer import TokenizerError
    return tuple(errors) + (DataError, PromptError, TokenizerError)


# ----------------------------------------------------------------------------
# sample

def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="generate a 2x2 grid of images from a prompt",
                       description="Generate images from a text prompt with the shipped model (or --model).")
    p.add_argument("prompt", help='what to draw, e.g. "a red circle on a blue background"')
    p.add_argument("--model", default=None, help="model folder (default: the model shipped in the package)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first image (default: random)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default 25)")
    p.add_argument("--sampler", default=None, help="ddpm, ddim, dpmpp-2m (default), euler, heun, euler-a")
    p.add_argument("--cfg", "--guidance-scale", dest="cfg", type=float, default=None,
                   help="classifier-free guidance scale (default 3; 1 turns guidance off)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from")
    p.add_argument("-n", type=int, default=4, help="number of images (default 4, shown as a 2x2 grid)")
    p.add_argument("--outdir", default="outputs", help="output folder (default ./outputs)")
    p.add_argument("--backend", default=None, help="kernel backend: cpu (default), reference, cuda")
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    import numpy as np

    from npdiff.imaging import make_grid, save_png
    from npdiff.model import DEFAULT_MODEL_DIR, Model
    from npdiff.pipeline import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS, Pipeline
    from npdiff.samplers import SAMPLERS

    sampler = args.sampler or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    if not 1 <= steps <= 1000:
        raise UsageError(f"--steps {steps} is out of range; use 1 to 1000")
    if not 1 <= args.n <= 64:
        raise UsageError(f"-n {args.n} is out of range; use 1 to 64")
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL_DIR
    if args.model is None and not (model_dir / "model.safetensors").is_file():
        raise UsageError("no default model is installed in this copy of npdiff; train one with "
                         "`python -m npdiff train` and pass --model runs/shapes/model")
    outdir = Path(args.outdir)
    _writable_dir(outdir)
    seed = int(np.random.default_rng().integers(0, 2**31 - 1)) if args.seed is None else args.seed

    model = Model.load(model_dir)
    pipe = Pipeline(model)
    images = pipe.generate([args.prompt] * args.n, negative_prompt=args.negative_prompt, seed=seed, steps=steps,
                           sampler=sampler, guidance_scale=DEFAULT_CFG if args.cfg is None else args.cfg)
    start = _next_index(outdir)
    for i, img in enumerate(images):
        path = outdir / f"{start + i:05d}-{seed + i}.png"
        save_png(path, img)
        print(path)
    grid_path = outdir / f"grid-{_next_grid_index(outdir):04d}.png"
    save_png(grid_path, make_grid(images, rows=2 if args.n == 4 else None))
    print(grid_path)
    return 0


def _writable_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create output folder {path} ({e.strerror}); choose another --outdir") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"output folder {path} is not writable; choose another --outdir")


def _next_index(outdir: Path) -> int:
    nums = [int(p.name[:5]) for p in outdir.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")]
    return max(nums, default=-1) + 1


def _next_grid_index(outdir: Path) -> int:
    nums = [int(p.stem[5:]) for p in outdir.glob("grid-[0-9][0-9][0-9][0-9].png")]
    return max(nums, default=-1) + 1


# ----------------------------------------------------------------------------
# train

def add_train(sub) -> None:
    from npdiff.train import TrainArgs
    d = TrainArgs()
    p = sub.add_parser("train", help="train a model from scratch on the CPU",
                       description="Train a text-to-image model on procedural shapes or a folder of captioned images.")
    p.add_argument("--data", default=d.data, help="'shapes' (procedural, default) or a folder with metadata.jsonl "
                                                   "or a .txt caption beside each image")
    p.add_argument("--output-dir", default=d.output_dir, help=f"where checkpoints and the model go (default {d.output_dir})")
    p.add_argument("--resolution", type=int, default=d.resolution, help="image side, a multiple of 8 (default 32)")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps)
    p.add_argument("--max-train-steps", type=int, default=d.max_train_steps)
    p.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=d.use_ema,
                   help="keep an exponential moving average of the weights and export it (default on)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--checkpointing-steps", type=int, default=d.checkpointing_steps)
    p.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint-STEP folder, or 'latest'")
    p.add_argument("--validation-prompts", nargs="*", default=[], help="prompts drawn at every checkpoint")
    p.add_argument("--base-channels", type=int, default=d.base_channels)
    p.add_argument("--channel-mult", default=",".join(map(str, d.channel_mult)), help="e.g. 1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks)
    p.add_argument("--attention-levels", default=",".join(map(str, d.attention_levels)),
                   help="levels with self- and cross-attention, e.g. 1,2 (level i has side resolution/2^i)")
    p.add_argument("--num-groups", type=int, default=d.num_groups, help="group-norm groups")
    p.add_argument("--text-width", type=int, default=d.text_width)
    p.add_argument("--text-layers", type=int, default=d.text_layers)
    p.add_argument("--prediction", choices=["eps", "x0", "v"], default=d.prediction)
    p.add_argument("--beta-schedule", default=d.beta_schedule, help="linear, scaled_linear, cosine, sigmoid")
    p.add_argument("--backend", default=None, help="kernel backend: cpu (default), reference")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from npdiff.train import TrainArgs, TrainingError, train

    if args.resolution % 8 or not 8 <= args.resolution <= 256:
        raise UsageError(f"--resolution {args.resolution} must be a multiple of 8 between 8 and 256")
    for name in ("train_batch_size", "max_train_steps", "checkpointing_steps", "base_channels", "num_res_blocks"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.learning_rate <= 0:
        raise UsageError("--learning-rate must be positive")
    mult = _int_list(args.channel_mult, "--channel-mult", "1,2,2")
    attention = _int_list(args.attention_levels, "--attention-levels", "1,2") if args.attention_levels else ()
    if any(not 0 <= a < len(mult) for a in attention):
        raise UsageError(f"--attention-levels {args.attention_levels} must name levels 0 to {len(mult) - 1}")
    if args.data != "shapes" and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data!r} is neither 'shapes' nor a folder")
    targs = TrainArgs(
        data=args.data, output_dir=args.output_dir, resolution=args.resolution,
        train_batch_size=args.train_batch_size, learning_rate=args.learning_rate,
        lr_warmup_steps=args.lr_warmup_steps, max_train_steps=args.max_train_steps, use_ema=args.use_ema,
        ema_decay=args.ema_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
        checkpointing_steps=args.checkpointing_steps, resume_from_checkpoint=args.resume_from_checkpoint,
        validation_prompts=tuple(args.validation_prompts), base_channels=args.base_channels, channel_mult=mult,
        num_res_blocks=args.num_res_blocks, attention_levels=attention, num_groups=args.num_groups,
        text_width=args.text_width, text_layers=args.text_layers,
        prediction=args.prediction, beta_schedule=args.beta_schedule,
    )
    try:
        from npdiff.nn.unet import UNetConfig
        UNetConfig(base_channels=targs.base_channels, channel_mult=mult, num_res_blocks=targs.num_res_blocks,
                   attention_levels=attention, num_groups=targs.num_groups, context_dim=targs.text_width).validate()
    except ValueError as e:
        raise UsageError(f"the model shape flags do not fit together: {e}") from None
    try:
        final = train(targs)
    except TrainingError as e:
        print(f"npdiff: error: {e}", file=sys.stderr)
        return 1
    print(f"model written to {final}")
    return 0


def _int_list(text: str, flag: str, example: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{flag} {text!r} must be comma-separated integers, e.g. {example}") from None


# ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npdiff", description="Text-to-image diffusion in NumPy and Numba.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_sample(sub)
    add_train(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    errors = _usage_errors()
    try:
        if getattr(args, "backend", None):
            from npdiff.kernels import set_backend
            try:
                set_backend(args.backend)
            except ValueError as e:
                raise UsageError(str(e)) from None
        return args.func(args)
    except errors as e:
        print(f"npdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npdiff: interrupted", file=sys.stderr)
        return 130
