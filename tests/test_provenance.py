"""Provenance chunks: the A1111 infotext reads back through A1111's PNG Info rules (tests/a1111.py), and
the npdiff recipe round-trips, keeps its parent, and refuses damage."""

import hashlib
import json
import re

import numpy as np
import pytest

from npdiff.imaging import png_bytes, read_image
from npdiff.provenance import (RecipeError, for_image, infotext, lineage, model_hash, parent_pixels, parent_record,
                               pixels_hash, png_text, read_recipe)
from npdiff.recipes import new_recipe
from a1111 import a1111_read


def recipe(**over):
    base = dict(prompt="a red circle, on the left", negative_prompt="blue, green", seed=41, n=4, steps=25,
                sampler="dpmpp-2m", cfg=3.0, chaos=0, width=48, height=24, model_hash="0123456789",
                model_name="shapes: v1", backend="cpu")
    base.update(over)
    return new_recipe("sample", **base)


def test_a1111_png_info_reads_the_parameters_chunk():
    r = for_image(recipe(), 2)
    got = a1111_read(infotext(r))
    assert got["Prompt"] == "a red circle, on the left"
    assert got["Negative prompt"] == "blue, green"
    assert (got["Steps"], got["Sampler"], got["CFG scale"], got["Seed"]) == ("25", "DPM++ 2M", "3", "43")
    assert (got["Size-1"], got["Size-2"], got["Model hash"]) == ("48", "24", "0123456789")
    assert got["Model"] == "shapes: v1"                 # a value with a colon survives through JSON quoting


def test_a1111_reads_karras_samplers_chaos_and_an_empty_negative_prompt():
    r = for_image(recipe(sampler="euler-a", negative_prompt="", chaos=100, cfg=5.0), 3)
    got = a1111_read(infotext(r))
    assert (got["Sampler"], got["Schedule type"], got["Negative prompt"]) == ("Euler a", "Karras", "")
    assert float(got["CFG scale"]) == 1.0 and got["Chaos"] == "100"   # the last of 4 at chaos 100: no guidance
    assert infotext(r).splitlines()[1] == "Negative prompt:"


def test_recipe_round_trips_through_a_png(tmp_path):
    r = for_image(recipe(), 1)
    path = tmp_path / "x.png"
    path.write_bytes(png_bytes(np.zeros((24, 48, 3), np.uint8), png_text(r)))
    img, text = read_image(path)
    assert set(text) == {"parameters", "npdiff"}
    assert read_recipe(text, str(path)) == r


@pytest.mark.parametrize("damage, message", [
    (lambda r: "{not json", "damaged npdiff recipe"),
    (lambda r: json.dumps({**r, "format": "other/9"}), "recipe format 'other/9'"),
    (lambda r: json.dumps({k: v for k, v in r.items() if k != "seed"}), "'seed' is missing"),
    (lambda r: json.dumps({**r, "steps": "25"}), "'steps' is missing or of the wrong type"),
    (lambda r: json.dumps({**r, "sampler": "plms"}), "unknown sampler 'plms'"),
    (lambda r: json.dumps({**r, "index": 7}), "index 7 is not in 0..3"),
    (lambda r: json.dumps({**r, "steps": 0}), "steps 0 is not in 1..1000"),
    (lambda r: json.dumps({**r, "cfg": float("nan")}), "cfg nan is not in 0..30"),
    (lambda r: json.dumps({**r, "n": 65}), "n 65 is not in 1..64"),
    (lambda r: json.dumps({**r, "operation": "vary"}), "names no parent image"),
])
def test_damaged_recipes_are_refused(damage, message):
    r = for_image(recipe(), 0)
    with pytest.raises(RecipeError, match=re.escape(message)):
        read_recipe({"npdiff": damage(r)}, "x.png")


def test_parent_record_keeps_pixels_and_lineage_but_not_old_pixels():
    rng = np.random.default_rng(0)
    grandparent_px, parent_px = (rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(2))
    first = for_image(recipe(), 0)
    second = for_image({**recipe(), "operation": "vary", "strength": 0.35,
                        "parent": parent_record(grandparent_px, "/a/00000-41.png", first)}, 0)
    third = {**recipe(), "operation": "upscale", "strength": 0.3,
             "parent": parent_record(parent_px, "00004-7.png", second)}
    assert lineage(third) == ["sample", "vary", "upscale"]
    assert third["parent"]["file"] == "00004-7.png" and third["parent"]["sha256"] == pixels_hash(parent_px)
    assert np.array_equal(parent_pixels(third, "x"), parent_px)
    assert "pixels" not in third["parent"]["recipe"]["parent"]          # only the direct parent's pixels are kept
    assert second["parent"]["pixels"]                                   # and the record was not changed in place
    tampered = {**third, "parent": {**third["parent"], "sha256": pixels_hash(grandparent_px)}}
    with pytest.raises(RecipeError, match="does not match its recorded hash"):
        parent_pixels(tampered, "x")


def test_model_hash_is_a1111s_short_sha256(tmp_path):
    data = np.random.default_rng(1).bytes(3_000_000)
    (tmp_path / "m.safetensors").write_bytes(data)
    assert model_hash(tmp_path / "m.safetensors") == hashlib.sha256(data).hexdigest()[:10]


def test_equal_recipes_give_equal_bytes():
    img = np.random.default_rng(2).integers(0, 256, (24, 48, 3), dtype=np.uint8)
    a = png_bytes(img, png_text(for_image(recipe(), 0)))
    b = png_bytes(img.copy(), png_text(for_image(recipe(), 0)))
    c = png_bytes(img, png_text(for_image(recipe(seed=42), 0)))
    assert a == b and a != c
