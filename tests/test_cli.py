"""The command line as users meet it: sample and the edit verbs write what they say, record how,
re-create it byte for byte, and meet every bad input with one line and exit code 2."""

import errno
import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from npdiff import cli, explain, kernels
from npdiff.checkpoint import load_tensors, save_tensors
from npdiff.cli import main
from npdiff.data.shapes import caption_corpus
from npdiff.imaging import read_image, save_png
from npdiff.provenance import lineage, parent_pixels, pixels_hash, read_recipe
from npdiff.text.tokenizer import train_tokenizer
from a1111 import a1111_read
from tiny_model import save_tiny_model, tiny_model

FAST = ["--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 16x16 tiny random model (fast)."""
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def parent(model_dir, tmp_path_factory):
    """A 16x16 sample (seed 2) for the edit verbs."""
    out = tmp_path_factory.mktemp("parent")
    assert main(["sample", "a red circle", "--seed", "2", "-n", "1", "--model", model_dir, "--outdir", str(out),
                 *FAST]) == 0
    return str(out / "00000-2.png")


@pytest.fixture
def keep_backend():
    """--backend switches the process's kernels: put back the ones in use before the test."""
    before = kernels.backend_name()
    yield
    kernels.set_backend(before)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out.split(), err


def sample(capsys, model_dir, outdir, prompt="a red circle", *extra):
    code, paths, err = run(capsys, "sample", prompt, "--model", model_dir, "--outdir", outdir, *FAST, *extra)
    assert code == 0, err
    return paths


def recipe_of(path):
    return read_recipe(read_image(path)[1], str(path))


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("npdiff: error: "), err
    for f in fragments:
        assert f in lines[0], (f, lines[0])


# ----------------------------------------------------------------------------
# sample

def test_sample_writes_four_images_and_a_grid_and_never_overwrites(capsys, model_dir, tmp_path):
    out = tmp_path / "outputs"
    first = sample(capsys, model_dir, out, "a red circle", "--seed", "10")
    assert [p.split("/")[-1] for p in first] == ["00000-10.png", "00001-11.png", "00002-12.png", "00003-13.png",
                                                 "grid-0000.png"]
    before = {p: open(p, "rb").read() for p in first}
    second = sample(capsys, model_dir, out, "a blue square", "--seed", "10")
    assert [p.split("/")[-1] for p in second] == ["00004-10.png", "00005-11.png", "00006-12.png", "00007-13.png",
                                                  "grid-0001.png"]
    assert all(open(p, "rb").read() == b for p, b in before.items())     # the first run's files are untouched
    grid, _ = read_image(first[-1])
    singles = [read_image(p)[0] for p in first[:4]]
    assert grid.shape == (32, 32, 3)
    assert np.array_equal(grid[:16, 16:], singles[1]) and np.array_equal(grid[16:, :16], singles[2])


def test_numbering_goes_on_past_the_name_width_and_never_overwrites(capsys, model_dir, tmp_path):
    for name in ("99999-5.png", "grid-9999.png", "grid-10000.png"):
        (tmp_path / name).write_bytes(b"kept")
    paths = sample(capsys, model_dir, tmp_path, "a red circle", "--seed", "1", "-n", "2")
    assert [Path(p).name for p in paths] == ["100000-1.png", "100001-2.png", "grid-10001.png"]
    assert all((tmp_path / name).read_bytes() == b"kept" for name in ("99999-5.png", "grid-9999.png", "grid-10000.png"))


def test_progress_bar_on_a_terminal_unless_quiet(capsys, monkeypatch, model_dir, tmp_path):
    argv = ["sample", "a red circle", "--model", model_dir, "--outdir", tmp_path, "-n", "1", "--steps", "2"]
    code, paths, err = run(capsys, *argv)                # captured stderr is not a terminal: no bar
    assert code == 0 and len(paths) == 1 and err == ""
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    code, paths, err = run(capsys, *argv)
    assert code == 0 and len(paths) == 1
    assert "0/2" in err and "step" in err                # tqdm: "  0%|          | 0/2 [00:00<?, ?step/s]"
    code, paths, err = run(capsys, *argv, "--quiet")
    assert code == 0 and err == ""


@pytest.mark.parametrize("inline, flags, key, value", [
    ("--seed 3", ["--seed", "3"], "seed", 3),
    ("--steps 2", ["--steps", "2"], "steps", 2),
    ("--sampler heun", ["--sampler", "heun"], "sampler", "heun"),
    ("--cfg 2", ["--guidance-scale", "2"], "cfg", 2.0),
    ("--guidance-scale 2", ["--cfg", "2"], "cfg", 2.0),
    ("--no blue, green", ["--negative-prompt", "blue, green"], "negative_prompt", "blue, green"),
    ("--chaos 50", ["--chaos", "50"], "chaos", 50),
    ("--n 2", ["-n", "2"], "n", 2),
    ("--backend reference", ["--backend", "reference"], "backend", "reference"),
])
def test_every_flag_has_an_inline_twin(capsys, model_dir, tmp_path, keep_backend, inline, flags, key, value):
    base = {"seed": ["--seed", "1"], "steps": ["--steps", "1"], "n": ["-n", "1"]}
    rest = [a for k, v in base.items() if k != key for a in v] + ["--quiet", "--model", model_dir]
    code, a, err = run(capsys, "sample", f"a red circle {inline}", "--outdir", tmp_path / "a", *rest)
    assert code == 0, err
    kernels.set_backend("cpu")
    code, b, err = run(capsys, "sample", "a red circle", *flags, "--outdir", tmp_path / "b", *rest)
    assert code == 0, err
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    r = recipe_of(a[0])
    assert r[key] == value and r["prompt"] == "a red circle"
    assert len(a) == r["n"] + (r["n"] > 1)               # the images, and their grid if there are several


def test_aspect_ratio_flag_and_inline_agree(capsys, tmp_path):
    folder = tmp_path / "m32"
    tiny_model(resolution=32).save(folder)
    common = ["--model", folder, "-n", "1", "--steps", "1", "--seed", "4", "--quiet"]
    code, a, err = run(capsys, "sample", "a red circle --ar 3:2", "--outdir", tmp_path / "a", *common)
    assert code == 0, err
    code, b, err = run(capsys, "sample", "a red circle", "--ar", "3:2", "--outdir", tmp_path / "b", *common)
    assert code == 0, err
    assert open(a[0], "rb").read() == open(b[0], "rb").read()
    assert read_image(a[0])[0].shape == (24, 40, 3)      # 960 pixels: the 32x32 model's 1024 at 3:2, sides of 8


A1111_SAMPLER_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "dpmpp-2m": "DPM++ 2M", "euler": "Euler", "heun": "Heun",
                       "euler-a": "Euler a"}


@pytest.mark.parametrize("sampler", list(A1111_SAMPLER_NAMES))
def test_a1111_png_info_reads_what_sample_writes(capsys, model_dir, tmp_path, sampler):
    """Each PNG's `parameters` chunk, read with PIL alone and parsed by A1111's rules (tests/a1111.py)."""
    code, paths, err = run(capsys, "sample", f"a red circle, on the left --no blue, green --sampler {sampler}",
                           "--seed", "7", "--cfg", "2.5", "-n", "2", "--steps", "1", "--quiet", "--model", model_dir,
                           "--outdir", tmp_path)
    assert code == 0, err
    weights = hashlib.sha256((Path(model_dir) / "model.safetensors").read_bytes()).hexdigest()[:10]
    with Image.open(paths[0]) as im:
        single_size = im.size
    for path, seed in zip(paths, [7, 8, 7]):             # two images and their grid (the first image's seed)
        with Image.open(path) as im:
            text = dict(im.text)
        assert set(text) == {"parameters", "npdiff"}
        got = a1111_read(text["parameters"])
        assert (got["Prompt"], got["Negative prompt"]) == ("a red circle, on the left", "blue, green")
        assert (got["Steps"], got["Sampler"], float(got["CFG scale"]), got["Seed"]) == \
            ("1", A1111_SAMPLER_NAMES[sampler], 2.5, str(seed))
        assert (int(got["Size-1"]), int(got["Size-2"])) == single_size and got["Model hash"] == weights
        recipe = json.loads(text["npdiff"])
        assert (recipe["sampler"], recipe["seed"], recipe["negative_prompt"]) == (sampler, 7, "blue, green")


def test_inline_parameters_are_the_flags(capsys, model_dir, tmp_path):
    a = sample(capsys, model_dir, tmp_path / "a", "a red circle --seed 3 --cfg 2 --no blue, green --n 2")
    b = sample(capsys, model_dir, tmp_path / "b", "a red circle", "--seed", "3", "--cfg", "2",
               "--negative-prompt", "blue, green", "-n", "2")
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    r = recipe_of(a[0])
    got = (r["prompt"], r["negative_prompt"], r["seed"], r["cfg"], r["n"])
    assert got == ("a red circle", "blue, green", 3, 2.0, 2)


def test_same_seed_same_bytes_other_seed_other_pixels(capsys, model_dir, tmp_path):
    a = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "5", "-n", "2")
    b = sample(capsys, model_dir, tmp_path / "b", "a red circle", "--seed", "5", "-n", "2")
    c = sample(capsys, model_dir, tmp_path / "c", "a red circle", "--seed", "6", "-n", "2")
    assert [open(p, "rb").read() for p in a] == [open(p, "rb").read() for p in b]
    assert not np.array_equal(read_image(a[0])[0], read_image(c[0])[0])
    # image i is seeded by seed + i: seed 6's first image starts from seed 5's second image's noise
    assert recipe_of(c[0])["seed"] + 0 == recipe_of(a[1])["seed"] + 1


def test_from_recreates_images_and_grids_byte_for_byte(capsys, model_dir, tmp_path):
    made = sample(capsys, model_dir, tmp_path / "a", "a green triangle --chaos 60 --sampler euler-a", "--seed", "21")
    for source in (made[2], made[-1]):
        code, paths, err = run(capsys, "sample", "--from", source, "--model", model_dir, "--outdir", tmp_path / "re",
                               "--quiet")
        assert code == 0, err
        assert open(paths[0], "rb").read() == open(source, "rb").read()
        assert "identical to" in err


def test_from_reports_how_far_a_remake_is_from_the_file(capsys, model_dir, tmp_path):
    made = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "3", "-n", "1")[0]
    pixels, text = read_image(made)
    pixels = pixels.copy()
    pixels[5, 7] = np.where(pixels[5, 7] < 128, pixels[5, 7] + 3, pixels[5, 7] - 3)   # an edited pixel, recipe kept
    save_png(tmp_path / "edited.png", pixels, text)
    code, again, err = run(capsys, "sample", "--from", tmp_path / "edited.png", "--model", model_dir,
                           "--outdir", tmp_path / "re", "--quiet")
    assert code == 0, err
    assert "NOT identical to" in err and "pixels differ by up to 3 of 255 levels" in err
    assert open(again[0], "rb").read() == open(made, "rb").read()


def test_from_on_another_backend_is_within_the_stated_tolerance(capsys, model_dir, tmp_path, keep_backend):
    """tests/test_pipeline.py states it: the reference and cpu kernels agree to one 8-bit level."""
    made = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "3", "-n", "2", "--backend", "cpu")[1]
    code, again, err = run(capsys, "sample", "--from", made, "--backend", "reference", "--model", model_dir,
                           "--outdir", tmp_path / "re", "--quiet")
    assert code == 0, err
    levels = np.abs(read_image(again[0])[0].astype(int) - read_image(made)[0].astype(int)).max()
    print(f"reference vs cpu through sample --from: {levels} levels; stderr: {err.strip()}")
    assert levels <= 1
    if levels:
        assert f"pixels differ by up to {levels} of 255 levels" in err
    assert (recipe_of(made)["backend"], recipe_of(again[0])["backend"]) == ("cpu", "reference")


def test_chaos_spreads_the_guidance_scales(capsys, model_dir, tmp_path):
    paths = sample(capsys, model_dir, tmp_path, "a red circle", "--seed", "1", "--cfg", "5", "--chaos", "100")
    scales = [re.search(r"CFG scale: ([\d.]+)", read_image(p)[1]["parameters"]).group(1) for p in paths[:4]]
    assert [float(s) for s in scales] == pytest.approx([5.0, 5 - 4 / 3, 5 - 8 / 3, 1.0], abs=1e-5)


def test_aspect_ratio_sets_the_size(capsys, tmp_path):
    folder = tmp_path / "m32"
    tiny_model(resolution=32).save(folder)
    code, paths, err = run(capsys, "sample", "a red circle --ar 2:1", "--model", folder, "--outdir", tmp_path / "o",
                           "-n", "1", "--steps", "1", "--quiet")
    assert code == 0, err
    img, text = read_image(paths[0])
    assert img.shape == (24, 48, 3) and "Size: 48x24" in text["parameters"]


def test_trajectory_gif_has_a_frame_per_step(capsys, model_dir, tmp_path):
    gif = tmp_path / "t.gif"
    paths = sample(capsys, model_dir, tmp_path / "o", "a red circle", "--seed", "1", "--steps", "3",
                   "--trajectory", gif)
    assert paths[-1] == str(gif)
    with Image.open(gif) as im:
        assert im.n_frames >= 3 and im.size[0] > 2 * im.size[1]   # x_t grid | x0 grid, side by side


# ----------------------------------------------------------------------------
# the verbs

def test_vary_records_its_parent_and_recreates(capsys, model_dir, tmp_path):
    parent = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "2", "-n", "1")[0]
    code, kids, err = run(capsys, "vary", parent, "--strength", "strong", "--model", model_dir,
                          "--outdir", tmp_path / "v", "--seed", "9", *FAST)
    assert code == 0, err
    assert len(kids) == 5
    r = recipe_of(kids[1])
    assert (r["operation"], r["strength"], r["prompt"], r["seed"], r["index"]) == ("vary", 0.7, "a red circle", 9, 1)
    assert r["parent"]["file"] == "00000-2.png"
    assert r["parent"]["sha256"] == pixels_hash(read_image(parent)[0])
    assert np.array_equal(parent_pixels(r, "kid"), read_image(parent)[0])
    assert lineage(r) == ["sample", "vary"]
    code, again, err = run(capsys, "sample", "--from", kids[1], "--model", model_dir, "--outdir", tmp_path / "re",
                           "--quiet")
    assert code == 0 and open(again[0], "rb").read() == open(kids[1], "rb").read()


def test_remix_keeps_seed_and_settings(capsys, model_dir, tmp_path):
    parent = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "4", "-n", "1", "--cfg", "2.5")[0]
    same = run(capsys, "remix", parent, "a red circle", "--model", model_dir, "--outdir", tmp_path / "b", "-n", "1",
               "--quiet")[1]
    other = run(capsys, "remix", parent, "a yellow square", "--model", model_dir, "--outdir", tmp_path / "c",
                "-n", "1", "--quiet")[1]
    r = recipe_of(other[0])
    assert (r["operation"], r["seed"], r["cfg"], r["steps"], r["strength"]) == ("remix", 4, 2.5, 2, None)
    assert np.array_equal(read_image(same[0])[0], read_image(parent)[0])        # same prompt: the same image
    assert not np.array_equal(read_image(other[0])[0], read_image(parent)[0])


def test_inpaint_keeps_the_black_part_exactly(capsys, model_dir, tmp_path):
    parent = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "2", "-n", "1")[0]
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[4:12, 4:12] = 255
    save_png(tmp_path / "mask.png", mask)
    code, kids, err = run(capsys, "inpaint", parent, "--mask", tmp_path / "mask.png", "a blue circle",
                          "--model", model_dir, "--outdir", tmp_path / "i", "-n", "2", *FAST)
    assert code == 0, err
    src, out = read_image(parent)[0], read_image(kids[0])[0]
    keep = mask[..., 0] == 0
    assert np.array_equal(out[keep], src[keep]) and not np.array_equal(out[~keep], src[~keep])
    r = recipe_of(kids[0])
    assert (r["operation"], r["prompt"], r["sampler"]) == ("inpaint", "a blue circle", "ddpm")
    again = run(capsys, "sample", "--from", kids[0], "--model", model_dir, "--outdir", tmp_path / "re", "--quiet")[1]
    assert open(again[0], "rb").read() == open(kids[0], "rb").read()


def test_zoom_out_and_pan_grow_the_canvas_around_the_parent(capsys, model_dir, tmp_path):
    parent = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "2", "-n", "1")[0]
    src = read_image(parent)[0]
    code, kids, err = run(capsys, "zoom-out", parent, "--model", model_dir, "--outdir", tmp_path / "z",
                          "-n", "1", *FAST)
    assert code == 0, err
    out = read_image(kids[0])[0]
    assert out.shape == (32, 32, 3) and np.array_equal(out[8:24, 8:24], src)
    assert recipe_of(kids[0])["factor"] == 2.0
    code, kids, err = run(capsys, "pan", parent, "--direction", "left", "--model", model_dir,
                          "--outdir", tmp_path / "p", "-n", "1", *FAST)
    assert code == 0, err
    out = read_image(kids[0])[0]
    assert out.shape == (16, 24, 3) and np.array_equal(out[:, 8:], src)
    assert lineage(recipe_of(kids[0])) == ["sample", "pan"]


def test_upscale_is_lanczos_then_img2img(capsys, model_dir, tmp_path):
    parent = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "2", "-n", "1")[0]
    src = read_image(parent)[0]
    code, kids, err = run(capsys, "upscale", parent, "--strength", "0", "--model", model_dir,
                          "--outdir", tmp_path / "u0", "--quiet")
    assert code == 0, err
    lanczos = np.asarray(Image.fromarray(src).resize((32, 32), Image.LANCZOS))
    assert len(kids) == 1 and np.array_equal(read_image(kids[0])[0], lanczos)
    assert err.strip() == "upscaled 2x by Lanczos resampling alone (--strength 0)"
    code, kids, err = run(capsys, "upscale", parent, "--model", model_dir, "--outdir", tmp_path / "u1", *FAST)
    assert code == 0, err
    out = read_image(kids[0])[0]
    assert out.shape == (32, 32, 3) and not np.array_equal(out, lanczos)
    assert recipe_of(kids[0])["strength"] == 0.3


VERBS = {                 # verb -> (its own arguments, what its recipe records)
    "vary": (["--strength", "subtle"], {"strength": 0.35, "prompt": "a red circle"}),
    "remix": (["a blue square"], {"prompt": "a blue square", "seed": 2, "strength": None}),
    "inpaint": (["--mask", "MASK", "a blue circle"], {"prompt": "a blue circle", "sampler": "ddpm"}),
    "zoom-out": (["--factor", "2"], {"factor": 2.0, "width": 32, "height": 32}),
    "pan": (["--direction", "left"], {"direction": "left", "width": 24, "height": 16}),
    "upscale": ([], {"strength": 0.3, "width": 32, "height": 32}),
}


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_edit_records_its_parent_and_operation_and_recreates(capsys, model_dir, parent, tmp_path, verb):
    own, expected = VERBS[verb]
    mask = np.zeros((16, 16, 3), np.uint8)
    mask[4:12, 4:12] = 255
    save_png(tmp_path / "mask.png", mask)
    own = [str(tmp_path / "mask.png") if a == "MASK" else a for a in own]
    code, kids, err = run(capsys, verb, parent, *own, "--model", model_dir, "--outdir", tmp_path / "o", "-n", "2",
                          "--steps", "1", "--quiet")
    assert code == 0, err
    assert [Path(k).name for k in kids] == ["00000-" + kids[0].split("-")[-1], "00001-" + kids[1].split("-")[-1],
                                            "grid-0000.png"]
    parent_pixels_ = read_image(parent)[0]
    for kid in kids:
        r = recipe_of(kid)
        assert r["operation"] == verb and lineage(r) == ["sample", verb]
        assert r["parent"]["file"] == Path(parent).name and r["parent"]["sha256"] == pixels_hash(parent_pixels_)
        assert r["parent"]["recipe"] == recipe_of(parent)
        assert {k: r[k] for k in expected} == expected
        assert f"Operation: {verb}" in read_image(kid)[1]["parameters"]
    if verb == "upscale":
        assert "upscaled 2x by Lanczos resampling, then img2img at strength 0.3" in err
    code, again, err = run(capsys, "sample", "--from", kids[1], "--model", model_dir, "--outdir", tmp_path / "re",
                           "--quiet")
    assert code == 0, err
    assert open(again[0], "rb").read() == open(kids[1], "rb").read() and "identical to" in err


def test_help_says_how_upscale_works(capsys):
    with pytest.raises(SystemExit):
        main(["upscale", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Lanczos resampling to 2x, then img2img" in text and "adds no real detail" in text


def test_an_image_from_elsewhere_is_fitted_and_kept_in_the_recipe(capsys, model_dir, tmp_path):
    photo = np.random.default_rng(0).integers(0, 256, (30, 45, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    code, _, err = run(capsys, "vary", tmp_path / "photo.png", "--model", model_dir, "--outdir", tmp_path / "x", *FAST)
    assert_one_line_error(code, err, "needs --prompt")
    code, kids, err = run(capsys, "vary", tmp_path / "photo.png", "--prompt", "a red circle", "--model", model_dir,
                          "--outdir", tmp_path / "v", "-n", "1", *FAST)
    assert code == 0, err
    r = recipe_of(kids[0])
    assert (r["width"], r["height"]) == (16, 16) and "recipe" not in r["parent"]
    again = run(capsys, "sample", "--from", kids[0], "--model", model_dir, "--outdir", tmp_path / "re", "--quiet")[1]
    assert open(again[0], "rb").read() == open(kids[0], "rb").read()


# ----------------------------------------------------------------------------
# teaching views

def test_explain_writes_noising_schedules_and_a_trajectory(capsys, model_dir, tmp_path):
    code, few, err = run(capsys, "explain", "--model", model_dir, "--outdir", tmp_path / "a", "--t", "0,500",
                         "--steps", "2")
    assert code == 0, err
    assert [Path(p).name for p in few] == ["noising.png", "schedules.png", "trajectory.png"]
    code, more, err = run(capsys, "explain", "--model", model_dir, "--outdir", tmp_path / "b", "--t", "0,250,500,1000",
                          "--steps", "4")
    assert code == 0, err
    (noising, curves, strip), (noising4, _, strip4) = ([read_image(p)[0] for p in ps] for ps in (few, more))
    assert noising4.shape[1] > noising.shape[1] and noising4.shape[0] == noising.shape[0]   # a column per t
    assert strip4.shape[1] > strip.shape[1]                                                 # a column per step
    for name, color in explain.CURVE_COLORS.items():     # both panels draw a curve per schedule (the legend is 84 px)
        assert (curves == color).all(axis=-1).sum() > 500, name


def test_explain_without_a_model_writes_the_views_it_can(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("npdiff.model.DEFAULT_MODEL_DIR", tmp_path / "weights")
    code, paths, err = run(capsys, "explain", "--outdir", tmp_path / "e", "--t", "0,1000")
    assert code == 0, err
    assert [Path(p).name for p in paths] == ["noising.png", "schedules.png"]
    assert err.strip() == "no model installed: trajectory.png needs one (pass --model)"
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["noising.png", "schedules.png"]


@pytest.mark.parametrize("argv, fragment", [
    (["--t", "0,2000"], "--t 0,2000 must hold values from 0 (clean) to 1000"),
    (["--t", "a,b"], "--t 'a,b' must be comma-separated integers"),
    (["--sampler", "plms"], "unknown sampler 'plms'"),
    (["--steps", "0"], "--steps 0 is out of range"),
    (["--image", "missing.png"], "missing.png does not exist"),
])
def test_bad_explain_arguments(capsys, model_dir, tmp_path, argv, fragment):
    code, _, err = run(capsys, "explain", *argv, "--model", model_dir, "--outdir", tmp_path / "e")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written

@pytest.mark.parametrize("argv, fragment", [
    (["a red circle --sampler plms"], "unknown sampler 'plms'"),
    (["a red circle", "--sampler", "plms"], "unknown sampler 'plms'"),
    (["a red circle --ar 100:1"], "--ar 100:1"),
    (["a red circle", "--ar", "100:1"], "--ar 100:1"),
    (["a red circle", "--ar", "16x9"], "--ar '16x9' is not a width:height ratio"),
    (["a red circle", "--steps", "0"], "--steps 0 is out of range"),
    (["a red circle --steps 0"], "--steps 0 is out of range"),
    (["a red circle --stylize 100"], "unknown inline parameter --stylize"),
    (["a red circle --seed 3", "--seed", "4"], "--seed is given twice"),
    (["a red circle", "--chaos", "101"], "--chaos 101"),
    (["a red circle", "-n", "0"], "-n 0"),
    (["a red circle", "--cfg", "nan"], "--cfg nan"),
    (["a red circle", "--backend", "tpu"], "unknown kernel backend 'tpu'"),
    (["a red circle --backend tpu"], "unknown kernel backend 'tpu'"),
    (["a red circle --backend cpu", "--backend", "reference"], "--backend is given twice"),
    (["a red circle", "--trajectory", "steps.png"], "--trajectory steps.png must end in .gif"),
    (["a red circle", "--trajectory", "/no-such-folder/t.gif"], "there is no folder /no-such-folder"),
    (["a red circle", "--bogus-flag"], "unrecognized arguments: --bogus-flag"),
])
def test_bad_sample_arguments(capsys, model_dir, tmp_path, keep_backend, argv, fragment):
    code, _, err = run(capsys, "sample", *argv, "--model", model_dir, "--outdir", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["vary", "PARENT", "--strength", "medium"], "--strength 'medium' is not subtle, strong or a number in (0, 1]"),
    (["vary", "PARENT", "--strength", "0"], "--strength '0' is not subtle, strong or a number in (0, 1]"),
    (["vary", "PARENT", "--prompt", "a red circle --ar 2:1"], "--ar is for sample only"),
    (["remix", "PARENT", "a red circle --sampler plms"], "unknown sampler 'plms'"),
    (["remix", "PARENT", "a red circle --steps 0"], "--steps 0 is out of range"),
    (["zoom-out", "PARENT", "--factor", "1"], "--factor 1.0 is out of range"),
    (["pan", "PARENT", "--direction", "left", "--amount", "0"], "--amount 0.0 is out of range"),
    (["upscale", "PARENT", "--strength", "2"], "--strength 2.0 is out of range"),
    (["inpaint", "PARENT", "--mask", "CORRUPT", "a red circle"], "corrupt.png is not a readable image"),
])
def test_bad_edit_arguments(capsys, model_dir, parent, tmp_path, argv, fragment):
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    argv = [{"PARENT": parent, "CORRUPT": tmp_path / "corrupt.png"}.get(a, a) for a in argv]
    code, _, err = run(capsys, *argv, "--model", model_dir, "--outdir", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_unwritable_output_folder(capsys, model_dir, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    code, _, err = run(capsys, "sample", "a red circle", "--model", model_dir, "--outdir", tmp_path / "file" / "o",
                       *FAST)
    assert_one_line_error(code, err, "is not a folder")
    assert (tmp_path / "file").read_text() == "not a folder"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_output_folder_that_cannot_be_made(capsys, model_dir, monkeypatch):
    """/proc takes no new folder, even from root, for whom access() calls every folder writable: the
    check tries a real write. If writing fails only after the check, the error is the same one line."""
    target = Path("/proc/npdiff-outputs")
    code, _, err = run(capsys, "sample", "a red circle", "--model", model_dir, "--outdir", target, *FAST)
    assert_one_line_error(code, err, "output folder /proc is not writable")
    monkeypatch.setattr(cli, "_check_outdir", lambda path: None)
    code, _, err = run(capsys, "sample", "a red circle", "--model", model_dir, "--outdir", target, *FAST)
    assert_one_line_error(code, err, "cannot write to /proc/npdiff-outputs", "no file of this batch was kept")
    assert not target.exists()


def test_a_write_that_fails_midway_keeps_no_part_of_the_batch(capsys, model_dir, tmp_path, monkeypatch):
    real, calls = cli._write_new, []

    def disk_full_at_the_grid(outdir, *args):
        calls.append(outdir)
        if len(calls) == 3:                              # after both images, at the grid
            raise OSError(errno.ENOSPC, "No space left on device", str(outdir / "grid-0000.png"))
        return real(outdir, *args)

    monkeypatch.setattr(cli, "_write_new", disk_full_at_the_grid)
    code, _, err = run(capsys, "sample", "a red circle", "--model", model_dir, "--outdir", tmp_path / "o", "-n", "2",
                       *FAST)
    assert_one_line_error(code, err, "grid-0000.png (No space left on device); no file of this batch was kept")
    assert len(calls) == 3 and not (tmp_path / "o").exists()
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "00000-1.png").write_bytes(b"an earlier image")
    calls.clear()
    code, _, err = run(capsys, "sample", "a red circle", "--model", model_dir, "--outdir", tmp_path / "kept",
                       "-n", "2", *FAST)
    assert code == 2 and [p.name for p in (tmp_path / "kept").iterdir()] == ["00000-1.png"]


def test_no_default_model(capsys, monkeypatch, tmp_path, parent):
    """Until a model ships in npdiff/weights/, the commands that need one say how to get one."""
    for weights in (tmp_path / "absent", tmp_path / "empty"):
        if weights.name == "empty":
            weights.mkdir()
        monkeypatch.setattr("npdiff.model.DEFAULT_MODEL_DIR", weights)
        for argv in (["sample", "a red circle"], ["vary", parent], ["sample", "--from", parent]):
            code, _, err = run(capsys, *argv, "--outdir", tmp_path / "o", "--quiet")
            assert_one_line_error(code, err, "no default model is installed", "npdiff train", "--model")
    assert not (tmp_path / "o").exists()


def test_missing_and_corrupt_images(capsys, model_dir, tmp_path):
    code, _, err = run(capsys, "vary", tmp_path / "nope.png", "--model", model_dir, "--outdir", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "nope.png does not exist")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    for verb in (["vary"], ["upscale"], ["pan", "--direction", "up"]):
        code, _, err = run(capsys, *verb, tmp_path / "bad.png", "--model", model_dir, "--outdir", tmp_path / "o", *FAST)
        assert_one_line_error(code, err, "bad.png is not a readable image")
    code, _, err = run(capsys, "sample", "--from", tmp_path / "bad.png", "--model", model_dir,
                       "--outdir", tmp_path / "o")
    assert_one_line_error(code, err, "not a readable image")
    assert not (tmp_path / "o").exists()


def test_image_without_or_with_a_damaged_recipe(capsys, model_dir, tmp_path):
    save_png(tmp_path / "plain.png", np.zeros((16, 16, 3), np.uint8))
    code, _, err = run(capsys, "sample", "--from", tmp_path / "plain.png", "--model", model_dir,
                       "--outdir", tmp_path / "o")
    assert_one_line_error(code, err, "has no npdiff recipe")
    save_png(tmp_path / "damaged.png", np.zeros((16, 16, 3), np.uint8), {"npdiff": '{"format": "npdiff-recipe/1"'})
    code, _, err = run(capsys, "remix", tmp_path / "damaged.png", "a red circle", "--model", model_dir,
                       "--outdir", tmp_path / "o")
    assert_one_line_error(code, err, "damaged npdiff recipe")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("verb, field, value, fragment", [
    ("sample", "width", 512, "edited.png's recipe would be 512x16 pixels"),
    ("sample", "steps", 0, "whose steps 0 is not in 1..1000; the recipe is damaged"),
    ("sample", "seed", -1, "whose seed -1 is not in 0.."),
    ("vary", "strength", 0, "vary recipe whose strength 0 is not a number in (0, 1]"),
    ("zoom-out", "factor", 1000, "zoom-out recipe whose factor 1000 is not a number in (1, 4]"),
    ("pan", "direction", "sideways", "pan recipe whose direction 'sideways' is not one of left, right, up, down"),
    ("pan", "width", 32, "the recipe says 32x16 but its pan of a 16x16 parent makes another size"),
    ("inpaint", "mask", None, "inpaint recipe whose mask is missing or not of its parent's size"),
])
def test_from_refuses_a_hand_edited_recipe(capsys, model_dir, parent, tmp_path, verb, field, value, fragment):
    """A recipe is checked before any work, so an edited one is one line, not a traceback or a huge allocation."""
    made = parent
    if verb != "sample":
        mask = np.full((16, 16, 3), 255, np.uint8)
        save_png(tmp_path / "mask.png", mask)
        own = {"vary": [], "zoom-out": [], "pan": ["--direction", "left"],
               "inpaint": ["--mask", tmp_path / "mask.png", "a red circle"]}[verb]
        made = run(capsys, verb, parent, *own, "--model", model_dir, "--outdir", tmp_path / "kids", "-n", "1",
                   "--steps", "1", "--quiet")[1][0]
    pixels, text = read_image(made)
    recipe = json.loads(text["npdiff"])
    recipe[field] = value
    save_png(tmp_path / "edited.png", pixels, {**text, "npdiff": json.dumps(recipe)})
    code, _, err = run(capsys, "sample", "--from", tmp_path / "edited.png", "--model", model_dir,
                       "--outdir", tmp_path / "o", "--quiet")
    assert_one_line_error(code, err, fragment)
    assert not (tmp_path / "o").exists()


def test_mask_of_the_wrong_size_or_empty(capsys, model_dir, tmp_path):
    parent = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "2", "-n", "1")[0]
    save_png(tmp_path / "big.png", np.full((20, 16, 3), 255, np.uint8))
    code, _, err = run(capsys, "inpaint", parent, "--mask", tmp_path / "big.png", "a blue circle",
                       "--model", model_dir, "--outdir", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "is 16x20 but", "is 16x16")
    save_png(tmp_path / "black.png", np.zeros((16, 16, 3), np.uint8))
    code, _, err = run(capsys, "inpaint", parent, "--mask", tmp_path / "black.png", "a blue circle",
                       "--model", model_dir, "--outdir", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "no white pixels")
    code, _, err = run(capsys, "inpaint", parent, "--mask", tmp_path / "none.png", "a blue circle",
                       "--model", model_dir, "--outdir", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "none.png does not exist")
    assert not (tmp_path / "o").exists()


def test_outpainting_beyond_the_size_limit(capsys, model_dir, tmp_path):
    parent = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "2", "-n", "1")[0]
    code, _, err = run(capsys, "zoom-out", parent, "--factor", "3", "--model", model_dir, "--outdir", tmp_path / "o")
    assert_one_line_error(code, err, "48x48", "at most 1024 pixels")
    code, _, err = run(capsys, "pan", parent, "--direction", "sideways", "--model", model_dir,
                       "--outdir", tmp_path / "o")
    assert_one_line_error(code, err, "--direction 'sideways'")
    assert not (tmp_path / "o").exists()


def test_corrupt_and_mismatched_weights(capsys, model_dir, tmp_path):
    import shutil
    corrupt = tmp_path / "corrupt"
    shutil.copytree(model_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = run(capsys, "sample", "a red circle", "--model", corrupt, "--outdir", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "is not a readable safetensors file")

    mismatched = tmp_path / "mismatched"
    shutil.copytree(model_dir, mismatched)
    config = json.loads((mismatched / "config.json").read_text())
    config["unet"]["base_channels"] = 12
    (mismatched / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "sample", "a red circle", "--model", mismatched, "--outdir", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, "does not match its config")

    reshaped = tmp_path / "reshaped"                     # the config is right, a tensor in the weights is not
    shutil.copytree(model_dir, reshaped)
    tensors = load_tensors(reshaped / "model.safetensors")
    name, gone = sorted(k for k, v in tensors.items() if v.ndim == 4)[:2]
    want = tensors[name].shape
    tensors[name] = np.zeros(want[:-1] + (want[-1] + 1,), np.float32)
    del tensors[gone]
    save_tensors(reshaped / "model.safetensors", tensors)
    code, _, err = run(capsys, "sample", "a red circle", "--model", reshaped, "--outdir", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, f"{name} has shape {tensors[name].shape}, the config expects {want}",
                          f"missing {gone}")

    for field, value, message in [("resolution", "big", "resolution must be a positive whole number, not 'big'"),
                                  ("prediction", "score", "prediction 'score' is not one of eps, x0, v"),
                                  ("beta_schedule", "quadratic", "unknown beta schedule 'quadratic'")]:
        damaged = tmp_path / f"config-{field}"         # a hand-edited config.json: refused on loading, not mid-sample
        shutil.copytree(model_dir, damaged)
        config = json.loads((damaged / "config.json").read_text())
        config[field] = value
        (damaged / "config.json").write_text(json.dumps(config))
        code, _, err = run(capsys, "sample", "a red circle", "--model", damaged, "--outdir", tmp_path / "o", *FAST)
        assert_one_line_error(code, err, "config.json is missing or has a wrong field", message)

    swapped = tmp_path / "swapped"                       # another model's tokenizer.json
    shutil.copytree(model_dir, swapped)
    vocab = json.loads((swapped / "config.json").read_text())["text_encoder"]["vocab_size"]
    other = train_tokenizer(caption_corpus(300, seed=0), vocab_size=vocab + 64)
    (swapped / "tokenizer.json").write_text(other.to_str())
    code, _, err = run(capsys, "sample", "a red circle", "--model", swapped, "--outdir", tmp_path / "o", *FAST)
    assert_one_line_error(code, err, f"has {other.vocab_size} tokens", f"expects {vocab}")

    code, _, err = run(capsys, "sample", "a red circle", "--model", tmp_path / "absent", "--outdir", tmp_path / "o")
    assert_one_line_error(code, err, "does not exist")
    assert not (tmp_path / "o").exists()


def test_from_with_another_model_is_refused(capsys, model_dir, tmp_path):
    made = sample(capsys, model_dir, tmp_path / "a", "a red circle", "--seed", "2", "-n", "1")[0]
    other = save_tiny_model(tmp_path / "other", seed=1)
    code, _, err = run(capsys, "sample", "--from", made, "--model", other, "--outdir", tmp_path / "o")
    assert_one_line_error(code, err, "was made by the model with hash")
    code, _, err = run(capsys, "sample", "--from", made, "--seed", "3", "--model", model_dir,
                       "--outdir", tmp_path / "o")
    assert_one_line_error(code, err, "drop seed")
    assert not (tmp_path / "o").exists()


def test_help_states_the_size_bounds_and_chaos(capsys):
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "multiples of 8 from 16 to 128" in text and "4x the model's training pixel count" in text
    assert "the first image keeps --cfg" in text
