"""The `shapes` dataset: procedural captioned images of circles, squares and triangles.

A tiny, fully known world, so that a small model can learn it in hours on a CPU and
a judge (npdiff/data/judge.py) can read every generated image back and say whether
it matches its prompt. Three layers, each usable on its own:

    Scene       what is in an image: a background color and one or two objects, each
                with a color, shape, size and position (all categorical). A *spec* is a
                Scene with some attributes left as None: the meaning of a caption.
    caption     describe(spec) -> text and parse_caption(text) -> spec, inverse of each
                other on the grammar below.
    pixels      render(scenes, rng, resolution) draws complete scenes, with jitter of
                size and position, anti-aliased, vectorized over the batch.

Caption grammar (canonical word order; two objects are joined by " and ", the
background phrase closes the caption):

    caption    = object [" and " object] [" on a " COLOR " background"]
    object     = ("a" | "an") [" " SIZE] [" " COLOR] " " (SHAPE | "shape") [" " place]
    place      = "on the left" | "on the right" | "on the top" | "on the bottom" | "in the center"

    "a red circle", "a small blue square on the left",
    "a large yellow triangle on a black background",
    "a red circle on the left and a blue square on the right"

("an" goes before a vowel: "an orange circle", "on an orange background".) An attribute
the caption does not name is drawn at random (the background never takes an object's
color). How often each is named (NAME_PROB; color and shape almost always, so that the
model sees them in nearly every caption):

    one object (50% of captions):   color 0.9, shape 0.9, size 0.5, position 0.5, background 0.5
    two objects (50%):              color 0.9 and shape 0.9 and size 0.3, object by object;
                                    position 0.8 (both objects or neither); background 0.3

Geometry, in pixels of a 32x32 image (everything scales with the resolution): an
object's size is the side of its bounding box, small 8-12 px and large 16-22 px; a
triangle points up and is equilateral (width s, height s*sqrt(3)/2). A position means
the object's centroid lies in the matching cell of a 3x3 grid (left: left third of the
columns and middle third of the rows, and so on), at least CELL_MARGIN inside it, and
the whole object lies inside the image. Where a large object does not fit in its cell
at the size drawn, it shrinks until it does: a large triangle at the top is at most
17.2 px, a large object on a side at most 19.8 px, and no large object is below 16 px.
The judge's small/large threshold is 14 px. Two objects always sit at opposite
positions (left/right or top/bottom) with a gap of GAP px, and at most one of them is
large, because two large objects cannot sit side by side in 32 px without touching.

The color-shape pairs in HELD_OUT_PAIRS are never drawn in training
(allow_held_out=False); evaluation renders them on purpose to test composition.

Dimension letters: N images, M objects over the batch, H and W pixels, C=3 channels.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
COLOR_NAMES = tuple(COLORS)
PALETTE = np.array([COLORS[c] for c in COLOR_NAMES], dtype=np.float32)  # (8, C)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}

# Never drawn in training; rendered only when allow_held_out=True (evaluation).
HELD_OUT_PAIRS = frozenset({("purple", "triangle"), ("orange", "circle"), ("green", "square")})

# Geometry at the base resolution; multiplied by resolution / BASE_RESOLUTION.
BASE_RESOLUTION = 32
SIZE_RANGE = {"small": (8.0, 12.0), "large": (16.0, 22.0)}        # bounding-box side, px
PAIR_SIZE_RANGE = {"small": (8.0, 11.0), "large": (16.0, 18.0)}   # two objects must fit side by side
SIZE_THRESHOLD = 14.0   # px; the judge's boundary between small and large
CELL_MARGIN = 0.75      # px; how far inside its third a centroid must lie
GAP = 3.0               # px; least distance between the bounding boxes of two objects
MAX_JITTER = 2.5        # px; a lone object's centroid moves at most this far from its cell's spot

# How a random caption is made (see sample_scenes).
P_TWO_OBJECTS = 0.5
NAME_PROB = {
    1: {"color": 0.9, "shape": 0.9, "size": 0.5, "position": 0.5, "background": 0.5},
    2: {"color": 0.9, "shape": 0.9, "size": 0.3, "position": 0.8, "background": 0.3},
}

SQRT3 = math.sqrt(3.0)


@dataclass(frozen=True)
class SceneObject:
    """One object; None means "not specified" (only in a spec, never in a drawn scene)."""

    color: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class Scene:
    """A background color and one or two objects: what an image shows, or what a caption asks for."""

    objects: tuple[SceneObject, ...]
    background: str | None = None

    def is_complete(self) -> bool:
        return self.background is not None and all(
            None not in (o.color, o.shape, o.size, o.position) for o in self.objects)


# ----------------------------------------------------------------------------
# captions: spec <-> text

PLACE_PHRASE = {"center": "in the center", "left": "on the left", "right": "on the right",
                "top": "on the top", "bottom": "on the bottom"}

# Words the parser understands beyond the canonical ones (user prompts, not captions).
_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
_SHAPE_WORDS = {"circle": "circle", "circles": "circle", "disc": "circle", "disk": "circle",
                "square": "square", "squares": "square", "triangle": "triangle", "triangles": "triangle"}
_PLACE_WORDS = {"center": "center", "centre": "center", "middle": "center", "left": "left", "right": "right",
                "top": "top", "bottom": "bottom"}
_BACKGROUND_RE = re.compile(r"(?:\b(?:on|against|with|over)\s+)?(?:\b(?:a|an|the)\s+)?\b([a-z]+)\s+background\b")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(spec: Scene) -> str:
    """The canonical caption of a spec: it names exactly the attributes that are not None."""
    parts = []
    for obj in spec.objects:
        words = [w for w in (obj.size, obj.color) if w is not None] + [obj.shape or "shape"]
        phrase = _article(words[0]) + " " + " ".join(words)
        if obj.position is not None:
            phrase += " " + PLACE_PHRASE[obj.position]
        parts.append(phrase)
    text = " and ".join(parts)
    if spec.background is not None:
        text += f" on {_article(spec.background)} {spec.background} background"
    return text


def parse_caption(text: str) -> Scene:
    """What a caption or prompt asks for -> spec (a Scene whose unnamed attributes are None).

    Inverse of describe() on the grammar; also reads common variants ("at the top",
    "in the middle", "big", "against a white background"). Words it does not know are
    ignored; a background of an unknown color is a ValueError.
    """
    t = " ".join(re.sub(r"[^a-z]+", " ", text.lower()).split())
    background = None
    m = _BACKGROUND_RE.search(t)
    if m:
        if m.group(1) not in COLORS:
            raise ValueError(f"unknown background color {m.group(1)!r} in {text!r}; "
                             f"the colors are {', '.join(COLOR_NAMES)}")
        background = m.group(1)
        t = t[:m.start()] + " " + t[m.end():]
    objects = []
    for clause in re.split(r"\band\b", t):
        found: dict[str, str] = {}
        for word in clause.split():
            for attr, table in (("size", _SIZE_WORDS), ("shape", _SHAPE_WORDS), ("position", _PLACE_WORDS)):
                if word in table:
                    found.setdefault(attr, table[word])
            if word in COLORS:
                found.setdefault("color", word)
        if found or "shape" in clause.split() or "object" in clause.split():
            objects.append(SceneObject(**found))
    return Scene(tuple(objects), background)


def validate_spec(spec: Scene, allow_held_out: bool = True) -> None:
    """Raise ValueError if no image of the shapes world can show this spec."""
    n = len(spec.objects)
    if n not in (1, 2):
        raise ValueError(f"a shapes scene has one or two objects, this one asks for {n}")
    for o in spec.objects:
        for attr, values in (("color", COLOR_NAMES), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
            v = getattr(o, attr)
            if v is not None and v not in values:
                raise ValueError(f"unknown {attr} {v!r}; expected one of {', '.join(values)}")
        if not allow_held_out and (o.color, o.shape) in HELD_OUT_PAIRS:
            raise ValueError(f"{o.color} {o.shape} is a held-out pair, never drawn in training")
        if spec.background is not None and o.color == spec.background:
            raise ValueError(f"a {o.color} object cannot sit on a {o.color} background")
    if spec.background is not None and spec.background not in COLORS:
        raise ValueError(f"unknown background color {spec.background!r}")
    if n == 2:
        a, b = spec.objects
        if a.position is not None and b.position is not None and OPPOSITE.get(a.position) != b.position:
            raise ValueError(f"two objects sit at opposite positions (left/right or top/bottom), "
                             f"not {a.position}/{b.position}")
        if "center" in (a.position, b.position):
            raise ValueError("with two objects neither sits in the center; use left/right or top/bottom")
        if a.size == b.size == "large":
            raise ValueError("two large objects do not fit side by side; at most one of two objects is large")


# ----------------------------------------------------------------------------
# scenes: random completion of a spec

def complete(spec: Scene, rng: np.random.Generator, allow_held_out: bool = True) -> Scene:
    """Fill every None of a spec at random, within the rules of the world -> a complete Scene."""
    validate_spec(spec, allow_held_out)
    objs = list(spec.objects)
    if len(objs) == 2:
        a, b = objs
        pa, pb = a.position, b.position
        if pa is None and pb is None:
            pa = ("left", "top")[rng.integers(2)]
            if rng.random() < 0.5:
                pa = OPPOSITE[pa]
        pa = pa or OPPOSITE[pb]
        pb = pb or OPPOSITE[pa]
        sa, sb = a.size, b.size
        if sa is None and sb is None:
            sa, sb = (("small", "small"), ("small", "large"), ("large", "small"))[rng.integers(3)]
        sa = sa or ("small" if sb == "large" else SIZES[rng.integers(2)])
        sb = sb or ("small" if sa == "large" else SIZES[rng.integers(2)])
        objs = [replace(a, position=pa, size=sa), replace(b, position=pb, size=sb)]
    done = []
    for o in objs:
        shape = o.shape
        if shape is None:
            options = [s for s in SHAPES if allow_held_out or (o.color, s) not in HELD_OUT_PAIRS]
            shape = options[rng.integers(len(options))]
        color = o.color
        if color is None:
            options = [c for c in COLOR_NAMES if c != spec.background
                       and (allow_held_out or (c, shape) not in HELD_OUT_PAIRS)]
            color = options[rng.integers(len(options))]
        size = o.size or SIZES[rng.integers(2)]
        position = o.position or POSITIONS[rng.integers(len(POSITIONS))]
        done.append(SceneObject(color, shape, size, position))
    background = spec.background
    if background is None:
        used = {o.color for o in done}
        options = [c for c in COLOR_NAMES if c not in used]
        background = options[rng.integers(len(options))]
    return Scene(tuple(done), background)


def sample_scenes(rng: np.random.Generator, n: int, allow_held_out: bool = False) -> tuple[list[Scene], list[str]]:
    """n random (complete scene, caption) pairs; the caption names a random subset of the scene.

    Each scene is a random completion of an empty spec with one object (probability
    1 - P_TWO_OBJECTS) or two; then each attribute is named with its NAME_PROB (for two
    objects, positions are named for both or neither, and the other attributes object
    by object).
    """
    scenes, captions = [], []
    for _ in range(n):
        k = 2 if rng.random() < P_TWO_OBJECTS else 1
        scene = complete(Scene((SceneObject(),) * k), rng, allow_held_out)
        p = NAME_PROB[k]
        named_position = rng.random() < p["position"]
        objs = []
        for o in scene.objects:
            keep = rng.random(3) < (p["color"], p["shape"], p["size"])
            objs.append(SceneObject(o.color if keep[0] else None, o.shape if keep[1] else None,
                                    o.size if keep[2] else None, o.position if named_position else None))
        background = scene.background if rng.random() < p["background"] else None
        scenes.append(scene)
        captions.append(describe(Scene(tuple(objs), background)))
    return scenes, captions


_CAPTION_BACKGROUND_RE = re.compile(r" on an? [a-z]+ background$")


def phrase_spans(caption: str) -> list[tuple[int, int] | None]:
    """Where a caption of the grammar names each thing it shows -> [first object, second object,
    background], each a (start, end) character span of the caption, or None when not named:
    "a red circle and a blue square on a black background" -> [(0, 12), (17, 30), (30, 52)].
    The " and " between objects belongs to neither. The empty caption names nothing."""
    m = _CAPTION_BACKGROUND_RE.search(caption)
    end = m.start() if m else len(caption)
    spans: list[tuple[int, int] | None] = []
    start = 0
    for part in caption[:end].split(" and ") if end else []:
        spans.append((start, start + len(part)))
        start += len(part) + len(" and ")
    spans = (spans + [None, None])[:2]
    return spans + [(m.start(), m.end()) if m else None]


def caption_corpus(n: int = 20000, seed: int = 0) -> list[str]:
    """A fixed sample of training captions (for training the tokenizer)."""
    return sample_scenes(np.random.default_rng(seed), n)[1]


def held_out_captions() -> list[str]:
    """One caption per held-out color-shape pair, e.g. "a purple triangle"."""
    return [describe(Scene((SceneObject(c, s),))) for c, s in sorted(HELD_OUT_PAIRS)]


# ----------------------------------------------------------------------------
# layout: where each object goes, in pixels

def _extent(shape: str, s: float) -> tuple[float, float, float]:
    """-> (width, height, centroid's distance below the top of the bounding box)."""
    if shape == "triangle":
        h = s * SQRT3 / 2
        return s, h, 2 * h / 3          # a triangle's centroid is 2/3 of the way from apex to base
    return s, s, s / 2


def _cell(position: str, axis: int, L: float) -> tuple[float, float]:
    """The interval of a position's third along axis 0 (x) or 1 (y) of an image of side L."""
    third = {"left": 0, "right": 2, "top": 1, "bottom": 1, "center": 1}[position] if axis == 0 else \
            {"top": 0, "bottom": 2, "left": 1, "right": 1, "center": 1}[position]
    return third * L / 3, (third + 1) * L / 3


def _interval(extent: float, offset: float, cell: tuple[float, float], L: float, margin: float):
    """Feasible positions q of a box's near edge: inside [0, L] and centroid q + offset inside the cell."""
    return max(0.0, cell[0] + margin - offset), min(L - extent, cell[1] - margin - offset)


def _layout(scene: Scene, rng: np.random.Generator, R: int) -> list[tuple[str, float, float, float, str]]:
    """-> per object (shape, x center, y center of its bounding box, side s, color), in pixels."""
    r = R / BASE_RESOLUTION
    L, margin, gap = float(R), CELL_MARGIN * r, GAP * r
    two = len(scene.objects) == 2
    ranges = PAIR_SIZE_RANGE if two else SIZE_RANGE
    sides = [r * rng.uniform(*ranges[o.size]) for o in scene.objects]
    # the axis along which two objects are separated: x for left/right, y for top/bottom
    split = 0 if two and scene.objects[0].position in ("left", "right") else 1
    if two and scene.objects[0].position in ("right", "bottom"):
        order = (1, 0)                  # order[0] is the object nearer the origin
    else:
        order = (0, 1)

    def intervals(scale):
        out = []
        for o, s in zip(scene.objects, sides):
            w, h, cy = _extent(o.shape, s * scale)
            out.append((_interval(w, w / 2, _cell(o.position, 0, L), L, margin),
                        _interval(h, cy, _cell(o.position, 1, L), L, margin), (w, h)))
        return out

    def feasible(scale):
        iv = intervals(scale)
        if any(lo > hi for o in iv for lo, hi in o[:2]):
            return False
        if two:
            a, b = iv[order[0]], iv[order[1]]
            return a[split][0] + a[2][split] + gap <= b[split][1]
        return True

    scale = 1.0
    if not feasible(1.0):               # shrink everything by the largest factor that fits (bisection)
        lo, hi = 0.3, 1.0
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if feasible(mid) else (lo, mid)
        scale = lo
    iv = intervals(scale)
    q = [[0.0, 0.0] for _ in scene.objects]    # near edges (x, y) of each bounding box
    for i, (ix, iy, _) in enumerate(iv):
        for axis, (lo, hi) in enumerate((ix, iy)):
            if two and axis == split:
                continue
            mid, half = (lo + hi) / 2, min((hi - lo) / 2, MAX_JITTER * r)
            q[i][axis] = rng.uniform(mid - half, mid + half)
    if two:                             # the nearer object first, then the other beyond it and the gap
        a, b = order
        (alo, ahi), (blo, bhi) = iv[a][split], iv[b][split]
        ea = iv[a][2][split]
        q[a][split] = rng.uniform(alo, min(ahi, bhi - ea - gap))
        q[b][split] = rng.uniform(max(blo, q[a][split] + ea + gap), bhi)
    out = []
    for o, s, (x0, y0), (_, _, (w, h)) in zip(scene.objects, sides, q, iv):
        out.append((o.shape, x0 + w / 2, y0 + h / 2, s * scale, o.color))
    return out


# ----------------------------------------------------------------------------
# pixels

def coverage(shape: str, px: np.ndarray, py: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance d (px, negative inside): clip(0.5 - d, 0, 1).

    For a straight edge this is the exact fraction of a pixel that the shape covers when
    the edge is axis-aligned, and close to it otherwise. px and py are offsets of pixel
    centers from the bounding box's center and s is the side, all broadcast together
    (render passes px (M, 1, W), py (M, H, 1), s (M, 1, 1)).
    """
    if shape == "circle":
        d = np.sqrt(px * px + py * py) - s / 2
    elif shape == "square":
        d = np.maximum(np.abs(px) - s / 2, np.abs(py) - s / 2)
    else:
        # apex up at (0, -h/2), base from (-s/2, h/2) to (s/2, h/2); y grows downwards.
        # Inside = below both slanted edges and above the base; outward unit normals
        # (-+sqrt3/2, -1/2) for the slanted edges, (0, 1) for the base.
        h = s * SQRT3 / 2
        slant = (SQRT3 / 2) * np.abs(px) - py / 2 - h / 4
        d = np.maximum(slant, py - h / 2)
    return np.clip(0.5 - d, 0.0, 1.0)   # (M, H, W)


def render(scenes: list[Scene], rng: np.random.Generator, resolution: int = BASE_RESOLUTION,
           return_masks: bool = False):
    """Draw complete scenes -> uint8 (N, H, W, C), H = W = resolution. Layout jitter comes from rng.

    With return_masks, also each object's coverage, float32 (N, 2, H, W) in [0, 1]: channel k is
    scene.objects[k] (zero for a scene's missing second object). The masks use no randomness of
    their own, so the images are the same with and without them."""
    R = int(resolution)
    if R < 16:
        raise ValueError(f"resolution {R} is too small for the shapes dataset; use 16 or more (32 is native)")
    N = len(scenes)
    canvas = np.empty((N, R, R, 3), dtype=np.float32)  # (N, H, W, C)
    masks = np.zeros((N, 2, R, R), dtype=np.float32) if return_masks else None
    rows = []                                          # (image, slot, shape, xc, yc, s, color)
    for n, scene in enumerate(scenes):
        if not scene.is_complete():
            raise ValueError(f"render() needs a complete scene; use complete() first: {scene}")
        canvas[n] = PALETTE[COLOR_NAMES.index(scene.background)]
        for slot, obj in enumerate(_layout(scene, rng, R)):
            rows.append((n, slot) + obj)
    centers = np.arange(R, dtype=np.float32) + 0.5    # pixel centers, (W,)
    for shape in SHAPES:
        sel = [row for row in rows if row[2] == shape]
        if not sel:
            continue
        img = np.array([row[0] for row in sel])                                  # (M,)
        slot = np.array([row[1] for row in sel])                                 # (M,)
        xc, yc, s = (np.array([row[k] for row in sel], dtype=np.float32)[:, None, None] for k in (3, 4, 5))
        color = PALETTE[[COLOR_NAMES.index(row[6]) for row in sel]]              # (M, C)
        alpha = coverage(shape, centers[None, None, :] - xc, centers[None, :, None] - yc, s)  # (M, H, W)
        # objects of one image never overlap, so compositing order does not matter; the
        # slot split keeps every fancy-index assignment free of repeated images
        for k in (0, 1):
            m = slot == k
            if m.any():
                idx = img[m]
                a = alpha[m][..., None]                                          # (m, H, W, 1)
                canvas[idx] += a * (color[m][:, None, None, :] - canvas[idx])
                if masks is not None:
                    masks[idx, k] = alpha[m]
    images = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return (images, masks) if return_masks else images


def sample_batch(rng: np.random.Generator, n: int, resolution: int = BASE_RESOLUTION,
                 allow_held_out: bool = False, return_masks: bool = False):
    """n random captioned images -> (uint8 (N, H, W, C), captions, complete scenes drawn), and with
    return_masks the objects' coverage (N, 2, H, W) last (see render).

    Deterministic given the state of rng. Held-out color-shape pairs are never drawn
    unless allow_held_out.
    """
    scenes, captions = sample_scenes(rng, n, allow_held_out)
    if return_masks:
        images, masks = render(scenes, rng, resolution, return_masks=True)
        return images, captions, scenes, masks
    return render(scenes, rng, resolution), captions, scenes


def render_prompt(prompt: str | Scene, rng: np.random.Generator, resolution: int = BASE_RESOLUTION,
                  allow_held_out: bool = True) -> tuple[np.ndarray, Scene]:
    """A reference image for a prompt (or spec) -> (uint8 (H, W, C), the complete scene drawn)."""
    spec = parse_caption(prompt) if isinstance(prompt, str) else prompt
    scene = complete(spec, rng, allow_held_out)
    return render([scene], rng, resolution)[0], scene


class ShapesDataset:
    """An endless, seeded stream of captioned shapes images."""

    def __init__(self, seed: int = 0, resolution: int = BASE_RESOLUTION):
        self.resolution = int(resolution)
        self.rng = np.random.default_rng(seed)

    def next_batch(self, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        return sample_batch(self.rng, n, self.resolution)

    def sample_batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], list[Scene]]:
        return sample_batch(rng, n, self.resolution)

    def corpus(self, n: int = 20000) -> list[str]:
        return caption_corpus(n)
