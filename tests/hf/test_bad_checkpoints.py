"""Every broken checkpoint a user can hand us fails with ONE clear message that names the problem.

Each case copies a good tiny HF folder, breaks one thing, and checks that `load_hf` raises a single
`CheckpointError` / `ValueError` whose one-line message names the key, field, or file at fault.
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from hf_fixtures import build_hf_model, tiny_hf_config  # noqa: E402

from eemo_jax.hf.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from eemo_jax.hf.load import load_hf  # noqa: E402
from eemo_jax.hf.safetensors_io import CheckpointError  # noqa: E402


@pytest.fixture(scope="module")
def good(tmp_path_factory):
  """A single-file and a sharded copy of the same tiny model, saved by transformers."""
  base = tmp_path_factory.mktemp("good")
  model = build_hf_model(tiny_hf_config())
  single, sharded = os.fspath(base / "single"), os.fspath(base / "sharded")
  model.save_pretrained(single)
  model.save_pretrained(sharded, max_shard_size="100KB")
  return single, sharded


@pytest.fixture
def folder(good, tmp_path):
  dst = os.fspath(tmp_path / "model")
  shutil.copytree(good[0], dst)
  return dst


def load_error(folder, exc=CheckpointError) -> str:
  """The single error `load_hf` raises, as text; it must be one line."""
  with pytest.raises(exc) as info:
    load_hf(folder)
  message = str(info.value)
  assert "\n" not in message, message
  return message


def rewrite(folder, change):
  """Applies `change(tensors) -> tensors` to model.safetensors (written with safetensors itself)."""
  path = os.path.join(folder, "model.safetensors")
  tensors = change(safetensors_torch.load_file(path))
  safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})


def edit_config(folder, change):
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    config = json.load(f)
  change(config)
  with open(path, "w") as f:
    json.dump(config, f)


def test_missing_key(folder):
  key = "model.layers.1.mlp.up_proj.weight"
  rewrite(folder, lambda t: {k: v for k, v in t.items() if k != key})
  message = load_error(folder)
  assert f"missing keys {key}" in message and "unexpected" not in message


def test_unexpected_key(folder):
  rewrite(folder, lambda t: {**t, "model.layers.7.mlp.up_proj.weight": torch.zeros(2)})
  assert "unexpected keys model.layers.7.mlp.up_proj.weight" in load_error(folder)


def test_wrong_shape(folder):
  key = "visual.merger.mlp.0.bias"
  rewrite(folder, lambda t: {**t, key: torch.zeros(127)})
  message = load_error(folder)
  assert f"tensor {key} has shape (127,)" in message and "(128,)" in message


def test_unknown_config_field(folder):
  edit_config(folder, lambda c: c["text_config"].update(foo_bar=1))
  message = load_error(folder, ValueError)
  assert "foo_bar" in message and "text config" in message


def test_unknown_rope_scaling(folder):
  edit_config(folder, lambda c: c["text_config"]["rope_parameters"].update(factor=4.0))
  assert "factor" in load_error(folder, ValueError)


def test_pytorch_bin_only(folder):
  tensors = safetensors_torch.load_file(os.path.join(folder, "model.safetensors"))
  os.remove(os.path.join(folder, "model.safetensors"))
  torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
  message = load_error(folder)
  assert "pytorch_model.bin" in message and "safetensors only" in message


def test_corrupt_header(folder):
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.seek(8)
    f.write(b"\xff\xfe not json \x00")
  message = load_error(folder)
  assert "model.safetensors has a corrupt safetensors header" in message


def test_impossible_header_length(folder):
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.write(struct.pack("<Q", 2**40))
  assert "is not a safetensors file (header length" in load_error(folder)


def test_truncated_file(folder):
  """An interrupted copy or download: the data ends before the last tensor does."""
  path = os.path.join(folder, "model.safetensors")
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 1000)
  message = load_error(folder)
  assert "model.safetensors is truncated or corrupt" in message and "download it again" in message


def test_missing_shard(good, tmp_path):
  dst = os.fspath(tmp_path / "sharded")
  shutil.copytree(good[1], dst)
  with open(os.path.join(dst, "model.safetensors.index.json")) as f:
    shards = sorted(set(json.load(f)["weight_map"].values()))
  assert len(shards) > 2
  os.remove(os.path.join(dst, shards[1]))
  message = load_error(dst)
  assert shards[1] in message and "missing" in message and "index" in message


def test_not_a_folder(tmp_path):
  missing = os.fspath(tmp_path / "nope")
  assert f"{missing} has no config.json" in load_error(missing)


def test_no_config(folder):
  os.remove(os.path.join(folder, "config.json"))
  assert "has no config.json" in load_error(folder)


def test_not_a_qwen25vl(folder):
  edit_config(folder, lambda c: c.update(model_type="llama"))
  assert "'llama'" in load_error(folder, ValueError)


# --------------------------------------------------------------------------------------------------
def test_checkpoint_errors(folder, tmp_path):
  """Orbax side: not a checkpoint, a checkpoint that its config does not match, no overwrite."""
  with pytest.raises(CheckpointError, match="is not an EEmo-JAX checkpoint"):
    load_checkpoint(folder)

  model = load_hf(folder)
  ckpt = os.fspath(tmp_path / "ckpt")
  save_checkpoint(model, ckpt)
  with pytest.raises(CheckpointError, match="already holds a checkpoint"):
    save_checkpoint(model, ckpt)

  path = os.path.join(ckpt, "model_config.json")
  with open(path) as f:
    config = json.load(f)
  config["text_config"]["intermediate_size"] = 80
  with open(path, "w") as f:
    json.dump(config, f)
  with pytest.raises(CheckpointError) as info:
    load_checkpoint(ckpt)
  assert "parameter language_model.layers.mlp.down_proj.kernel has shape (2, 96, 64)" in str(info.value)
  assert "(2, 80, 64)" in str(info.value)
