"""Random access to a built data set, for the Grain pipeline.

Record layout (one ArrayRecord entry = one serialised example of these features; text comes back as
`str`, encoded images as `bytes`, numbers as numpy):

EmoVerse (`emoverse`, `synthetic/emoverse`), see `common.emoverse_features`:
  id str | image bytes (encoded, original pixels) | width, height int32 | emotion str (Mikels-8, lower case)
  | label int32 (index in MIKELS_8) | description, background, attribute, subject str | confidence float32
  (released 0–10 scale, NaN if absent) | des float32 (1024,) (NaN if absent) | has_des bool
  | boxes int32 (N, 4) x1, y1, x2, y2 in image pixels | source, split str

EEmo (`eemo`, `synthetic/eemo`), see `common.eemo_features`:
  id str | images list of 1–2 bytes | widths, heights int32 (n_images,) | task str (EEMO_TASKS)
  | question str (no <image> placeholders) | answer str (the target text as released) | options list[str]
  | choice str (option letter or "") | emotion str (dominant emotion or "") | scores float32 (3,) V, A, D
  on 0–1, NaN where absent | ranking list[str] | option_set str (an OPTION_SETS entry or "") | source, split str

Entries are in TFDS's shuffled write order, not annotation order; a record's `id` is stable.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import tensorflow_datasets as tfds
from etils import epath

from data_pipeline.errors import DatasetError
from eemo_jax import paths
from data_pipeline.records import EEmoRecord, EmoVerseRecord


class RecordSource:
  """`grain` random-access source over one split's ArrayRecord files, returning decoded feature dicts.

  Picklable (Grain worker processes re-open the files). `record(i)` gives the typed record instead.
  """

  def __init__(self, dataset_dir: str | os.PathLike, split: str):
    self.dataset_dir = epath.Path(dataset_dir)
    self.split = split
    try:
      info = tfds.builder_from_directory(str(self.dataset_dir)).info
    except Exception as error:  # TFDS raises its own types for a missing or unreadable dataset_info.json
      raise DatasetError(f"{self.dataset_dir} is not a complete built data set ({type(error).__name__}: "
                         f"{_first_line(error)}); rebuild it with data_pipeline.builders.build(..., "
                         "overwrite=True)") from None
    if split not in info.splits:
      raise DatasetError(f"{self.dataset_dir} has no split {split!r}; it has {sorted(info.splits.keys())}: set "
                         "data.split (eval.split for the held-out one) to one of them, or build the data set with "
                         "that split")
    self.paths = [str(p) for p in info.splits[split].filepaths]
    if info.splits[split].num_examples == 0 or not self.paths:
      raise DatasetError(f"the {split} split of {self.dataset_dir} holds no records; rebuild the data set with "
                         "records in that split, or set data.split to another one")
    self.features = info.features
    self._text = {k for k, f in self.features.items() if _is_text(f)}
    self.record_type = EEmoRecord if "images" in self.features else EmoVerseRecord
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except Exception as error:  # a missing or damaged file: array_record raises RuntimeError with a C++ message
      raise DatasetError(f"the {split} split of {self.dataset_dir} cannot be opened ({type(error).__name__}: "
                         f"{_first_line(error)}); rebuild it with data_pipeline.builders.build(..., "
                         "overwrite=True)") from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):  # an IndexError ends plain iteration (`for record in source`)
      raise IndexError(f"record {index} of a split with {len(self)} records")
    return self._decode(self._source[index])

  def __getitems__(self, indices) -> list[dict[str, Any]]:
    return [self._decode(raw) for raw in self._source.__getitems__(list(indices))]

  def record(self, index: int) -> EmoVerseRecord | EEmoRecord:
    return self.record_type.from_features(self[index])

  def _decode(self, raw: bytes) -> dict[str, Any]:
    example = self.features.deserialize_example_np(raw)
    for key in self._text:
      value = example[key]
      example[key] = [_str(v) for v in value] if isinstance(value, list) else _str(value)
    return example

  def __repr__(self) -> str:
    return f"RecordSource({str(self.dataset_dir)!r}, split={self.split!r}, len={len(self)})"


def dataset_dir(name: str, data_dir: str | os.PathLike, config: str | None = None,
                version: str | None = None) -> epath.Path:
  """data_dir/name[/config]/version of a built data set (the newest version unless one is given).

  `data_dir` is a local folder or a bucket URL: it is read through `etils.epath`, as TFDS and Grain read it.
  """
  build_it = f"build it first with data_pipeline.builders.build({name!r}, {str(data_dir)!r}, ...)"
  if not str(data_dir):
    raise DatasetError("the data directory is empty (data.data_dir); set it to the folder "
                       "data_pipeline.builders.build wrote the data set to")
  paths.check_usable(data_dir, "data.data_dir")
  if not epath.Path(data_dir).is_dir():
    raise DatasetError(f"the data directory {data_dir} does not exist (data.data_dir); point it to the folder "
                       f"holding the built data set, or {build_it}")
  base = epath.Path(data_dir) / name
  if not base.is_dir():
    raise DatasetError(f"no data set {name!r} under {data_dir} (data.dataset, data.data_dir); {build_it}")
  configs = sorted(p.name for p in base.iterdir()
                   if p.is_dir() and not _is_version(p.name) and not p.name.startswith((".", "incomplete")))
  if config is None:
    if len(configs) > 1:
      raise DatasetError(f"{base} holds configs {configs}; pass config=<one of them> (data.dataset_config)")
    config = configs[0] if configs else ""
  config_dir = base / config if config else base
  if config and not config_dir.is_dir():
    raise DatasetError(f"{base} has no config {config!r} (data.dataset_config); it holds {configs or 'none'}: "
                       f"use one of them, or {build_it}")
  versions = sorted((p.name for p in config_dir.iterdir() if p.is_dir() and _is_version(p.name)),
                    key=lambda v: tuple(int(x) for x in v.split(".")))
  if not versions:
    raise DatasetError(f"no built version of {name}/{config or '-'} under {config_dir} (an earlier build failed or "
                       f"is still running); {build_it}")
  if version is not None and version not in versions:
    raise DatasetError(f"{config_dir} has no version {version}; it has {versions}")
  return config_dir / (version or versions[-1])


def load_records(name: str, data_dir: str | os.PathLike, split: str, *, config: str | None = None,
                 version: str | None = None) -> RecordSource:
  """A random-access source of decoded feature dicts for one split of a built data set."""
  return RecordSource(dataset_dir(name, data_dir, config, version), split)


def _is_text(feature) -> bool:
  if isinstance(feature, tfds.features.Sequence):
    feature = feature.feature
  return isinstance(feature, tfds.features.Text)


def _is_version(name: str) -> bool:
  parts = name.split(".")
  return len(parts) == 3 and all(p.isdigit() for p in parts)


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [""])[0][:300]


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
