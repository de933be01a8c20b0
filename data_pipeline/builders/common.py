"""What the three builders share: the stored features, the skip-or-fail loop, and annotation files.

Works without TensorFlow: tensorflow-datasets 4.9 serialises examples with its own protobuf copies and
writes ArrayRecord through `array_record`. Images are therefore stored as encoded bytes in a scalar
string `Tensor` (`tfds.features.Image` would need TensorFlow to encode), and text as `Text`.

The skip-or-fail loop is the data-set half of "bad records are counted and skipped with a clear
message, or fail the run when configured so" (DESIGN.md decision 11). A bad record costs only itself:
every parse runs on its own, and the ids skipped are written beside the data in `skipped_records.json`.
A split in which no record is good fails the build with a `DatasetError` (TFDS cannot write an empty
split); the skipped ids then go to `skipped_records.json` one folder up, where no built version is.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from data_pipeline.errors import DatasetError, DuplicateIdError, InvalidFieldError, RecordError
from data_pipeline.image_processor import PIXEL_LIMIT_CAP
from data_pipeline.records import DES_DIM, EEmoRecord, EmoVerseRecord

SKIPPED_FILE = "skipped_records.json"
ANNOTATION_SUFFIXES = (".json", ".jsonl", ".parquet")
_SPLIT_WORD = re.compile(r"(?<![a-z])(train|test|val|validation|dev)(?![a-z])")
_SPLIT_NAMES = {"train": "train", "test": "test", "val": "validation", "validation": "validation",
                "dev": "validation"}

log = logging.getLogger("data_pipeline.builders")


def _encoded_bytes():
  return tfds.features.Tensor(shape=(), dtype=np.object_)  # an encoded image, stored as is


def emoverse_features() -> tfds.features.FeaturesDict:
  """Stored layout of an `EmoVerseRecord` (`EmoVerseRecord.to_features`)."""
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(), "image": _encoded_bytes(), "width": np.int32, "height": np.int32,
      "emotion": text(), "label": np.int32, "description": text(),
      "background": text(), "attribute": text(), "subject": text(), "confidence": np.float32,
      "des": tfds.features.Tensor(shape=(DES_DIM,), dtype=np.float32), "has_des": np.bool_,
      "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.int32), "source": text(), "split": text(),
  })


def eemo_features() -> tfds.features.FeaturesDict:
  """Stored layout of an `EEmoRecord` (`EEmoRecord.to_features`)."""
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      "id": text(), "images": tfds.features.Sequence(_encoded_bytes()),
      "widths": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "heights": tfds.features.Tensor(shape=(None,), dtype=np.int32),
      "task": text(), "question": text(), "answer": text(), "options": tfds.features.Sequence(text()),
      "choice": text(), "emotion": text(), "scores": tfds.features.Tensor(shape=(3,), dtype=np.float32),
      "ranking": tfds.features.Sequence(text()), "option_set": text(), "source": text(), "split": text(),
  })


# An attempt is one annotation item's parse, run lazily so that its failure is caught on its own.
Attempt = tuple[str, Callable[[], Sequence[EmoVerseRecord | EEmoRecord]]]


class EmptySplitError(DatasetError):
  """A split has no good record to write; `skipped` tells whether bad ones were skipped (and listed)."""

  def __init__(self, message: str, split: str, skipped: bool):
    super().__init__(message)
    self.split = split
    self.skipped = skipped


class RecordBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A GeneratorBasedBuilder writing ArrayRecord, skipping bad records (or failing when `strict`).

  `max_image_pixels` refuses images whose header declares more pixels, before decoding them (None:
  `PIXEL_LIMIT_CAP`, PIL's decompression-bomb warning threshold, which is also the largest limit the input
  pipeline uses by default, so a larger image could never train). A build is reused by TFDS whatever the
  limit; rebuild with overwrite=True after changing it.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  DESCRIPTION = ""
  HOMEPAGE = ""

  def __init__(self, *, strict: bool = False, max_image_pixels: int | None = None, **kwargs):
    self.strict = strict
    self.max_image_pixels = PIXEL_LIMIT_CAP if max_image_pixels is None else int(max_image_pixels)
    if self.max_image_pixels < 1:
      raise DatasetError(f"max_image_pixels must be >= 1, got {max_image_pixels}")
    self.skipped: dict[str, list[dict[str, str]]] = {}
    self.generated = False
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """The builder's source file. Replaces TFDS's lookup, which imports `importlib_resources`: a package
    tensorflow-datasets 4.9.10 uses on Python >= 3.9 without depending on it."""
    return epath.Path(inspect.getfile(cls))

  def _features(self) -> tfds.features.FeaturesDict:
    raise NotImplementedError

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, features=self._features(),
                                 homepage=self.HOMEPAGE)

  def _generate_examples(self, split: str, attempts: Iterable[Attempt]):
    """(id, features) for every good record; bad ones are logged and listed in `self.skipped`."""
    self.generated = True
    skipped = self.skipped.setdefault(split, [])
    seen: set[str] = set()
    written = 0
    for where, attempt in attempts:
      try:
        records = list(attempt())
        ids = [r.id for r in records]
        repeated = next((i for n, i in enumerate(ids) if i in seen or i in ids[:n]), None)
        if repeated is not None:
          raise DuplicateIdError(repeated, "id", f"is used by an earlier record of the {split} split",
                                 "give every record a unique id (the first one was kept)")
      except Exception as error:  # one item's failure, whatever it is, must not cost the other records
        if not isinstance(error, RecordError):
          log.warning("%s/%s %s: unexpected %s while parsing", self.name, split, where, type(error).__name__,
                      exc_info=True)
          error = InvalidFieldError(where, "<item>", f"could not be parsed ({type(error).__name__}: {error})",
                                    "check the item against the released format")
        if self.strict:
          raise error
        skipped.append({"id": error.record_id, "where": where, "field": error.field,
                        "error": type(error).__name__, "message": str(error)})
        log.warning("%s/%s %s: skipping %s: %s", self.name, split, where, error.record_id, error)
        continue
      seen.update(ids)
      for record in records:
        written += 1
        yield record.id, record.to_features()
    if not written:  # TFDS would fail with "No examples were yielded", naming neither the split nor the records
      if skipped:
        reasons = sorted({s["error"] for s in skipped})
        raise EmptySplitError(f"every record of the {split} split of {self.name} is bad: {len(skipped)} skipped "
                              f"({', '.join(reasons)}), none written", split, skipped=True)
      raise EmptySplitError(f"the {split} split of {self.name} has no records: its annotations hold no items",
                            split, skipped=False)

  def download_and_prepare(self, *args, **kwargs):
    """Prepares the data, then writes the skipped-record summary beside it (when it generated anything).

    A split without one good record stops the build with a `DatasetError`; when it had bad records, their
    list is written to `skipped_records.json` beside the version folder (which TFDS did not create) and
    the message points at it.
    """
    target = Path(self.data_dir)  # TFDS points data_dir at a temporary folder while generating
    try:
      super().download_and_prepare(*args, **kwargs)
    except EmptySplitError as error:
      if not error.skipped:
        raise DatasetError(f"{error}; check the annotation files of that split (or pass annotations=...)") from None
      path = write_failed_summary(self, target.parent, str(error))
      raise DatasetError(f"{error}. The skipped records and why: {path}; fix them, or leave the split out "
                         "(annotations=...)") from None
    if self.generated:
      write_skipped_summary(self)


def write_failed_summary(builder: RecordBuilder, folder: Path, failure: str) -> Path:
  """`skipped_records.json` of a build that failed: the records skipped so far, in `folder`."""
  path = Path(folder) / SKIPPED_FILE
  path.parent.mkdir(parents=True, exist_ok=True)
  summary = {"dataset": builder.name, "config": builder.builder_config.name if builder.builder_config else "",
             "strict": builder.strict, "failed": failure,
             "splits": {name: {"written": 0, "skipped": skipped} for name, skipped in builder.skipped.items()}}
  path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
  return path


def write_skipped_summary(builder: RecordBuilder) -> Path:
  (Path(builder.data_dir).parent / SKIPPED_FILE).unlink(missing_ok=True)  # an earlier failed build's list
  path = Path(builder.data_dir) / SKIPPED_FILE
  splits = {name: {"written": builder.info.splits[name].num_examples, "skipped": builder.skipped.get(name, [])}
            for name in builder.info.splits.keys()}
  summary = {"dataset": builder.name, "config": builder.builder_config.name if builder.builder_config else "",
             "strict": builder.strict, "splits": splits}
  path.write_text(json.dumps(summary, indent=1, ensure_ascii=False))
  for name, split in splits.items():
    if split["skipped"]:
      ids = ", ".join(s["id"] for s in split["skipped"][:10])
      more = f" and {len(split['skipped']) - 10} more" if len(split["skipped"]) > 10 else ""
      log.warning("%s/%s: skipped %d bad records (wrote %d): %s%s. Details: %s", builder.name, name,
                  len(split["skipped"]), split["written"], ids, more, path)
  return path


# ---------------------------------------------------------------------------------- annotation files


def split_of(relative_path: str) -> str | None:
  """The split a file belongs to from its name: 'train', 'test', 'validation' (val, dev), or None."""
  match = _SPLIT_WORD.search(Path(relative_path).stem.lower()) or _SPLIT_WORD.search(relative_path.lower())
  return _SPLIT_NAMES[match.group(1)] if match else None


def split_annotation_files(root: Path, annotations: Mapping[str, str | Sequence[str]] | None,
                           search_dir: str = "") -> dict[str, list[Path]]:
  """Split name -> annotation files: the ones given (relative to `root`), or every `.json`, `.jsonl`
  and `.parquet` under `root / search_dir` whose name contains a split word."""
  root = Path(root)
  if not root.is_dir():
    raise DatasetError(f"the data set root {root} is not a directory; pass manual_dir=<the data set folder>")
  if annotations:
    files = {split: [root / p for p in ([paths] if isinstance(paths, str) else paths)]
             for split, paths in annotations.items()}
    missing = [str(p) for paths in files.values() for p in paths if not p.is_file()]
    if missing:
      raise DatasetError(f"annotation files not found: {missing}; give paths relative to {root}")
    return files
  files: dict[str, list[Path]] = {}
  base = root / search_dir
  for path in sorted(p for p in base.rglob("*") if p.suffix in ANNOTATION_SUFFIXES and p.is_file()):
    split = split_of(str(path.relative_to(root)))
    if split:
      files.setdefault(split, []).append(path)
  if not files:
    raise DatasetError(f"no annotation files with 'train', 'test' or 'val' in their name under {base}; "
                       "pass annotations={'train': ['path/relative/to/root.json'], ...}")
  order = ("train", "validation", "test")
  return {split: files[split] for split in order if split in files}


def annotation_attempts(root: Path, paths: Iterable[Path], parse: Callable[[Any, str], list]):
  """(location, thunk) per annotation item; the thunk parses it with `parse(item, location)` (a list of
  records), or raises the RecordError the reader met there. The builder runs each thunk in turn, so a
  bad record is counted and skipped without losing the others."""
  for path in paths:
    for where, item in iter_annotation_items(root, path):
      yield where, functools.partial(_parse_item, parse, item, where)


def _parse_item(parse: Callable[[Any, str], list], item: Any, where: str) -> list:
  if isinstance(item, RecordError):
    raise item
  return parse(item, where)


def iter_annotation_items(root: Path, path: Path) -> Iterator[tuple[str, Any]]:
  """(location, item) for every item of a JSON array, JSON object of id -> item, JSONL or parquet file.

  The location `file#n` is the item's default id. A JSONL line that is not JSON is yielded as a
  `RecordError` in place of the item (one bad line costs one record); a whole file that cannot be read
  raises `DatasetError`, since its records cannot even be counted.
  """
  relative = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
  if path.suffix == ".parquet":
    yield from _parquet_items(path, relative)
    return
  if path.suffix == ".jsonl":
    with path.open(encoding="utf-8") as lines:
      for n, line in enumerate(lines):
        if line.strip():
          where = f"{relative}#{n}"
          try:
            yield where, json.loads(line)
          except json.JSONDecodeError as error:
            yield where, InvalidFieldError(where, "<line>", f"is not valid JSON ({error})",
                                           "fix or delete the line")
    return
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise DatasetError(f"{path} is not valid JSON ({error}); fix the file or remove it from the annotations"
                       ) from None
  if isinstance(data, Mapping) and all(isinstance(v, Mapping) for v in data.values()):
    for key, item in data.items():
      yield f"{relative}#{key}", {"id": key, **item} if "id" not in item else item
  elif isinstance(data, list):
    for n, item in enumerate(data):
      yield f"{relative}#{n}", item
  else:
    raise DatasetError(f"{path} holds a {type(data).__name__}; expected a JSON array of annotation objects")


def _parquet_items(path: Path, relative: str) -> Iterator[tuple[str, Any]]:
  import pyarrow.parquet as pq  # a dependency of tensorflow-datasets; only needed for HF parquet files

  n = 0
  for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
    for row in batch.to_pylist():
      yield f"{relative}#{n}", row
      n += 1
