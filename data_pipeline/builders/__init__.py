"""TFDS builders writing ArrayRecord (no TensorFlow needed), `build()` and `load_records()`.

```python
from data_pipeline.builders import build, load_records
report = build("synthetic", "data/", config="emoverse", num_train=64, num_test=16)
report = build("emoverse", "data/", manual_dir="/datasets/EmoVerse")          # skips and lists bad records
report = build("eemo", "data/", manual_dir="/datasets/EEmoDB", config="qa", strict=True)  # fails on one
report = build("eemo_bench", "data/", manual_dir="/datasets/eemo-bench", config="single",  # test split only
               image_root="/datasets/eemo-bench/images")  # configs single, pair, artemis, artphoto
source = load_records("synthetic", "data/", "train", config=report.config)    # grain random-access source
```

Bad records are skipped and listed (id, location, field, message) in `skipped_records.json` beside the
data and in the log; with `strict=True` the first one stops the build with its `RecordError`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from data_pipeline import data_packages

data_packages.require()  # without the `data` extra: one line naming it, before the imports below fail
import tensorflow_datasets as tfds

from data_pipeline.builders.common import SKIPPED_FILE, RecordBuilder
from data_pipeline.builders.eemo import EEmo
from data_pipeline.builders.eemo_bench import EEmoBench
from data_pipeline.builders.emoverse import EmoVerse
from data_pipeline.builders.reading import RecordSource, dataset_dir, load_records
from data_pipeline.builders.synthetic import Synthetic, synthetic_config
from data_pipeline.errors import DatasetError
from eemo_jax import paths

BUILDERS: dict[str, type[RecordBuilder]] = {"emoverse": EmoVerse, "eemo": EEmo, "eemo_bench": EEmoBench,
                                            "synthetic": Synthetic}


@dataclasses.dataclass(frozen=True)
class BuildReport:
  """What a build wrote and what it skipped."""

  name: str
  config: str
  dataset_dir: str  # data_dir/name/config/version: the ArrayRecord files, dataset_info.json, skipped_records.json
  written: dict[str, int]  # split -> records written
  skipped: dict[str, list[dict[str, str]]]  # split -> [{id, where, field, error, message}]
  reused: bool  # the data set was already built there and was not regenerated

  @property
  def skipped_ids(self) -> list[str]:
    return [s["id"] for split in self.skipped.values() for s in split]

  @property
  def num_skipped(self) -> int:
    return len(self.skipped_ids)


def build(name: str, data_dir: str | Path, *, manual_dir: str | Path | None = None, strict: bool = False,
          config: str | None = None, overwrite: bool = False, **kwargs) -> BuildReport:
  """Builds data set `name` ("emoverse", "eemo", "eemo_bench", "synthetic") into `data_dir` as ArrayRecord.

  `manual_dir` is the data set root (required for the real sets). Extra kwargs go to the builder:
  `annotations=` (emoverse, eemo, eemo_bench), `image_root=` (eemo, eemo_bench), `seed=`, `num_train=`,
  `num_test=` (synthetic),
  `max_image_pixels=` (images over it are skipped from their header; default `PIXEL_LIMIT_CAP`).
  An existing build is reused unless `overwrite=True`. Problems with the arguments or the data set as a
  whole, including a split in which every record is bad, raise `DatasetError`.
  """
  if name not in BUILDERS:
    raise DatasetError(f"unknown data set {name!r}; choose one of {sorted(BUILDERS)}")
  if paths.is_url(data_dir) or paths.is_url(manual_dir or ""):
    raise DatasetError(f"build writes a local data_dir from a local manual_dir, not {data_dir}: build it here, then "
                       "copy the folder to the bucket (a training run reads data.data_dir from a bucket directly)")
  builder_class = BUILDERS[name]
  configs = [c.name for c in builder_class.BUILDER_CONFIGS]
  if config is not None and config not in configs:
    raise DatasetError(f"{name} has no config {config!r}; " + (f"use one of {configs}" if configs else "leave it out"))
  if name != "synthetic":
    if manual_dir is None:
      raise DatasetError(f"{name} is built from a local copy: pass manual_dir=<the data set root folder>")
    if not Path(manual_dir).is_dir() or not any(Path(manual_dir).iterdir()):
      raise DatasetError(f"manual_dir {manual_dir} does not exist or is empty; pass the root folder of your copy of "
                         f"{name} ({builder_class.HOMEPAGE})")
  builder = builder_class(data_dir=str(data_dir), config=config, strict=strict, **kwargs)
  mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
  if overwrite:
    mode = tfds.download.GenerateMode.FORCE_REDOWNLOAD
  download_config = tfds.download.DownloadConfig(
      manual_dir=str(manual_dir) if manual_dir is not None else None, download_mode=mode)
  builder.download_and_prepare(download_config=download_config)
  summary_path = Path(builder.data_dir) / SKIPPED_FILE
  summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"splits": {}}
  return BuildReport(
      name=name, config=builder.builder_config.name if builder.builder_config else "",
      dataset_dir=str(builder.data_dir),
      written={split: info.num_examples for split, info in builder.info.splits.items()},
      skipped={split: s["skipped"] for split, s in summary["splits"].items()},
      reused=not builder.generated)


__all__ = ["BUILDERS", "BuildReport", "EEmo", "EEmoBench", "EmoVerse", "RecordSource", "Synthetic", "build",
           "dataset_dir", "load_records", "synthetic_config"]
