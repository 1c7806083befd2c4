"""Provenance: every PNG npdiff writes says how it was made, twice.

    parameters   A1111's "infotext", so that Stable Diffusion web UI's PNG Info tab (and the many
                 tools that read it) show the prompt and settings:

                     a red circle on a blue background
                     Negative prompt: green
                     Steps: 25, Sampler: DPM++ 2M, CFG scale: 3.0, Seed: 42, Size: 32x32, Model hash: 3f2a9c1b7e, ...

                 The last line is "Key: value" pairs split on ", "; a value holding a comma, colon or
                 quote is written as a JSON string, which is how that parser reads it back. The model
                 hash is the first 10 hex digits of the SHA-256 of model.safetensors (A1111's "AutoV2").

    npdiff       the recipe, a JSON object with everything needed to make the same pixels again:
                 the operation, prompt, negative prompt, seed, the batch it belongs to, sampler,
                 steps, guidance, chaos, size, model hash, backend and dtype, the operation's own
                 settings, and for an edit its parent: the parent's pixels (so the edit can be re-made
                 from this one file) and, if npdiff made the parent, the parent's recipe (the lineage).

A recipe names a batch: `n` images from seeds seed, seed+1, ..., of which this image is number
`index` (None for the grid). Re-making an image re-runs the whole batch and keeps that one image,
because a batched network call need not round the same way for one image as for four.

Nothing time- or place-dependent goes into a recipe, so equal recipes give equal PNG bytes.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

RECIPE_FORMAT = "npdiff-recipe/1"
PARAMETERS_KEY = "parameters"
RECIPE_KEY = "npdiff"

OPERATIONS = ("sample", "vary", "remix", "inpaint", "zoom-out", "pan", "upscale")

# npdiff sampler name -> (A1111's sampler name, A1111's "Schedule type" or None)
A1111_SAMPLERS = {
    "ddpm": ("DDPM", None),
    "ddim": ("DDIM", None),
    "dpmpp-2m": ("DPM++ 2M", None),
    "euler": ("Euler", "Karras"),      # npdiff's Euler, Heun and Euler a walk Karras sigmas (rho = 7)
    "heun": ("Heun", "Karras"),
    "euler-a": ("Euler a", "Karras"),
}


class RecipeError(ValueError):
    """A recipe that is missing, malformed, or cannot be followed with what is at hand."""


# ----------------------------------------------------------------------------
# hashes

def model_hash(weights_path: str | os.PathLike) -> str:
    """A1111's short model hash: the first 10 hex digits of the SHA-256 of the weights file."""
    h = hashlib.sha256()
    with open(weights_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def pixels_hash(img: np.ndarray) -> str:
    """SHA-256 (16 hex digits) of an (H, W, 3) uint8 image's shape and pixels: the identity of a parent."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    return hashlib.sha256(f"{img.shape}".encode() + img.tobytes()).hexdigest()[:16]


def pixels_to_text(img: np.ndarray) -> str:
    """(H, W, C) uint8 -> base64 of a plain PNG (for parents and masks kept inside a recipe)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def pixels_from_text(text: str) -> np.ndarray:
    from PIL import Image
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
            return np.asarray(im)
    except Exception as e:  # noqa: BLE001 - any decoding failure means the same thing to the user
        raise RecipeError(f"a recipe holds an image that cannot be decoded ({e})") from None


# ----------------------------------------------------------------------------
# the two text chunks

def _quote(value: str) -> str:
    """A value of the infotext's last line: JSON-quoted when it would otherwise split the line."""
    return json.dumps(value) if any(c in value for c in ',:"\n') else value


def infotext(recipe: dict) -> str:
    """The A1111 `parameters` text of a recipe (see the module docstring)."""
    name, schedule_type = A1111_SAMPLERS[recipe["sampler"]]
    seed = recipe["seed"] + (recipe["index"] or 0)
    fields = [("Steps", str(recipe["steps"])), ("Sampler", name)]
    if schedule_type:
        fields.append(("Schedule type", schedule_type))
    fields += [("CFG scale", _fmt(recipe_cfg(recipe))), ("Seed", str(seed)),
               ("Size", f"{recipe['width']}x{recipe['height']}"), ("Model hash", recipe["model_hash"]),
               ("Model", recipe.get("model_name") or "npdiff")]
    if recipe.get("strength") is not None:
        fields.append(("Denoising strength", _fmt(recipe["strength"])))
    if recipe.get("chaos"):
        fields.append(("Chaos", str(recipe["chaos"])))
    if recipe["operation"] != "sample":
        fields.append(("Operation", recipe["operation"]))
    fields.append(("Version", f"npdiff {recipe['npdiff_version']}"))
    prompt_line = recipe["prompt"].replace("\n", " ")
    negative_line = ("Negative prompt: " + recipe["negative_prompt"].replace("\n", " ")).rstrip()
    return "\n".join([prompt_line, negative_line, ", ".join(f"{k}: {_quote(v)}" for k, v in fields)])


def _fmt(x: float) -> str:
    return f"{float(x):.6g}"


def recipe_cfg(recipe: dict) -> float:
    """The guidance scale this image was drawn with (chaos lowers it image by image; see chaos_scales)."""
    from npdiff.pipeline import chaos_scales
    if recipe["index"] is None:
        return float(recipe["cfg"])
    return float(chaos_scales(recipe["cfg"], recipe["chaos"], recipe["n"])[recipe["index"]])


def png_text(recipe: dict) -> dict[str, str]:
    """The text chunks of a PNG made by `recipe`, in a fixed order."""
    return {PARAMETERS_KEY: infotext(recipe), RECIPE_KEY: json.dumps(recipe, sort_keys=True, separators=(",", ":"))}


def for_image(recipe: dict, index: int | None) -> dict:
    """The recipe of image `index` of the batch (None: the grid of the whole batch)."""
    r = dict(recipe)
    r["index"] = index
    return r


def read_recipe(text_chunks: dict[str, str], source: str) -> dict:
    """The npdiff recipe from a PNG's text chunks; RecipeError if there is none or it is malformed."""
    raw = text_chunks.get(RECIPE_KEY)
    if raw is None:
        raise RecipeError(f"{source} has no npdiff recipe (it was not made by npdiff, or its metadata "
                          "was stripped); it can still be edited with vary --prompt")
    try:
        recipe = json.loads(raw)
    except json.JSONDecodeError as e:
        raise RecipeError(f"{source} has a damaged npdiff recipe ({e})") from None
    check_recipe(recipe, source)
    return recipe


# the values each numeric setting may take, in a recipe and on the command line alike (image i of a batch
# has seed + i, which must stay below 2^63)
RANGES = {"steps": (1, 1000), "n": (1, 64), "chaos": (0, 100), "cfg": (0, 30), "seed": (0, 2**63 - 65)}

_REQUIRED = {"format": str, "operation": str, "prompt": str, "negative_prompt": str, "seed": int, "n": int,
             "steps": int, "sampler": str, "cfg": (int, float), "chaos": int, "width": int, "height": int,
             "model_hash": str, "backend": str, "dtype": str}


def check_recipe(recipe, source: str) -> None:
    if not isinstance(recipe, dict):
        raise RecipeError(f"{source} has an npdiff recipe that is not a JSON object")
    if recipe.get("format") != RECIPE_FORMAT:
        raise RecipeError(f"{source} has recipe format {recipe.get('format')!r}; this npdiff reads {RECIPE_FORMAT!r}")
    for key, kind in _REQUIRED.items():
        if not isinstance(recipe.get(key), kind) or isinstance(recipe.get(key), bool):
            raise RecipeError(f"{source} has an npdiff recipe whose {key!r} is missing or of the wrong type")
    if recipe["operation"] not in OPERATIONS:
        raise RecipeError(f"{source} has an npdiff recipe with unknown operation {recipe['operation']!r}")
    if recipe["sampler"] not in A1111_SAMPLERS:
        raise RecipeError(f"{source} has an npdiff recipe with unknown sampler {recipe['sampler']!r}")
    for key, (lo, hi) in RANGES.items():
        if not lo <= recipe[key] <= hi:
            raise RecipeError(f"{source} has an npdiff recipe whose {key} {recipe[key]!r} is not in {lo}..{hi}; "
                              "the recipe is damaged")
    index = recipe.get("index")
    if index is not None and not (isinstance(index, int) and 0 <= index < recipe["n"]):
        raise RecipeError(f"{source} has an npdiff recipe whose index {index!r} is not in 0..{recipe['n'] - 1}")
    parent = recipe.get("parent")
    if recipe["operation"] != "sample" and parent is None:
        raise RecipeError(f"{source} has an npdiff recipe for {recipe['operation']} that names no parent image")
    if parent is not None:
        if not isinstance(parent, dict) or not isinstance(parent.get("sha256"), str):
            raise RecipeError(f"{source} has an npdiff recipe with a malformed parent")
        if parent.get("recipe") is not None:
            check_recipe(parent["recipe"], f"{source} (its parent's recipe)")


# ----------------------------------------------------------------------------
# parents

def parent_record(pixels: np.ndarray, file: str | os.PathLike, recipe: dict | None) -> dict:
    """What a child records of its parent: its file name, the hash and the pixels the child was made
    from (so the child can be re-made from its own file alone), and the parent's recipe if npdiff made
    it (the lineage; pixels of older ancestors are left out, their hashes stay)."""
    record = {"file": Path(file).name, "sha256": pixels_hash(pixels), "pixels": pixels_to_text(pixels)}
    if recipe is not None:
        record["recipe"] = _without_pixels(recipe)
    return record


def _without_pixels(recipe: dict) -> dict:
    recipe = copy.deepcopy(recipe)
    r = recipe
    while r is not None and r.get("parent") is not None:
        r["parent"].pop("pixels", None)
        r = r["parent"].get("recipe")
    return recipe


def parent_pixels(recipe: dict, source: str) -> np.ndarray:
    """The (H, W, 3) uint8 image an edit was made from, checked against its recorded hash."""
    parent = recipe.get("parent")
    if parent is None or "pixels" not in parent:
        raise RecipeError(f"{source} is a {recipe['operation']} but its recipe does not hold its parent image")
    img = pixels_from_text(parent["pixels"])
    if img.ndim != 3 or img.shape[2] != 3 or pixels_hash(img) != parent["sha256"]:
        raise RecipeError(f"{source} holds a parent image that does not match its recorded hash; the recipe is damaged")
    return img


def lineage(recipe: dict) -> list[str]:
    """Operations from the first ancestor to this image, e.g. ["sample", "vary", "upscale"]."""
    chain = []
    while recipe is not None:
        chain.append(recipe["operation"])
        recipe = (recipe.get("parent") or {}).get("recipe")
    return chain[::-1]
