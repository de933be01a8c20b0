"""EEmo-Bench scoring: one model's predictions -> the flat metrics of the evaluation contract, and per-item verdicts.

Each response is read with the project's one answer parser (`data_pipeline.tasks`), the parser the GRPO rewards
use: a choice by `tasks.read_free_choice` (which reads an `<answer>` block when there is one, else the free
text), the other tasks' values by `tasks.read_answer_value` on the `<answer>` content (its `Key:` dropped) or
on the free text. An answer it cannot read counts as wrong, and is counted (`unparsed`), so a model is not
rewarded for answering off-format. The benchmark authors' own verdicts (`eval_result`), where a file has
them, are compared with ours (`perception.judged_agreement`) rather than used, except for the open-ended
judge ratings, which no parser can replace: those come from the file, or from a `judge` callable.

    file = predictions.read_predictions(path, strict=False)
    metrics, scored = score(file.items, judge=None)     # metrics["perception.pair.overall.accuracy"], ...

Metric names and definitions follow the contract (fractions, not percents): perception accuracy by question
type, perceptual dimension and question concern, with `overall` the mean of the yes/no and what/how
accuracies (the benchmark's table); description scores sum(ratings) / 10 averaged per describing dimension;
the ranking Emotion Score (0-100, `metrics.ranking_score`); V/A/D SRCC/PLCC over the items whose score was
read; dominant-emotion accuracy and F1 per data set. Headline figures get bootstrap 95% intervals.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from data_pipeline import tasks
from data_pipeline.bench_records import NO_REFERENCE_ANSWER
from eemo_jax.eval import metrics as M
from eemo_jax.eval.predictions import (ASSESSMENT, DOMINANT, JUDGE_RATINGS, OPEN_ENDED, PERCEPTION_TYPES, RANKING,
                                       YES_NO, Prediction, PredictionFile)

Judge = Callable[[str, str, str], Sequence[int]]  # (question, reference, response) -> five ratings 0-2
SETTINGS = ("single", "pair")


def score(items: Sequence[Prediction] | PredictionFile, *, n_resamples: int = 1000, judge: Judge | None = None,
          seed: int = 0) -> tuple[dict[str, float], list[Prediction]]:
  """(metrics, scored items): the flat metrics of every task present, and each item with `parsed` and `correct`.

  Open-ended items without ratings are rated by `judge(question, reference, response)` when given (the
  ratings go into the scored item's `judged`) and left out of the description scores otherwise (counted in
  `description.S.unjudged`). `n_resamples` and `seed` set the bootstrap of the 95% intervals.
  """
  if isinstance(items, PredictionFile):
    items = items.items
  scored = [_score_item(p, judge) for p in items]
  ci = {"n_resamples": n_resamples, "seed": seed}
  out: dict[str, float] = {}
  for setting in SETTINGS:
    _perception(out, [p for p in scored if p.question_type in PERCEPTION_TYPES and p.setting == setting],
                setting, ci)
    _description(out, [p for p in scored if p.question_type == OPEN_ENDED and p.setting == setting], setting, ci)
  judged = [p for p in scored if p.question_type in PERCEPTION_TYPES and p.judged is not None]
  if judged:
    out["perception.judged_agreement"] = M.accuracy([p.correct == p.judged for p in judged])
    out["perception.judged_n"] = len(judged)
  _ranking(out, [p for p in scored if p.question_type == RANKING], ci)
  _assessment(out, [p for p in scored if p.question_type == ASSESSMENT], ci)
  _dominant(out, [p for p in scored if p.question_type == DOMINANT], ci)
  return out, scored


def read_response(prediction: Prediction):
  """What the parser reads from one response: the option letter, the (up to 3) ranked emotions, the score in
  [0, 1] or the emotion, in the options' spelling; None when it reads nothing (and for open-ended items)."""
  p = prediction
  if p.question_type in PERCEPTION_TYPES:
    return tasks.read_free_choice(p.response, p.options, question=p.question)
  if p.question_type == RANKING:
    return _answer_value(p.response, "emotion_ranking", p.options, partial=True)
  if p.question_type == ASSESSMENT:
    return _answer_value(p.response, p.assessment_dimension)
  if p.question_type == DOMINANT:
    return _answer_value(p.response, "dominant_emotion", p.options)
  return None


def slug(name: str) -> str:
  """A metric-name part: lower case, each run of non-alphanumerics one `_` ("Emotion perception" ->
  "emotion_perception")."""
  return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


# --------------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------------


def _score_item(p: Prediction, judge: Judge | None) -> Prediction:
  if p.question_type == OPEN_ENDED:
    if p.judged is None and judge is not None and p.correct_answer != NO_REFERENCE_ANSWER:
      return dataclasses.replace(p, judged=_judge_ratings(p, judge))  # no reference: nothing to judge against
    return p
  parsed = read_response(p)
  if p.question_type in PERCEPTION_TYPES or p.question_type == DOMINANT:
    correct = int(parsed == p.correct_answer)
  elif p.question_type == RANKING:
    correct = int(bool(parsed) and parsed[0] == p.correct_answer[0])  # top-1 hit
  else:
    correct = None  # a score has no right or wrong; its correlation with the truth is the metric
  return dataclasses.replace(p, parsed=parsed, correct=correct)


def _answer_value(response: str, task: str, options=None, *, partial: bool = False):
  """One task's value from an `<answer>Key: value</answer>` (as `tasks.parse_answer` reads it), or from the
  answer block's content or the free text when the key is absent. Another task's key reads as nothing."""
  content = tasks.answer_content(response)
  text = (response if content is None else content).strip()
  key, colon, value = text.partition(":")
  if colon and key.strip().lower() == tasks.ANSWER_KEYS[task].lower():
    text = value.strip()
  return tasks.read_answer_value(task, text, options=options, partial=partial)


def _judge_ratings(p: Prediction, judge: Judge) -> tuple[int, ...]:
  ratings = tuple(judge(p.question, str(p.correct_answer), p.response))
  if len(ratings) != JUDGE_RATINGS or not all(
      not isinstance(r, bool) and isinstance(r, (int, np.integer)) and 0 <= r <= 2 for r in ratings):
    raise ValueError(f"the judge rated item {p.id!r} {ratings!r}: a judge must return {JUDGE_RATINGS} integer "
                     "ratings of 0, 1 or 2")
  return tuple(int(r) for r in ratings)


# --------------------------------------------------------------------------------------------------
# Metrics per task
# --------------------------------------------------------------------------------------------------


def _perception(out: dict, rows: list[Prediction], setting: str, ci: dict) -> None:
  if not rows:
    return
  name = f"perception.{setting}"
  correct = np.array([p.correct for p in rows], np.float64)  # (items,)
  yes_no = np.array([p.question_type == YES_NO for p in rows])  # (items,)
  M.with_ci(out, f"{name}.yes_no.accuracy", M.accuracy, correct[yes_no], **ci)
  M.with_ci(out, f"{name}.what_how.accuracy", M.accuracy, correct[~yes_no], **ci)
  M.with_ci(out, f"{name}.overall.accuracy", _mean_of_type_accuracies, correct, yes_no, **ci)
  out[f"{name}.n"] = len(rows)
  out[f"{name}.unparsed"] = sum(p.parsed is None for p in rows)
  for kind, field in (("dimension", "perceptual_dimension"), ("concern", "question_concern")):
    for group in sorted({getattr(p, field) for p in rows} - {None}):
      mask = np.array([getattr(p, field) == group for p in rows])
      M.with_ci(out, f"{name}.{kind}.{slug(group)}.accuracy", M.accuracy, correct[mask], **ci)


def _mean_of_type_accuracies(correct: np.ndarray, yes_no: np.ndarray) -> float:
  """The benchmark's overall perception accuracy: the mean of the yes/no and the what/how accuracies."""
  return (M.accuracy(correct[yes_no]) + M.accuracy(correct[~yes_no])) / 2.0


def _description(out: dict, rows: list[Prediction], setting: str, ci: dict) -> None:
  if not rows:
    return
  name = f"description.{setting}"
  judged = [p for p in rows if p.judged is not None]
  out[f"{name}.n"] = len(judged)
  out[f"{name}.unjudged"] = len(rows) - len(judged)
  if not judged:
    return
  scores = np.array([sum(p.judged) / (2.0 * JUDGE_RATINGS) for p in judged])  # (items,) in [0, 1]
  dimensions = np.array([p.describing_dimension for p in judged])
  for dimension in sorted(set(dimensions.tolist())):
    M.with_ci(out, f"{name}.{slug(dimension)}.score", _mean, scores[dimensions == dimension], **ci)
  M.with_ci(out, f"{name}.overall.score", _mean, scores, **ci)


def _ranking(out: dict, rows: list[Prediction], ci: dict) -> None:
  if not rows:
    return
  true = np.array([[p.options.index(e) for e in p.correct_answer] for p in rows], np.int32)  # (items, 3)
  pred = np.full_like(true, M.UNPARSED)  # (items, 3): -1 where fewer than 3 emotions were read
  for i, p in enumerate(rows):
    found = [p.options.index(e) for e in (p.parsed or ())]
    pred[i, :len(found)] = found
  M.with_ci(out, "ranking.emotion_score", _mean, M.ranking_score(pred, true), **ci)
  out["ranking.top1_hit"] = M.accuracy(pred[:, 0] == true[:, 0])
  out["ranking.n"] = len(rows)
  out["ranking.unparsed"] = sum(p.parsed is None for p in rows)


def _assessment(out: dict, rows: list[Prediction], ci: dict) -> None:
  """SRCC/PLCC per dimension over the items whose score was read (an unread score has no rank); `unparsed`
  counts the others. `mean` is the mean over the dimensions present, its interval resampled jointly."""
  if not rows:
    return
  for prefix, value in (("assessment", lambda p: p.parsed), ("assessment.level", lambda p: p.level_score)):
    read = [p for p in rows if value(p) is not None]
    if prefix == "assessment":
      for dimension in tasks.VAD_DIMENSIONS:
        of_dimension = [p for p in rows if p.assessment_dimension == dimension]
        if of_dimension:
          out[f"assessment.{dimension}.n"] = len(of_dimension)
          out[f"assessment.{dimension}.unparsed"] = sum(p.parsed is None for p in of_dimension)
    if not read:
      continue
    true = np.array([p.correct_answer for p in read], np.float64)  # (items,)
    pred = np.array([value(p) for p in read], np.float64)  # (items,)
    dimension_ids = np.array([tasks.VAD_DIMENSIONS.index(p.assessment_dimension) for p in read])  # (items,)
    for d in sorted(set(dimension_ids.tolist())):
      mask = dimension_ids == d
      for metric, fn in (("srcc", M.srcc), ("plcc", M.plcc)):
        M.with_ci(out, f"{prefix}.{tasks.VAD_DIMENSIONS[d]}.{metric}", fn, true[mask], pred[mask], **ci)
    for metric, fn in (("srcc", M.srcc), ("plcc", M.plcc)):
      M.with_ci(out, f"{prefix}.mean.{metric}", _mean_over_dimensions(fn), true, pred, dimension_ids, **ci)


def _mean_over_dimensions(correlation: Callable[..., float]) -> Callable[..., float]:
  def statistic(true: np.ndarray, pred: np.ndarray, dimension_ids: np.ndarray) -> float:
    return float(np.mean([correlation(true[dimension_ids == d], pred[dimension_ids == d])
                          for d in np.unique(dimension_ids)]))
  return statistic


def _dominant(out: dict, rows: list[Prediction], ci: dict) -> None:
  for dataset in sorted({p.dataset for p in rows}):
    of_dataset = [p for p in rows if p.dataset == dataset]
    labels = list(dict.fromkeys(e for p in of_dataset for e in p.options))  # the options offered, first seen first
    true = np.array([labels.index(p.correct_answer) for p in of_dataset])  # (items,)
    pred = np.array([M.UNPARSED if p.parsed is None else labels.index(p.parsed) for p in of_dataset])  # (items,)
    name = f"dominant.{slug(dataset)}"
    for metric in ("accuracy", "macro_f1", "weighted_f1"):
      statistic = lambda t, q, metric=metric: M.classification_metrics(t, q, labels)[metric]  # noqa: E731
      M.with_ci(out, f"{name}.{metric}", statistic, true, pred, **ci)
    out[f"{name}.n"] = len(of_dataset)
    out[f"{name}.unparsed"] = int(np.sum(pred == M.UNPARSED))


def _mean(values: np.ndarray) -> float:
  values = np.asarray(values, np.float64)
  return float(values.mean()) if values.size else math.nan
