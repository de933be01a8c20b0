"""TFDS builder `eemo`: EEmoDB (EEmo-Logic) question-answer items -> ArrayRecord.

Two configs follow the HF release layout (papers.md §3.1): `qa` reads the Stage-1 LLaVA-style
conversations under `EEmoDB-QA/`, `assess` the Stage-2 / benchmark items (`problem.question`,
`solution.answer`, `video_path`) under `EEmoDB-Assess/`. Either format is accepted in either config;
the config only says where to look. manual_dir is the data set root; `image_root` (relative to it)
is where image paths start, and no image may lie outside it.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from data_pipeline.builders.common import RecordBuilder, annotation_attempts, eemo_features, split_annotation_files
from data_pipeline.errors import DatasetError
from data_pipeline.records import parse_eemo


@dataclasses.dataclass
class EEmoConfig(tfds.core.BuilderConfig):
  search_dir: str = ""  # where annotation files are looked for, relative to manual_dir


class EEmo(RecordBuilder):
  """EEmoDB (arXiv 2602.01173): emotion questions of 8 task types about one image or a pair."""

  name = "eemo"
  DESCRIPTION = "EEmoDB: emotion QA (yes/no, multiple choice, dominant emotion, ranking, V/A/D, open-ended)."
  HOMEPAGE = "https://github.com/workerred/EEmo-Logic"
  BUILDER_CONFIGS = [
      EEmoConfig(name="qa", search_dir="EEmoDB-QA", description="Stage 1: EEmoDB-QA conversations."),
      EEmoConfig(name="assess", search_dir="EEmoDB-Assess", description="Stage 2: EEmoDB-Assess items."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Download EEmoDB (HF Workerred/EEmoDB) and its images yourself and pass the `dataset/` folder as
  manual_dir. Files named *train* / *test* under EEmoDB-QA/ (config qa) or EEmoDB-Assess/ (config
  assess) become the splits, or pass annotations={"train": ["file.json"], ...} relative to the root.
  """

  def __init__(self, *, annotations: Mapping[str, str | Sequence[str]] | None = None, image_root: str = "",
               **kwargs):
    self.annotations = dict(annotations) if annotations else None
    self.image_root = image_root
    super().__init__(**kwargs)

  def _features(self):
    return eemo_features()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(dl_manager.manual_dir)
    image_root = root / self.image_root
    if not image_root.resolve().is_relative_to(root.resolve()) or not image_root.is_dir():
      raise DatasetError(f"image_root {self.image_root!r} is not a folder inside the data set root {root}")
    search_dir = self.builder_config.search_dir if not self.annotations else ""
    if search_dir and not (root / search_dir).is_dir():
      search_dir = ""  # a flat folder: look everywhere under the root
    files = split_annotation_files(root, self.annotations, search_dir)
    return {split: self._generate_examples(split, annotation_attempts(root, paths, functools.partial(
                _parse, image_root=image_root, split=split, max_image_pixels=self.max_image_pixels)))
            for split, paths in files.items()}


def _parse(item, where: str, *, image_root: Path, split: str, max_image_pixels: int):
  return parse_eemo(item, image_root, default_id=where, split=split, max_image_pixels=max_image_pixels)
