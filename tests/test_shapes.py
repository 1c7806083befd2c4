"""The shapes dataset draws what its captions say.

Geometry is measured here independently of the judge: around a lone object every pixel
is a blend alpha * object + (1 - alpha) * background, so alpha gives the object's area
and centroid directly.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage

from npdiff.data import shapes
from npdiff.data.shapes import (COLORS, HELD_OUT_PAIRS, NAME_PROB, POSITIONS, SHAPES, SIZES, Scene, SceneObject,
                                complete, describe, parse_caption, render_prompt, sample_batch, sample_scenes)

RGB = {c: np.array(v, dtype=np.float64) for c, v in COLORS.items()}
AREA_PER_SIDE2 = {"circle": np.pi / 4, "square": 1.0, "triangle": np.sqrt(3) / 4}


def alpha_map(image, obj_color, bg_color):
    """(H, W) coverage of the object: projection of each pixel on the background -> object segment."""
    b, c = RGB[bg_color], RGB[obj_color]
    return (image.astype(np.float64) - b) @ (c - b) / ((c - b) @ (c - b))


def test_same_seed_same_batch_and_different_seed_different_batch():
    a = sample_batch(np.random.default_rng(7), 16)
    b = sample_batch(np.random.default_rng(7), 16)
    c = sample_batch(np.random.default_rng(8), 16)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
    assert not np.array_equal(a[0], c[0])
    ds = shapes.ShapesDataset(seed=7)
    d = ds.next_batch(16)
    assert np.array_equal(a[0], d[0]) and a[1] == d[1]


@pytest.mark.parametrize("resolution", [32, 48, 64])
def test_batch_shape_dtype(resolution):
    images, captions, scenes = sample_batch(np.random.default_rng(0), 5, resolution=resolution)
    assert images.shape == (5, resolution, resolution, 3) and images.dtype == np.uint8
    assert len(captions) == len(scenes) == 5 and all(s.is_complete() for s in scenes)


def test_every_pixel_is_background_or_a_blend_with_one_object():
    images, _, scenes = sample_batch(np.random.default_rng(1), 200)
    for img, scene in zip(images, scenes):
        x = img.reshape(-1, 3).astype(np.float64)
        b = RGB[scene.background]
        dist = np.full(len(x), np.inf)
        for o in scene.objects:
            c = RGB[o.color]
            t = np.clip((x - b) @ (c - b) / ((c - b) @ (c - b)), 0, 1)
            dist = np.minimum(dist, np.linalg.norm(x - (b + t[:, None] * (c - b)), axis=1))
        assert dist.max() <= 1.0           # rounding to uint8 moves a channel by at most 0.5
        assert (x == b).all(1).mean() > 0.4  # the background is the largest region


def test_background_never_takes_an_object_color_and_held_out_pairs_never_drawn():
    scenes, _ = sample_scenes(np.random.default_rng(2), 4000)
    pairs = {(o.color, o.shape) for s in scenes for o in s.objects}
    assert not pairs & HELD_OUT_PAIRS
    assert len(pairs) == len(COLORS) * len(SHAPES) - len(HELD_OUT_PAIRS)   # every other pair occurs
    assert all(s.background not in {o.color for o in s.objects} for s in scenes)
    allowed, _ = sample_scenes(np.random.default_rng(2), 4000, allow_held_out=True)
    assert {(o.color, o.shape) for s in allowed for o in s.objects} >= HELD_OUT_PAIRS


def _cell_ok(position, cx, cy, L):
    third = L / 3
    col = 0 if cx < third else 2 if cx > 2 * third else 1
    row = 0 if cy < third else 2 if cy > 2 * third else 1
    return {"center": (1, 1), "left": (0, 1), "right": (2, 1), "top": (1, 0), "bottom": (1, 2)}[position] == (col, row)


@pytest.mark.parametrize("resolution, n", [(32, 400), (48, 150), (64, 100)])
def test_lone_object_size_position_and_shape(resolution, n):
    """Side from area within the size's range (+-0.5 px for pixel rounding), centroid in its third."""
    rng = np.random.default_rng(resolution)
    scenes = [complete(Scene((SceneObject(),)), rng, allow_held_out=False) for _ in range(n)]
    images = shapes.render(scenes, rng, resolution)
    r = resolution / 32
    for img, scene in zip(images, scenes):
        (o,) = scene.objects
        a = alpha_map(img, o.color, scene.background)
        area = a.sum()
        side = np.sqrt(area / AREA_PER_SIDE2[o.shape]) / r
        lo, hi = {"small": (8, 12), "large": (16, 22)}[o.size]
        assert lo - 0.5 <= side <= hi + 0.5, (scene, side)
        ys, xs = np.mgrid[0:resolution, 0:resolution] + 0.5
        cx, cy = (a * xs).sum() / area, (a * ys).sum() / area
        assert _cell_ok(o.position, cx, cy, resolution), (scene, cx, cy)
        # shape: a triangle points up (its centroid lies a sixth of its height below the
        # middle of its box); a square fills its box, a circle pi/4 of it, a triangle
        # half. Box sides count a partly covered row or column by its coverage.
        rowmax, colmax = np.clip(a, 0, 1).max(1), np.clip(a, 0, 1).max(0)
        height, width = rowmax.sum(), colmax.sum()
        first = np.nonzero(rowmax > 0)[0][0]
        top = first + 1 - rowmax[first]            # a partly covered top row is covered at its bottom
        drop = (cy - (top + height / 2)) / height
        fill = area / (height * width)
        if o.shape == "triangle":
            assert 0.12 < drop < 0.22 and 0.45 < fill < 0.65, (scene, drop, fill)
        else:
            assert abs(drop) < 0.05, (scene, drop)
            assert (fill > 0.95) if o.shape == "square" else (0.72 < fill < 0.85), (scene, fill)


def test_two_objects_sit_apart_at_opposite_positions():
    rng = np.random.default_rng(3)
    scenes = [complete(Scene((SceneObject(), SceneObject())), rng, allow_held_out=False) for _ in range(300)]
    images = shapes.render(scenes, rng, 32)
    for img, scene in zip(images, scenes):
        a, b = scene.objects
        assert shapes.OPPOSITE[a.position] == b.position
        assert (a.size, b.size) != ("large", "large")
        not_bg = ~(img == RGB[scene.background].astype(np.uint8)).all(-1)
        labels, count = ndimage.label(not_bg, structure=np.ones((3, 3)))   # 8-connected: not even touching
        assert count == 2, scene
        # each component lies in the third of the object with its color at its position
        for k in (1, 2):
            ys, xs = np.nonzero(labels == k)
            cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
            here = [o for o in scene.objects if _cell_ok(o.position, cx, cy, 32)]
            assert len(here) == 1 and (img[labels == k] == RGB[here[0].color]).all(-1).any(), scene


def test_captions_of_the_issue_examples():
    assert describe(Scene((SceneObject("red", "circle"),))) == "a red circle"
    assert describe(Scene((SceneObject("blue", "square", "small", "left"),))) == "a small blue square on the left"
    assert describe(Scene((SceneObject("yellow", "triangle", "large"),), "black")) == \
        "a large yellow triangle on a black background"
    assert describe(Scene((SceneObject("red", "circle", position="left"),
                           SceneObject("blue", "square", position="right")))) == \
        "a red circle on the left and a blue square on the right"
    assert describe(Scene((SceneObject("orange", "circle"),), "orange")) == "an orange circle on an orange background"
    assert describe(Scene((SceneObject(size="small", position="center"),))) == "a small shape in the center"
    assert describe(Scene((SceneObject(shape="triangle", position="top"),))) == "a triangle on the top"


def test_parse_caption_reads_variants():
    assert parse_caption("A big red circle at the top, against a white background.") == \
        Scene((SceneObject("red", "circle", "large", "top"),), "white")
    assert parse_caption("a tiny green triangle in the middle") == \
        Scene((SceneObject("green", "triangle", "small", "center"),))
    assert parse_caption("a red circle on the left and a blue square on the right on a black background") == \
        Scene((SceneObject("red", "circle", position="left"), SceneObject("blue", "square", position="right")), "black")
    assert parse_caption("a purple shape") == Scene((SceneObject("purple"),))
    with pytest.raises(ValueError, match="gray"):
        parse_caption("a red circle on a gray background")


specs = st.builds(
    lambda objs, bg: Scene(tuple(objs), bg),
    st.lists(st.builds(SceneObject, st.sampled_from((None,) + tuple(COLORS)), st.sampled_from((None,) + SHAPES),
                       st.sampled_from((None,) + SIZES), st.sampled_from((None,) + POSITIONS)), min_size=1, max_size=2),
    st.sampled_from((None,) + tuple(COLORS)))


@settings(max_examples=300, deadline=None)
@given(specs)
def test_parse_caption_inverts_describe(spec):
    assert parse_caption(describe(spec)) == spec


def test_every_caption_names_only_what_its_scene_shows():
    scenes, captions = sample_scenes(np.random.default_rng(4), 2000)
    for scene, caption in zip(scenes, captions):
        spec = parse_caption(caption)
        assert len(spec.objects) == len(scene.objects)
        assert spec.background in (None, scene.background)
        for want, have in zip(spec.objects, scene.objects):
            for attr in ("color", "shape", "size", "position"):
                assert getattr(want, attr) in (None, getattr(have, attr)), (caption, scene)


def test_how_often_each_attribute_is_named():
    """Each rate within 4.5 binomial standard deviations of NAME_PROB (4000 captions, seeded)."""
    _, captions = sample_scenes(np.random.default_rng(5), 4000)
    named = {k: {a: [] for a in NAME_PROB[k]} for k in (1, 2)}
    for caption in captions:
        spec = parse_caption(caption)
        k = len(spec.objects)
        named[k]["background"].append(spec.background is not None)
        for o in spec.objects:
            for a in ("color", "shape", "size", "position"):
                named[k][a].append(getattr(o, a) is not None)
    assert 0.5 < len(named[1]["background"]) / 4000 < 0.7
    for k in (1, 2):
        for a, p in NAME_PROB[k].items():
            x = np.array(named[k][a])
            assert abs(x.mean() - p) < 4.5 * np.sqrt(p * (1 - p) / len(x)), (k, a, x.mean())
    # color and shape are named in most captions, so the model sees them
    assert NAME_PROB[1]["color"] >= 0.85 and NAME_PROB[1]["shape"] >= 0.85


def test_render_prompt_draws_what_is_asked_held_out_included():
    rng = np.random.default_rng(6)
    for prompt in shapes.held_out_captions() + ["a large white square on the right on a blue background"]:
        image, scene = render_prompt(prompt, rng)
        spec = parse_caption(prompt)
        assert image.shape == (32, 32, 3) and scene.is_complete()
        for attr in ("color", "shape", "size", "position"):
            assert getattr(spec.objects[0], attr) in (None, getattr(scene.objects[0], attr))
        a = alpha_map(image, scene.objects[0].color, scene.background)
        assert a.sum() > 20                     # the object is really there
    assert shapes.held_out_captions() == ["a green square", "an orange circle", "a purple triangle"]


@pytest.mark.parametrize("spec, message", [
    (Scene((SceneObject("red"),), "red"), "red background"),
    (Scene((SceneObject(size="large"), SceneObject(size="large"))), "at most one"),
    (Scene((SceneObject(position="left"), SceneObject(position="top"))), "opposite"),
    (Scene((SceneObject(position="center"), SceneObject())), "center"),
    (Scene(()), "one or two"),
    (Scene((SceneObject("pink"),)), "unknown color"),
])
def test_impossible_specs_are_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        complete(spec, np.random.default_rng(0))


def test_held_out_pair_refused_when_not_allowed():
    with pytest.raises(ValueError, match="held-out"):
        complete(parse_caption("a purple triangle"), np.random.default_rng(0), allow_held_out=False)


def test_masks_are_each_objects_coverage_and_leave_the_images_unchanged():
    images, captions, scenes, masks = sample_batch(np.random.default_rng(3), 60, return_masks=True)
    assert np.array_equal(images, sample_batch(np.random.default_rng(3), 60)[0])
    assert masks.shape == (60, 2, 32, 32) and masks.dtype == np.float32
    for img, scene, m in zip(images, scenes, masks):
        for k, o in enumerate(scene.objects):
            alone = m[1 - k] == 0                              # pixels the other object does not touch
            alpha = np.clip(alpha_map(img, o.color, scene.background), 0, 1)
            np.testing.assert_allclose(m[k][alone], alpha[alone], atol=0.02)
        assert len(scene.objects) == 2 or not m[1].any()
        assert m.sum(axis=0).max() <= 1.0 + 1e-6              # objects never overlap


def test_phrase_spans_cut_a_caption_into_its_objects_and_background():
    _, captions = sample_scenes(np.random.default_rng(4), 300)
    for caption in captions + [""]:
        spec = parse_caption(caption)
        spans = shapes.phrase_spans(caption)
        for k in range(2):
            if k < len(spec.objects):
                a, b = spans[k]
                assert parse_caption(caption[a:b]).objects == (spec.objects[k],), caption
                assert "background" not in caption[a:b] and " and " not in caption[a:b]
            else:
                assert spans[k] is None
        if spec.background is None:
            assert spans[2] is None
        else:
            a, b = spans[2]
            assert b == len(caption) and parse_caption("a shape" + caption[a:b]).background == spec.background
