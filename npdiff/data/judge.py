"""The judge: read an image of the shapes world back into a Scene, and score it against a prompt.

    image (H, W, C) uint8
      -> label map: each pixel's nearest palette color, or none if it is far from all
      -> background: the most common label on the image border
      -> objects: connected components of each other color, kept if they look like an
         object rather than an edge artifact (see detect)
      -> per object, from a soft coverage map (below): color, shape (the best-fitting of
         three templates), size (the side that shape needs for the measured area, against
         SIZE_THRESHOLD), position (the centroid's third of the image)

Hard labels find objects; soft coverage measures them. Around each object every pixel
x is read as a blend alpha * c + (1 - alpha) * b of the object's color c and the
background b, alpha = (x - b).(c - b) / |c - b|^2, not clipped, so that zero-mean noise
adds no bias to the area sum(alpha) or the centroid. A square's ragged, noisy edge then
still has the area of a square, where counting hard-labelled pixels would not. The shape
is the template (drawn by the dataset's own anti-aliased renderer with the measured
area and centroid, sharp or softened by blur) with the least squared difference from
alpha.

Edge artifacts matter because anti-aliasing blends neighbouring colors, and some blends
are themselves near a palette color: half red, half yellow is almost exactly orange;
half red, half blue is near purple. Such blends make rings one or two pixels wide
around an object. A ring is not an object: it has no interior (nothing survives one
erosion), or, when blur widens it, its bounding box contains another object's.

score() compares a judged scene with what a prompt asks for, attribute by attribute,
only for the attributes the prompt names. Measured accuracy, clean and noisy, is in
tests/test_judge.py.

Dimension letters: H and W pixels, C=3 channels, K=8 palette colors, P pixels of a region.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from npdiff.data.shapes import (BASE_RESOLUTION, COLOR_NAMES, PALETTE, SHAPES, SIZE_THRESHOLD, SQRT3, Scene,
                                SceneObject, coverage, parse_caption)

MAX_COLOR_DISTANCE = 90.0   # RGB distance beyond which a pixel belongs to no palette color
MIN_AREA = 12.0             # px at 32x32 (scales with area); the smallest object, an 8 px triangle, has 28
REGION_GROWTH = 2           # px around an object's labelled pixels whose blend with the background counts
BLEND_DISTANCE = 45.0       # a palette color this near a blend of two others can be an edge artifact
TEMPLATE_BLURS = 3          # templates are compared sharp and after 1 and 2 passes of a 1-2-1 blur

# area of each shape per unit bounding-box side squared: side = sqrt(area / AREA_PER_SIDE2)
AREA_PER_SIDE2 = {"circle": np.pi / 4, "square": 1.0, "triangle": SQRT3 / 4}


@dataclass(frozen=True)
class Detection:
    """One object found in an image, with the measurements behind its attributes."""

    color: str
    shape: str
    size: str
    position: str
    area: float                     # sum of soft coverage, px
    side: float                     # bounding-box side the shape needs for that area, px
    centroid: tuple[float, float]   # (y, x), pixel centers at +0.5
    bbox: tuple[int, int, int, int]  # (y0, x0, y1, x1) of the labelled pixels, end exclusive
    misfit: dict[str, float]        # shape -> least squared difference from its templates / area

    def as_object(self) -> SceneObject:
        return SceneObject(self.color, self.shape, self.size, self.position)


def label_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, C) -> int (H, W): index into COLOR_NAMES of the nearest palette color, -1 if none is near."""
    x = image.astype(np.float32)                                           # (H, W, C)
    d2 = ((x[:, :, None, :] - PALETTE[None, None]) ** 2).sum(-1)           # (H, W, K)
    label = d2.argmin(-1)
    label[d2.min(-1) > MAX_COLOR_DISTANCE ** 2] = -1
    return label


def _shift_and(mask: np.ndarray, pad_value: bool, op) -> np.ndarray:
    """3x3 erosion (op = and) or dilation (op = or) of a boolean (H, W) mask."""
    p = np.pad(mask, 1, constant_values=pad_value)
    out = mask.copy()
    H, W = mask.shape
    for dy in range(3):
        for dx in range(3):
            out = op(out, p[dy:dy + H, dx:dx + W])
    return out


def erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion; outside the image counts as set (objects may touch the border)."""
    return _shift_and(mask, True, np.logical_and)


def dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    return _shift_and(mask, False, np.logical_or)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean (H, W) mask -> list of (k, 2) arrays of (y, x)."""
    H, W = mask.shape
    seen = ~mask
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, pixels = [(y0, x0)], []
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < H and 0 <= nx < W and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _bbox(pix: np.ndarray) -> tuple[int, int, int, int]:
    (y0, x0), (y1, x1) = pix.min(0), pix.max(0) + 1
    return int(y0), int(x0), int(y1), int(x1)


def _strictly_contains(outer: tuple, inner: tuple) -> bool:
    return outer != inner and inner[0] >= outer[0] and inner[1] >= outer[1] and \
        inner[2] <= outer[2] and inner[3] <= outer[3]


def _blends() -> set[tuple[int, int, int]]:
    """(object, background, k): some blend t*object + (1-t)*background lies within BLEND_DISTANCE of color k."""
    t = np.linspace(0.0, 1.0, 101, dtype=np.float32)[:, None]             # (101, 1)
    out = set()
    K = len(COLOR_NAMES)
    for j, b, k in itertools.permutations(range(K), 3):
        seg = t * PALETTE[j] + (1 - t) * PALETTE[b]                        # (101, C)
        if np.sqrt(((seg - PALETTE[k]) ** 2).sum(1)).min() < BLEND_DISTANCE:
            out.add((j, b, k))
    return out


BLENDS = _blends()   # with the palette above: red on blue or blue on red -> purple, red/yellow -> orange


def blur121(a: np.ndarray) -> np.ndarray:
    """One pass of the separable 1-2-1 filter over an (H, W) array, edges repeated (a Gaussian of sigma ~0.7 px)."""
    p = np.pad(a, 1, mode="edge")
    p = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    return 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]


def _measure(image: np.ndarray, region: np.ndarray, color: int, background: int,
             bbox: tuple[int, int, int, int]) -> Detection:
    """Attributes of one object from the soft coverage of its region (H, W) bool."""
    H, W, _ = image.shape
    b, c = PALETTE[background], PALETTE[color]                             # (C,)
    alpha = np.zeros((H, W), dtype=np.float32)                             # 0 outside the region
    alpha[region] = (image[region].astype(np.float32) - b) @ (c - b) / float((c - b) @ (c - b))
    area = max(float(alpha.sum()), 1e-6)
    centers = np.arange(max(H, W), dtype=np.float32) + 0.5
    cy = float(alpha.sum(1) @ centers[:H]) / area
    cx = float(alpha.sum(0) @ centers[:W]) / area
    px, py = centers[None, :W] - cx, centers[:H, None] - cy                # (1, W), (H, 1)
    misfit = {}
    for shape in SHAPES:
        side = np.sqrt(area / AREA_PER_SIDE2[shape])
        # a triangle's centroid lies h/6 below the center of its bounding box
        shift = side * SQRT3 / 12 if shape == "triangle" else 0.0
        template = coverage(shape, px, py + shift, np.float32(side))       # (H, W)
        # a generated image has softer edges than the renderer's: blur rounds a square's
        # corners towards a circle's, so each shape is also tried blurred, and the shape
        # keeps its best fit
        errors = []
        for _ in range(TEMPLATE_BLURS):
            errors.append(float(((alpha - template) ** 2).sum()) / area)
            template = blur121(template)
        misfit[shape] = min(errors)
    shape = min(misfit, key=misfit.get)
    side = float(np.sqrt(area / AREA_PER_SIDE2[shape]))
    size = "large" if side > SIZE_THRESHOLD * min(H, W) / BASE_RESOLUTION else "small"
    # the five positions are the plus-shaped cells of a 3x3 grid; a centroid in a corner
    # cell goes to whichever side it is further towards
    dy, dx = (cy - H / 2) / H, (cx - W / 2) / W
    if max(abs(dx), abs(dy)) < 1 / 6:
        position = "center"
    elif abs(dx) >= abs(dy):
        position = "left" if dx < 0 else "right"
    else:
        position = "top" if dy < 0 else "bottom"
    return Detection(COLOR_NAMES[color], shape, size, position, area, side, (cy, cx), bbox, misfit)


def detect(image: np.ndarray) -> tuple[str, list[Detection]]:
    """uint8 (H, W, C) -> (background color, objects largest first)."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"the judge reads uint8 (H, W, 3) images, got {image.dtype} {image.shape}")
    H, W, _ = image.shape
    label = label_pixels(image)                                            # (H, W)
    border = np.concatenate([label[0], label[-1], label[:, 0], label[:, -1]])
    border = border[border >= 0]
    if border.size == 0:
        raise ValueError("no border pixel is near any palette color; this is not a shapes image")
    bg = int(np.bincount(border, minlength=len(COLOR_NAMES)).argmax())
    min_area = MIN_AREA * (H * W) / BASE_RESOLUTION ** 2
    found = []                                                             # (color, pixels, bbox)
    for k in range(len(COLOR_NAMES)):
        if k == bg:
            continue
        mask = label == k
        if mask.sum() < min_area:
            continue
        core = erode(mask)
        for pix in components(mask):
            if len(pix) >= min_area and core[pix[:, 0], pix[:, 1]].any():
                found.append((k, pix, _bbox(pix)))
    # a ring drawn by blur encloses its object's box
    found = [f for f in found if not any(_strictly_contains(f[2], g[2]) for g in found)]
    masks = []
    for _, pix, _ in found:
        m = np.zeros((H, W), dtype=bool)
        m[pix[:, 0], pix[:, 1]] = True
        masks.append(m)
    # a patch of blend color touching a larger object whose edge makes that blend (an apex
    # cut by the border, a blurred corner); the dataset keeps objects GAP px apart, so two
    # real objects never touch
    keep = [not any((j, bg, k) in BLENDS and len(pj) > len(pk) and (dilate(mk) & mj).any()
                    for (j, pj, _), mj in zip(found, masks))
            for (k, pk, _), mk in zip(found, masks)]
    found = [f for f, ok in zip(found, keep) if ok]
    masks = [m for m, ok in zip(masks, keep) if ok]
    taken = np.logical_or.reduce(masks) if masks else np.zeros((H, W), dtype=bool)
    objects = []
    for (k, _, bbox), m in zip(found, masks):
        region = m
        for _ in range(REGION_GROWTH):
            region = dilate(region)
        region &= ~(taken & ~m)                 # never another object's pixels
        objects.append(_measure(image, region, k, bg, bbox))
    objects.sort(key=lambda d: -d.area)
    return COLOR_NAMES[bg], objects


def judge_image(image: np.ndarray) -> Scene:
    """uint8 (H, W, C) -> the Scene it shows: background color and objects, largest first."""
    background, objects = detect(image)
    return Scene(tuple(d.as_object() for d in objects), background)


ATTRIBUTES = ("color", "shape", "size", "position")


def score(scene: Scene, prompt: str | Scene) -> dict[str, bool]:
    """Per attribute the prompt names: does the judged scene agree?

    Keys: "count" (always: as many objects as the prompt describes), "background" if
    named, and for a one-object prompt "color", "shape", "size", "position" as named;
    for a two-object prompt the same with the object's index in the prompt, "color.0",
    "shape.1", ... (attribute = key.partition(".")[0]). Prompt objects are matched to
    judged objects one to one, by the assignment that agrees on the most named
    attributes; a prompt object left without a match gets False for all it names.
    """
    spec = parse_caption(prompt) if isinstance(prompt, str) else prompt
    result = {"count": len(scene.objects) == len(spec.objects)}
    if spec.background is not None:
        result["background"] = scene.background == spec.background
    want = spec.objects
    have: list[SceneObject | None] = list(scene.objects) + [None] * max(0, len(want) - len(scene.objects))

    def agree(w: SceneObject, h: SceneObject | None) -> dict[str, bool]:
        return {a: h is not None and getattr(h, a) == getattr(w, a) for a in ATTRIBUTES if getattr(w, a) is not None}

    best, best_hits = None, -1
    for perm in itertools.permutations(range(len(have)), len(want)):
        checks = [agree(w, have[j]) for w, j in zip(want, perm)]
        hits = sum(sum(c.values()) for c in checks)
        if hits > best_hits:               # strict: ties keep the earliest (largest objects first)
            best, best_hits = checks, hits
    for i, checks in enumerate(best or []):
        for attr, ok in checks.items():
            result[attr if len(want) == 1 else f"{attr}.{i}"] = ok
    return result
