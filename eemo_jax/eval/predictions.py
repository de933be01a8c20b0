"""Prediction files: the EEmo-Bench leaderboard format, read, checked item by item, and written back.

The benchmark authors publish each model's results as a JSON list of questions with the model's raw
`response(MODEL)` and their judged `eval_result(MODEL)` (eemo_jax/eval/data/eemo_bench/leaderboard/). Keeping that
format for our own predictions means their files and ours go through one scorer (`eemo_bench.score`), and a
file we write can be compared with theirs line by line. Our writer extends it for the tasks the leaderboard
files lack (`Ranking`, `Assessment`, `Dominant`) and adds `parsed(MODEL)` / `correct(MODEL)` to scored items.

    file = read_predictions("EEmo-Bench(gpt-4o-pair).json", strict=False)   # file.model == "gpt-4o"
    metrics, scored = eemo_bench.score(file.items)
    write_predictions("scored.json", scored, file.model)

Every item is checked when read, so that a bad one fails with its id and field rather than as a wrong figure:
with `strict=True` the first malformed item raises its `RecordError`; with `strict=False` it is left out and
listed in `PredictionFile.skipped`. The benchmark's `options` may be a dict or the Python-literal string of
one (its own files: "{'A': 'No.', 'B': 'Yes.'}"), read with `ast.literal_eval`, never `eval`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import math
import numbers
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from data_pipeline import tasks
from data_pipeline.errors import DatasetError, InvalidFieldError, MissingFieldError, RecordError, UnknownLabelError
from eemo_jax import paths

YES_NO, WHAT_HOW, OPEN_ENDED = "Yes-or-No", "What/How", "Open_ended"
RANKING, ASSESSMENT, DOMINANT = "Ranking", "Assessment", "Dominant"
PERCEPTION_TYPES = (YES_NO, WHAT_HOW)
QUESTION_TYPES = (YES_NO, WHAT_HOW, OPEN_ENDED, RANKING, ASSESSMENT, DOMINANT)
JUDGE_RATINGS = 5  # an open-ended answer gets five judge ratings, each 0, 1 or 2
_MODEL_KEY_RE = re.compile(r"response\((.+)\)")
_IMAGE_KEY_RE = re.compile(r"image(\d+)_url")
# Fields with a meaning here; every other field of an item (image paths, labels) is kept and written back.
_KNOWN = ("id", "question", "options", "correct_answer", "question_type", "perceptual_dimension", "question_concern",
          "describing_dimension", "assessment_dimension", "dataset")


@dataclasses.dataclass(frozen=True)
class Prediction:
  """One question with one model's response, as the scorer needs it.

  `options`: letter -> text for Yes-or-No / What/How; the emotions offered (a tuple) for Ranking / Dominant;
  None otherwise. `correct_answer`: the letter; the reference text (Open_ended); the true top 3, strongest
  first (Ranking); the true score in [0, 1] (Assessment); the true emotion in the spelling of `options`
  (Dominant). `judged`: the file's `eval_result` (0/1, or the five 0-2 ratings of an open-ended answer).
  `parsed` / `correct`: what the scorer read from `response` and its verdict (None until scored).
  `extra`: the item's other fields, written back unchanged.
  """
  id: Any
  question_type: str
  response: str
  correct_answer: Any
  question: str = ""
  options: Mapping[str, str] | tuple[str, ...] | None = None
  images: tuple[str, ...] = ()
  perceptual_dimension: str | None = None
  question_concern: str | None = None
  describing_dimension: str | None = None
  assessment_dimension: str | None = None
  dataset: str | None = None
  judged: int | tuple[int, ...] | None = None
  invalid: int | None = None
  level_score: float | None = None
  parsed: Any = None
  correct: int | None = None
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def setting(self) -> str:
    """`pair` when the question is about two images (the item has `image2_url`), else `single`."""
    return "pair" if len(self.images) >= 2 else "single"


@dataclasses.dataclass(frozen=True)
class Skipped:
  """An item left out by `read_predictions(strict=False)`: its id, the field at fault, and the message."""
  id: Any
  field: str
  message: str


@dataclasses.dataclass(frozen=True)
class PredictionFile:
  model: str
  items: tuple[Prediction, ...]
  skipped: tuple[Skipped, ...] = ()


def read_predictions(source: str | os.PathLike | Sequence[Mapping], *, strict: bool = True) -> PredictionFile:
  """A prediction file (a path, or its already loaded list of items), every item checked.

  MODEL is read from the items' `response(MODEL)` key; a file holds one model. `strict=True` raises the first
  malformed item's `RecordError` (it names the id and the field); `strict=False` skips such items and lists
  them in `skipped`. A file that is not a list of items, or names no model or several, raises `DatasetError`.
  """
  where = "the items given"
  if isinstance(source, (str, os.PathLike)):
    where = os.fspath(source)
    source = load_items(source)
  elif isinstance(source, (str, bytes)) or not isinstance(source, Sequence) \
      or not all(isinstance(item, Mapping) for item in source):
    raise DatasetError(f"{where} is not a list of items (objects); give one object per question")
  model = model_of(source, where)
  items, skipped = [], []
  for index, raw in enumerate(source):
    try:
      items.append(prediction_from_item(raw, model, index=index))
    except RecordError as e:
      if strict:
        raise
      skipped.append(Skipped(_item_id(raw, index), e.field, str(e)))
  return PredictionFile(model=model, items=tuple(items), skipped=tuple(skipped))


def load_items(path: str | os.PathLike) -> list[dict]:
  """A prediction file's raw items (a JSON list of objects), unchecked."""
  where = os.fspath(path)
  try:
    items = json.loads(paths.read_text(where))
  except (OSError, json.JSONDecodeError) as e:
    raise DatasetError(f"cannot read the prediction file {where}: {e}. Give a JSON list of items in the "
                       "EEmo-Bench leaderboard format") from e
  if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
    raise DatasetError(f"{where} is not a JSON list of items (objects); write one object per question")
  return items


def prediction_from_item(raw: Mapping, model: str, *, index: int | None = None) -> Prediction:
  """One item of the file as a checked `Prediction`; a malformed field raises a `RecordError` naming it."""
  item_id = _item_id(raw, index)
  if not _given(raw.get("id")):
    raise MissingFieldError(str(item_id), "id", "missing", "give every item an id (the question's number)")
  label = str(item_id)
  question_type = raw.get("question_type")
  if question_type not in QUESTION_TYPES:
    raise UnknownLabelError(label, "question_type", f"{question_type!r} is not a question type",
                            f"use one of {', '.join(QUESTION_TYPES)}")
  response_key = f"response({model})"
  if response_key not in raw:
    raise MissingFieldError(label, response_key, "missing",
                            f"give every item the model's response under {response_key!r} (one model per file)")
  response = raw[response_key]
  if response is None:
    response = ""  # the model produced nothing: unparsed, and wrong
  if not isinstance(response, str):
    raise InvalidFieldError(label, response_key, f"{type(response).__name__} is not text",
                            "store the model's raw output as a string")
  fields = _TYPE_READERS[question_type](raw, label, model)
  extra = {k: v for k, v in raw.items() if k not in _KNOWN and not _model_field(k, model)
           and not _IMAGE_KEY_RE.fullmatch(k)}
  return Prediction(
      id=item_id, question_type=question_type, response=response,
      question=str(raw["question"]) if _given(raw.get("question")) else "",
      images=_images(raw), perceptual_dimension=_text(raw, "perceptual_dimension"),
      question_concern=_text(raw, "question_concern"), describing_dimension=_text(raw, "describing_dimension"),
      invalid=_flag(raw, f"if_invalid({model})", label), parsed=_parsed(raw.get(f"parsed({model})")),
      correct=_flag(raw, f"correct({model})", label), extra=extra, **fields)


def write_predictions(path: str | os.PathLike, predictions: PredictionFile | Sequence[Prediction],
                      model: str | None = None) -> None:
  """Write items in the leaderboard format, with `parsed(MODEL)` and `correct(MODEL)` where scored.

  `model` defaults to the file's; it is required for a plain sequence of items.
  """
  if isinstance(predictions, PredictionFile):
    model, predictions = model or predictions.model, predictions.items
  if not model:
    raise ValueError("write_predictions needs the model's name for the response(MODEL) keys: pass model=...")
  paths.write_text(os.fspath(path), json.dumps([to_item(p, model) for p in predictions], ensure_ascii=False,
                                               indent=1) + "\n")


def to_item(prediction: Prediction, model: str) -> dict:
  """The JSON object of one item (the inverse of `prediction_from_item`, plus the scorer's fields)."""
  p = prediction
  item: dict[str, Any] = {"id": p.id}
  item.update({f"image{i + 1}_url": url for i, url in enumerate(p.images)})
  item["question"] = p.question
  if p.options is not None:
    item["options"] = dict(p.options) if isinstance(p.options, Mapping) else list(p.options)
  item["correct_answer"] = list(p.correct_answer) if isinstance(p.correct_answer, tuple) else p.correct_answer
  item["question_type"] = p.question_type
  for name in ("perceptual_dimension", "question_concern", "describing_dimension", "assessment_dimension", "dataset"):
    if getattr(p, name) is not None:
      item[name] = getattr(p, name)
  item.update(p.extra)
  item[f"response({model})"] = p.response
  if p.judged is not None:
    item[f"eval_result({model})"] = list(p.judged) if isinstance(p.judged, tuple) else p.judged
  if p.invalid is not None:
    item[f"if_invalid({model})"] = p.invalid
  if p.level_score is not None:
    item[f"level_score({model})"] = p.level_score
  if p.parsed is not None or p.correct is not None:
    item[f"parsed({model})"] = list(p.parsed) if isinstance(p.parsed, tuple) else p.parsed
  if p.correct is not None:
    item[f"correct({model})"] = p.correct
  return item


# --------------------------------------------------------------------------------------------------
# Fields of each question type
# --------------------------------------------------------------------------------------------------


def _choice_fields(raw: Mapping, label: str, model: str) -> dict:
  options = _letter_options(raw.get("options"), label)
  answer = raw.get("correct_answer")
  letter = tasks.read_free_choice(str(answer), options) if _given(answer) else None
  if letter is None:
    raise InvalidFieldError(label, "correct_answer", f"{answer!r} is none of the options {options}",
                            "give the correct option's letter")
  return {"options": options, "correct_answer": letter, "judged": _flag(raw, f"eval_result({model})", label)}


def _open_ended_fields(raw: Mapping, label: str, model: str) -> dict:
  for name in ("question", "correct_answer", "describing_dimension"):
    if not _given(raw.get(name)) or not isinstance(raw[name], str):
      raise MissingFieldError(label, name, "missing or not text",
                              "an open-ended item needs its question, reference answer and describing_dimension")
  return {"correct_answer": raw["correct_answer"], "judged": _ratings(raw, f"eval_result({model})", label)}


def _ranking_fields(raw: Mapping, label: str, model: str) -> dict:
  options = _emotion_options(raw.get("options"), label)
  given = _literal(raw.get("correct_answer"))
  given = given.split(",") if isinstance(given, str) else given
  top3 = tuple(tasks.match_emotion(str(v), options) for v in given) \
      if isinstance(given, Sequence) and not isinstance(given, str) else ()
  if len(top3) != 3 or None in top3 or len(set(top3)) != 3:
    raise InvalidFieldError(label, "correct_answer", f"{raw.get('correct_answer')!r} is not three distinct "
                            f"emotions of the options {list(options)}", "give the true top 3, strongest first")
  return {"options": options, "correct_answer": top3}


def _assessment_fields(raw: Mapping, label: str, model: str) -> dict:
  dimension = raw.get("assessment_dimension")
  if dimension not in tasks.VAD_DIMENSIONS:
    raise UnknownLabelError(label, "assessment_dimension", f"{dimension!r} is not a V/A/D dimension",
                            f"use one of {', '.join(tasks.VAD_DIMENSIONS)}")
  return {"assessment_dimension": dimension, "correct_answer": _unit_score(raw, "correct_answer", label),
          "level_score": _unit_score(raw, f"level_score({model})", label, required=False)}


def _dominant_fields(raw: Mapping, label: str, model: str) -> dict:
  if not _given(raw.get("dataset")):
    raise MissingFieldError(label, "dataset", "missing", "name the data set the item comes from (artemis, ...)")
  options = _emotion_options(raw.get("options"), label)
  answer = raw.get("correct_answer")
  emotion = tasks.match_emotion(str(answer), options) if _given(answer) else None
  if emotion is None:
    raise InvalidFieldError(label, "correct_answer", f"{answer!r} is not among the options {list(options)}",
                            "give the true emotion from the item's options")
  return {"options": options, "correct_answer": emotion, "dataset": str(raw["dataset"]),
          "judged": _flag(raw, f"eval_result({model})", label)}


_TYPE_READERS = {YES_NO: _choice_fields, WHAT_HOW: _choice_fields, OPEN_ENDED: _open_ended_fields,
                 RANKING: _ranking_fields, ASSESSMENT: _assessment_fields, DOMINANT: _dominant_fields}


# --------------------------------------------------------------------------------------------------
# Field readers
# --------------------------------------------------------------------------------------------------


def model_of(items: Sequence[Mapping], where: str) -> str:
  """The one model whose `response(MODEL)` the items hold."""
  models = {m.group(1) for item in items for key in item if (m := _MODEL_KEY_RE.fullmatch(str(key)))}
  if len(models) != 1:
    found = f"found {sorted(models)}" if models else "no item has one"
    raise DatasetError(f"{where}: a prediction file holds one model's responses under 'response(MODEL)'; {found}. "
                       "Write one file per model")
  return models.pop()


def _item_id(raw: Mapping, index: int | None):
  """The item's id, or its position ("#3") when it has none, so that even an item without an id is named."""
  return raw["id"] if _given(raw.get("id")) else f"#{index}" if index is not None else "?"


def _model_field(key: str, model: str) -> bool:
  return key.endswith(f"({model})") and key.split("(", 1)[0] in ("response", "eval_result", "if_invalid",
                                                                 "level_score", "parsed", "correct")


def _literal(value):
  """A Python-literal string (the benchmark's "{'A': 'No.', ...}" or "['joy', ...]") as its value; other
  values, and strings that are no literal, as they are."""
  if isinstance(value, str) and value.strip()[:1] in ("{", "["):
    try:
      return ast.literal_eval(value.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
      return value
  return value


def _letter_options(value, label: str) -> dict[str, str]:
  options = _literal(value)
  if isinstance(options, Sequence) and not isinstance(options, str):
    options = {chr(ord("A") + i): v for i, v in enumerate(options)}
  if not isinstance(options, Mapping) or len(options) < 2 or not all(
      re.fullmatch(r"[A-Z]", str(k).strip().upper()) and isinstance(v, str) for k, v in options.items()):
    raise InvalidFieldError(label, "options", f"{value!r} is not a set of lettered options",
                            "give at least two options as {'A': 'text', 'B': 'text'} (or its string form)")
  return {str(k).strip().upper(): v for k, v in options.items()}


def _emotion_options(value, label: str) -> tuple[str, ...]:
  options = _literal(value)
  if isinstance(options, str):
    options = tasks.OPTION_SETS.get(options) or [o for o in options.split(",") if o.strip()]
  if isinstance(options, Mapping):
    options = list(options.values())
  if not isinstance(options, Sequence) or len(options) < 2 or not all(isinstance(o, str) for o in options):
    raise InvalidFieldError(label, "options", f"{value!r} is not a list of emotions",
                            "give the emotions offered as a list of strings")
  return tuple(o.strip() for o in options)


def _flag(raw: Mapping, key: str, label: str) -> int | None:
  """An optional 0/1 field (a verdict: 0, 1, a bool or the strings "0"/"1"); None when absent."""
  value = raw.get(key)
  if value is None:
    return None
  if isinstance(value, str) and value.strip() in ("0", "1"):
    return int(value.strip())
  if isinstance(value, numbers.Real) and value in (0, 1):
    return int(value)
  raise InvalidFieldError(label, key, f"{value!r} is not a 0/1 verdict", "give 1 (right) or 0 (wrong)")


def _parsed(value):
  """A scored file's `parsed(MODEL)` as the scorer set it (a ranking's list as a tuple)."""
  return tuple(value) if isinstance(value, list) else value


def _ratings(raw: Mapping, key: str, label: str) -> tuple[int, ...] | None:
  """An open-ended item's judge ratings: five integers 0-2 (or their strings); None when absent."""
  value = raw.get(key)
  if value is None:
    return None
  ratings = value if isinstance(value, Sequence) and not isinstance(value, str) else ()
  numbers_ = [_rating(v) for v in ratings]
  if len(numbers_) != JUDGE_RATINGS or None in numbers_:
    raise InvalidFieldError(label, key, f"{value!r} is not {JUDGE_RATINGS} ratings of 0, 1 or 2",
                            "give the judge's five ratings, or leave the field out to have the item judged")
  return tuple(numbers_)


def _rating(value) -> int | None:
  if isinstance(value, bool):
    return None
  text = str(value).strip()
  return int(text) if text in ("0", "1", "2") else None


def _unit_score(raw: Mapping, key: str, label: str, *, required: bool = True) -> float | None:
  value = raw.get(key)
  if value is None and not required:
    return None
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
      or not 0.0 <= value <= 1.0:
    raise InvalidFieldError(label, key, f"{value!r} is not a score in [0, 1]",
                            "rescale SAM 1-9 means to [0, 1] with (x - 1) / 8")
  return float(value)


def _images(raw: Mapping) -> tuple[str, ...]:
  numbered = sorted((int(m.group(1)), str(v)) for k, v in raw.items()
                    if (m := _IMAGE_KEY_RE.fullmatch(str(k))) and _given(v))
  return tuple(url for _, url in numbered)


def _text(raw: Mapping, key: str) -> str | None:
  return str(raw[key]) if _given(raw.get(key)) else None


def _given(value) -> bool:
  return value is not None and not (isinstance(value, str) and not value.strip())
