"""What a tiny run reads, built once per test module: the offline tokenizer and a synthetic data set.

A real run's inputs are a checkpoint's tokenizer and a built TFDS folder; the tests build both offline
(data_pipeline.tokenizer, data_pipeline.builders "synthetic") in a temporary folder.
"""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Assets:
  tokenizer_dir: str
  data_dir: str
  dataset_config: str


def build_assets(root: str, *, config: str = "emoverse", num_train: int, num_test: int) -> Assets:
  """Builds the tokenizer and `num_train` / `num_test` synthetic records of `config` under `root`."""
  from data_pipeline.builders import build
  from data_pipeline.tokenizer import build_offline_tokenizer
  tokenizer_dir, data_dir = os.path.join(root, "tokenizer"), os.path.join(root, "data")
  build_offline_tokenizer(tokenizer_dir)
  report = build("synthetic", data_dir, config=config, num_train=num_train, num_test=num_test)
  assert report.written == {"train": num_train, "test": num_test}
  return Assets(tokenizer_dir, data_dir, report.config)
