"""Minimal safetensors reading and writing over memory maps, with bfloat16 support.

We read the format ourselves (an 8-byte header length, a JSON header, raw little-endian data)
because the numpy backend of `safetensors` has no bfloat16 and the JAX backend would place whole
tensors on the default device. A memory map lets each device's callback read only its shard.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as asked; the message names the file or key."""


def _read_header(path: str) -> tuple[dict, int]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise CheckpointError(f"{path} is not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", raw)
    if n > 100 * 2**20:
      raise CheckpointError(f"{path} is not a safetensors file (header length {n})")
    try:
      header = json.loads(f.read(n))
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
      raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path} has a corrupt safetensors header: expected a JSON object")
  return header, 8 + n


class SafetensorsFolder:
  """All tensors of an HF model folder (one file or shards with an index), opened lazily."""

  def __init__(self, folder: str):
    self.folder = folder
    files = _weight_files(folder)
    self._entries: dict[str, tuple[str, np.dtype, tuple[int, ...], int]] = {}
    self._maps: dict[str, np.memmap] = {}
    for path in files:
      header, offset = _read_header(path)
      file_size = os.path.getsize(path)
      for key, info in header.items():
        if key == "__metadata__":
          continue
        self._entries[key] = _entry(path, key, info, offset, file_size)

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entries[key][2]

  def dtype(self, key: str) -> np.dtype:
    return self._entries[key][1]

  def get(self, key: str) -> np.ndarray:
    """The tensor as a read-only memory-mapped array (no copy until sliced and used)."""
    path, dtype, shape, offset = self._entries[key]
    count = int(np.prod(shape)) if shape else 1
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,)).reshape(shape)


def _entry(path: str, key: str, info, offset: int, file_size: int) -> tuple[str, np.dtype, tuple[int, ...], int]:
  """One header entry, checked against the file so a truncated download fails here, naming the file."""
  try:
    dtype_name, shape, (start, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
  except (KeyError, TypeError, ValueError):
    raise CheckpointError(f"{path} has a corrupt safetensors header (entry for {key}: {info!r})") from None
  if dtype_name not in _DTYPES:
    raise CheckpointError(f"{path}: tensor {key} has unsupported dtype {dtype_name}")
  dtype = np.dtype(_DTYPES[dtype_name])
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if end - start != nbytes or offset + end > file_size:
    raise CheckpointError(f"{path} is truncated or corrupt: tensor {key} needs bytes {offset + start}-{offset + end} "
                          f"({nbytes} bytes) but the file has {file_size}; copy or download it again")
  return path, dtype, shape, offset + start


def _weight_files(folder: str) -> list[str]:
  if not os.path.isdir(folder):
    raise CheckpointError(f"{folder} is not a directory; pass the folder that holds config.json and *.safetensors")
  names = os.listdir(folder)
  pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  index = os.path.join(folder, "model.safetensors.index.json")
  if os.path.exists(index):
    with open(index) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    missing = [s for s in shards if not os.path.exists(os.path.join(folder, s))]
    if missing:
      raise CheckpointError(f"{folder}: shards {missing} listed in model.safetensors.index.json are missing")
    return [os.path.join(folder, s) for s in shards]
  # Without an index transformers reads model.safetensors only; other safetensors files beside it
  # (e.g. emotion_head.safetensors, adapters) are not the backbone's.
  files = sorted(n for n in names if n.startswith("model") and n.endswith(".safetensors"))
  if not files:
    if pickles:
      raise CheckpointError(f"{folder} holds only PyTorch pickles ({', '.join(sorted(pickles))}). EEmo-JAX reads "
                            "safetensors only (pickles can run code); convert with transformers: "
                            "`Model.from_pretrained(dir).save_pretrained(out_dir)`.")
    raise CheckpointError(f"{folder} holds no model*.safetensors weights")
  return [os.path.join(folder, n) for n in files]


def write_sharded(folder: str, tensors: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int = 5 * 2**30,
                  metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes tensors as `model.safetensors` or `model-0000k-of-0000n.safetensors` + index, as HF does.

  Tensors are consumed one at a time and written straight to disk, so peak host memory is one
  shard's worth of bookkeeping plus one tensor.
  """
  os.makedirs(folder, exist_ok=True)
  shards: list[list[tuple[str, str, np.dtype, tuple[int, ...], int]]] = [[]]
  size = 0
  tmp_dir = os.path.join(folder, ".tmp-tensors")
  os.makedirs(tmp_dir, exist_ok=True)
  for n, (key, arr) in enumerate(tensors):
    arr = np.ascontiguousarray(arr)
    if arr.dtype not in _NAMES:
      raise CheckpointError(f"cannot write {key}: dtype {arr.dtype} has no safetensors name")
    if size and size + arr.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    tmp = os.path.join(tmp_dir, f"{n}.raw")
    arr.tofile(tmp)
    shards[-1].append((key, tmp, arr.dtype, arr.shape, arr.nbytes))
    size += arr.nbytes
  total = len(shards)
  names = ["model.safetensors"] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
  weight_map, total_size = {}, 0
  for name, shard in zip(names, shards):
    header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
    for key, _, dtype, shape, nbytes in shard:
      header[key] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
      offset += nbytes
      weight_map[key] = name
      total_size += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # HF pads the header to 8-byte alignment
    with open(os.path.join(folder, name), "wb") as f:
      f.write(struct.pack("<Q", len(blob)))
      f.write(blob)
      for _, tmp, *_ in shard:
        with open(tmp, "rb") as src:
          while chunk := src.read(64 * 2**20):
            f.write(chunk)
        os.remove(tmp)
  os.rmdir(tmp_dir)
  if total > 1:
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {"total_size": total_size}, "weight_map": weight_map}, f, indent=2)
  return names
