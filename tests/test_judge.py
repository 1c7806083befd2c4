"""The judge reads shapes images back: ground truth is the scene the generator drew.

Accuracy is per attribute: for each image, score(judged scene, true scene) checks
count, background, and each object's color, shape, size and position (the true scene
names everything). Tolerances and what was measured when they were set (seeded, so
each run measures the same images):

    clean, 32x32, 1000 images                        >= 99%   (measured 100% on every attribute)
    clean, 48x48 and 64x64, 200 images each          >= 99%   (measured 100%)
    Gaussian noise sigma = 16 (of 255) per channel   >= 99%   (measured 99.8% count, 99.86% the rest)
    1-2-1 blur, then noise sigma = 12                >= 99%   (measured 99.8% count, 99.86% the rest)
    two passes of 1-2-1 blur (sigma ~1 px), 1000     >= 99%   (measured 99.5% count, 99.72% the rest)

Beyond these the judge degrades gradually (1000 images each): at sigma = 24 it
measured 99.4% count and 99.57% the rest, at sigma = 32 95.5% count and 96.6-96.8%
the rest; small orange triangles, orange lying only 71 from yellow, are lost first.
"""

from collections import Counter

import numpy as np
import pytest

from npdiff.data import judge, shapes
from npdiff.data.shapes import Scene, SceneObject


def degrade(images, sigma=0.0, blur=0, seed=0):
    """Blur passes of the separable 1-2-1 filter (edges repeated), then Gaussian noise of sigma, then rounding."""
    x = images.astype(np.float64)                   # (N, H, W, C)
    for _ in range(blur):
        x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        x = 0.25 * x[:, :-2] + 0.5 * x[:, 1:-1] + 0.25 * x[:, 2:]
        x = 0.25 * x[:, :, :-2] + 0.5 * x[:, :, 1:-1] + 0.25 * x[:, :, 2:]
    if sigma:
        x = x + np.random.default_rng(seed).normal(0.0, sigma, x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def accuracy(images, scenes):
    hits, totals = Counter(), Counter()
    for img, truth in zip(images, scenes):
        for key, ok in judge.score(judge.judge_image(img), truth).items():
            attr = key.partition(".")[0]
            hits[attr] += ok
            totals[attr] += 1
    return {a: hits[a] / totals[a] for a in totals}


@pytest.mark.parametrize("resolution, n, sigma, blur", [
    (32, 1000, 0, 0),
    (48, 200, 0, 0),
    (64, 200, 0, 0),
    (32, 500, 16, 0),
    (32, 500, 12, 1),
    (32, 1000, 0, 2),
])
def test_judge_accuracy_per_attribute(resolution, n, sigma, blur):
    images, _, scenes = shapes.sample_batch(np.random.default_rng(100 + resolution), n, resolution=resolution)
    acc = accuracy(degrade(images, sigma, blur, seed=resolution), scenes)
    assert set(acc) == {"count", "background", "color", "shape", "size", "position"}
    assert min(acc.values()) >= 0.99, acc


BLENDING = [("yellow", "red"), ("red", "yellow"), ("blue", "red"), ("red", "blue")]


def _blending_scenes(background, color, repeats, rng):
    specs = [Scene((SceneObject(color, shape, size, pos),), background)
             for shape in shapes.SHAPES for size in shapes.SIZES for pos in shapes.POSITIONS]
    return [shapes.complete(s, rng) for s in specs * repeats]


@pytest.mark.parametrize("background, color", BLENDING)
def test_blend_edges_are_not_objects(background, color):
    """Half red, half yellow is orange; half red, half blue is near purple: the edge is not an object.

    Sharp and lightly blurred (one 1-2-1 pass): every image read exactly right. Blurred
    twice (sigma ~1 px), edge rings two or three pixels wide: never an extra object
    (this fails without either ring rule of detect), and at least 97% read exactly
    right (measured 98-100%; the misses are small triangles whose own color shrinks
    to a few pixels).
    """
    rng = np.random.default_rng(7)
    scenes = _blending_scenes(background, color, 2, rng)
    images = shapes.render(scenes, rng)
    for blur in (0, 1):
        for img, scene in zip(degrade(images, blur=blur), scenes):
            judged = judge.judge_image(img)
            assert judged == scene, (blur, scene, judged)
    scenes = _blending_scenes(background, color, 10, rng)
    judged = [judge.judge_image(img) for img in degrade(shapes.render(scenes, rng), blur=2)]
    assert max(len(j.objects) for j in judged) == 1
    assert np.mean([j == s for j, s in zip(judged, scenes)]) >= 0.97


def test_held_out_pairs_are_read_like_any_other():
    rng = np.random.default_rng(8)
    for prompt in shapes.held_out_captions() * 20:
        image, scene = shapes.render_prompt(prompt, rng)
        result = judge.score(judge.judge_image(image), prompt)
        assert result == {"count": True, "color": True, "shape": True}, (prompt, scene)


RED_CIRCLE_LEFT = SceneObject("red", "circle", "small", "left")
BLUE_SQUARE_RIGHT = SceneObject("blue", "square", "large", "right")


def test_score_names_only_what_the_prompt_names():
    judged = Scene((RED_CIRCLE_LEFT,), "white")
    assert judge.score(judged, "a red circle") == {"count": True, "color": True, "shape": True}
    assert judge.score(judged, "a large red square on the left on a black background") == {
        "count": True, "background": False, "color": True, "shape": False, "size": False, "position": True}
    assert judge.score(judged, "a shape") == {"count": True}


def test_score_matches_two_objects_whatever_their_order():
    judged = Scene((BLUE_SQUARE_RIGHT, RED_CIRCLE_LEFT), "white")
    prompt = "a red circle on the left and a blue square on the right"
    assert judge.score(judged, prompt) == {
        "count": True, "color.0": True, "shape.0": True, "position.0": True,
        "color.1": True, "shape.1": True, "position.1": True}
    # swapped positions: colors and shapes still match object to object, positions do not
    swapped = "a red circle on the right and a blue square on the left"
    assert judge.score(judged, swapped) == {
        "count": True, "color.0": True, "shape.0": True, "position.0": False,
        "color.1": True, "shape.1": True, "position.1": False}


def test_score_missing_object_fails_everything_it_names():
    judged = Scene((RED_CIRCLE_LEFT,), "white")
    assert judge.score(judged, "a red circle and a blue square") == {
        "count": False, "color.0": True, "shape.0": True, "color.1": False, "shape.1": False}


def test_empty_image_has_no_objects():
    image = np.broadcast_to(np.array(shapes.COLORS["green"], np.uint8), (32, 32, 3)).copy()
    assert judge.judge_image(image) == Scene((), "green")
    assert judge.score(judge.judge_image(image), "a red circle") == {"count": False, "color": False, "shape": False}


@pytest.mark.parametrize("bad", [np.zeros((32, 32), np.uint8), np.zeros((32, 32, 4), np.uint8),
                                 np.zeros((32, 32, 3), np.float32)])
def test_judge_refuses_what_is_not_an_rgb_uint8_image(bad):
    with pytest.raises(ValueError, match="uint8"):
        judge.judge_image(bad)
