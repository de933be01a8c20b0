"""Our safetensors reader against the `safetensors` library, on the same hand-crafted files.

A file must be read by us exactly when the library reads it, with the same bytes for every tensor;
every file the library refuses we refuse with one `CheckpointError` line naming the file. Index
shard paths must stay inside their folder, while shards that are symlinks (the HF cache) stay readable.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

safetensors = pytest.importorskip("safetensors")

from eemo_jax.hf.safetensors_io import CheckpointError, SafetensorsFolder  # noqa: E402

A = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
B = {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]}
DATA = bytes(range(1, 33))


def entry(dtype, shape, start, end):
  return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


# name -> (header: dict, or raw bytes for the JSON part; data section; header length override)
CASES = {
    "valid": ({"a": A, "b": B}, DATA, None),
    "valid_reverse_order": ({"b": B, "a": A}, DATA, None),
    "valid_metadata": ({"__metadata__": {"format": "pt"}, "a": A, "b": B}, DATA, None),
    "valid_metadata_null": ({"__metadata__": None, "a": A, "b": B}, DATA, None),
    "valid_empty": ({}, b"", None),
    "valid_zero_size_tensor": ({"z": entry("F32", [0, 3], 0, 0), "a": A, "b": B}, DATA, None),
    "valid_scalar": ({"s": entry("I32", [], 0, 4)}, DATA[:4], None),
    "valid_extra_field": ({"a": {**A, "note": "x"}, "b": B}, DATA, None),
    "valid_padded_header": (json.dumps({"a": A, "b": B}).encode() + b"       ", DATA, None),
    "valid_leading_space": (b" " + json.dumps({"a": A, "b": B}).encode(), DATA, None),
    "valid_float8": ({"f": entry("F8_E4M3", [4], 0, 4)}, DATA[:4], None),
    "negative_start": ({"a": entry("F32", [2, 3], -8, 16), "b": B}, DATA, None),
    "negative_end": ({"a": entry("F32", [0], 0, -0), "b": entry("F32", [1], -4, 0)}, DATA[:4], None),
    "end_before_start": ({"a": entry("F32", [2, 3], 24, 0), "b": B}, DATA, None),
    "gap": ({"a": A, "b": entry("BF16", [4], 28, 36)}, DATA + b"\0" * 4, None),
    "overlap": ({"a": A, "b": entry("BF16", [4], 16, 24)}, DATA[:24], None),
    "not_from_zero": ({"a": entry("F32", [2, 3], 8, 32)}, DATA, None),
    "length_mismatch": ({"a": entry("F32", [2, 2], 0, 24), "b": B}, DATA, None),
    "data_past_end": ({"a": A, "b": B}, DATA[:28], None),
    "trailing_bytes": ({"a": A, "b": B}, DATA + b"\0", None),
    "header_past_end": ({"a": A, "b": B}, DATA, 10_000),
    "header_too_long": ({}, b"", 100_000_001),
    "header_not_object": (b"[1, 2]", b"", None),
    "header_null": (b"null", b"", None),
    "header_not_utf8": (b'{"a\xff": 1}', b"", None),
    "header_not_json": (b"{not json}", b"", None),
    "header_utf16": ("{}".encode("utf-16-le"), b"", None),
    "header_nan": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": NaN}}', DATA[:4], None),
    "metadata_not_strings": ({"__metadata__": {"k": 1}, "a": A, "b": B}, DATA, None),
    "negative_dim": ({"a": entry("F32", [-1], 0, 0)}, b"", None),
    "float_offset": ({"a": {**A, "data_offsets": [0.0, 24]}, "b": B}, DATA, None),
    "bool_offset": ({"a": {**A, "data_offsets": [False, 24]}, "b": B}, DATA, None),
    "three_offsets": ({"a": {**A, "data_offsets": [0, 24, 32]}, "b": B}, DATA, None),
    "shape_string": ({"a": {**A, "shape": "2,3"}, "b": B}, DATA, None),
    "shape_overflow": ({"a": entry("F32", [2**40, 2**40, 0], 0, 0)}, b"", None),
    "offset_over_u64": ({"a": entry("F32", [0], 2**64, 2**64)}, b"", None),
    "missing_dtype": ({"a": {"shape": [2, 3], "data_offsets": [0, 24]}, "b": B}, DATA, None),
    "unknown_dtype": ({"a": {**A, "dtype": "F33"}, "b": B}, DATA, None),
    "entry_not_object": ({"a": 5, "b": B}, DATA, None),
}


def write_file(path, header, data, length=None):
  blob = header if isinstance(header, bytes) else json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob) if length is None else length))
    f.write(blob)
    f.write(data)


def library_reads(path):
  """The library's verdict and, if it reads the file, each tensor's (dtype, shape, bytes)."""
  try:
    with safetensors.safe_open(path, framework="numpy") as f:
      list(f.keys())
  except safetensors.SafetensorError:
    return None
  with open(path, "rb") as f:
    return {k: (v["dtype"], tuple(v["shape"]), bytes(v["data"])) for k, v in safetensors.deserialize(f.read())}


def our_reads(folder):
  tensors = SafetensorsFolder(folder)
  return {k: (tensors.dtype(k), tensors.shape(k), np.ascontiguousarray(tensors.get(k)).tobytes())
          for k in tensors.keys()}


@pytest.mark.parametrize("name", list(CASES))
def test_reader_agrees_with_the_library(name, tmp_path):
  header, data, length = CASES[name]
  path = os.fspath(tmp_path / "model.safetensors")
  write_file(path, header, data, length)
  want = library_reads(path)
  assert (want is not None) == name.startswith("valid"), "the case's name says what the library does"
  if want is None:
    with pytest.raises(CheckpointError) as info:
      our_reads(os.fspath(tmp_path))
    assert "\n" not in str(info.value) and path in str(info.value)
    return
  got = our_reads(os.fspath(tmp_path))
  assert sorted(got) == sorted(want)
  for key, (dtype, shape, raw) in want.items():
    assert (got[key][1], got[key][2]) == (shape, raw), key
    assert got[key][0].itemsize * int(np.prod(shape)) == len(raw), key


def test_negative_offsets_never_read_header_bytes_as_weights(tmp_path):
  """The case of the issue: a tensor whose range starts inside the JSON header."""
  path = os.fspath(tmp_path / "model.safetensors")
  write_file(path, {"a": entry("F32", [4], -16, 0), "b": entry("F32", [4], 0, 16)}, DATA[:16])
  with pytest.raises(CheckpointError, match="tensor a has data_offsets \\[-16, 0\\]"):
    SafetensorsFolder(os.fspath(tmp_path))


def test_sub_byte_dtype_is_named_as_unsupported(tmp_path):
  """The library knows 4-bit floats; we do not read them, and say so instead of calling the file corrupt."""
  path = os.fspath(tmp_path / "model.safetensors")
  write_file(path, {"q": entry("F4", [8], 0, 4)}, DATA[:4])
  assert library_reads(path) is not None
  with pytest.raises(CheckpointError, match="tensor q has dtype F4, which EEmo-JAX does not read"):
    SafetensorsFolder(os.fspath(tmp_path))


# ------------------------------------------------------------------------------------------ indexes
def sharded_folder(folder, shard_names=("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")):
  """Two shards (tensor a in the first, b in the second) and the index naming them."""
  os.makedirs(folder, exist_ok=True)
  write_file(os.path.join(folder, os.path.basename(shard_names[0])), {"a": A}, DATA[:24])
  write_file(os.path.join(folder, os.path.basename(shard_names[1])), {"b": entry("BF16", [4], 0, 8)}, DATA[24:])
  write_index(folder, {"a": shard_names[0], "b": shard_names[1]})


def write_index(folder, weight_map):
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": 32}, "weight_map": weight_map}, f)


def test_sharded_folder_reads(tmp_path):
  sharded_folder(os.fspath(tmp_path))
  got = our_reads(os.fspath(tmp_path))
  assert got["a"][2] == DATA[:24] and got["b"][2] == DATA[24:]


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/../../outside.safetensors", "ABSOLUTE"])
def test_index_cannot_name_files_outside_the_folder(shard, tmp_path):
  folder = os.fspath(tmp_path / "model")
  sharded_folder(folder)
  outside = os.fspath(tmp_path / "outside.safetensors")  # a valid file, so only the path can be refused
  write_file(outside, {"b": entry("BF16", [4], 0, 8)}, DATA[24:])
  shard = outside if shard == "ABSOLUTE" else shard
  write_index(folder, {"a": "model-00001-of-00002.safetensors", "b": shard})
  with pytest.raises(CheckpointError) as info:
    SafetensorsFolder(folder)
  message = str(info.value)
  assert "\n" not in message and "model.safetensors.index.json" in message and repr(shard) in message
  assert "not a file inside" in message


def test_symlinked_shards_of_the_hf_cache_are_read(tmp_path):
  """snapshots/<rev>/model-*.safetensors -> ../../blobs/<hash>, as huggingface_hub lays them out."""
  blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
  sharded_folder(os.fspath(blobs))
  snapshot.mkdir(parents=True)
  for name in os.listdir(blobs):
    os.symlink(os.path.join("..", "..", "blobs", name), snapshot / name)
  got = our_reads(os.fspath(snapshot))
  assert got["a"][2] == DATA[:24] and got["b"][2] == DATA[24:]


def test_shards_in_a_subfolder_of_the_index_are_read(tmp_path):
  sharded_folder(os.fspath(tmp_path), ("model-00001-of-00002.safetensors", "weights/model-00002-of-00002.safetensors"))
  os.makedirs(tmp_path / "weights")
  os.rename(tmp_path / "model-00002-of-00002.safetensors", tmp_path / "weights" / "model-00002-of-00002.safetensors")
  assert our_reads(os.fspath(tmp_path))["b"][2] == DATA[24:]


@pytest.mark.parametrize("text,expected", [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "is not a safetensors index"),
    ('{"metadata": {}}', "is not a safetensors index"),
    ('{"weight_map": {"a": 3}}', "is not a safetensors index"),
])
def test_malformed_index_is_one_line_naming_it(text, expected, tmp_path):
  sharded_folder(os.fspath(tmp_path))
  (tmp_path / "model.safetensors.index.json").write_text(text)
  with pytest.raises(CheckpointError) as info:
    SafetensorsFolder(os.fspath(tmp_path))
  message = str(info.value)
  assert "\n" not in message and "model.safetensors.index.json" in message and expected in message


def test_tensor_in_two_shards_is_refused(tmp_path):
  sharded_folder(os.fspath(tmp_path))
  write_file(os.fspath(tmp_path / "model-00002-of-00002.safetensors"), {"a": A}, DATA[:24])
  write_index(os.fspath(tmp_path), {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"})
  with pytest.raises(CheckpointError, match="tensor a is stored twice"):
    SafetensorsFolder(os.fspath(tmp_path))
