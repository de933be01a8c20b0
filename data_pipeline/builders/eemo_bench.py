"""TFDS builder `eemo_bench`: EEmo-Bench and EEmo-Logic's cross-domain test sets -> ArrayRecord, for evaluation.

Configs: `single` (1,960 images), `pair` (1,006 image pairs), `artemis` and `artphoto` (the dominant-emotion
cross-domain sets). Each benchmark question becomes one `EEmoRecord` in the training layout
(`data_pipeline.bench_records`), all in a `test` split, so `eemo-jax eval` prompts a model with the same
pipeline it was trained with and reads its answers against the options it was shown.

manual_dir holds the annotation file, found by its name in the authors' release or in this project's copy
(`ANNOTATION_FILES`; also under `test_data/` or `test data/`), or named with `annotations=`. Images are read
from `image_root` (absolute, or relative to manual_dir; default manual_dir itself), by the names the file
gives them, and no image outside it is read.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds

from data_pipeline import bench_records
from data_pipeline.builders.common import Attempt, RecordBuilder, eemo_features, iter_annotation_items
from data_pipeline.errors import DatasetError, RecordError

SPLIT = "test"
# Annotation file names per config: this project's copy (eemo_jax/eval/data/eemo_bench), then the authors'
# (EEmo-Logic `test_data/`), looked for in manual_dir and in the release's folders below it; when manual_dir
# holds none, pass manual_dir=eemo_jax.eval.BENCH_DATA (the package's copy) and the images as image_root.
ANNOTATION_FILES = {
    "single": ("Ebench_single.json", "Ebench_1_data(jac_en_check).json"),
    "pair": ("Ebench_pair.json", "Ebench_imgpir(en).json"),
    "artemis": ("cross_domain_ArtEmis.json", "test_ArtEmis.json"),
    "artphoto": ("cross_domain_ArtPhoto.json", "test_Artphoto.json"),
}
ANNOTATION_DIRS = ("", "test_data", "test data")


class EEmoBench(RecordBuilder):
  """EEmo-Bench (perception, ranking, V/A/D assessment, description) and EEmo-Logic's ArtEmis / ArtPhoto."""

  name = "eemo_bench"
  DESCRIPTION = "EEmo-Bench and EEmo-Logic cross-domain test questions, one record per question."
  HOMEPAGE = "https://github.com/workerred/EEmo-Bench"
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name="single", description="EEmo-Bench single images: yes/no, what/how, "
                              "ranking, V/A/D, open-ended."),
      tfds.core.BuilderConfig(name="pair", description="EEmo-Bench image pairs: yes/no, what/how, open-ended."),
      tfds.core.BuilderConfig(name="artemis", description="EEmo-Logic cross-domain ArtEmis: dominant emotion "
                              "over the 8 Mikels emotions."),
      tfds.core.BuilderConfig(name="artphoto", description="EEmo-Logic cross-domain ArtPhoto: dominant emotion "
                              "over its 8 emotions."),
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Pass as manual_dir a folder holding the annotation file (EEmo-Logic test_data/: Ebench_1_data(jac_en_check).json,
  Ebench_imgpir(en).json, test_ArtEmis.json, test_Artphoto.json; or this project's data/eemo-bench copies), or
  name it with annotations="file.json". Download the images from the benchmarks' pages and pass their folder as
  image_root: EEmo-Bench's images by `image_name` (1.jpg, ...), ArtEmis's test_dominant_images/, ArtPhoto's files.
  """

  def __init__(self, *, annotations: str | os.PathLike | None = None, image_root: str | os.PathLike = "",
               **kwargs):
    self.annotations = annotations
    self.image_root = image_root
    super().__init__(**kwargs)

  def _features(self):
    return eemo_features()

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(dl_manager.manual_dir)
    path = annotation_file(root, self.builder_config.name, self.annotations)
    image_root = root / self.image_root  # an absolute image_root replaces the root
    if not image_root.is_dir():
      raise DatasetError(f"image_root {str(image_root)!r} is not a folder; pass image_root=<the folder holding the "
                         f"{self.builder_config.name} images> (absolute, or relative to {root})")
    return {SPLIT: self._generate_examples(SPLIT, bench_attempts(
        self.builder_config.name, root, path, image_root, max_image_pixels=self.max_image_pixels))}


def annotation_file(root: Path, config: str, annotations: str | os.PathLike | None = None) -> Path:
  """The annotation file of `config`: `annotations` (absolute, or relative to `root`), or the first default
  name (`ANNOTATION_FILES`) found in `root` or its `ANNOTATION_DIRS`."""
  if annotations is not None:
    if not isinstance(annotations, (str, os.PathLike)):
      raise DatasetError(f"annotations= of eemo_bench is one file (a benchmark has a test split only), got "
                         f"{annotations!r:.80}; give the path of the {config} annotation file")
    path = root / annotations
    if not path.is_file():
      raise DatasetError(f"annotation file {str(path)!r} not found; give annotations= as a path relative to {root} "
                         "or an absolute one")
    return path
  candidates = [root / folder / name for name in ANNOTATION_FILES[config] for folder in ANNOTATION_DIRS]
  found = next((p for p in candidates if p.is_file()), None)
  if found is None:
    raise DatasetError(f"no {config} annotation file in {root}: looked for {', '.join(ANNOTATION_FILES[config])} "
                       f"(also under {', '.join(repr(d) for d in ANNOTATION_DIRS if d)}); put it there, pass "
                       "annotations=<its path>, or pass manual_dir=eemo_jax.eval.BENCH_DATA (the copy the package "
                       "carries) with image_root=<your image folder>")
  return found


def bench_attempts(config: str, root: Path, path: Path, image_root: Path, *,
                   max_image_pixels: int | None = None) -> Iterator[Attempt]:
  """(location, thunk) per question of every item: each question parses on its own, so a bad field skips
  only the records that read it. The location is the item (`Ebench_single.json#17`), also the records' source."""
  for index, (where, item) in enumerate(iter_annotation_items(root, path)):
    if isinstance(item, RecordError):  # a JSONL line that is not JSON
      yield where, functools.partial(_raise, item)
      continue
    for task in bench_records.item_tasks(config, item):
      yield where, functools.partial(_parse, config, item, index, task, image_root, where, max_image_pixels)


def _parse(config, item, index, task, image_root, where, max_image_pixels):
  return [bench_records.parse_bench_record(config, item, index, task, image_root, source=where, split=SPLIT,
                                           max_image_pixels=max_image_pixels)]


def _raise(error: RecordError):
  raise error
