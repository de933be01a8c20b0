"""Minimal safetensors reading and writing over memory maps, with bfloat16 support.

We read the format ourselves (an 8-byte header length, a JSON header, raw little-endian data)
because the numpy backend of `safetensors` has no bfloat16 and the JAX backend would place whole
tensors on the default device. A memory map lets each device's callback read only its shard.

A file is accepted exactly when the `safetensors` library accepts it (tests/hf/test_safetensors_io.py
holds the two side by side): a header of at most 100,000,000 bytes that is a UTF-8 JSON object, and
tensors whose byte ranges are non-negative, match their dtype and shape, and tile the data section
from its first byte to the end of the file with no gap, overlap or trailing byte. Anything else is
a damaged or hostile file and is refused with the file and tensor named, before any byte is read as
a weight.

A folder in a bucket (`gs://...`) cannot be memory-mapped: `SafetensorsFolder` first copies its weight files
into a local temporary folder (removed with the object), so the host needs that much free local disk.
Writing goes through `eemo_jax.paths` and streams to a bucket as to a local file.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import ml_dtypes
import numpy as np

from eemo_jax import paths

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "F8_E8M0": ml_dtypes.float8_e8m0fnu,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_, "C64": np.complex64,
}
_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's limit
_USIZE = 2**64  # shapes and offsets are u64 in the format; the library rejects a product that overflows it
INDEX = "model.safetensors.index.json"


class CheckpointError(ValueError):
  """A checkpoint that cannot be loaded as asked; the message names the file or key."""


@dataclasses.dataclass(frozen=True)
class TensorEntry:
  path: str
  dtype: np.dtype
  shape: tuple[int, ...]
  offset: int  # of the first byte, from the start of the file


class TensorSpec(NamedTuple):
  """What `write_sharded` will receive for one tensor, known before any tensor is gathered."""
  key: str
  dtype: np.dtype
  shape: tuple[int, ...]

  @property
  def nbytes(self) -> int:
    return math.prod(self.shape) * np.dtype(self.dtype).itemsize


# ------------------------------------------------------------------------------------------ reading
def read_entries(path: str) -> dict[str, TensorEntry]:
  """Every tensor of one safetensors file, validated as the `safetensors` library validates it."""
  size = os.path.getsize(path)
  header, data_start = _read_header(path, size)
  _check_metadata(path, header.pop("__metadata__", None))
  spans = {key: _span(path, key, info) for key, info in header.items()}
  end = 0
  for key, (dtype_name, shape, start, stop) in sorted(spans.items(), key=lambda kv: kv[1][2:]):
    if start != end or stop < start:
      raise CheckpointError(f"{path} is corrupt: tensor {key} has data_offsets [{start}, {stop}], but the tensors' "
                            f"data must follow each other from byte 0 of the data section (expected it to start "
                            f"at {end}); copy or download the file again")
    nbytes = _nbytes(path, key, dtype_name, shape)
    if stop - start != nbytes:
      raise CheckpointError(f"{path} is corrupt: tensor {key} ({dtype_name}, shape {list(shape)}) needs {nbytes} "
                            f"bytes, but its data_offsets [{start}, {stop}] span {stop - start}")
    end = stop
  if data_start + end != size:
    problem = (f"its tensors need {data_start + end} bytes but it has {size}" if data_start + end > size else
               f"it has {size - data_start - end} bytes after its last tensor")
    raise CheckpointError(f"{path} is truncated or corrupt: {problem}; copy or download it again")
  return {key: TensorEntry(path, np.dtype(_DTYPES[d]), shape, data_start + start)
          for key, (d, shape, start, _) in spans.items()}


def _read_header(path: str, size: int) -> tuple[dict, int]:
  if size < 8:
    raise CheckpointError(f"{path} is not a safetensors file (too short: {size} bytes)")
  with open(path, "rb") as f:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > MAX_HEADER_BYTES:
      raise CheckpointError(f"{path} is not a safetensors file (header length {n} is over the format's limit "
                            f"of {MAX_HEADER_BYTES})")
    if 8 + n > size:
      raise CheckpointError(f"{path} is truncated or corrupt: its header length {n} runs past the end of the file "
                            f"({size} bytes); copy or download it again")
    raw = f.read(n)
  try:
    # Decoded as UTF-8 first: json.loads(bytes) would also guess UTF-16/32. Non-standard constants
    # (NaN, Infinity) are refused as the library's JSON parser refuses them.
    header = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
  except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
    raise CheckpointError(f"{path} has a corrupt safetensors header: {e}") from None
  if not isinstance(header, dict):
    raise CheckpointError(f"{path} has a corrupt safetensors header: expected a JSON object, got "
                          f"{type(header).__name__}")
  return header, 8 + n


def _no_constant(name: str):
  raise ValueError(f"{name} is not valid JSON")


def _check_metadata(path: str, metadata) -> None:
  if metadata is None:
    return
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    raise CheckpointError(f"{path} has a corrupt safetensors header: __metadata__ must map strings to strings, "
                          f"got {metadata!r:.200}")


def _span(path: str, key: str, info) -> tuple[str, tuple[int, ...], int, int]:
  """(dtype name, shape, start, stop) of one header entry, each of the type the format prescribes."""
  if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
    raise CheckpointError(f"{path} has a corrupt safetensors header: the entry of tensor {key} must be an object "
                          f"with dtype, shape and data_offsets, got {info!r:.200}")
  dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
  if not isinstance(dtype_name, str):
    raise CheckpointError(f"{path} has a corrupt safetensors header: tensor {key} has dtype {dtype_name!r}")
  if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
    raise CheckpointError(f"{path} has a corrupt safetensors header: tensor {key} has shape {shape!r:.200}; "
                          "expected a list of non-negative integers")
  if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
    raise CheckpointError(f"{path} has a corrupt safetensors header: tensor {key} has data_offsets "
                          f"{offsets!r:.200}; expected [start, end], two non-negative integers")
  if dtype_name not in _DTYPES:
    raise CheckpointError(f"{path}: tensor {key} has dtype {dtype_name}, which EEmo-JAX does not read "
                          f"(it reads {', '.join(_DTYPES)})")
  return dtype_name, tuple(shape), offsets[0], offsets[1]


def _is_u64(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < _USIZE


def _nbytes(path: str, key: str, dtype_name: str, shape: tuple[int, ...]) -> int:
  count = 1
  for d in shape:  # in order, as the library does: an overflow is refused even if a later dimension is 0
    count *= d
    if count >= _USIZE:
      raise CheckpointError(f"{path} is corrupt: tensor {key} has shape {list(shape)}, too large to exist")
  nbytes = count * np.dtype(_DTYPES[dtype_name]).itemsize
  if nbytes >= _USIZE:
    raise CheckpointError(f"{path} is corrupt: tensor {key} has shape {list(shape)}, too large to exist")
  return nbytes


class SafetensorsFolder:
  """All tensors of an HF model folder (one file or shards with an index), opened lazily."""

  def __init__(self, folder: str):
    self.folder = folder
    files = _weight_files(folder)
    if paths.is_url(folder):  # memory maps need local files: a copy that lives as long as this object
      self._local = tempfile.TemporaryDirectory(prefix="eemo-jax-weights-")
      files = paths.download(folder, self._local.name, [f[len(folder.rstrip("/")) + 1:] for f in files])
    self.files = files  # the (local) weight files, in the order transformers reads them
    self._entries: dict[str, TensorEntry] = {}
    for path in files:
      for key, entry in read_entries(path).items():
        if key in self._entries:
          first = os.path.basename(self._entries[key].path)
          raise CheckpointError(f"{folder}: tensor {key} is stored twice, in {first} and {os.path.basename(path)}; "
                                "the folder mixes two checkpoints")
        self._entries[key] = entry

  def keys(self) -> list[str]:
    return list(self._entries)

  def shape(self, key: str) -> tuple[int, ...]:
    return self._entries[key].shape

  def dtype(self, key: str) -> np.dtype:
    return self._entries[key].dtype

  def get(self, key: str) -> np.ndarray:
    """The tensor as a read-only memory-mapped array (no copy until sliced and used)."""
    entry = self._entries[key]
    count = math.prod(entry.shape)
    if count == 0:  # a memory map cannot be empty
      return np.zeros(entry.shape, entry.dtype)
    return np.memmap(entry.path, dtype=entry.dtype, mode="r", offset=entry.offset, shape=(count,)).reshape(entry.shape)


def read_through(path: str, chunk_bytes: int = 64 * 2**20) -> None:
  """Reads a file once from start to end and drops the bytes: its pages are then in the OS page cache.

  Loading places each parameter by slicing memory maps in parameter order, which visits every file
  many times; reading the files first, one after the other, turns the disk work into sequential reads
  whose progress can be shown file by file (`eemo_jax.hf.load`).
  """
  buffer = bytearray(chunk_bytes)
  with open(path, "rb", buffering=0) as f:
    while f.readinto(buffer):
      pass


def _weight_files(folder: str) -> list[str]:
  if not paths.isdir(folder):
    raise CheckpointError(f"{folder} is not a directory; pass the folder that holds config.json and *.safetensors")
  names = paths.listdir(folder)
  pickles = [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
  index = paths.join(folder, INDEX)
  if INDEX in names and paths.exists(index):
    shards = _index_shards(folder, index)
    missing = [s for s in shards if not paths.exists(paths.join(folder, s))]
    if missing:
      raise CheckpointError(f"{folder}: shards {missing} listed in {INDEX} are missing")
    return [paths.join(folder, s) for s in shards]
  # Without an index transformers reads model.safetensors only; other safetensors files beside it
  # (e.g. emotion_head.safetensors, adapters) are not the backbone's.
  files = sorted(n for n in names if n.startswith("model") and n.endswith(".safetensors"))
  if not files:
    if pickles:
      raise CheckpointError(f"{folder} holds only PyTorch pickles ({', '.join(sorted(pickles))}). EEmo-JAX reads "
                            "safetensors only (pickles can run code); convert with transformers: "
                            "`Model.from_pretrained(dir).save_pretrained(out_dir)`.")
    raise CheckpointError(f"{folder} holds no model*.safetensors weights; pass an HF model folder (config.json + "
                          "model.safetensors, or model-*-of-*.safetensors with model.safetensors.index.json)")
  return [paths.join(folder, n) for n in files]


def _index_shards(folder: str, index: str) -> list[str]:
  """The shard files an index names, each a path inside `folder`.

  Only the path *string* is checked: a shard that is a symlink (the HF cache links every file of a
  snapshot into its blob store) is read wherever it points, as transformers reads it.
  """
  try:
    data = json.loads(paths.read_text(index))
  except ValueError as e:
    raise CheckpointError(f"{index} is not valid JSON ({e}); copy or download it again") from None
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
    raise CheckpointError(f"{index} is not a safetensors index: expected a JSON object whose \"weight_map\" maps "
                          "each tensor name to the shard file that holds it")
  shards = sorted(set(weight_map.values()))
  for shard in shards:
    parts = shard.replace("\\", "/").split("/")
    if not shard or os.path.isabs(shard) or ".." in parts or "" in parts:
      raise CheckpointError(f"{index} names the shard {shard!r}, which is not a file inside {folder}; an index may "
                            "only name files of its own folder (no absolute paths, no '..')")
  return shards


# ------------------------------------------------------------------------------------------ writing
def _shard_layout(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
  """Tensors in order, split into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
  shards: list[list[TensorSpec]] = [[]]
  size = 0
  for spec in specs:
    if size and size + spec.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(spec)
    size += spec.nbytes
  return shards


def write_sharded(folder: str, specs: Sequence[TensorSpec], tensors: Iterable[tuple[str, np.ndarray]], *,
                  max_shard_bytes: int = 5 * 2**30, metadata: Mapping[str, str] | None = None) -> list[str]:
  """Writes tensors as `model.safetensors` or `model-0000k-of-0000n.safetensors` + index, as HF does.

  `specs` announces every tensor (key, dtype, shape) so each shard's header is written before its
  data: `tensors` ((key, array) pairs, in the same order) are then streamed straight into place, so peak
  host memory is one tensor and every byte is written once. `folder` must exist; it is meant to be
  the temporary folder of `eemo_jax.hf.staging.staged_folder`, so a failure leaves no partial export.
  """
  for spec in specs:
    if np.dtype(spec.dtype) not in _NAMES:
      raise CheckpointError(f"cannot write {spec.key}: dtype {np.dtype(spec.dtype)} has no safetensors name")
  shards = _shard_layout(specs, max_shard_bytes)
  total = len(shards)
  names = (["model.safetensors"] if total == 1 else
           [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)])
  headers = [_header(shard, metadata) for shard in shards]
  needed = sum(8 + len(h) + sum(s.nbytes for s in shard) for h, shard in zip(headers, shards))
  arrays = iter(tensors)
  path = folder
  try:
    for name, header, shard in zip(names, headers, shards):
      path = paths.join(folder, name)
      with paths.open_file(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec in shard:
          f.write(_bytes_of(spec, *next(arrays)))
    if total > 1:
      path = paths.join(folder, INDEX)
      weight_map = {spec.key: name for name, shard in zip(names, shards) for spec in shard}
      paths.write_text(path, json.dumps({"metadata": {"total_size": sum(s.nbytes for s in specs)},
                                         "weight_map": weight_map}, indent=2))
  except OSError as e:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
      free = shutil.disk_usage(folder).free
      raise CheckpointError(f"no space left on the device writing {path}: the weights need {needed} bytes and "
                            f"{free} are free there; free some space or write elsewhere") from None
    raise
  return names


def _header(shard: Sequence[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
  header, offset = {"__metadata__": dict(metadata or {"format": "pt"})}, 0
  for spec in shard:
    header[spec.key] = {"dtype": _NAMES[np.dtype(spec.dtype)], "shape": list(spec.shape),
                        "data_offsets": [offset, offset + spec.nbytes]}
    offset += spec.nbytes
  blob = json.dumps(header, separators=(",", ":")).encode()
  return blob + b" " * (-len(blob) % 8)  # HF pads the header to 8-byte alignment


def _bytes_of(spec: TensorSpec, key: str, arr: np.ndarray) -> np.ndarray:
  """The array's bytes, in C order; it must be what its spec announced (the header is already written)."""
  arr = np.ascontiguousarray(arr)
  if key != spec.key or arr.dtype != np.dtype(spec.dtype) or tuple(arr.shape) != tuple(spec.shape):
    raise AssertionError(f"{key} arrived as {arr.dtype}{list(arr.shape)}, but {spec.key} was announced as "
                         f"{np.dtype(spec.dtype)}{list(spec.shape)}")
  return arr.reshape(-1).view(np.uint8)
