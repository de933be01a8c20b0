"""TFDS builder `synthetic`: the SYNTHETIC drawn-emotion data set (`data_pipeline.synthetic`) -> ArrayRecord.

Config `emoverse` writes `EmoVerseRecord`s, config `eemo` writes `EEmoRecord`s (9 questions per image).
The train split is indices [0, num_train), the test split [num_train, num_train + num_test), so the two
never share an image. Other seeds or sizes get their own config name (`emoverse-seed1-train64-test16`),
so a smaller build never silently reuses a larger one, or the other way round.
"""

from __future__ import annotations

import dataclasses
import functools

import tensorflow_datasets as tfds

from data_pipeline import synthetic
from data_pipeline.builders.common import RecordBuilder, eemo_features, emoverse_features
from data_pipeline.errors import DatasetError


@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  kind: str = "emoverse"  # "emoverse" or "eemo": which record kind the config writes
  seed: int = 0
  num_train: int = 2000
  num_test: int = 400


_DEFAULTS = {kind: SyntheticConfig(name=kind, kind=kind, description=f"{synthetic.SYNTHETIC_NOTICE} ({kind} records)")
             for kind in ("emoverse", "eemo")}


def synthetic_config(kind: str = "emoverse", *, seed: int | None = None, num_train: int | None = None,
                     num_test: int | None = None) -> SyntheticConfig:
  """The config for these settings: a default one when they are the defaults, else a named custom one."""
  if kind not in _DEFAULTS:
    raise DatasetError(f"synthetic config {kind!r} does not exist; use one of {sorted(_DEFAULTS)}")
  base = _DEFAULTS[kind]
  seed = base.seed if seed is None else seed
  num_train = base.num_train if num_train is None else num_train
  num_test = base.num_test if num_test is None else num_test
  if min(num_train, num_test) < 0 or seed < 0:
    raise DatasetError(f"seed, num_train and num_test must be >= 0, got {seed}, {num_train}, {num_test}")
  if (seed, num_train, num_test) == (base.seed, base.num_train, base.num_test):
    return base
  return SyntheticConfig(name=f"{kind}-seed{seed}-train{num_train}-test{num_test}", kind=kind, seed=seed,
                         num_train=num_train, num_test=num_test, description=base.description)


class Synthetic(RecordBuilder):
  """SYNTHETIC drawn images whose emotion is learnable from the pixels; for offline end-to-end runs."""

  name = "synthetic"
  DESCRIPTION = synthetic.SYNTHETIC_NOTICE
  BUILDER_CONFIGS = list(_DEFAULTS.values())
  DEFAULT_BUILDER_CONFIG_NAME = "emoverse"

  def __init__(self, *, config=None, seed: int | None = None, num_train: int | None = None,
               num_test: int | None = None, **kwargs):
    if seed is not None or num_train is not None or num_test is not None:
      config = synthetic_config(config or "emoverse", seed=seed, num_train=num_train, num_test=num_test)
    super().__init__(config=config, **kwargs)

  def _features(self):
    return emoverse_features() if self.builder_config.kind == "emoverse" else eemo_features()

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download: every image is drawn
    c = self.builder_config
    make = synthetic.synthetic_emoverse_record if c.kind == "emoverse" else synthetic.synthetic_eemo_records
    ranges = {"train": range(0, c.num_train), "test": range(c.num_train, c.num_train + c.num_test)}
    return {split: self._generate_examples(split, _attempts(make, c.seed, indices, split))
            for split, indices in ranges.items()}


def _attempts(make, seed: int, indices: range, split: str):
  for index in indices:
    yield f"index {index}", functools.partial(_records, make, seed, index, split)


def _records(make, seed: int, index: int, split: str):
  records = make(seed, index, split)
  return records if isinstance(records, list) else [records]
