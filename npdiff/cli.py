"""Command line: python -m npdiff {sample, vary, remix, inpaint, zoom-out, pan, upscale, explain, train, eval}.

Every user mistake ends in one line on stderr, "npdiff: error: ...", and exit code 2, and is found
before anything is written: inputs are read and checked, the model loaded and the output folder
probed first; files are written only once every image is drawn, each under a fresh name.
"""

from __future__ import annotations

import argparse
import math
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
    from npdiff.provenance import RecipeError
    from npdiff.text.tokenizer import TokenizerError
    return tuple(errors) + (DataError, PromptError, TokenizerError, RecipeError)


# ----------------------------------------------------------------------------
# options shared by every command that draws images

SIZE_HELP = ("sides are multiples of 8 from 16 to 128 and at most 4x the model's training pixel count "
             "(4096 for the 32x32 default model); --ar keeps the training pixel count, so ratios up to "
             "about 4:1 fit")
CHAOS_HELP = ("0-100: how different the images of one batch are. Chaos spreads the guidance scales: the "
              "first image keeps --cfg, the last gets cfg - chaos/100*(cfg-1), so at 100 it is drawn "
              "without guidance and wanders furthest from the prompt's typical look (default 0)")


class _Parser(argparse.ArgumentParser):
    """argparse with npdiff's one-line errors (no usage dump) and exit code 2."""

    def error(self, message):
        print(f"npdiff: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _add_drawing_args(p, n_default: int | None = None, parent: bool = False) -> None:
    inherit = " (default: the parent's)" if parent else ""
    p.add_argument("--model", default=None, help="model folder (default: the model shipped in the package)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the first image; image i uses seed+i (default: random)")
    p.add_argument("--steps", type=int, default=None, help=f"sampler steps, 1-1000 (default {25}){inherit}")
    p.add_argument("--sampler", default=None, help=f"ddpm, ddim, dpmpp-2m (default), euler, heun, euler-a{inherit}")
    p.add_argument("--cfg", "--guidance-scale", dest="cfg", type=float, default=None,
                   help=f"classifier-free guidance scale, 0-30 (default 3; 1 turns guidance off){inherit}")
    p.add_argument("--negative-prompt", default=None, help=f"what to steer away from (inline: --no a, b){inherit}")
    p.add_argument("--chaos", type=int, default=None, help=CHAOS_HELP)
    p.add_argument("-n", type=int, default=None,
                   help=f"number of images, 1-64 (default {n_default or 4}; 4 are shown as a 2x2 grid)")
    p.add_argument("--outdir", default="outputs", help="output folder (default ./outputs); files are never overwritten")
    p.add_argument("--backend", default=None, help="kernel backend: cpu (default), reference, cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar (there is none when stderr is not a terminal)")


def _add_parent_prompt(p) -> None:
    p.add_argument("--prompt", default=None, help="the prompt to use instead of the parent's (needed for an image "
                                                  "npdiff did not make); inline parameters allowed")


# ----------------------------------------------------------------------------
# sample

def add_sample(sub) -> None:
    p = sub.add_parser("sample", help="draw a 2x2 grid of images from a prompt",
                       description="Draw images from a text prompt. Settings may also follow the prompt, "
                                   "Midjourney style: \"a red circle --ar 3:2 --seed 7 --no blue --chaos 30\" "
                                   "(inline --ar, --seed, --steps, --sampler, --cfg, --no, --chaos, --n, --backend). "
                                   "Writes {n:05}-{seed}.png per image and grid-{n:04}.png to --outdir and prints "
                                   "their paths.")
    p.add_argument("prompt", nargs="?", default=None, help='what to draw, e.g. "a red circle on a blue background"')
    p.add_argument("--ar", default=None, help=f"aspect ratio W:H, e.g. 3:2; {SIZE_HELP}")
    p.add_argument("--from", dest="from_image", default=None, metavar="IMAGE.png",
                   help="re-create an image (or grid) npdiff made, from the recipe in its metadata")
    p.add_argument("--trajectory", default=None, metavar="OUT.gif",
                   help="also write the denoising as an animated GIF: x_t (left) and the predicted x_0 (right) "
                        "per step")
    _add_drawing_args(p)
    p.set_defaults(func=cmd_sample)


def cmd_sample(args) -> int:
    if args.from_image:
        return _recreate(args)
    if args.prompt is None:
        raise UsageError("sample needs a prompt, e.g. npdiff sample \"a red circle\", or --from IMAGE.png")
    from npdiff.recipes import new_recipe, size_for_ratio
    from npdiff.text.prompt import _ratio

    prompt, s = _settings(args, args.prompt, extra=("ar",))
    loaded = _load_model(args.model)
    res = loaded.model.config.resolution
    width = height = res
    if s.get("ar") is not None:
        ar = s["ar"] if isinstance(s["ar"], tuple) else _ratio("ar", s["ar"])
        width, height = size_for_ratio(*ar, res)
    _check_outdir(Path(args.outdir))
    if args.trajectory:
        _check_output_file(Path(args.trajectory), ".gif", "--trajectory")
    recipe = new_recipe("sample", prompt=prompt, width=width, height=height, **_common(s, loaded))
    return _make_and_write(args, loaded, recipe, trajectory=args.trajectory)


def _recreate(args) -> int:
    """sample --from IMAGE: follow the recipe in IMAGE's metadata and write what it makes."""
    from npdiff.imaging import read_image
    from npdiff.kernels import backend_name, set_backend
    from npdiff.provenance import read_recipe

    given = [f for f in ("prompt", "seed", "steps", "sampler", "cfg", "negative_prompt", "chaos", "n", "ar")
             if getattr(args, f) is not None]
    if given:
        raise UsageError(f"--from takes every setting from the image's recipe; drop {', '.join(given)} "
                         "(use remix or vary to change an image)")
    source = Path(args.from_image)
    _, chunks = read_image(source)
    recipe = read_recipe(chunks, str(source))
    loaded = _load_model(args.model)
    if loaded.hash != recipe["model_hash"]:
        raise UsageError(f"{source} was made by the model with hash {recipe['model_hash']}, and the model loaded has "
                         f"hash {loaded.hash}; pass --model with the folder of the model that made it")
    if args.backend is None and backend_name() != recipe["backend"]:
        try:
            set_backend(recipe["backend"])
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"{source} was made on the {recipe['backend']!r} backend, which is not available "
                             f"here ({e}); pass --backend to re-make it on another (the pixels may then differ)"
                             ) from None
    recipe = {**recipe, "backend": backend_name()}       # the new image records where it was made
    _check_outdir(Path(args.outdir))
    if args.trajectory:
        _check_output_file(Path(args.trajectory), ".gif", "--trajectory")
    paths = _make_and_write(args, loaded, recipe, only=recipe["index"], trajectory=args.trajectory, quiet_paths=True)
    for p in paths:
        print(p)
    if Path(paths[0]).read_bytes() == source.read_bytes():
        print(f"identical to {source}", file=sys.stderr)
        return 0
    import numpy as np
    made, original = read_image(paths[0])[0].astype(np.int16), read_image(source)[0].astype(np.int16)
    levels = int(np.abs(made - original).max()) if made.shape == original.shape else None
    differ = ("the pixels are the same, the file bytes are not" if levels == 0 else
              f"pixels differ by up to {levels} of 255 levels" if levels is not None else "the size differs")
    print(f"NOT identical to {source}: {differ} (a different backend, dtype or npdiff version rounds differently)",
          file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------
# Midjourney's verbs: edits of an existing image

def add_verbs(sub) -> None:
    p = sub.add_parser("vary", help="variations of an image (img2img from it and its recipe)",
                       description="Variations of IMAGE: noise it part way and denoise it again with its own "
                                   "prompt and settings (img2img, SDEdit), 4 new seeds.")
    p.add_argument("image", help="an image npdiff made (or any image, with --prompt)")
    p.add_argument("--strength", default="subtle",
                   help="subtle (0.35), strong (0.7), or a number in (0, 1]: how much noise is added (default subtle)")
    _add_parent_prompt(p)
    _add_drawing_args(p, parent=True)
    p.set_defaults(func=cmd_vary)

    p = sub.add_parser("remix", help="the same seeds and settings with a new prompt",
                       description="Re-run IMAGE's recipe with a new prompt: same seeds, same settings, so the "
                                   "composition carries over. For an image that is not a plain sample (an edit, or "
                                   "an image npdiff did not make), img2img from it at the strong strength.")
    p.add_argument("image")
    p.add_argument("prompt", help="the new prompt; inline parameters allowed")
    _add_drawing_args(p, parent=True)
    p.set_defaults(func=cmd_remix)

    p = sub.add_parser("inpaint", help="redraw the region a mask marks",
                       description="Redraw the white part of MASK (black is kept) with PROMPT, by RePaint: DDPM "
                                   "steps with the kept part re-noised from IMAGE at every step and resampling jumps "
                                   "so the new part blends in. The mask must be the size of the image.")
    p.add_argument("image")
    p.add_argument("--mask", required=True, help="PNG of the image's size: white = redraw, black = keep")
    p.add_argument("prompt", help="what the redrawn region should show (the whole image's description works best)")
    _add_drawing_args(p, parent=True)
    p.set_defaults(func=cmd_edit_canvas, operation="inpaint")

    p = sub.add_parser("zoom-out", help="outpaint: a larger canvas with the image in its middle",
                       description="Put IMAGE in the middle of a canvas --factor times larger and draw the rest "
                                   f"(RePaint with the fully convolutional U-Net). {SIZE_HELP}.")
    p.add_argument("image")
    p.add_argument("--factor", type=float, default=2.0, help="how much larger each side gets, in (1, 4] (default 2)")
    _add_parent_prompt(p)
    _add_drawing_args(p, parent=True)
    p.set_defaults(func=cmd_edit_canvas, operation="zoom-out")

    p = sub.add_parser("pan", help="outpaint: extend the image on one side",
                       description=f"Extend IMAGE on one side and draw the new strip (RePaint). {SIZE_HELP}.")
    p.add_argument("image")
    p.add_argument("--direction", required=True, help="left, right, up or down")
    p.add_argument("--amount", type=float, default=0.5,
                   help="how far to extend, as a fraction of the side, in (0, 1] (default 0.5; rounded to 8 pixels)")
    _add_parent_prompt(p)
    _add_drawing_args(p, parent=True)
    p.set_defaults(func=cmd_edit_canvas, operation="pan")

    p = sub.add_parser("upscale", help="twice the size: Lanczos resampling, then a light img2img pass",
                       description="Make IMAGE twice as large. Method, plainly: Lanczos resampling to 2x, then "
                                   "img2img at --strength with the same U-Net at the new size, which redraws the "
                                   "blurred edges; the model was trained at one size only, so this sharpens but "
                                   "adds no real detail. --strength 0 is Lanczos alone.")
    p.add_argument("image")
    p.add_argument("--strength", type=float, default=None, help="img2img strength after resampling, in [0, 1] "
                                                                "(default 0.3; 0 = Lanczos only)")
    _add_parent_prompt(p)
    _add_drawing_args(p, n_default=1, parent=True)
    p.set_defaults(func=cmd_upscale)


def cmd_vary(args) -> int:
    from npdiff.recipes import STRENGTHS
    strength = STRENGTHS.get(args.strength)
    if strength is None:
        strength = _float_in(args.strength, "--strength", 0.0, 1.0, "subtle, strong or a number in (0, 1]")
    return _edit(args, "vary", args.prompt, strength=strength)


def cmd_remix(args) -> int:
    return _edit(args, "remix", args.prompt, remix=True)


def cmd_edit_canvas(args) -> int:
    op = args.operation
    if op == "inpaint":
        return _edit(args, op, args.prompt, mask_path=args.mask)
    if op == "zoom-out":
        if not 1.0 < args.factor <= 4.0:
            raise UsageError(f"--factor {args.factor} is out of range; use a number above 1, at most 4")
        return _edit(args, op, args.prompt, factor=float(args.factor))
    from npdiff.recipes import PAN_DIRECTIONS
    if args.direction not in PAN_DIRECTIONS:
        raise UsageError(f"--direction {args.direction!r} is not one of {', '.join(PAN_DIRECTIONS)}")
    if not 0.0 < args.amount <= 1.0:
        raise UsageError(f"--amount {args.amount} is out of range; use a number above 0, at most 1")
    return _edit(args, op, args.prompt, direction=args.direction, amount=float(args.amount))


def cmd_upscale(args) -> int:
    from npdiff.recipes import DEFAULT_UPSCALE_STRENGTH
    strength = DEFAULT_UPSCALE_STRENGTH if args.strength is None else args.strength
    if not 0.0 <= strength <= 1.0:
        raise UsageError(f"--strength {strength} is out of range; use 0 (Lanczos only) to 1")
    code = _edit(args, "upscale", args.prompt, strength=float(strength), n_default=1)
    print("upscaled 2x by Lanczos resampling" + (f", then img2img at strength {strength:g} with the same U-Net "
          "(sharper edges, no new detail)" if strength else " alone (--strength 0)"), file=sys.stderr)
    return code


def _edit(args, operation: str, prompt_text: str | None, *, remix: bool = False, mask_path: str | None = None,
          n_default: int = 4, **settings) -> int:
    """Every edit: read the parent, take its settings unless overridden, build the recipe, draw, write."""
    from npdiff.provenance import parent_record
    from npdiff.recipes import STRENGTHS, check_size, new_recipe, output_size

    loaded = _load_model(args.model)
    res = loaded.model.config.resolution
    pixels, parent_recipe, parent_path = _read_parent(args.image, res)
    prompt, s = _settings(args, prompt_text or "", inherit=parent_recipe, n_default=n_default)
    if prompt_text is None:
        if parent_recipe is None and not (operation == "upscale" and settings.get("strength") == 0):
            raise UsageError(f"{parent_path} has no npdiff recipe, so {operation} needs --prompt to say what it shows")
        prompt = parent_recipe["prompt"] if parent_recipe else ""
    if mask_path is not None:
        settings["mask"] = _read_mask(mask_path, parent_path, pixels)
    if operation == "inpaint":
        s["sampler"] = "ddpm"                    # RePaint walks DDPM ancestral steps whatever the sampler
    if operation in ("zoom-out", "pan"):
        s["sampler"] = "ddpm"
    if remix:
        if parent_recipe is not None and parent_recipe["operation"] == "sample":
            if args.seed is None:                # the parent's own seed: image 0 starts from its noise
                s["seed"] = parent_recipe["seed"] + (parent_recipe["index"] or 0)
            settings["strength"] = None
        else:
            settings["strength"] = STRENGTHS["strong"]
    width, height = output_size(operation, pixels, settings)
    if remix and settings["strength"] is None:
        width, height = parent_recipe["width"], parent_recipe["height"]
    check_size(width, height, res, f"the {operation} of {parent_path}")
    _check_outdir(Path(args.outdir))
    parent = parent_record(pixels, parent_path, parent_recipe)
    recipe = new_recipe(operation, prompt=prompt, width=width, height=height, parent=parent,
                        **_common(s, loaded), **settings)
    return _make_and_write(args, loaded, recipe)


# ----------------------------------------------------------------------------
# pieces of the drawing commands

class _Loaded:
    def __init__(self, model, hash_, name, path):
        self.model, self.hash, self.name, self.path = model, hash_, name, path

    def compile_kernels(self) -> None:
        """Before the first network evaluation: on the cpu backend with a cold kernel cache, compile
        the kernels on two cores at once (npdiff.kernels.warmup); otherwise nothing."""
        from npdiff.kernels import backend_name
        if backend_name() == "cpu":
            from npdiff.kernels.warmup import compile_in_two_processes
            compile_in_two_processes(self.model, self.path)


def _load_model(arg) -> _Loaded:
    from npdiff.checkpoint import MODEL_FILE
    from npdiff.model import DEFAULT_MODEL_DIR, Model
    from npdiff.provenance import model_hash
    model_dir = Path(arg) if arg else DEFAULT_MODEL_DIR
    if arg is None and not (model_dir / MODEL_FILE).is_file():
        raise UsageError("no default model is installed in this copy of npdiff; train one with "
                         "`python -m npdiff train` and pass --model runs/shapes/model")
    model = Model.load(model_dir)
    name = "npdiff-default" if arg is None else model_dir.resolve().name
    return _Loaded(model, model_hash(model_dir / MODEL_FILE), name, model_dir)


def _settings(args, prompt_text: str, *, inherit: dict | None = None, n_default: int = 4, extra=()) -> tuple[str, dict]:
    """The prompt without its inline parameters, and every setting: a flag, else the same parameter
    inline, else the parent's recipe, else the default. A flag and an inline value that disagree are an error."""
    from npdiff.pipeline import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS
    from npdiff.provenance import RANGES
    from npdiff.samplers import SAMPLERS
    from npdiff.text.prompt import parse_prompt

    prompt, inline = parse_prompt(prompt_text)
    if "ar" in inline and "ar" not in extra:
        raise UsageError("--ar is for sample only; an edit keeps its image's shape (use pan or zoom-out to change it)")
    s = {}
    for key in ("seed", "steps", "sampler", "cfg", "chaos", "n", "ar", "backend"):
        flag = getattr(args, key, None)
        if flag is not None and key in inline and _norm(key, flag) != inline[key]:
            raise UsageError(f"--{key} is given twice, as a flag ({flag}) and in the prompt ({inline[key]}); keep one")
        s[key] = flag if flag is not None else inline.get(key)
    if "backend" in inline and args.backend is None:     # a --backend flag was already applied by main()
        _use_backend(inline["backend"])
    negatives = [v for v in (getattr(args, "negative_prompt", None), inline.get("negative_prompt")) if v]
    s["negative_prompt"] = ", ".join(negatives) if negatives else None
    defaults = {"steps": DEFAULT_STEPS, "sampler": DEFAULT_SAMPLER, "cfg": DEFAULT_CFG, "chaos": 0, "n": n_default,
                "negative_prompt": ""}
    for key, default in defaults.items():
        if s[key] is None:
            s[key] = inherit[key] if inherit is not None and key in ("steps", "sampler", "cfg", "negative_prompt") \
                else default
    if s["sampler"] not in SAMPLERS:
        raise UsageError(f"unknown sampler {s['sampler']!r}; choose one of {', '.join(SAMPLERS)}")
    if s["seed"] is None:
        import numpy as np
        s["seed"] = int(np.random.default_rng().integers(0, 2**31 - 1))
    for key, flag, hint in (("steps", "--steps", ""), ("n", "-n", ""), ("chaos", "--chaos", ""),
                            ("cfg", "--cfg", " (1 turns guidance off)"), ("seed", "--seed", "")):
        lo, hi = RANGES[key]
        if not lo <= s[key] <= hi:                       # a NaN guidance scale fails this too
            raise UsageError(f"{flag} {s[key]} is out of range; use {lo} to {hi}{hint}")
    return prompt, s


def _norm(key, flag):
    """A flag's value in the form parse_prompt gives the same parameter."""
    if key == "ar":
        from npdiff.text.prompt import _ratio
        return _ratio("ar", flag)
    return flag


def _use_backend(name: str) -> None:
    from npdiff.kernels import set_backend
    try:
        set_backend(name)
    except (ValueError, RuntimeError) as e:
        raise UsageError(str(e)) from None


def _common(s: dict, loaded: _Loaded) -> dict:
    from npdiff.kernels import backend_name
    return dict(negative_prompt=s["negative_prompt"], seed=s["seed"], n=s["n"], steps=s["steps"],
                sampler=s["sampler"], cfg=s["cfg"], chaos=s["chaos"], model_hash=loaded.hash,
                model_name=loaded.name, backend=backend_name())


def _float_in(text: str, flag: str, lo: float, hi: float, expected: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not lo < value <= hi:
        raise UsageError(f"{flag} {text!r} is not {expected}")
    return value


def _read_parent(path: str, resolution: int):
    """-> (pixels (H, W, 3) uint8 at a size the model runs at, the image's recipe or None, its path)."""
    from npdiff.imaging import read_image
    from npdiff.provenance import RECIPE_KEY, read_recipe
    from npdiff.recipes import fit_image
    pixels, chunks = read_image(path)
    recipe = read_recipe(chunks, path) if RECIPE_KEY in chunks else None
    return fit_image(pixels, resolution), recipe, Path(path)


def _read_mask(mask_path: str, image_path: Path, pixels) -> str:
    """The mask as recipe text, checked: the image's size, something to redraw."""
    import numpy as np

    from npdiff.imaging import read_image
    from npdiff.provenance import pixels_to_text
    from npdiff.recipes import resize
    mask, _ = read_image(mask_path)
    original, _ = read_image(image_path)
    if mask.shape[:2] != original.shape[:2]:
        raise UsageError(f"mask {mask_path} is {mask.shape[1]}x{mask.shape[0]} but {image_path} is "
                         f"{original.shape[1]}x{original.shape[0]}; draw the mask at the image's size "
                         "(white = redraw, black = keep)")
    gray = mask.mean(axis=2)
    if gray.shape != pixels.shape[:2]:                       # the image was fitted to the model: fit the mask too
        gray = resize(gray.astype(np.uint8), pixels.shape[1], pixels.shape[0]).astype(np.float64)
    redraw = np.where(gray >= 128, 255, 0).astype(np.uint8)
    if not redraw.any():
        raise UsageError(f"mask {mask_path} has no white pixels, so there is nothing to redraw; paint the region "
                         "to redraw white")
    return pixels_to_text(redraw)


def _check_outdir(path: Path, flag: str = "--outdir") -> None:
    """Fail before any work if `path` cannot become a writable folder (it is created only when writing)."""
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write to {path}: {probe} is not a folder; choose another {flag}")
    import tempfile
    try:                                       # a real write: access() says yes to root on /proc or a read-only mount
        fd, tmp = tempfile.mkstemp(prefix=".npdiff-probe-", dir=probe)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise UsageError(f"output folder {probe} is not writable ({e.strerror}); choose another {flag}") from None


def _check_output_file(path: Path, suffix: str, flag: str) -> None:
    if path.suffix.lower() != suffix:
        raise UsageError(f"{flag} {path} must end in {suffix}")
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder; give a file name ending in {suffix}")
    if not path.parent.is_dir():                # files are written beside their final name, so the folder must be there
        raise UsageError(f"{flag} {path}: there is no folder {path.parent}; create it or choose another path")
    _check_outdir(path.parent, flag)


def _make_and_write(args, loaded: _Loaded, recipe: dict, *, only="all", trajectory: str | None = None,
                    quiet_paths: bool = False):
    """Run the recipe and write its images (only="all": every image and, for n > 1, the grid; an int:
    that image; None: the grid), then print each path and return 0 (quiet_paths: return the paths)."""
    import numpy as np

    from npdiff.imaging import make_grid, png_bytes, to_uint8
    from npdiff.pipeline import Pipeline
    from npdiff.provenance import for_image, png_text
    from npdiff.recipes import run_recipe

    frames = []

    def keep_frame(i, x_t, x0_pred):               # (N, C, H, W) each -> one frame: x_t grid | x0 grid
        rows = 2 if len(x_t) == 4 else None
        left, right = make_grid(to_uint8(x_t), rows=rows), make_grid(to_uint8(x0_pred), rows=rows)
        frames.append(np.concatenate([left, np.full((left.shape[0], 2, 3), 255, np.uint8), right], axis=1))

    loaded.compile_kernels()
    images = run_recipe(recipe, Pipeline(loaded.model), progress=not args.quiet and sys.stderr.isatty(),
                        callback=keep_frame if trajectory else None,
                        source=getattr(args, "from_image", None) or "the recipe")
    outdir = Path(args.outdir)
    rows = 2 if recipe["n"] == 4 else None
    indices = range(recipe["n"]) if only == "all" else ([] if only is None else [only])
    singles = [(i, png_bytes(images[i], png_text(for_image(recipe, i)))) for i in indices]
    grid = None
    if (only == "all" and recipe["n"] > 1) or only is None:
        grid = png_bytes(make_grid(images, rows=rows), png_text(for_image(recipe, None)))
    paths, made = [], not outdir.exists()
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        for i, data in singles:
            paths.append(_write_new(outdir, lambda k, i=i: f"{k:05d}-{recipe['seed'] + i}.png", r"(\d{5,})-.+\.png",
                                    data))
        if grid is not None:
            paths.append(_write_new(outdir, lambda k: f"grid-{k:04d}.png", r"grid-(\d{4,})\.png", grid))
        if trajectory:
            from npdiff.imaging import save_gif
            scale = max(1, 256 // max(frames[0].shape[:2]))
            big = [f.repeat(scale, axis=0).repeat(scale, axis=1) for f in frames]
            save_gif(trajectory, big + [big[-1]] * 5, duration_ms=120)   # hold the last frame a moment
            paths.append(trajectory)
    except OSError as e:                       # the folder went away or filled up after the check: keep no part
        for p in paths:
            Path(p).unlink(missing_ok=True)
        if made and outdir.is_dir() and not any(outdir.iterdir()):
            outdir.rmdir()
        raise UsageError(f"cannot write to {e.filename or outdir} ({e.strerror or e}); no file of this batch was "
                         "kept; free some space or choose another folder") from None
    if quiet_paths:
        return paths
    for p in paths:
        print(p)
    return 0


def _write_new(outdir: Path, name_for, numbered: str, data: bytes) -> str:
    """Write `data` under the next free number in `outdir` (one past the largest in a name that matches
    the regex `numbered`, whose group is the number), never replacing an existing file: the name is
    claimed with O_EXCL, then the complete file is renamed over the claim."""
    import re
    import tempfile
    fd, tmp = tempfile.mkstemp(prefix=".npdiff-", suffix=".tmp", dir=outdir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes 0600; an image is as readable as any new file
        taken = [int(m.group(1)) for m in (re.fullmatch(numbered, p.name) for p in outdir.iterdir()) if m]
        k = max(taken, default=-1) + 1
        while True:                            # a name claimed meanwhile by another npdiff: try the next
            path = outdir / name_for(k)
            try:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                k += 1
                continue
            os.replace(tmp, path)
            return str(path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ----------------------------------------------------------------------------
# explain

def add_explain(sub) -> None:
    from npdiff.pipeline import DEFAULT_CFG, DEFAULT_SAMPLER, DEFAULT_STEPS

    p = sub.add_parser("explain", help="teaching views: noising, schedules, a denoising trajectory",
                       description="Write three PNGs to --outdir: noising.png (an image noised at the chosen t by "
                                   "each beta schedule), schedules.png (alpha-bar and log SNR against t for each "
                                   "schedule) and trajectory.png (x_t and the predicted x_0 along a sampler's walk; "
                                   "needs a model). t is the paper's t, 1..T; t = 0 is the clean image.")
    p.add_argument("--prompt", default="a red circle on a blue background",
                   help="drawn by the shapes dataset for noising.png (unless --image) and by the model for the "
                        "trajectory")
    p.add_argument("--image", default=None, help="an image to noise instead of the shapes drawing")
    p.add_argument("--t", default="0,50,100,250,500,750,1000", help="comma-separated t values for noising.png")
    p.add_argument("--model", default=None, help="model folder for the trajectory (default: the shipped model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    p.add_argument("--sampler", default=DEFAULT_SAMPLER, help=f"sampler of the trajectory (default {DEFAULT_SAMPLER})")
    p.add_argument("--cfg", "--guidance-scale", dest="cfg", type=float, default=DEFAULT_CFG,
                   help=f"guidance scale of the trajectory (default {DEFAULT_CFG:g})")
    p.add_argument("--outdir", default="explain", help="output folder (default ./explain); files are replaced")
    p.add_argument("--backend", default=None, help="kernel backend: cpu (default), reference, cuda")
    p.set_defaults(func=cmd_explain)


def cmd_explain(args) -> int:
    import numpy as np

    from npdiff import explain
    from npdiff.imaging import read_image, save_png
    from npdiff.model import DEFAULT_MODEL_DIR
    from npdiff.samplers import SAMPLERS

    times = _int_list(args.t, "--t", "0,100,500,1000")
    if any(not 0 <= t <= 1000 for t in times):
        raise UsageError(f"--t {args.t} must hold values from 0 (clean) to 1000 (T)")
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 1 <= args.steps <= 1000:
        raise UsageError(f"--steps {args.steps} is out of range; use 1 to 1000")
    have_model = args.model is not None or (DEFAULT_MODEL_DIR / "model.safetensors").is_file()
    loaded = _load_model(args.model) if have_model else None
    resolution = loaded.model.config.resolution if loaded else 32
    if args.image:
        from npdiff.recipes import fit_image
        image = fit_image(read_image(args.image)[0], resolution)
    else:
        from npdiff.data.shapes import render_prompt
        try:
            image, _ = render_prompt(args.prompt, np.random.default_rng(args.seed), resolution)
        except ValueError as e:
            raise UsageError(f"the shapes dataset cannot draw {args.prompt!r} ({e}); pass --image") from None
    outdir = Path(args.outdir)
    _check_outdir(outdir)
    views = {"noising.png": explain.noising_view(image, times, seed=args.seed),
             "schedules.png": explain.schedule_curves()}
    if loaded is not None:
        from npdiff.pipeline import Pipeline
        loaded.compile_kernels()
        frames = explain.record_trajectory(Pipeline(loaded.model), args.prompt, seed=args.seed, steps=args.steps,
                                           sampler=args.sampler, guidance_scale=args.cfg)
        views["trajectory.png"] = explain.trajectory_strip(frames)
    outdir.mkdir(parents=True, exist_ok=True)
    for name, img in views.items():
        save_png(outdir / name, img)
        print(outdir / name)
    if loaded is None:
        print("no model installed: trajectory.png needs one (pass --model)", file=sys.stderr)
    return 0


# ----------------------------------------------------------------------------
# train

def add_train(sub) -> None:
    from npdiff.train import TrainArgs
    from npdiff.diffusion.schedule import BETA_SCHEDULES
    d = TrainArgs()
    p = sub.add_parser("train", help="train a model from scratch on the CPU",
                       description="Train a text-to-image model on procedural shapes or a folder of captioned images.")
    p.add_argument("--data", default=d.data, help="'shapes' (procedural, default) or a folder with metadata.jsonl "
                                                   "or a .txt caption beside each image")
    p.add_argument("--output-dir", default=d.output_dir,
                   help=f"where checkpoints and the model go (default {d.output_dir})")
    p.add_argument("--resolution", type=int, default=d.resolution, help="image side, a multiple of 8 (default 32)")
    p.add_argument("--train-batch-size", type=int, default=d.train_batch_size,
                   help="images per training step (default %(default)s)")
    p.add_argument("--learning-rate", type=float, default=d.learning_rate,
                   help="AdamW's peak learning rate, reached after the warmup and then cosine-decayed "
                        "(default %(default)g)")
    p.add_argument("--lr-warmup-steps", type=int, default=d.lr_warmup_steps,
                   help="steps of linear warmup from 0 to --learning-rate (default %(default)s)")
    p.add_argument("--max-train-steps", type=int, default=d.max_train_steps,
                   help="training steps in all, counted across resumed runs (default %(default)s)")
    p.add_argument("--use-ema", action=argparse.BooleanOptionalAction, default=d.use_ema,
                   help="keep an exponential moving average of the weights and export it (default on)")
    p.add_argument("--ema-decay", type=float, default=d.ema_decay,
                   help="largest EMA decay; step k uses min(this, (1 + k) / (10 + k)) (default %(default)s)")
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm,
                   help="clip the global gradient norm to this; 0 turns clipping off (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the weights, the data and the noise (default %(default)s)")
    p.add_argument("--checkpointing-steps", type=int, default=d.checkpointing_steps,
                   help="write a checkpoint every this many steps (default %(default)s)")
    p.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint-STEP folder, or 'latest'")
    p.add_argument("--validation-prompts", nargs="*", default=[], help="prompts drawn at every checkpoint")
    p.add_argument("--base-channels", type=int, default=d.base_channels,
                   help="U-Net channels at full resolution (default %(default)s)")
    p.add_argument("--channel-mult", default=",".join(map(str, d.channel_mult)), help="e.g. 1,2,2")
    p.add_argument("--num-res-blocks", type=int, default=d.num_res_blocks,
                   help="residual blocks per level (default %(default)s)")
    p.add_argument("--attention-levels", default=",".join(map(str, d.attention_levels)),
                   help="levels with self- and cross-attention, e.g. 1,2 (level i has side resolution/2^i)")
    p.add_argument("--num-groups", type=int, default=d.num_groups,
                   help="group-norm groups; as many groups as channels erases every feature that is the "
                        "same at each pixel, such as a flat background (default %(default)s)")
    p.add_argument("--coord-channels", action=argparse.BooleanOptionalAction, default=d.coord_channels,
                   help="give the first convolution each pixel's x and y as two more input channels, "
                        "so that positions such as 'on the left' are easier to learn (default %(default)s)")
    p.add_argument("--query-coords", action=argparse.BooleanOptionalAction, default=d.query_coords,
                   help="let every cross-attention query see its position, so that each object's words "
                        "are read where that object belongs (default %(default)s)")
    p.add_argument("--snr-gamma", type=float, default=d.min_snr_gamma,
                   help="min-SNR-gamma loss weighting: the x0 error of a step counts min(snr, gamma) times; "
                        "0 turns it off (default %(default)s)")
    p.add_argument("--snr-floor", type=float, default=d.snr_floor or 0.0,
                   help="... and at least this many times, so that the noisiest steps, where the layout of an "
                        "image is decided, are trained too (on the shapes recipe, floor 1 lost shape accuracy: "
                        "see the README); 0 is off (default %(default)s)")
    p.add_argument("--multiscale-snr", action=argparse.BooleanOptionalAction, default=d.multiscale_snr,
                   help="weight each scale of the error by its own snr: a mean over b x b pixels sees b^2 snr, "
                        "so the layout and background color, decided at the noisiest steps, are trained "
                        "there while fine detail keeps min-SNR; on the shapes recipe it left samples grainy and lost "
                        "shape accuracy, see the README (needs --snr-gamma; default %(default)s)")
    p.add_argument("--text-width", type=int, default=d.text_width,
                   help="text encoder width, the token features cross-attention reads; a multiple of "
                        "its 4 heads (default %(default)s)")
    p.add_argument("--text-layers", type=int, default=d.text_layers,
                   help="text encoder transformer blocks; 0 leaves token and position embeddings only "
                        "(default %(default)s)")
    p.add_argument("--text-rel-pos", type=int, default=d.text_rel_pos, metavar="K",
                   help="give the text encoder's attention a learned bias per head and per word offset in "
                        "[-K, K] (Shaw et al. 2018), so a word can learn to read the words of its own phrase: "
                        "it binds each object's color and shape to its place; 0 turns it off (default %(default)s)")
    p.add_argument("--text-rel-slope", type=float, default=d.text_rel_slope, metavar="S",
                   help="where --text-rel-pos's bias starts: heads 0 and 1 read forward and backward with a "
                        "penalty of S per word of distance (one-sided ALiBi, Press et al. 2022), so each word "
                        "starts mixed with its own phrase; 0 starts every head flat (default %(default)s)")
    p.add_argument("--phrase-tokens", type=int, default=d.phrase_tokens, metavar="C",
                   help="append to the text tokens one feature per phrase, the mean of its words, cutting the "
                        "caption at each 'and' (up to C phrases; more fold into the last): the U-Net then reads "
                        "an object's color, shape and place in one token (after StructureDiffusion, Feng et al. "
                        "2023); 0 turns it off (default %(default)s)")
    p.add_argument("--grounding-loss", type=float, default=d.grounding_loss, metavar="W",
                   help="add W times a loss that makes each object's pixels attend to their own object's words "
                        "in every cross-attention layer (after TokenCompose, Wang et al. 2024), from the masks "
                        "the shapes dataset draws: it teaches which color and shape stand where in a "
                        "two-object caption; shapes data only; 0 turns it off (default %(default)s)")
    p.add_argument("--freeze-text-encoder", action=argparse.BooleanOptionalAction, default=d.freeze_text_encoder,
                   help="keep the text encoder at its random initialization and train only the U-Net, as Imagen "
                        "keeps its text encoder frozen (Saharia et al. 2022); trained jointly from embeddings at "
                        "--text-embed-std 0.02, the encoder learns to give 'left' and 'right' nearly the same "
                        "features, see the README (default %(default)s)")
    p.add_argument("--text-encoder-lr-scale", type=float, default=d.text_encoder_lr_scale, metavar="S",
                   help="train the text encoder at S times --learning-rate, between frozen (see "
                        "--freeze-text-encoder) and the U-Net's own rate (default %(default)s)")
    p.add_argument("--text-embed-std", type=float, default=d.text_embed_std, metavar="STD",
                   help="initial standard deviation of the text encoder's token and position embeddings: "
                        "0.02 (GPT-2) starts every token near the caption's mean, 1 (PyTorch's default) "
                        "starts each token as itself plus a little context, and keeps 'left' and 'right' "
                        "apart through training (default %(default)s)")
    p.add_argument("--prediction", choices=["eps", "x0", "v"], default=d.prediction,
                   help="what the network predicts: the noise, the clean image or v (default %(default)s)")
    p.add_argument("--beta-schedule", default=d.beta_schedule, choices=BETA_SCHEDULES,
                   help="noise schedule (default %(default)s)")
    p.add_argument("--backend", default=None,
                   help="kernel backend: cpu (default), reference, cuda (forward on the GPU, gradients on the CPU)")
    p.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    from npdiff.train import GROUNDING_NEEDS_SHAPES, TrainArgs, TrainingError, train

    if args.resolution % 8 or not 8 <= args.resolution <= 256:
        raise UsageError(f"--resolution {args.resolution} must be a multiple of 8 between 8 and 256")
    for name in ("train_batch_size", "max_train_steps", "checkpointing_steps", "base_channels", "num_res_blocks"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        raise UsageError(f"--learning-rate {args.learning_rate:g} must be positive")
    if not (math.isfinite(args.text_rel_slope) and args.text_rel_slope >= 0):
        raise UsageError(f"--text-rel-slope {args.text_rel_slope:g} must be a number >= 0, e.g. 0.5")
    if args.text_rel_pos < 0:
        raise UsageError(f"--text-rel-pos {args.text_rel_pos} must be 0 (off) or a positive offset, e.g. 8")
    if args.phrase_tokens < 0:
        raise UsageError(f"--phrase-tokens {args.phrase_tokens} must be 0 (off) or a number of phrases, e.g. 2")
    if not (math.isfinite(args.grounding_loss) and args.grounding_loss >= 0):
        raise UsageError(f"--grounding-loss {args.grounding_loss:g} must be a number >= 0, e.g. 0.01 (0 is off)")
    if args.grounding_loss and args.data != "shapes":
        raise UsageError(GROUNDING_NEEDS_SHAPES)
    if args.lr_warmup_steps < 0 or args.text_layers < 0:
        raise UsageError("--lr-warmup-steps and --text-layers must not be negative")
    if not args.max_grad_norm >= 0:
        raise UsageError(f"--max-grad-norm {args.max_grad_norm:g} must not be negative; 0 turns clipping off")
    if not 0 <= args.ema_decay < 1:
        raise UsageError(f"--ema-decay {args.ema_decay:g} must lie in [0, 1)")
    mult = _int_list(args.channel_mult, "--channel-mult", "1,2,2")
    attention = _int_list(args.attention_levels, "--attention-levels", "1,2") if args.attention_levels else ()
    if any(not 0 <= a < len(mult) for a in attention):
        raise UsageError(f"--attention-levels {args.attention_levels} must name levels 0 to {len(mult) - 1}")
    if args.snr_gamma < 0 or not 0 <= args.snr_floor <= max(args.snr_gamma, 0):
        raise UsageError(f"--snr-floor {args.snr_floor:g} must lie between 0 and --snr-gamma {args.snr_gamma:g} "
                         "(and --snr-gamma must not be negative)")
    if args.snr_floor and args.prediction == "eps":
        raise UsageError("--snr-floor needs --prediction v or x0 (the eps objective's weight would be 1/snr); "
                         "pass --snr-floor 0")
    if args.multiscale_snr and not args.snr_gamma:
        raise UsageError("--multiscale-snr weights each scale by min(snr, gamma): give --snr-gamma a positive value")
    if not (math.isfinite(args.text_encoder_lr_scale) and args.text_encoder_lr_scale > 0):
        raise UsageError(f"--text-encoder-lr-scale {args.text_encoder_lr_scale:g} must be positive; "
                         "to keep the encoder as it starts, use --freeze-text-encoder")
    if not (math.isfinite(args.text_embed_std) and args.text_embed_std > 0):
        raise UsageError(f"--text-embed-std {args.text_embed_std:g} must be a positive number, e.g. 0.02 or 1")
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
        coord_channels=args.coord_channels, query_coords=args.query_coords,
        text_width=args.text_width, text_layers=args.text_layers, text_rel_pos=args.text_rel_pos,
        text_rel_slope=args.text_rel_slope, phrase_tokens=args.phrase_tokens,
        grounding_loss=args.grounding_loss,
        freeze_text_encoder=args.freeze_text_encoder,
        text_encoder_lr_scale=args.text_encoder_lr_scale, text_embed_std=args.text_embed_std,
        prediction=args.prediction, beta_schedule=args.beta_schedule,
        min_snr_gamma=args.snr_gamma or None, snr_floor=args.snr_floor or None,
        multiscale_snr=args.multiscale_snr,
    )
    try:
        from npdiff.nn.text_encoder import TextEncoderConfig
        from npdiff.nn.unet import UNetConfig
        if targs.text_width < 1:
            raise ValueError(f"--text-width {targs.text_width} must be at least 1")
        TextEncoderConfig(width=targs.text_width, num_layers=targs.text_layers,
                          rel_pos=targs.text_rel_pos).validate()
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
# eval

def add_eval(sub) -> None:
    from npdiff.pipeline import DEFAULT_CFG, DEFAULT_STEPS
    p = sub.add_parser("eval", help="judge accuracy per attribute on a fixed set of shapes prompts",
                       description="Sample N images for each prompt of a fixed set (single objects, two objects, "
                                   "the color-shape pairs never drawn in training), read each image back with the "
                                   "judge and print the accuracy per attribute as a Markdown table.")
    p.add_argument("--model", default=None, help="model folder (default: the model shipped in the package)")
    p.add_argument("-n", type=int, default=8, help="images per prompt (default 8)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"sampler steps (default {DEFAULT_STEPS})")
    p.add_argument("--cfg", default=f"1,{DEFAULT_CFG:g}",
                   help=f"comma-separated guidance scales to evaluate (default 1,{DEFAULT_CFG:g})")
    p.add_argument("--seed", type=int, default=0, help="seed of the first prompt's images (default 0)")
    p.add_argument("--json", default=None, metavar="OUT.json", help="also write the results as JSON")
    p.add_argument("--backend", default=None, help="kernel backend: cpu (default), reference, cuda")
    p.add_argument("--place-probe", action="store_true",
                   help="instead of sampling, measure the network's x0 error on noised dataset images with the "
                        "prompt, with its place words swapped (left <-> right, top <-> bottom) and with no "
                        "prompt, at t = 500 ... 990: does it read places, and for two objects which object "
                        "stands where? (-n images per prompt; seconds, not minutes)")
    p.set_defaults(func=cmd_eval)


def cmd_eval(args) -> int:
    import json
    from npdiff.checkpoint import atomic_write_bytes
    from npdiff.evaluate import evaluate, format_table
    from npdiff.pipeline import Pipeline

    if not 1 <= args.n <= 256:
        raise UsageError(f"-n {args.n} must be between 1 and 256")
    if not 1 <= args.steps <= 1000:
        raise UsageError(f"--steps {args.steps} must be between 1 and 1000")
    try:
        scales = tuple(float(v) for v in args.cfg.split(","))
    except ValueError:
        raise UsageError(f"--cfg {args.cfg!r} must be comma-separated numbers, e.g. 1,3") from None
    if any(not 0 <= s <= 30 for s in scales):
        raise UsageError(f"--cfg {args.cfg!r}: each guidance scale must lie in 0-30")
    if args.json:
        _check_output_file(Path(args.json), ".json", "--json")
    loaded = _load_model(args.model)
    loaded.compile_kernels()
    if args.place_probe:
        from npdiff.evaluate import format_place_probe, place_probe
        results = place_probe(loaded.model, n_per_prompt=args.n, seed=args.seed)
        print(format_place_probe(results))
        record = {"n_per_prompt": args.n, "seed": args.seed, "place_probe": results}
    else:
        results = evaluate(Pipeline(loaded.model), n_per_prompt=args.n, guidance_scales=scales, steps=args.steps,
                           seed=args.seed, progress=sys.stderr.isatty())
        print(format_table(results))
        record = {"n_per_prompt": args.n, "steps": args.steps, "seed": args.seed, "results": results}
    if args.json:
        record = {"model": loaded.name, "model_hash": loaded.hash, **record}
        atomic_write_bytes(Path(args.json), (json.dumps(record, indent=2) + "\n").encode())
        print(f"results written to {args.json}")
    return 0


# ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="npdiff", description="Text-to-image diffusion in NumPy and Numba.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_sample(sub)
    add_verbs(sub)
    add_explain(sub)
    add_train(sub)
    add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:      # a malformed command line, already reported in one line by _Parser.error
        if e.code == 2:
            return 2
        raise
    if args.command is None:
        parser.print_help()
        return 2
    errors = _usage_errors()
    try:
        if getattr(args, "backend", None):
            _use_backend(args.backend)
        elif os.environ.get("NPDIFF_BACKEND", "").strip():     # checked here too, so that it fails in one line
            _use_backend(os.environ["NPDIFF_BACKEND"].strip())
        return args.func(args)
    except errors as e:
        print(f"npdiff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("npdiff: interrupted", file=sys.stderr)
        return 130
