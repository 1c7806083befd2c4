"""Your own images: a folder of captioned pictures, resized and center-cropped for training.

Two ways to caption a folder (the first wins when both are present):

    metadata.jsonl   one JSON object per line, {"file_name": "cats/tom.png", "text": "a grey cat"},
                     file_name relative to the folder (the Hugging Face `imagefolder` layout)
    NAME.txt         beside each image NAME.png, holding its caption

Every image in the folder, subfolders included, needs a caption; files and folders
whose names start with "." are skipped. Each image is turned upright by its EXIF
orientation, flattened onto white if it has transparency, scaled so that its shorter
side fits the target (Lanczos) and cropped at the center: nothing is stretched.

Every problem a user can fix raises DataError, one line that names the file and says
what to do.

Dimension letters: N images, H and W pixels, C=3 channels.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

METADATA_FILE = "metadata.jsonl"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class DataError(ValueError):
    """A problem with a user's image folder: a missing caption, an unreadable image, an empty folder, bad metadata."""


def _resolution(resolution) -> tuple[int, int]:
    h, w = (resolution, resolution) if np.isscalar(resolution) else tuple(resolution)
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"resolution must be a positive int or (height, width), got {resolution!r}")
    return int(h), int(w)


def resize_and_crop(image: Image.Image, height: int, width: int) -> np.ndarray:
    """A PIL image -> uint8 (H, W, C): scaled so it covers height x width, then cropped at the center."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    image = image.convert("RGB")
    w0, h0 = image.size
    scale = max(height / h0, width / w0)             # the shorter side (relative to the target) fits
    w1, h1 = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    if (w1, h1) != (w0, h0):
        image = image.resize((w1, h1), Image.Resampling.LANCZOS)
    left, top = (w1 - width) // 2, (h1 - height) // 2
    image = image.crop((left, top, left + width, top + height))
    return np.asarray(image, dtype=np.uint8).copy()  # (H, W, C)


def _image_files(root: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def _read_metadata(root: Path, images: list[Path]) -> dict[Path, str]:
    meta = root / METADATA_FILE
    example = '{"file_name": "cat.png", "text": "a grey cat"}'
    captions: dict[Path, str] = {}
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {meta} ({e}); it must be UTF-8 text, one JSON object per line") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{meta}, line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where} is not valid JSON ({e.msg}); write each line as {example}") from None
        if not isinstance(record, dict):
            raise DataError(f"{where} is not a JSON object; write each line as {example}")
        for key in ("file_name", "text"):
            if not isinstance(record.get(key), str):
                problem = "has no" if key not in record else "has a non-string"
                raise DataError(f'{where} {problem} "{key}" field; write each line as {example}')
        path = (root / record["file_name"]).resolve()
        if not path.is_file():
            raise DataError(f"{where} names {record['file_name']}, which is not a file in {root}; "
                            f"fix the name or remove the line")
        if path in captions:
            raise DataError(f"{where} captions {record['file_name']} a second time; keep one line per image")
        captions[path] = record["text"].strip()
    for img in images:
        if img.resolve() not in captions:
            line = json.dumps({"file_name": img.relative_to(root).as_posix(), "text": "..."})
            raise DataError(f"{img} has no caption in {meta}; add a line {line} or move the image out")
    return captions


def _read_txt_captions(root: Path, images: list[Path]) -> dict[Path, str]:
    captions = {}
    for img in images:
        txt = img.with_suffix(".txt")
        if not txt.is_file():
            raise DataError(f"{img} has no caption; write it to {txt}, or caption the folder in {root / METADATA_FILE}")
        try:
            captions[img.resolve()] = txt.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read caption {txt} ({e}); save it as UTF-8 text") from None
    return captions


class ImageFolder:
    """Captioned images from a folder, served at one resolution (int, or (height, width))."""

    def __init__(self, path: str | os.PathLike, resolution=32):
        self.root = Path(path)
        self.height, self.width = _resolution(resolution)
        if not self.root.is_dir():
            raise DataError(f"{self.root} is not a folder; pass a folder of images with captions")
        images = _image_files(self.root)
        if not images:
            raise DataError(f"{self.root} holds no images ({', '.join(IMAGE_EXTENSIONS)}); "
                            f"put captioned images in it")
        if (self.root / METADATA_FILE).is_file():
            by_path = _read_metadata(self.root, images)
        else:
            by_path = _read_txt_captions(self.root, images)
        self.files = images                                 # sorted by path in the folder: stable
        self.captions = [by_path[p.resolve()] for p in images]
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.files)

    def load(self, i: int) -> np.ndarray:
        """Image i -> uint8 (H, W, C) at the folder's resolution (decoded once, then cached)."""
        if i not in self._cache:
            path = self.files[i]
            try:
                with Image.open(path) as im:
                    im.load()
                    self._cache[i] = resize_and_crop(im, self.height, self.width)
            except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
                raise DataError(f"cannot read image {path} ({e}); replace it or move it out of the folder") from None
        return self._cache[i]

    def __getitem__(self, i: int) -> tuple[np.ndarray, str]:
        return self.load(i), self.captions[i]

    def load_all(self) -> tuple[np.ndarray, list[str]]:
        """Every image -> (uint8 (N, H, W, C), captions)."""
        return np.stack([self.load(i) for i in range(len(self))]), list(self.captions)

    def sample_batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], list[Path]]:
        """n images drawn with replacement -> (uint8 (N, H, W, C), captions, their files)."""
        idx = rng.integers(0, len(self), size=n)
        images = np.stack([self.load(int(i)) for i in idx]) if n else np.zeros((0, self.height, self.width, 3),
                                                                                np.uint8)
        return images, [self.captions[i] for i in idx], [self.files[i] for i in idx]
