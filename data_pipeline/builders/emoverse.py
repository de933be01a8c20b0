"""TFDS builder `emoverse`: the EmoVerse release (GitHub JSON/JSONL or HF parquet) -> ArrayRecord.

manual_dir is the data set root. Annotation files are found under it by name (`*train*`, `*test*`,
`*val*` with suffix .json, .jsonl or .parquet), or given as `annotations={"train": [...], ...}`
relative to the root. Image paths in the annotations are relative to the root and must stay inside it;
HF parquet rows carry their image bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from data_pipeline.builders.common import RecordBuilder, annotation_attempts, emoverse_features, \
  split_annotation_files
from data_pipeline.records import parse_emoverse


class EmoVerse(RecordBuilder):
  """EmoVerse (arXiv 2511.12554): Mikels-8 emotion, description, B-A-S attribution, DES, subject boxes."""

  name = "emoverse"
  DESCRIPTION = "EmoVerse: images with Mikels-8 emotion, description, B-A-S attribution, 1024-d DES and boxes."
  HOMEPAGE = "https://github.com/alkaline-acid/EmoVerse"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download EmoVerse yourself (GitHub JSON + images, or the HF parquet files of PiLabUSTC/EmoVerse-Dataset)
  and pass its root folder as manual_dir. Files named *train*, *test* or *val* (.json, .jsonl, .parquet)
  become the splits, or pass annotations={"train": ["a.jsonl"], ...} relative to the root.
  """

  def __init__(self, *, annotations: Mapping[str, str | Sequence[str]] | None = None, **kwargs):
    self.annotations = dict(annotations) if annotations else None
    super().__init__(**kwargs)

  def _features(self):
    return emoverse_features()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(dl_manager.manual_dir)
    files = split_annotation_files(root, self.annotations)
    return {split: self._generate_examples(split, annotation_attempts(root, paths, functools.partial(
                _parse, root=root, split=split, max_image_pixels=self.max_image_pixels)))
            for split, paths in files.items()}


def _parse(item, where: str, *, root: Path, split: str, max_image_pixels: int):
  return [parse_emoverse(item, root, default_id=where, split=split, max_image_pixels=max_image_pixels)]
