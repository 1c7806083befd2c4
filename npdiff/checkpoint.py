"""Checkpoints: tensors in safetensors, everything else in JSON, every write atomic.

A model folder (what `sample` loads, and what ships in `npdiff/weights/`):

    model.safetensors   network weights, names "unet.*" and "text.*"
    config.json         model configs, diffusion schedule, tokenizer length, resolution
    tokenizer.json      the Hugging Face tokenizer trained on the captions

A training checkpoint (`OUTPUT_DIR/checkpoint-STEP/`) is a model folder plus

    ema.safetensors         the exponential moving average of the weights
    optimizer.safetensors   AdamW moments, names "m.*" and "v.*"
    training_state.json     step, RNG state, arguments, last loss

No pickle anywhere: safetensors holds only named arrays, JSON only plain values.
Every file is written to a temporary name in the same folder and renamed into
place, and a checkpoint folder is assembled under a temporary name and renamed
as a whole, so an interrupted save never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
EMA_FILE = "ema.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "training_state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable or does not match its config."""


# ----------------------------------------------------------------------------
# atomic writes

def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; the file gets a new file's usual mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def save_tensors(path: str | os.PathLike, tensors: dict[str, np.ndarray], metadata: dict | None = None) -> None:
    contiguous = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
    atomic_write_bytes(path, st_save(contiguous, metadata=metadata))


def load_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; point to a model folder that holds {path.name}")
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-save or re-download it") from None


def load_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; point to a model folder that holds {path.name}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); re-save the checkpoint") from None


# ----------------------------------------------------------------------------
# checking weights against what the config expects

def check_tensors(found: dict[str, np.ndarray], expected: dict[str, np.ndarray], source: str) -> None:
    """Raise one CheckpointError listing every missing, unexpected or mis-shaped tensor."""
    problems = []
    for name in sorted(expected.keys() - found.keys()):
        problems.append(f"missing {name} {tuple(expected[name].shape)}")
    for name in sorted(found.keys() - expected.keys()):
        problems.append(f"unexpected {name} {tuple(found[name].shape)}")
    for name in sorted(expected.keys() & found.keys()):
        want, got = expected[name], found[name]
        if want.shape != got.shape:
            problems.append(f"{name} has shape {tuple(got.shape)}, the config expects {tuple(want.shape)}")
        elif got.dtype.kind != "f":
            problems.append(f"{name} has dtype {got.dtype}, expected a float type")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{source} does not match its config: {shown}")


# ----------------------------------------------------------------------------
# folders

def write_folder(path: str | os.PathLike, files: dict[str, bytes]) -> None:
    """Create folder `path` holding `files` (name -> bytes) atomically: build it under a
    temporary name beside it, then rename. An existing folder of that name is replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def tensor_bytes(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> bytes:
    return st_save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint-STEP folder with the largest STEP, or None."""
    best, best_step = None, -1
    for p in Path(output_dir).glob("checkpoint-*"):
        suffix = p.name[len("checkpoint-"):]
        if p.is_dir() and suffix.isdigit() and int(suffix) > best_step:
            best, best_step = p, int(suffix)
    return best
