"""Checkpoints (npdiff/checkpoint.py): tensors in safetensors and everything else in JSON, with no
pickle anywhere; loading checks names, shapes and dtypes against the config and reports every
problem in one message; every write is atomic (a temporary name in the same folder, then a rename),
so a failed save leaves the previous file or folder as it was."""

import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from npdiff import checkpoint as ckpt
from npdiff.model import Model

from tiny_model import save_tiny_model, tiny_model

PACKAGE = Path(ckpt.__file__).parent


def test_tensors_round_trip_exactly(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"a.weight": rng.standard_normal((3, 4)).astype(np.float32),
               "b.bias": rng.standard_normal(5),  # float64
               "c.view": rng.standard_normal((4, 6)).astype(np.float32).T}  # non-contiguous
    ckpt.save_tensors(tmp_path / "t.safetensors", tensors)
    assert not (tmp_path / "t.safetensors").read_bytes().startswith(b"\x80")  # not a pickle stream
    back = ckpt.load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for name, a in tensors.items():
        assert back[name].dtype == a.dtype and back[name].shape == a.shape
        assert np.array_equal(back[name], a)


def test_model_folder_round_trip(tmp_path):
    model = tiny_model()
    folder = tmp_path / "m"
    model.save(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([ckpt.MODEL_FILE, ckpt.CONFIG_FILE, ckpt.TOKENIZER_FILE])
    assert json.loads((folder / ckpt.CONFIG_FILE).read_text()) == model.config.to_dict()
    loaded = Model.load(folder)
    assert loaded.config.to_dict() == model.config.to_dict()
    assert set(loaded.params) == set(model.params)
    for name, value in model.params.items():
        assert loaded.params[name].dtype == value.dtype and np.array_equal(loaded.params[name], value), name


def test_load_reports_every_mismatch_in_one_message(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    params = ckpt.load_tensors(folder / ckpt.MODEL_FILE)
    names = sorted(params)
    missing, reshaped, integer = names[0], names[1], names[2]
    wrong_shape = params[reshaped].shape + (1,)
    del params[missing]
    params[reshaped] = np.zeros(wrong_shape, np.float32)
    params[integer] = params[integer].astype(np.int32)
    params["unet.extra.weight"] = np.zeros((2, 2), np.float32)
    ckpt.save_tensors(folder / ckpt.MODEL_FILE, params)
    with pytest.raises(ckpt.CheckpointError) as err:
        Model.load(folder)
    message = str(err.value)
    assert "\n" not in message and "does not match its config" in message
    assert f"missing {missing}" in message
    assert "unexpected unet.extra.weight (2, 2)" in message
    assert f"{reshaped} has shape {wrong_shape}" in message and "the config expects" in message
    assert f"{integer} has dtype int32" in message


def test_many_mismatches_are_all_counted():
    """The message lists the first eight problems and counts the rest."""
    expected = {f"w{i:02d}": np.zeros(3) for i in range(11)}
    found = {f"w{i:02d}": np.zeros(4) for i in range(11)}
    with pytest.raises(ckpt.CheckpointError, match=r"w07 has shape \(4,\), the config expects \(3,\); and 3 more$"):
        ckpt.check_tensors(found, expected, "x.safetensors")


def test_other_float_dtypes_are_accepted_and_cast(tmp_path):
    folder = save_tiny_model(tmp_path / "m")
    params = ckpt.load_tensors(folder / ckpt.MODEL_FILE)
    ckpt.save_tensors(folder / ckpt.MODEL_FILE, {k: v.astype(np.float64) for k, v in params.items()})
    model = Model.load(folder)
    assert all(v.dtype == np.float32 for v in model.params.values())


def test_unreadable_files_are_clear_errors(tmp_path):
    good = ckpt.tensor_bytes({"a": np.arange(6, dtype=np.float32)})
    (tmp_path / "cut.safetensors").write_bytes(good[:len(good) // 2])
    with pytest.raises(ckpt.CheckpointError, match="is not a readable safetensors file"):
        ckpt.load_tensors(tmp_path / "cut.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_tensors(tmp_path / "absent.safetensors")
    (tmp_path / "bad.json").write_text("{step: 1")
    with pytest.raises(ckpt.CheckpointError, match="is not valid JSON"):
        ckpt.load_json(tmp_path / "bad.json")


class _Payload:
    """Unpickling this creates a file: proof that a pickle stream was executed."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    (tmp_path / "pickled.safetensors").write_bytes(pickle.dumps(_Payload(str(marker))))
    with open(tmp_path / "object.safetensors", "wb") as f:  # a .npy holding a pickled object array
        np.save(f, np.array([_Payload(str(marker))], dtype=object), allow_pickle=True)
    for name in ("pickled.safetensors", "object.safetensors"):
        with pytest.raises(ckpt.CheckpointError, match="is not a readable safetensors file"):
            ckpt.load_tensors(tmp_path / name)
    assert not marker.exists()


def test_no_pickle_in_the_package_source():
    """No module of npdiff imports pickle, calls np.load with allow_pickle=True or torch.load."""
    forbidden = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b|allow_pickle\s*=\s*True|torch\.load\(",
                           re.MULTILINE)
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 20
    hits = [f"{p.relative_to(PACKAGE)}: {m.group(0).strip()}"
            for p in sources for m in forbidden.finditer(p.read_text())]
    assert not hits, hits


# ----------------------------------------------------------------------------------------------
# atomic writes


def test_atomic_write_renames_within_the_folder(tmp_path, monkeypatch):
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renames.append((src, dst)), real_replace(src, dst))[1])
    ckpt.atomic_write_json(tmp_path / "state.json", {"step": 3})
    assert json.loads((tmp_path / "state.json").read_text()) == {"step": 3}
    [(src, dst)] = renames
    assert Path(src).parent == Path(dst).parent == tmp_path  # same file system: the rename is atomic
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    ckpt.save_tensors(path, {"a": np.ones(3, np.float32)})
    before = path.read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        ckpt.save_tensors(path, {"a": np.zeros(1000, np.float32)})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]  # no temporary left


def test_a_failed_folder_save_keeps_the_old_folder(tmp_path, monkeypatch):
    folder = tmp_path / "checkpoint-2"
    ckpt.write_folder(folder, {"a.json": b"old a", "b.json": b"old b"})
    writes = []
    real_write = Path.write_bytes

    def fail_on_second(self, data):
        writes.append(self.name)
        if len(writes) == 2:
            raise OSError(5, "Input/output error")
        return real_write(self, data)
    monkeypatch.setattr(Path, "write_bytes", fail_on_second)
    with pytest.raises(OSError, match="Input/output"):
        ckpt.write_folder(folder, {"a.json": b"new a", "b.json": b"new b"})
    monkeypatch.undo()
    assert (folder / "a.json").read_bytes() == b"old a" and (folder / "b.json").read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    ckpt.write_folder(folder, {"c.json": b"new"})  # a successful save replaces the folder whole
    assert sorted(p.name for p in folder.iterdir()) == ["c.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
