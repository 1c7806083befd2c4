"""Recipes: what every command makes, described as data, and the one function that makes it.

Every verb of the command line (sample, vary, remix, inpaint, zoom-out, pan, upscale) builds a
recipe (see provenance.py for its fields) and hands it to run_recipe(); `sample --from IMAGE`
reads the recipe back out of a PNG and hands it to the same function. One code path makes an
image and re-makes it, which is why a re-made image has the same bytes.

    operation  what run_recipe does with the recipe
    sample     txt2img from the seeds' noise
    vary       img2img from the parent at strength subtle (0.35) or strong (0.7)
    remix      a sample's recipe again with a new prompt (same seeds, same settings); for a parent
               that is not a plain sample, img2img from the parent at the strong strength
    inpaint    RePaint: the parent kept where the mask is black, redrawn where it is white
    zoom-out   RePaint on a canvas `factor` times larger, the parent in its middle
    pan        RePaint on a canvas extended on one side by `amount` of the image
    upscale    Lanczos resampling to twice the size, then (strength > 0) img2img at that size

Sizes: the U-Net is fully convolutional, so it runs at any size whose sides are multiples of 8,
but it learned from training-size images. Outputs keep each side within 16..128 pixels and the
pixel count within 4x the training image's (4096 for the 32x32 default model).

Dimension letters: N batch, H height, W width.
"""

from __future__ import annotations

import math

import numpy as np

from npdiff import __version__
from npdiff.provenance import RECIPE_FORMAT, RecipeError, parent_pixels, pixels_from_text

MIN_SIDE = 16
MAX_SIDE = 128
MAX_PIXELS_FACTOR = 4          # x the training image's pixel count
STRENGTHS = {"subtle": 0.35, "strong": 0.7}
DEFAULT_UPSCALE_STRENGTH = 0.3
PAN_DIRECTIONS = ("left", "right", "up", "down")


# ----------------------------------------------------------------------------
# sizes

def check_size(width: int, height: int, resolution: int, what: str) -> None:
    """Raise RecipeError unless width x height is a size the model may be run at."""
    limit = MAX_PIXELS_FACTOR * resolution * resolution
    if (width % 8 or height % 8 or not MIN_SIDE <= width <= MAX_SIDE or not MIN_SIDE <= height <= MAX_SIDE
            or width * height > limit):
        raise RecipeError(f"{what} would be {width}x{height} pixels; each side must be a multiple of 8 from "
                          f"{MIN_SIDE} to {MAX_SIDE}, and at most {limit} pixels in all "
                          f"({MAX_PIXELS_FACTOR}x the model's {resolution}x{resolution})")


def _round8(x: float) -> int:
    return max(8, int(round(x / 8.0)) * 8)


def size_for_ratio(w: int, h: int, resolution: int, flag: str = "--ar") -> tuple[int, int]:
    """--ar W:H -> (width, height): the training image's pixel count at that shape, sides rounded to 8."""
    height = math.sqrt(resolution * resolution * h / w)
    width, height = _round8(height * w / h), _round8(height)
    try:
        check_size(width, height, resolution, f"{flag} {w}:{h}")
    except RecipeError as e:
        raise RecipeError(f"{e}; pick a ratio nearer 1:1") from None
    return width, height


def fit_image(img: np.ndarray, resolution: int) -> np.ndarray:
    """An image from elsewhere, resized (Lanczos) to the size --ar would pick for its shape unless
    it already is a size the model may run at."""
    h, w = img.shape[:2]
    try:
        check_size(w, h, resolution, "the image")
        return img
    except RecipeError:
        pass
    width, height = size_for_ratio(w, h, resolution, flag="an image shaped")
    return resize(img, width, height)


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    from PIL import Image
    return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((width, height), Image.LANCZOS))


# ----------------------------------------------------------------------------
# canvases for outpainting

def zoom_out_canvas(img: np.ndarray, factor: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) -> a canvas about `factor` times larger on each side with the image in its middle,
    and the keep mask (True where the image is)."""
    h, w = img.shape[:2]
    H, W = _round8(h * factor), _round8(w * factor)
    top, left = (H - h) // 2, (W - w) // 2
    return _place(img, H, W, top, left)


def pan_canvas(img: np.ndarray, direction: str, amount: float) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) -> a canvas extended on the `direction` side by `amount` of that side (a multiple of 8)."""
    h, w = img.shape[:2]
    grow = _round8((w if direction in ("left", "right") else h) * amount)
    H, W = (h, w + grow) if direction in ("left", "right") else (h + grow, w)
    top = grow if direction == "up" else 0
    left = grow if direction == "left" else 0
    return _place(img, H, W, top, left)


def _place(img, H, W, top, left):
    h, w = img.shape[:2]
    canvas = np.full((H, W, 3), 128, dtype=np.uint8)                  # (H, W, 3); grey where drawn anew
    canvas[top:top + h, left:left + w] = img
    keep = np.zeros((H, W), dtype=bool)                               # (H, W)
    keep[top:top + h, left:left + w] = True
    return canvas, keep


def output_size(operation: str, parent: np.ndarray | None, settings: dict) -> tuple[int, int]:
    """(width, height) an edit of `parent` produces."""
    h, w = parent.shape[:2]
    if operation == "zoom-out":
        canvas, _ = zoom_out_canvas(parent, settings["factor"])
        return canvas.shape[1], canvas.shape[0]
    if operation == "pan":
        canvas, _ = pan_canvas(parent, settings["direction"], settings["amount"])
        return canvas.shape[1], canvas.shape[0]
    if operation == "upscale":
        return 2 * w, 2 * h
    return w, h


# ----------------------------------------------------------------------------
# building and running recipes

def new_recipe(operation: str, *, prompt: str, negative_prompt: str, seed: int, n: int, steps: int,
               sampler: str, cfg: float, chaos: int, width: int, height: int, model_hash: str, model_name: str,
               backend: str, parent: dict | None = None, **settings) -> dict:
    """A complete recipe (index None: the batch as a whole; provenance.for_image picks one image)."""
    recipe = {"format": RECIPE_FORMAT, "npdiff_version": __version__, "operation": operation,
              "prompt": prompt, "negative_prompt": negative_prompt, "seed": int(seed), "n": int(n), "index": None,
              "steps": int(steps), "sampler": sampler, "cfg": float(cfg), "chaos": int(chaos),
              "width": int(width), "height": int(height), "model_hash": model_hash, "model_name": model_name,
              "backend": backend, "dtype": "float32", "parent": parent}
    recipe.update(settings)
    return recipe


def run_recipe(recipe: dict, pipe, *, progress: bool = True, callback=None, source: str = "the recipe") -> np.ndarray:
    """Make the batch a recipe describes -> (n, H, W, 3) uint8."""
    op = recipe["operation"]
    prompts = [recipe["prompt"]] * recipe["n"]
    common = dict(negative_prompt=recipe["negative_prompt"], seed=recipe["seed"], steps=recipe["steps"],
                  guidance_scale=recipe["cfg"], chaos=recipe["chaos"], progress=progress, callback=callback)
    strength = recipe.get("strength")
    resolution = pipe.model.config.resolution
    check_size(recipe["width"], recipe["height"], resolution, f"{source}'s recipe")
    if op == "sample" or (op == "remix" and strength is None):
        images = pipe.generate(prompts, sampler=recipe["sampler"], width=recipe["width"], height=recipe["height"],
                               **common)
    else:
        parent = parent_pixels(recipe, source)
        _check_edit(recipe, parent, resolution, source)
        if op in ("vary", "remix"):
            images = pipe.img2img(parent, prompts, strength=strength, sampler=recipe["sampler"], **common)
        elif op == "upscale":
            h, w = parent.shape[:2]
            big = resize(parent, 2 * w, 2 * h)
            if not strength:
                images = np.repeat(big[None], recipe["n"], axis=0)
            else:
                images = pipe.img2img(big, prompts, strength=strength, sampler=recipe["sampler"], **common)
        else:
            if op == "inpaint":
                canvas, keep = parent, pixels_from_text(recipe["mask"]) < 128
            elif op == "zoom-out":
                canvas, keep = zoom_out_canvas(parent, recipe["factor"])
            elif op == "pan":
                canvas, keep = pan_canvas(parent, recipe["direction"], recipe["amount"])
            else:
                raise RecipeError(f"{source}: unknown operation {op!r}")
            images = pipe.inpaint(canvas, keep, prompts, **common)
    if images.shape[1:3] != (recipe["height"], recipe["width"]):
        raise RecipeError(f"{source}: the recipe says {recipe['width']}x{recipe['height']} but makes "
                          f"{images.shape[2]}x{images.shape[1]}; it is damaged")
    return images


def _check_edit(recipe: dict, parent: np.ndarray, resolution: int, source: str) -> None:
    """What an edit reads from its recipe, checked before any work: a recipe read back from a file may
    have been edited by hand (the command line checks the same values as flags)."""
    op = recipe["operation"]

    def number(key, lo, hi, low_open=True):
        value = recipe.get(key)
        if (not isinstance(value, (int, float)) or isinstance(value, bool)
                or not (lo < value <= hi if low_open else lo <= value <= hi)):
            raise RecipeError(f"{source} has a {op} recipe whose {key} {value!r} is not a number in "
                              f"{'(' if low_open else '['}{lo}, {hi}]; the recipe is damaged")

    check_size(parent.shape[1], parent.shape[0], resolution, f"{source}'s parent image")
    if op in ("vary", "remix"):
        number("strength", 0, 1)
    elif op == "upscale":
        number("strength", 0, 1, low_open=False)
    elif op == "zoom-out":
        number("factor", 1, 4)
    elif op == "pan":
        number("amount", 0, 1)
        if recipe.get("direction") not in PAN_DIRECTIONS:
            raise RecipeError(f"{source} has a pan recipe whose direction {recipe.get('direction')!r} is not one "
                              f"of {', '.join(PAN_DIRECTIONS)}; the recipe is damaged")
    elif op == "inpaint":
        mask = pixels_from_text(recipe["mask"]) if isinstance(recipe.get("mask"), str) else None
        if mask is None or mask.shape != parent.shape[:2]:
            raise RecipeError(f"{source} has an inpaint recipe whose mask is missing or not of its parent's size; "
                              "the recipe is damaged")
    if output_size(op, parent, recipe) != (recipe["width"], recipe["height"]):
        raise RecipeError(f"{source}: the recipe says {recipe['width']}x{recipe['height']} but its {op} of a "
                          f"{parent.shape[1]}x{parent.shape[0]} parent makes another size; it is damaged")
