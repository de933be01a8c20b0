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

from pathlib import Path
from typing import Any

import grain
import tensorflow_datasets as tfds

from data_pipeline.errors import DatasetError
from data_pipeline.records import EEmoRecord, EmoVerseRecord


class RecordSource:
  """`grain` random-access source over one split's ArrayRecord files, returning decoded feature dicts.

  Picklable (Grain worker processes re-open the files). `record(i)` gives the typed record instead.
  """

  def __init__(self, dataset_dir: str | Path, split: str):
    self.dataset_dir = Path(dataset_dir)
    self.split = split
    info = tfds.builder_from_directory(str(self.dataset_dir)).info
    if split not in info.splits:
      raise DatasetError(f"{self.dataset_dir} has no split {split!r}; it has {sorted(info.splits.keys())}")
    self.paths = [str(p) for p in info.splits[split].filepaths]
    self.features = info.features
    self._text = {k for k, f in self.features.items() if _is_text(f)}
    self.record_type = EEmoRecord if "images" in self.features else EmoVerseRecord
    self._source = grain.sources.ArrayRecordDataSource(self.paths)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
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


def dataset_dir(name: str, data_dir: str | Path, config: str | None = None, version: str | None = None) -> Path:
  """data_dir/name[/config]/version of a built data set (the newest version unless one is given)."""
  base = Path(data_dir) / name
  if not base.is_dir():
    raise DatasetError(f"no data set {name!r} under {data_dir}; build it first with "
                       f"data_pipeline.builders.build({name!r}, {str(data_dir)!r}, ...)")
  if config is None:
    configs = sorted(p.name for p in base.iterdir()
                     if p.is_dir() and not _is_version(p.name) and not p.name.startswith((".", "incomplete")))
    if len(configs) > 1:
      raise DatasetError(f"{base} holds configs {configs}; pass config=<one of them>")
    config = configs[0] if configs else ""
  config_dir = base / config if config else base
  versions = sorted((p.name for p in config_dir.iterdir() if p.is_dir() and _is_version(p.name)),
                    key=lambda v: tuple(int(x) for x in v.split("."))) if config_dir.is_dir() else []
  if not versions or (version is not None and version not in versions):
    raise DatasetError(f"no built version {version or ''} of {name}/{config} under {config_dir}; build it first")
  return config_dir / (version or versions[-1])


def load_records(name: str, data_dir: str | Path, split: str, *, config: str | None = None,
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


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)
