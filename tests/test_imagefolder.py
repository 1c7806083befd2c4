"""A user's folder of captioned images: both caption layouts, resize and center crop, and
one clear DataError for each mistake a user can make."""

import json

import numpy as np
import pytest
from PIL import Image

from npdiff.data.imagefolder import DataError, ImageFolder, resize_and_crop

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)


def stripes(width, height, horizontal=True):
    """Outer quarters red and blue, middle half green, along the long side."""
    a = np.zeros((height, width, 3), np.uint8)
    n = width if horizontal else height
    cut = [0, n // 4, 3 * n // 4, n]
    for color, lo, hi in zip((RED, GREEN, BLUE), cut, cut[1:]):
        if horizontal:
            a[:, lo:hi] = color
        else:
            a[lo:hi] = color
    return Image.fromarray(a)


def write_metadata(root, records):
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_metadata_folder_resizes_and_center_crops(tmp_path):
    stripes(128, 64).save(tmp_path / "wide.png")
    stripes(40, 80, horizontal=False).save(tmp_path / "tall.png")
    (tmp_path / "sub").mkdir()
    Image.new("RGB", (10, 10), BLUE).save(tmp_path / "sub" / "small.jpg", quality=95)
    write_metadata(tmp_path, [{"file_name": "tall.png", "text": "a tall one"},
                              {"file_name": "sub/small.jpg", "text": " a small one "},
                              {"file_name": "wide.png", "text": "a wide one"}])
    folder = ImageFolder(tmp_path, 32)
    images, captions = folder.load_all()
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    assert [f.name for f in folder.files] == ["small.jpg", "tall.png", "wide.png"]    # sorted by path
    assert captions == ["a small one", "a tall one", "a wide one"]
    # 128x64 -> 64x32 and 40x80 -> 32x64: the center 32 columns (rows) are the green
    # stripe exactly; only the outermost line feels the red and blue through the filter
    wide, tall = images[2].astype(int), images[1].astype(int)
    assert np.abs(wide[:, 1:-1] - GREEN).max() <= 12 and np.abs(tall[1:-1] - GREEN).max() <= 12
    for edge in (wide[:, 0], wide[:, -1], tall[0], tall[-1]):
        assert (edge[:, 1] > 160).all()                                                 # still mostly green
    assert np.abs(images[0].astype(int) - BLUE).max() <= 8                             # upscaled, not cropped


def test_txt_captions_and_non_square_resolution(tmp_path):
    stripes(64, 64).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("stripes\n", encoding="utf-8")
    folder = ImageFolder(tmp_path, (16, 32))
    image, caption = folder[0]
    assert image.shape == (16, 32, 3) and caption == "stripes"
    # 64x64 -> 32x32, crop 8 rows from top and bottom: all three stripes survive
    assert np.abs(image[:, 0].astype(int) - RED).max() <= 12
    assert np.abs(image[:, 16].astype(int) - GREEN).max() <= 12


def test_transparency_is_flattened_on_white_and_exif_orientation_applied(tmp_path):
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:16] = (255, 0, 0, 255)                       # top half opaque red, bottom transparent
    img = resize_and_crop(Image.fromarray(rgba, "RGBA"), 32, 32)
    assert (img[:16] == RED).all() and (img[16:] == 255).all()
    # a 40x20 picture stored sideways: EXIF orientation 6 means "rotate 90 degrees clockwise to view"
    sideways = stripes(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways.save(tmp_path / "s.jpg", exif=exif, quality=95)
    with Image.open(tmp_path / "s.jpg") as im:
        up = resize_and_crop(im, 40, 20)               # upright it is 20 wide, 40 tall
    assert up.shape == (40, 20, 3)
    assert np.abs(up[0].astype(int) - RED).max() <= 40 and np.abs(up[-1].astype(int) - BLUE).max() <= 40


def test_sample_batch_is_seeded(tmp_path):
    for i, color in enumerate((RED, GREEN, BLUE)):
        Image.new("RGB", (8, 8), color).save(tmp_path / f"{i}.png")
        (tmp_path / f"{i}.txt").write_text(f"color {i}", encoding="utf-8")
    folder = ImageFolder(tmp_path, 8)
    a = folder.sample_batch(np.random.default_rng(0), 10)
    b = folder.sample_batch(np.random.default_rng(0), 10)
    assert np.array_equal(a[0], b[0]) and a[1] == b[1] and a[0].shape == (10, 8, 8, 3)
    for img, caption, path in zip(*a):                 # each image goes with its own caption
        i = int(path.stem)
        assert caption == f"color {i}" and (img == (RED, GREEN, BLUE)[i]).all()


def expect(match, root, resolution=32):
    with pytest.raises(DataError, match=match) as info:
        ImageFolder(root, resolution).load_all()
    assert "\n" not in str(info.value)                 # one line
    assert isinstance(info.value, ValueError)


def test_empty_folder_and_not_a_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here", encoding="utf-8")
    expect(r"holds no images .*put captioned images in it", tmp_path)
    expect(r"is not a folder", tmp_path / "missing")


def test_missing_txt_caption_names_the_file_and_the_fix(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    expect(r"cat.png has no caption; write it to .*cat.txt", tmp_path)


def test_image_missing_from_metadata(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "cat.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "dog.png")
    write_metadata(tmp_path, [{"file_name": "cat.png", "text": "a cat"}])
    expect(r"dog.png has no caption in .*metadata.jsonl; add a line", tmp_path)


@pytest.mark.parametrize("line, match", [
    ('{"file_name": "cat.png", "text": "a cat"', r"line 2 is not valid JSON"),
    ('["cat.png", "a cat"]', r"line 2 is not a JSON object"),
    ('{"file_name": "cat.png"}', r'line 2 has no "text" field'),
    ('{"file_name": "cat.png", "text": 3}', r'line 2 has a non-string "text" field'),
    ('{"file_name": "cow.png", "text": "a cow"}', r"line 2 names cow.png, which is not a file"),
    ('{"file_name": "dog.png", "text": "again"}', r"line 2 captions dog.png a second time"),
])
def test_bad_metadata_lines(tmp_path, line, match):
    Image.new("RGB", (8, 8)).save(tmp_path / "dog.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "dog.png", "text": "a dog"}\n' + line + "\n",
                                             encoding="utf-8")
    expect(r"metadata.jsonl, " + match, tmp_path)


@pytest.mark.parametrize("content", [b"not an image at all", None])
def test_unreadable_image_names_the_file(tmp_path, content):
    path = tmp_path / "bad.png"
    if content is None:                                # a real PNG cut short
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        content = path.read_bytes()[:200]
    path.write_bytes(content)
    (tmp_path / "bad.txt").write_text("broken", encoding="utf-8")
    expect(r"cannot read image .*bad.png .*replace it or move it out", tmp_path)


def test_hidden_files_are_skipped(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a", encoding="utf-8")
    (tmp_path / "._a.png").write_bytes(b"macOS resource fork")
    (tmp_path / ".cache").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / ".cache" / "b.png")
    assert len(ImageFolder(tmp_path, 8)) == 1
