"""Images in and out: [-1, 1] arrays <-> uint8, grids, PNGs with text chunks, GIFs.

Dimension letters: N batch, C channels, H height, W width.
Every file is written to a temporary name beside its target and renamed into place.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from npdiff.checkpoint import atomic_write_bytes


class ImageError(ValueError):
    """An image file that is missing, unreadable or of the wrong kind."""


def to_uint8(x: np.ndarray) -> np.ndarray:
    """(N, C, H, W) or (C, H, W) in [-1, 1] -> (N, H, W, C) or (H, W, C) uint8."""
    x = np.clip((np.asarray(x, dtype=np.float64) + 1.0) * 127.5, 0.0, 255.0)
    x = np.rint(x).astype(np.uint8)
    return np.moveaxis(x, -3, -1)


def from_uint8(img: np.ndarray, dtype=np.float32) -> np.ndarray:
    """(N, H, W, C) or (H, W, C) uint8 -> (N, C, H, W) or (C, H, W) in [-1, 1]."""
    x = np.asarray(img, dtype=dtype) / dtype(127.5) - dtype(1.0)
    return np.moveaxis(x, -1, -3)


def make_grid(images: np.ndarray, rows: int | None = None, pad: int = 0) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*H, cols*W, C) image, filled row by row."""
    n, h, w, c = images.shape
    rows = rows or int(np.floor(np.sqrt(n)))
    cols = -(-n // rows)
    grid = np.zeros((rows * (h + pad) - pad, cols * (w + pad) - pad, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * (h + pad): r * (h + pad) + h, q * (w + pad): q * (w + pad) + w] = images[i]
    return grid


def png_bytes(img: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes with tEXt/iTXt chunks. Deterministic for equal input."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value) if not value.isascii() else info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def save_png(path: str | os.PathLike, img: np.ndarray, text: dict[str, str] | None = None) -> None:
    atomic_write_bytes(path, png_bytes(img, text))


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, str]]:
    """Read an image file -> ((H, W, 3) uint8, its PNG text chunks)."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{path} does not exist; check the path")
    try:
        with Image.open(path) as im:
            im.load()
            text = dict(getattr(im, "text", {}) or {})
            rgb = np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ImageError(f"{path} is not a readable image ({e}); use a PNG or JPEG file") from None
    return rgb, text


def save_gif(path: str | os.PathLike, frames: list[np.ndarray], duration_ms: int = 80) -> None:
    """Frames of (H, W, 3) uint8 -> an animated GIF that loops."""
    pil = [Image.fromarray(np.ascontiguousarray(f)) for f in frames]
    buf = io.BytesIO()
    pil[0].save(buf, format="GIF", save_all=True, append_images=pil[1:], duration=duration_ms, loop=0)
    atomic_write_bytes(path, buf.getvalue())
