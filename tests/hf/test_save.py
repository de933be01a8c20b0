"""`save_hf` and `export_folder` never clobber an export half-way: the old one stays until the new one is whole.

Every case compares the target folder, file by file and byte by byte, with either the old export
it held or a reference export written into a fresh folder. The kill-at-every-operation test of the
underlying staging is tests/hf/test_staging.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from flax import nnx  # noqa: E402
from hf_fixtures import save_hf_model, tiny_hf_config  # noqa: E402

from eemo_jax import paths  # noqa: E402
from eemo_jax.hf import save as save_module  # noqa: E402
from eemo_jax.hf.heads_io import save_head  # noqa: E402
from eemo_jax.hf.load import load_hf  # noqa: E402
from eemo_jax.hf.safetensors_io import CheckpointError  # noqa: E402
from eemo_jax.hf.save import export_folder, save_hf, write_hf  # noqa: E402
from eemo_jax.model.heads import EmotionHead, HeadConfig  # noqa: E402

ASSETS = {"tokenizer_config.json": '{"model_max_length": 512}\n', "chat_template.jinja": "{{ x }}\n"}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """(source folder, model, a reference export of the model written into a fresh folder)."""
  src = os.fspath(tmp_path_factory.mktemp("src"))
  save_hf_model(src, tiny_hf_config())
  for name, text in ASSETS.items():
    with open(os.path.join(src, name), "w") as f:
      f.write(text)
  model = load_hf(src)
  reference = os.fspath(tmp_path_factory.mktemp("reference") / "export")
  save_hf(model, reference, source_dir=src)
  return src, model, snapshot(reference)


def snapshot(folder) -> dict:
  """name -> ('link', where it points) or ('file', bytes), for everything in `folder` (recursively)."""
  files = {}
  for parent, dirs, names in os.walk(folder):
    for name in names + [d for d in dirs if os.path.islink(os.path.join(parent, d))]:
      path = os.path.join(parent, name)
      key = os.path.relpath(path, folder)
      if os.path.islink(path):
        files[key] = ("link", os.readlink(path))
      else:
        with open(path, "rb") as f:
          files[key] = ("file", f.read())
  return files


def old_export(folder) -> dict:
  """A previous, different export (sharded, with a file of its own); returns its snapshot."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"old": True}, f)
  for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
               "model.safetensors.index.json", "notes.txt"):
    with open(os.path.join(folder, name), "w") as f:
      f.write(f"old {name}")
  return snapshot(folder)


def beside(folder) -> list[str]:
  """What an export left next to its target (temporary folders of killed or failed exports)."""
  name = os.path.basename(folder)
  return sorted(n for n in os.listdir(os.path.dirname(folder)) if n.startswith(f".{name}."))


def test_export_into_a_folder_with_files_is_refused(exported, tmp_path):
  src, model, _ = exported
  out = os.fspath(tmp_path / "out")
  old = old_export(out)
  with pytest.raises(ValueError) as info:
    save_hf(model, out, source_dir=src)
  assert "already holds files" in str(info.value) and "--overwrite" in str(info.value)
  assert snapshot(out) == old and beside(out) == []


def test_overwrite_replaces_the_old_export_whole(exported, tmp_path):
  src, model, reference = exported
  out = os.fspath(tmp_path / "out")
  old_export(out)
  assert save_hf(model, out, source_dir=src, overwrite=True) == ["model.safetensors"]
  assert snapshot(out) == reference and beside(out) == []


def test_symlinks_in_the_target_are_replaced_not_written_through(exported, tmp_path):
  """An HF-cache snapshot as target: its files link into a blob store that other snapshots share."""
  src, model, reference = exported
  blobs, out = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
  old_export(os.fspath(blobs))
  blob_files = snapshot(os.fspath(blobs))
  out.mkdir(parents=True)
  for name in os.listdir(blobs):
    os.symlink(os.path.join("..", "..", "blobs", name), out / name)
  save_hf(model, os.fspath(out), source_dir=src, overwrite=True)
  assert snapshot(os.fspath(blobs)) == blob_files
  assert snapshot(os.fspath(out)) == reference


def test_the_target_is_untouched_until_the_export_is_complete(exported, tmp_path, monkeypatch):
  src, model, reference = exported
  out = os.fspath(tmp_path / "out")
  old = old_export(out)
  seen = []

  def watching(step):
    def run(*args, **kwargs):
      seen.append(step)
      assert snapshot(out) == old, f"the target changed before {step}"
      result = step_functions[step](*args, **kwargs)
      assert snapshot(out) == old, f"the target changed during {step}"
      return result
    return run

  step_functions = {"write_sharded": save_module.write_sharded, "copy_assets": save_module.copy_assets}
  for step in step_functions:
    monkeypatch.setattr(save_module, step, watching(step))
  save_hf(model, out, source_dir=src, overwrite=True)
  assert seen == ["write_sharded", "copy_assets"] and snapshot(out) == reference


def test_a_failed_export_leaves_the_old_one(exported, tmp_path, monkeypatch):
  src, model, _ = exported
  out = os.fspath(tmp_path / "out")
  old = old_export(out)

  def failing_copy(source_dir, folder):
    raise OSError(errno.EACCES, "Permission denied", os.path.join(source_dir, "tokenizer.json"))

  monkeypatch.setattr(save_module, "copy_assets", failing_copy)
  with pytest.raises(PermissionError):
    save_hf(model, out, source_dir=src, overwrite=True)
  assert snapshot(out) == old and beside(out) == []


class _FullDisk:
  """A file whose writes fail with ENOSPC once `room` bytes are written, as on a full disk."""

  def __init__(self, f, room):
    self.f, self.room = f, room

  def write(self, data):
    n = memoryview(data).nbytes
    if n > self.room:
      self.f.write(bytes(memoryview(data).cast("B")[:self.room]))
      self.room = 0
      raise OSError(errno.ENOSPC, "No space left on device")
    self.room -= n
    return self.f.write(data)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.f.close()


def test_disk_full_names_the_file_and_the_bytes_needed(exported, tmp_path, monkeypatch):
  src, model, reference = exported
  out = os.fspath(tmp_path / "out")
  old = old_export(out)
  real_open = paths.open_file  # every file of an export is opened through the path layer
  monkeypatch.setattr(paths, "open_file", lambda path, mode="r", *a, **k: (
      _FullDisk(real_open(path, mode, *a, **k), 4096) if "w" in mode else real_open(path, mode, *a, **k)))
  with pytest.raises(CheckpointError) as info:
    save_hf(model, out, source_dir=src, overwrite=True)
  message = str(info.value)
  needed = len(reference["model.safetensors"][1])
  assert "no space left on the device writing" in message and "model.safetensors" in message
  assert f"the weights need {needed} bytes" in message and "free" in message
  assert snapshot(out) == old and beside(out) == []


def test_leftovers_of_killed_exports_do_not_get_in_the_way(exported, tmp_path):
  """A temporary folder beside the target, and the `.tmp-tensors/` an older EEmo-JAX left inside it."""
  src, model, reference = exported
  out = os.fspath(tmp_path / "out")
  old_export(out)
  os.makedirs(os.path.join(out, ".tmp-tensors"))
  with open(os.path.join(out, ".tmp-tensors", "0.raw"), "wb") as f:
    f.write(b"\0" * 64)
  partial = os.fspath(tmp_path / ".out.partial-0123456789ab")
  shutil.copytree(out, partial)
  save_hf(model, out, source_dir=src, overwrite=True)
  assert snapshot(out) == reference and beside(out) == []


def test_export_folder_puts_backbone_and_head_in_place_together(exported, tmp_path):
  """How a training run exports: the HF files and the head's files, replaced as one folder."""
  src, model, reference = exported
  # Built abstractly and filled with numpy (initialising a real head compiles for seconds).
  head = nnx.eval_shape(lambda: EmotionHead(HeadConfig.pooled(model.config.text.hidden_size), rngs=None))
  for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(head, nnx.Param))):
    var.set_value(np.full(var.shape, i + 1, np.float32))
  head_alone = os.fspath(tmp_path / "head_alone")
  save_head(head, head_alone)
  out = os.fspath(tmp_path / "out")
  old = old_export(out)
  with export_folder(out, overwrite=True) as folder:
    write_hf(model, folder, source_dir=src)
    save_head(head, folder)
    assert snapshot(out) == old
  assert snapshot(out) == {**reference, **snapshot(head_alone)} and beside(out) == []


def test_export_folder_error_keeps_the_old_export(exported, tmp_path):
  src, model, _ = exported
  out = os.fspath(tmp_path / "out")
  old = old_export(out)
  with pytest.raises(RuntimeError, match="stopped"):
    with export_folder(out, overwrite=True) as folder:
      write_hf(model, folder, source_dir=src)
      raise RuntimeError("stopped")
  assert snapshot(out) == old and beside(out) == []
