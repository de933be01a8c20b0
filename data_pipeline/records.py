"""The two record kinds EEmo-JAX trains on, validated, and their parsers from the released formats.

* `EmoVerseRecord`: one image with its Mikels-8 emotion, description, Background–Attribute–Subject
  attribution, optional 1024-d DES vector and subject boxes (papers.md §2.1).
* `EEmoRecord`: one emotion question about one image (or a pair) with its answer, the task type and
  the structured labels a reward needs: option letter, dominant emotion, ranking, V/A/D score (§3.3).

A record is valid by construction (`__post_init__` checks the cheap invariants), so everything downstream
can trust it. `to_features()` gives the flat dict of numpy-friendly values that the builders store, and
`from_features()` reads one back (text may come back as `bytes`, as TFDS returns it).

The parsers turn one released annotation item (a dict) into records. Images are read from *inside the
data set root only*: absolute paths elsewhere, `..` escapes and symlinks leading out are refused, and
every image is decoded once with PIL, so a bad file is reported here, named, instead of crashing a
training step hours later; one whose header declares more than `max_image_pixels` is refused before
decoding. Every failure is a `RecordError` naming the record, the field and the fix.

Label sets come from `data_pipeline/tasks.py` (`MIKELS_8` here is their lower-case spelling).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from data_pipeline import tasks
from data_pipeline.errors import (CorruptImageError, ImageTooLargeError, InvalidFieldError, MissingFieldError,
                                  MissingFileError, RecordError, UnknownLabelError, UnsafePathError)
from data_pipeline.image_processor import PIXEL_LIMIT_CAP

# Label sets live in data_pipeline/tasks.py; records store the lower-case spelling of the Mikels classes.
# The 8 Mikels emotion categories (EmoVerse's CES), in alphabetical order: a label's index is its class id.
MIKELS_8 = tuple(e.lower() for e in tasks.MIKELS_8)
# Spellings of the same classes in other releases (ArtPhoto-style option set, papers.md §1).
_MIKELS_ALIASES = {"sad": "sadness", "content": "contentment"}

EEMO_TASKS = ("yes_no", "multiple_choice", "dominant_emotion", "emotion_ranking", "valence", "arousal",
              "dominance", "open_ended")
VAD_TASKS = tasks.VAD_DIMENSIONS

# The dominant-emotion option sets of EEmoDB-Assess as the released strings: they are the keys of the reward
# matrices (EEmo-Logic train/Stage_2/vad_distance.py `option_str_list`, reward_matrix_1.json).
OPTION_SETS = tuple(", ".join(names) for names in tasks.OPTION_SETS.values())

DES_DIM = 1024
# EmoVerse `confidence` is kept on its released scale: the schema shows 5.0 and 8, the authors' scorer
# clips it to 0–10, their LoRA head divides it by 5. Values outside 0–10 are refused.
CONFIDENCE_RANGE = (0.0, 10.0)
MAX_IMAGES = 2  # EEmoDB has single-image and image-pair questions


# ----------------------------------------------------------------------------------------------- records


@dataclasses.dataclass(frozen=True, eq=False)
class EmoVerseRecord:
  """One EmoVerse image: emotion class, description, B-A-S attribution, DES and subject boxes.

  `des` is None when the release has no DES for the image (stored as NaNs with `has_des=False`).
  `boxes` are (N, 4) int32 `x1, y1, x2, y2` in the pixels of the stored (original) image.
  `confidence` keeps the released scale (see `CONFIDENCE_RANGE`); NaN when absent.
  """

  id: str
  image: bytes
  width: int
  height: int
  emotion: str
  description: str
  background: str
  attribute: str
  subject: str
  confidence: float = math.nan
  des: np.ndarray | None = None
  boxes: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros((0, 4), np.int32))
  source: str = ""
  split: str = ""

  def __post_init__(self):
    _check_str(self, "id", "description", "background", "attribute", "subject", "source", "split")
    _check_image(self.id, "image", self.image, self.width, self.height)
    if self.emotion not in MIKELS_8:
      raise UnknownLabelError(self.id, "emotion", f"{self.emotion!r} is not one of the Mikels-8 {MIKELS_8}",
                              "use one of these names, or parse the annotation with `parse_emoverse`")
    _set(self, "confidence", _confidence(self.id, self.confidence))
    if self.des is not None:
      _set(self, "des", _des(self.id, self.des))
    _set(self, "boxes", _checked_boxes(self.id, self.boxes, self.width, self.height))

  @property
  def label(self) -> int:
    """Class id: the emotion's index in `MIKELS_8`."""
    return MIKELS_8.index(self.emotion)

  @property
  def has_des(self) -> bool:
    return self.des is not None

  @property
  def bas(self) -> str:
    """The released "B-A-S" string: background-attribute-subject."""
    return f"{self.background}-{self.attribute}-{self.subject}"

  def to_features(self) -> dict[str, Any]:
    """The flat dict that is stored; see `data_pipeline.builders.common.emoverse_features` for types."""
    return {
        "id": self.id, "image": self.image,
        "width": np.int32(self.width), "height": np.int32(self.height),
        "emotion": self.emotion, "label": np.int32(self.label), "description": self.description,
        "background": self.background, "attribute": self.attribute, "subject": self.subject,
        "confidence": np.float32(self.confidence),
        "des": self.des if self.des is not None else np.full((DES_DIM,), np.nan, np.float32),
        "has_des": np.bool_(self.has_des), "boxes": self.boxes, "source": self.source, "split": self.split,
    }

  @classmethod
  def from_features(cls, features: Mapping[str, Any]) -> EmoVerseRecord:
    return cls(
        id=_text(features["id"]), image=bytes(features["image"]),
        width=int(features["width"]), height=int(features["height"]), emotion=_text(features["emotion"]),
        description=_text(features["description"]), background=_text(features["background"]),
        attribute=_text(features["attribute"]), subject=_text(features["subject"]),
        confidence=float(features["confidence"]),
        des=np.asarray(features["des"], np.float32) if bool(features["has_des"]) else None,
        boxes=np.asarray(features["boxes"], np.int32).reshape(-1, 4),
        source=_text(features["source"]), split=_text(features["split"]))

  def __eq__(self, other):
    return _dataclass_equal(self, other)


@dataclasses.dataclass(frozen=True, eq=False)
class EEmoRecord:
  """One EEmo question about one image or an image pair, with its answer and structured labels.

  `answer` is the target text as released (what SFT trains on); the other fields are what it says,
  parsed once so rewards and metrics need not parse text:
    `choice`   option letter for yes_no / multiple_choice ("" when the question lists no options);
    `emotion`  the dominant emotion (lower case) for dominant_emotion;
    `ranking`  emotion names, strongest first, for emotion_ranking;
    `scores`   (valence, arousal, dominance) on 0–1, NaN where the record says nothing;
    `option_set` the `OPTION_SETS` entry the question draws its emotions from ("" if none).
  `question` has the `<image>` placeholders removed: the prompt builder places the images.
  """

  id: str
  images: tuple[bytes, ...]
  widths: tuple[int, ...]
  heights: tuple[int, ...]
  task: str
  question: str
  answer: str
  options: tuple[str, ...] = ()
  choice: str = ""
  emotion: str = ""
  scores: np.ndarray = dataclasses.field(default_factory=lambda: np.full((3,), np.nan, np.float32))
  ranking: tuple[str, ...] = ()
  option_set: str = ""
  source: str = ""
  split: str = ""

  def __post_init__(self):
    _check_str(self, "id", "task", "question", "answer", "choice", "emotion", "option_set", "source", "split")
    for name in ("images", "widths", "heights", "options", "ranking"):
      _set(self, name, tuple(getattr(self, name)))
    if not 1 <= len(self.images) <= MAX_IMAGES or not len(self.images) == len(self.widths) == len(self.heights):
      raise InvalidFieldError(self.id, "images", f"{len(self.images)} images with {len(self.widths)} widths and "
                              f"{len(self.heights)} heights", f"give 1 to {MAX_IMAGES} images, each with its size")
    for i, (data, w, h) in enumerate(zip(self.images, self.widths, self.heights)):
      _check_image(self.id, f"images[{i}]", data, w, h)
    if self.task not in EEMO_TASKS:
      raise UnknownLabelError(self.id, "task", f"{self.task!r} is not one of {EEMO_TASKS}", "use one of these")
    if not self.answer.strip():
      raise InvalidFieldError(self.id, "answer", "is empty", "give the answer text")
    scores = np.asarray(self.scores, np.float32)
    if scores.shape != (3,) or not np.all(np.isnan(scores) | ((scores >= 0) & (scores <= 1))):
      raise InvalidFieldError(self.id, "scores", f"must be 3 values (V, A, D) in [0, 1] or NaN, got {scores}",
                              "map the scores to 0–1 (1–9 SAM ratings: (x - 1) / 8)")
    _set(self, "scores", _readonly(scores))
    self._check_task_labels()

  def _check_task_labels(self):
    letters = "ABCDEFGH"[:len(self.options)]
    if self.choice and (self.task not in ("yes_no", "multiple_choice") or self.choice not in letters):
      raise InvalidFieldError(self.id, "choice", f"{self.choice!r} is not an option letter of this {self.task} "
                              f"question (options {letters or 'none'})", "answer with one of the option letters")
    if self.task in VAD_TASKS and np.isnan(self.scores[VAD_TASKS.index(self.task)]):
      raise MissingFieldError(self.id, "scores", f"a {self.task} question has no {self.task} score",
                              f"answer as '{self.task.capitalize()}: 0.xxxx'")
    if self.task == "dominant_emotion" and not self.emotion:
      raise MissingFieldError(self.id, "emotion", "a dominant_emotion question names no emotion",
                              "answer as 'Dominant emotion: <name>'")
    if self.task == "emotion_ranking" and not self.ranking:
      raise MissingFieldError(self.id, "ranking", "an emotion_ranking question ranks no emotion",
                              "answer as 'Emotion ranking: a, b, c'")
    if len(set(self.ranking)) != len(self.ranking):
      raise InvalidFieldError(self.id, "ranking", f"repeats an emotion: {self.ranking}", "rank each emotion once")

  def to_features(self) -> dict[str, Any]:
    """The flat dict that is stored; see `data_pipeline.builders.common.eemo_features` for types."""
    return {
        "id": self.id, "images": list(self.images),
        "widths": np.asarray(self.widths, np.int32), "heights": np.asarray(self.heights, np.int32),
        "task": self.task, "question": self.question, "answer": self.answer, "options": list(self.options),
        "choice": self.choice, "emotion": self.emotion, "scores": self.scores, "ranking": list(self.ranking),
        "option_set": self.option_set, "source": self.source, "split": self.split,
    }

  @classmethod
  def from_features(cls, features: Mapping[str, Any]) -> EEmoRecord:
    return cls(
        id=_text(features["id"]), images=tuple(bytes(b) for b in features["images"]),
        widths=tuple(int(w) for w in features["widths"]), heights=tuple(int(h) for h in features["heights"]),
        task=_text(features["task"]), question=_text(features["question"]), answer=_text(features["answer"]),
        options=tuple(_text(o) for o in features["options"]), choice=_text(features["choice"]),
        emotion=_text(features["emotion"]), scores=np.asarray(features["scores"], np.float32),
        ranking=tuple(_text(r) for r in features["ranking"]), option_set=_text(features["option_set"]),
        source=_text(features["source"]), split=_text(features["split"]))

  def __eq__(self, other):
    return _dataclass_equal(self, other)


# ------------------------------------------------------------------------------------- images and paths


def resolve_image_path(root: str | os.PathLike, path: Any, record_id: str, field: str) -> Path:
  """The real path of an image named in an annotation, refusing anything outside `root`."""
  if not isinstance(path, str) or not path.strip() or "\x00" in path:
    raise InvalidFieldError(record_id, field, f"must be a non-empty path string, got {path!r:.120}",
                            "give the image path relative to the data set root")
  root_abs = Path(os.path.abspath(root))
  root_real = root_abs.resolve()
  given = Path(path)
  lexical = Path(os.path.normpath(given if given.is_absolute() else root_abs / given))
  if not (lexical.is_relative_to(root_abs) or lexical.is_relative_to(root_real)):
    how = "is an absolute path outside" if given.is_absolute() else "leaves through '..'"
    raise UnsafePathError(record_id, field, f"{path!r} {how} the data set root {root_abs}",
                          "keep images under the data set root and name them relative to it")
  real = lexical.resolve()
  if not real.is_relative_to(root_real):
    raise UnsafePathError(record_id, field, f"{path!r} is a symlink to {real}, outside the data set root "
                          f"{root_abs}", "copy the image into the data set root instead of linking to it")
  if not real.is_file():
    raise MissingFileError(record_id, field, f"no image file at {lexical}",
                           "check the path, or remove the record from the annotations")
  return real


def image_size(data: bytes, record_id: str, field: str, origin: str = "the image", *,
               max_image_pixels: int | None = None) -> tuple[int, int]:
  """(width, height) of encoded image bytes, decoding every pixel: truncated files fail here, not later.

  An image whose header declares more than `max_image_pixels` (None: `PIXEL_LIMIT_CAP`) is refused with
  `ImageTooLargeError` before a pixel is decoded. `origin` names the bytes in the error (the file path when
  they were read from one).
  """
  if not isinstance(data, (bytes, bytearray)) or not data:
    raise CorruptImageError(record_id, field, f"{origin} has no bytes", "give an encoded image (JPEG, PNG, ...)")
  try:
    with Image.open(io.BytesIO(data)) as image:  # the header only
      check_pixel_count(image.size, record_id, field, origin, max_image_pixels)
      image.verify()  # structure and checksums
    with Image.open(io.BytesIO(data)) as image:
      image.load()  # verify() does not see truncated pixel data
      return image.size
  except ImageTooLargeError:
    raise
  except Image.DecompressionBombError as error:  # above twice PIL's threshold: Image.open refuses it
    raise ImageTooLargeError(record_id, field, f"{origin} is larger than PIL opens ({error})", _DOWNSCALE,
                             limit=_pixel_limit(max_image_pixels)) from None
  except Image.UnidentifiedImageError:
    problem = f"{origin} is not in an image format PIL can read"
  except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError...)
    problem = f"{origin} cannot be decoded ({type(error).__name__}: {error})"
  raise CorruptImageError(record_id, field, problem, "re-download or re-encode the image, or remove the record")


_DOWNSCALE = "downscale the image (or remove the record), or raise max_image_pixels"


def _pixel_limit(max_image_pixels: int | None) -> int:
  return PIXEL_LIMIT_CAP if max_image_pixels is None else int(max_image_pixels)


def check_pixel_count(size: tuple[int, int], record_id: str, field: str, origin: str,
                      max_image_pixels: int | None = None) -> None:
  """Raises `ImageTooLargeError` when an image of `size` (width, height) has more than `max_image_pixels`."""
  limit = _pixel_limit(max_image_pixels)
  width, height = size
  if width * height > limit:
    raise ImageTooLargeError(record_id, field, f"{origin} is {width}x{height} = {width * height:,} pixels, more "
                             f"than max_image_pixels={limit:,}", _DOWNSCALE, size=width * height, limit=limit)


def read_image(root: str | os.PathLike | None, image: Any, record_id: str, field: str, *,
               max_image_pixels: int | None = None) -> tuple[bytes, int, int]:
  """Encoded bytes and size of an annotation's image: a path under `root`, raw bytes, or an HF image dict.

  Images of more than `max_image_pixels` (None: `PIXEL_LIMIT_CAP`) are refused from their header.
  """
  if isinstance(image, Mapping):  # HF `datasets` Image feature: {"bytes": ..., "path": ...}
    image = image.get("bytes") or image.get("path")
  if isinstance(image, (bytes, bytearray)):
    data = bytes(image)
    return data, *image_size(data, record_id, field, "the image bytes", max_image_pixels=max_image_pixels)
  if root is None:
    raise InvalidFieldError(record_id, field, f"is a path ({image!r:.120}) but no data set root was given",
                            "pass the data set root (the builder's manual_dir)")
  path = resolve_image_path(root, image, record_id, field)
  try:
    data, stat = path.read_bytes(), path.stat()
  except OSError as error:
    raise MissingFileError(record_id, field, f"{path} cannot be read ({type(error).__name__}: {error})",
                           "make the file readable, or remove the record") from None
  key = (str(path), stat.st_mtime_ns, stat.st_size)
  if key not in _DECODED_FILES:  # EEmoDB asks ~10 questions per image: decode each file once
    _DECODED_FILES[key] = image_size(data, record_id, field, str(path), max_image_pixels=max_image_pixels)
    if len(_DECODED_FILES) > _DECODED_FILES_MAX:
      del _DECODED_FILES[next(iter(_DECODED_FILES))]
  check_pixel_count(_DECODED_FILES[key], record_id, field, str(path), max_image_pixels)  # decoded under another limit
  return data, *_DECODED_FILES[key]


# Sizes of image files already decoded, keyed by (real path, mtime, size); only files that decoded cleanly.
_DECODED_FILES: dict[tuple[str, int, int], tuple[int, int]] = {}
_DECODED_FILES_MAX = 65536


# ------------------------------------------------------------------------------------- EmoVerse parser

# Field names of the GitHub JSON first, then the HF parquet names where they differ (papers.md §2.1).
_EMOVERSE_NAMES = {
    "image": ("image_path", "image"),
    "emotion": ("emotion", "emotion_category"),
    "confidence": ("confidence", "confidence_score", "intensity"),
    "des": ("DES", "DES_representation"),
    "boxes": ("bbox", "bounding_box", "bbox_2d"),
}


def parse_emoverse(item: Mapping[str, Any], root: str | os.PathLike | None, *, default_id: str,
                   split: str = "", max_image_pixels: int | None = None) -> EmoVerseRecord:
  """One EmoVerse annotation (GitHub JSON/JSONL item or HF parquet row) -> `EmoVerseRecord`.

  Required: the image, emotion, description, background, attribute, subject. Optional: id (else
  `default_id`), confidence, DES, bbox, source. `mask_path` is not read (masks are not used in training).
  """
  record_id = _item_id(item, default_id)
  if not isinstance(item, Mapping):
    raise InvalidFieldError(record_id, "<item>", f"is a {type(item).__name__}, not a JSON object",
                            "each annotation must be an object with EmoVerse fields")
  image_key, image = _first(item, "image", record_id, required=True)
  data, width, height = read_image(root, image, record_id, image_key, max_image_pixels=max_image_pixels)
  emotion_key, emotion = _first(item, "emotion", record_id, required=True)
  _, confidence = _first(item, "confidence", record_id)
  des_key, des = _first(item, "des", record_id)
  box_key, boxes = _first(item, "boxes", record_id)
  text = {name: _required_str(item, name, record_id)
          for name in ("description", "background", "attribute", "subject")}
  return EmoVerseRecord(
      id=record_id, image=data, width=width, height=height,
      emotion=canonical_emotion(emotion, record_id, emotion_key),
      confidence=math.nan if confidence is None else _number(confidence, record_id, "confidence"),
      des=None if des is None else _des(record_id, des, des_key),
      boxes=_parse_boxes(boxes, record_id, box_key, width, height),
      source=_optional_str(item, "source", record_id), split=split, **text)


def canonical_emotion(name: Any, record_id: str, field: str = "emotion") -> str:
  """A Mikels-8 name in lower case ('Amusement', 'sad', 'Content' are accepted)."""
  if not isinstance(name, str):
    raise InvalidFieldError(record_id, field, f"must be a string, got {type(name).__name__}",
                            f"use one of {MIKELS_8}")
  key = name.strip().lower()
  key = _MIKELS_ALIASES.get(key, key)
  if key not in MIKELS_8:
    raise UnknownLabelError(record_id, field, f"{name!r} is not a Mikels-8 emotion",
                            f"use one of {MIKELS_8}")
  return key


def _parse_boxes(value: Any, record_id: str, field: str, width: int, height: int) -> np.ndarray:
  """Boxes as (N, 4) int32 from `[{x1,y1,x2,y2}]`, a dict, `[[x1,y1,x2,y2]]` or a flat 4N list.

  Grounding boxes may spill a pixel over the border, so they are clipped to the image; a box with
  x2 < x1 or y2 < y1, or lying wholly outside the image, is refused.
  """
  if value is None:
    return np.zeros((0, 4), np.int32)
  if isinstance(value, Mapping):
    value = [value]
  rows = []
  try:
    if all(isinstance(v, Mapping) for v in value):
      rows = [[box[k] for k in ("x1", "y1", "x2", "y2")] for box in value]
    elif all(isinstance(v, (list, tuple, np.ndarray)) for v in value):
      rows = [list(v) for v in value]
    else:
      flat = list(value)
      rows = [flat[i:i + 4] for i in range(0, len(flat), 4)] if len(flat) % 4 == 0 else [flat]
    array = np.asarray(rows, np.float64).reshape(-1, 4) if rows else np.zeros((0, 4))
    if any(len(r) != 4 for r in rows) or any(isinstance(x, bool) for r in rows for x in r):
      raise ValueError
  except (KeyError, TypeError, ValueError):
    raise InvalidFieldError(record_id, field, f"is not a list of x1, y1, x2, y2 boxes: {value!r:.120}",
                            "give [{'x1':..,'y1':..,'x2':..,'y2':..}, ...] in image pixels") from None
  if not np.all(np.isfinite(array)) or np.any(array[:, 2] < array[:, 0]) or np.any(array[:, 3] < array[:, 1]):
    raise InvalidFieldError(record_id, field, f"has a box with x2 < x1 or y2 < y1 (or NaN): {array.tolist()}",
                            "give boxes as x1, y1, x2, y2 with x1 <= x2 and y1 <= y2")
  outside = (array[:, 0] >= width) | (array[:, 1] >= height) | (array[:, 2] <= 0) | (array[:, 3] <= 0)
  if np.any(outside):
    raise InvalidFieldError(record_id, field, f"has a box outside the {width}x{height} image: "
                            f"{array[outside].tolist()}", "give boxes in the pixels of the stored image")
  array = np.clip(np.round(array), 0, [width, height, width, height])
  return array.astype(np.int32)


# ---------------------------------------------------------------------------------------- EEmo parsers

# Answer prefixes that name a task (EEmo-Logic vllm_grpo_trainer_video_tg.py `task_list`).
_ANSWER_KEYS = (("valence", "valence"), ("arousal", "arousal"), ("dominance", "dominance"),
                ("emotion ranking", "emotion_ranking"), ("dominant emotion", "dominant_emotion"))
_IMAGE_TOKEN = "<image>"
_OPTION_MARK = re.compile(r"(?:^|(?<=\s))\(?([A-H])\s*[:.)]\s*")


def parse_eemo(item: Mapping[str, Any], root: str | os.PathLike | None, *, default_id: str,
               split: str = "", max_image_pixels: int | None = None) -> list[EEmoRecord]:
  """One EEmoDB item -> its records: LLaVA-style `{image, conversations}` (one record per question and
  answer turn) or Stage-2 / benchmark `{problem: {question}, solution: {answer}, video_path}`."""
  record_id = _item_id(item, default_id)
  if not isinstance(item, Mapping):
    raise InvalidFieldError(record_id, "<item>", f"is a {type(item).__name__}, not a JSON object",
                            "each EEmoDB item must be an object")
  if "conversations" in item:
    return parse_eemo_conversation(item, root, default_id=default_id, split=split,
                                   max_image_pixels=max_image_pixels)
  if "problem" in item or "solution" in item:
    return [parse_eemo_stage2(item, root, default_id=default_id, split=split, max_image_pixels=max_image_pixels)]
  raise MissingFieldError(record_id, "conversations", "the item has neither 'conversations' nor "
                          "'problem'/'solution'", "give LLaVA-style {image, conversations} or Stage-2 "
                          "{problem: {question}, solution: {answer}, video_path} items")


def parse_eemo_conversation(item: Mapping[str, Any], root, *, default_id: str, split: str = "",
                            max_image_pixels: int | None = None) -> list[EEmoRecord]:
  record_id = _item_id(item, default_id)
  if "image" not in item:
    raise MissingFieldError(record_id, "image", "the item names no image", "give 'image': path or [path, path]")
  images = _read_images(root, item["image"], record_id, "image", max_image_pixels)
  turns = item["conversations"]
  if not isinstance(turns, list) or not turns or len(turns) % 2:
    raise InvalidFieldError(record_id, "conversations", "must be a non-empty list of human/gpt turn pairs",
                            "alternate {'from': 'human'} and {'from': 'gpt'} turns")
  records = []
  for k in range(0, len(turns), 2):
    field = f"conversations[{k}]"
    human, gpt = turns[k], turns[k + 1]
    if not (isinstance(human, Mapping) and isinstance(gpt, Mapping)
            and human.get("from") == "human" and gpt.get("from") == "gpt"):
      raise InvalidFieldError(record_id, field, "is not a human turn followed by a gpt turn",
                              "alternate {'from': 'human', 'value': ...} and {'from': 'gpt', 'value': ...}")
    question = _required_str(human, "value", record_id, f"{field}.value")
    answer = _required_str(gpt, "value", record_id, f"conversations[{k + 1}].value")
    turn_id = record_id if len(turns) == 2 else f"{record_id}#{k // 2}"
    records.append(_qa_record(turn_id, images, question, answer, None, split))
  return records


def parse_eemo_stage2(item: Mapping[str, Any], root, *, default_id: str, split: str = "",
                      max_image_pixels: int | None = None) -> EEmoRecord:
  record_id = _item_id(item, default_id)
  problem, solution = item.get("problem"), item.get("solution")
  question = problem.get("question") if isinstance(problem, Mapping) else problem
  answer = solution.get("answer") if isinstance(solution, Mapping) else solution
  if not isinstance(question, str) or not question.strip():
    raise MissingFieldError(record_id, "problem.question", "is missing or not text", "give the question text")
  if not isinstance(answer, str) or not answer.strip():
    raise MissingFieldError(record_id, "solution.answer", "is missing or not text", "give the answer text")
  key = next((k for k in ("video_path", "image", "image_path") if k in item), None)
  if key is None:
    raise MissingFieldError(record_id, "video_path", "the item names no image", "give 'video_path': image path")
  images = _read_images(root, item[key], record_id, key, max_image_pixels)
  options = problem.get("options") if isinstance(problem, Mapping) else None
  return _qa_record(record_id, images, question, answer, options, split)


def infer_task(answer: str, options: Sequence[str]) -> str:
  """The task type an answer belongs to, from its keywords as the EEmo-Logic authors do.

  Deviation: the prefix must open a line of the answer body (after `<think>`/`<answer>` tags), not
  merely occur in it, so an open-ended description that mentions "valence:" stays open-ended.
  """
  body = answer_body(answer)
  for key, task in _ANSWER_KEYS:
    if re.search(rf"^\s*{key}\s*:", body, re.IGNORECASE | re.MULTILINE):
      return task
  if options:
    return "yes_no" if {o.strip().rstrip(".").lower() for o in options} == {"yes", "no"} else "multiple_choice"
  if body.strip().rstrip(".").lower() in ("yes", "no"):
    return "yes_no"
  return "open_ended"


def answer_body(answer: str) -> str:
  """The answer without reasoning: the `<answer>` content if tagged, else the text minus `<think>`."""
  match = re.search(r"<answer>(.*?)(?:</answer>|$)", answer, re.DOTALL)
  if match:
    return match.group(1).strip()
  return re.sub(r"<think>.*?(?:</think>|$)", "", answer, flags=re.DOTALL).strip()


def parse_options(question: str) -> tuple[str, ...]:
  """Option texts of a question listing `A: ...  B: ...` or `A. ...\\nB. ...` (the last such list)."""
  marks = list(_OPTION_MARK.finditer(question))
  best: list[re.Match] = []
  run: list[re.Match] = []
  for mark in marks:
    letter = mark.group(1)
    if letter == "A":
      run = [mark]
    elif run and ord(letter) == ord(run[-1].group(1)) + 1:
      run.append(mark)
    else:
      continue
    if len(run) >= 2:
      best = list(run)
  options = []
  for i, mark in enumerate(best):
    end = best[i + 1].start() if i + 1 < len(best) else len(question)
    text = question[mark.end():end]
    if i + 1 == len(best):
      text = text.split("\n", 1)[0]
    options.append(text.strip())
  return tuple(options)


def detect_option_set(question: str) -> str:
  """The `OPTION_SETS` entry a question offers: quoted verbatim, or all of its emotions named."""
  lowered = question.lower()
  for option_set in OPTION_SETS:
    if option_set.lower() in lowered:
      return option_set
  for option_set in sorted(OPTION_SETS, key=len, reverse=True):
    names = [n.strip().lower() for n in option_set.split(",")]
    if all(re.search(rf"(?<![a-z]){re.escape(n)}(?![a-z])", lowered) for n in names):
      return option_set
  return ""


def _qa_record(record_id, images, question, answer, options, split) -> EEmoRecord:
  placeholders = question.count(_IMAGE_TOKEN)
  if placeholders and placeholders != len(images):
    raise InvalidFieldError(record_id, "question", f"has {placeholders} {_IMAGE_TOKEN} placeholders for "
                            f"{len(images)} images", f"put one {_IMAGE_TOKEN} per image in the question")
  question = re.sub(rf"\s*{re.escape(_IMAGE_TOKEN)}\s*", "\n", question).strip()
  options = _options(options, record_id) if options is not None else parse_options(question)
  task = infer_task(answer, options)
  body = answer_body(answer)
  fields: dict[str, Any] = {}
  if task in VAD_TASKS:
    scores = np.full((3,), np.nan, np.float32)
    scores[VAD_TASKS.index(task)] = _answer_score(body, task, record_id)
    fields["scores"] = scores
  elif task == "dominant_emotion":
    fields["emotion"] = _answer_value(body, "dominant emotion", record_id).rstrip(".").lower()
  elif task == "emotion_ranking":
    value = _answer_value(body, "emotion ranking", record_id)
    fields["ranking"] = tuple(n.strip().rstrip(".").lower() for n in re.split(r"[,;>]", value) if n.strip())
  elif options:
    fields["choice"] = _answer_choice(body, options, record_id)
  return EEmoRecord(id=record_id, images=tuple(d for d, _, _ in images), widths=tuple(w for _, w, _ in images),
                    heights=tuple(h for _, _, h in images), task=task, question=question, answer=answer,
                    options=options, option_set=detect_option_set(question), split=split, **fields)


def _answer_value(body: str, key: str, record_id: str) -> str:
  match = re.search(rf"^\s*{key}\s*:\s*(.*)$", body, re.IGNORECASE | re.MULTILINE)
  value = match.group(1).strip() if match else ""
  if not value:
    raise InvalidFieldError(record_id, "answer", f"'{key.capitalize()}:' is followed by nothing",
                            f"answer as '{key.capitalize()}: <value>'")
  return value


def _answer_score(body: str, task: str, record_id: str) -> float:
  value = _answer_value(body, task, record_id)
  match = re.match(r"[-+]?(\d+\.?\d*|\.\d+)", value)
  score = float(match.group(0)) if match else math.nan
  if not 0.0 <= score <= 1.0:
    raise InvalidFieldError(record_id, "answer", f"the {task} score {value!r} is not a number in [0, 1]",
                            "give 0–1 scores with 4 decimals (map 1–9 SAM ratings with (x - 1) / 8)")
  return score


def _answer_choice(body: str, options: Sequence[str], record_id: str) -> str:
  letters = "ABCDEFGH"[:len(options)]
  match = re.match(r"^\(?([A-H])\)?(?=$|[\s:.,)])", body)
  if match:
    letter = match.group(1)
  else:
    texts = [o.strip().rstrip(".").lower() for o in options]
    said = body.strip().rstrip(".").lower()
    letter = letters[texts.index(said)] if said in texts else ""
  if letter not in letters or not letter:
    raise InvalidFieldError(record_id, "answer", f"{body[:60]!r} names none of the options {letters}",
                            "answer with an option letter or the option text")
  return letter


def _options(value: Any, record_id: str) -> tuple[str, ...]:
  if isinstance(value, Mapping):
    value = [value[k] for k in sorted(value)]
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise InvalidFieldError(record_id, "problem.options", f"must be a list or {{letter: text}} of strings, "
                            f"got {value!r:.80}", "give the options as text")
  return tuple(re.sub(r"^\(?[A-H]\s*[:.)]\s*", "", v).strip() for v in value)


def _read_images(root, value, record_id: str, field: str,
                 max_image_pixels: int | None = None) -> list[tuple[bytes, int, int]]:
  paths = [value] if isinstance(value, (str, bytes, Mapping)) else value
  if not isinstance(paths, (list, tuple)) or not 1 <= len(paths) <= MAX_IMAGES:
    raise InvalidFieldError(record_id, field, f"must be one image path or a list of 1 to {MAX_IMAGES}, "
                            f"got {value!r:.80}", "give 'image': path or [path, path]")
  return [read_image(root, p, record_id, field if len(paths) == 1 else f"{field}[{i}]",
                     max_image_pixels=max_image_pixels) for i, p in enumerate(paths)]


# --------------------------------------------------------------------------------------------- helpers


def _item_id(item: Any, default_id: str) -> str:
  value = item.get("id") if isinstance(item, Mapping) else None
  return default_id if value is None or isinstance(value, bool) or str(value) == "" else str(value)


def _first(item: Mapping, name: str, record_id: str, required: bool = False) -> tuple[str, Any]:
  for key in _EMOVERSE_NAMES[name]:
    if item.get(key) is not None:
      return key, item[key]
  if required:
    names = " or ".join(repr(k) for k in _EMOVERSE_NAMES[name])
    raise MissingFieldError(record_id, _EMOVERSE_NAMES[name][0], f"is missing (looked for {names})",
                            "add the field to the annotation, or remove the record")
  return _EMOVERSE_NAMES[name][0], None


def _required_str(item: Mapping, key: str, record_id: str, field: str | None = None) -> str:
  field = field or key
  if key not in item or item[key] is None:
    raise MissingFieldError(record_id, field, "is missing", "add the field to the annotation, or remove the record")
  if not isinstance(item[key], str):
    raise InvalidFieldError(record_id, field, f"must be text, got {type(item[key]).__name__}", "give a string")
  return item[key]


def _optional_str(item: Mapping, key: str, record_id: str) -> str:
  value = item.get(key)
  if value is not None and not isinstance(value, str):
    raise InvalidFieldError(record_id, key, f"must be text, got {type(value).__name__}", "give a string")
  return value or ""


def _number(value: Any, record_id: str, field: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
    raise InvalidFieldError(record_id, field, f"must be a number, got {value!r:.40}", "give a number")
  return float(value)


def _confidence(record_id: str, value: Any) -> float:
  value = float(np.float32(_number(value, record_id, "confidence")))
  low, high = CONFIDENCE_RANGE
  if not (math.isnan(value) or low <= value <= high):
    raise InvalidFieldError(record_id, "confidence", f"{value} is outside the released {low:g}–{high:g} scale",
                            "give the confidence on its released 0–10 scale, or leave it out")
  return value


def _des(record_id: str, value: Any, field: str = "des") -> np.ndarray:
  if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
    raise InvalidFieldError(record_id, field, f"must be a list of {DES_DIM} numbers, got {type(value).__name__}",
                            f"give the {DES_DIM}-d DES vector, or leave it out")
  try:
    array = np.asarray(value, np.float32)
  except (TypeError, ValueError):
    raise InvalidFieldError(record_id, field, "holds values that are not numbers",
                            f"give {DES_DIM} numbers") from None
  if array.shape != (DES_DIM,) or not np.all(np.isfinite(array)):
    raise InvalidFieldError(record_id, field, f"must be {DES_DIM} finite numbers, got shape {array.shape}",
                            f"give the full {DES_DIM}-d DES vector, or leave it out")
  return _readonly(array)


def _checked_boxes(record_id: str, boxes: Any, width: int, height: int) -> np.ndarray:
  array = np.asarray(boxes)
  if array.size == 0:
    array = np.zeros((0, 4), np.int32)
  if array.ndim != 2 or array.shape[1] != 4 or not np.issubdtype(array.dtype, np.integer):
    raise InvalidFieldError(record_id, "boxes", f"must be (N, 4) integers, got {array.dtype} {array.shape}",
                            "parse boxes with `parse_emoverse`, which converts and clips them")
  bad = ((array[:, 0] < 0) | (array[:, 1] < 0) | (array[:, 2] > width) | (array[:, 3] > height)
         | (array[:, 2] < array[:, 0]) | (array[:, 3] < array[:, 1]))
  if np.any(bad):
    raise InvalidFieldError(record_id, "boxes", f"{array[bad].tolist()} do not lie in the {width}x{height} "
                            "image as x1 <= x2, y1 <= y2", "give boxes in the pixels of the stored image")
  return _readonly(array.astype(np.int32))


def _check_image(record_id: str, field: str, data: Any, width: Any, height: Any) -> None:
  if not isinstance(data, bytes) or not data:
    raise InvalidFieldError(record_id, field, "must be non-empty encoded image bytes", "read it with `read_image`")
  if isinstance(width, bool) or isinstance(height, bool) or not (
      isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
    raise InvalidFieldError(record_id, field, f"has size {width}x{height}", "give a positive width and height")


def _check_str(record, *names: str) -> None:
  for name in names:
    value = getattr(record, name)
    if not isinstance(value, str):
      raise InvalidFieldError(str(getattr(record, "id", "?")), name, f"must be text, got {type(value).__name__}",
                              "give a string")


def _text(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, (bytes, np.bytes_)) else str(value)


def _readonly(array: np.ndarray) -> np.ndarray:
  array = np.array(array, copy=True)
  array.setflags(write=False)
  return array


def _set(record, name: str, value: Any) -> None:
  object.__setattr__(record, name, value)  # normalising a frozen dataclass field in __post_init__


def _dataclass_equal(a, b) -> bool:
  if type(a) is not type(b):
    return NotImplemented
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
      if x is None or y is None or not np.array_equal(x, y, equal_nan=True):
        return False
    elif isinstance(x, float) and isinstance(y, float):
      if not (x == y or (math.isnan(x) and math.isnan(y))):
        return False
    elif x != y:
      return False
  return True


__all__ = ["CONFIDENCE_RANGE", "DES_DIM", "EEMO_TASKS", "EEmoRecord", "EmoVerseRecord", "MIKELS_8", "OPTION_SETS",
           "RecordError", "VAD_TASKS", "answer_body", "canonical_emotion", "check_pixel_count", "detect_option_set",
           "image_size", "infer_task", "parse_eemo", "parse_eemo_conversation", "parse_eemo_stage2", "parse_emoverse",
           "parse_options", "read_image", "resolve_image_path"]
