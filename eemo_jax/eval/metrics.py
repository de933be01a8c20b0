"""Numeric metrics of evaluation: pure functions of numpy arrays, one number (or one column) per call.

The benchmark code (`eemo_bench`, `emoverse`) turns prediction files into arrays and names the results; the
formulas live here once, so a figure in a report and its confidence interval come from the same function.
Every headline figure gets a percentile-bootstrap interval over items (`with_ci`), because the benchmark's
splits are small (hundreds of questions) and a one-point difference between models is often noise.

    metrics = {}
    with_ci(metrics, "perception.single.yes_no.accuracy", accuracy, pred == true)
    with_ci(metrics, "assessment.valence.srcc", srcc, true_scores, pred_scores)
    # metrics["assessment.valence.srcc"], [...".ci95_low"], [...".ci95_high"]

Conventions: an unparsed prediction is -1 (class ids) or NaN (scores, boxes) and counts as wrong; a metric
with nothing to measure (no items, a constant column) is NaN rather than a made-up 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from eemo_jax.rl import rewards

UNPARSED = -1


def accuracy(correct) -> float:
  """Mean of a bool / 0-1 array; NaN for an empty one."""
  correct = np.asarray(correct, np.float64).reshape(-1)
  return float(correct.mean()) if correct.size else float("nan")


def srcc(x, y) -> float:
  """Spearman rank correlation: Pearson's r of the average ranks (ties share their mean rank, as
  `scipy.stats.spearmanr`). NaN with fewer than 2 items, a constant column or a NaN entry."""
  x, y = _paired_columns(x, y)
  if x.size < 2 or np.isnan(x).any() or np.isnan(y).any():
    return float("nan")
  return plcc(_average_ranks(x), _average_ranks(y))


def plcc(x, y) -> float:
  """Pearson linear correlation. NaN with fewer than 2 items, a constant column or a NaN entry."""
  x, y = _paired_columns(x, y)
  if x.size < 2 or np.isnan(x).any() or np.isnan(y).any() or np.all(x == x[0]) or np.all(y == y[0]):
    return float("nan")
  dx, dy = x - x.mean(), y - y.mean()
  r = np.sum(dx * dy) / np.sqrt(np.sum(dx * dx) * np.sum(dy * dy))
  return float(np.clip(r, -1.0, 1.0))


def _paired_columns(x, y) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
  if x.shape != y.shape:
    raise ValueError(f"a correlation needs paired columns: got {x.size} and {y.size} items; pass one prediction "
                     "per ground-truth item")
  return x, y


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """(N,) 1-based ranks, tied values sharing the mean of the ranks they span."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  last_rank = np.cumsum(counts)  # (groups,): the highest rank each group of equal values spans
  return (last_rank - (counts - 1) / 2.0)[inverse]


def bootstrap_ci(statistic: Callable[..., float], *arrays, n_resamples: int = 1000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
  """Percentile-bootstrap interval of `statistic(*arrays)` over items.

  Each resample draws N item indices with replacement and applies the same indices to every array (their
  first axis), so paired columns stay paired. Resamples whose statistic is NaN (e.g. a constant column for a
  correlation) are dropped; (NaN, NaN) when none is left or there are no items. Deterministic per `seed`.
  """
  if not arrays:
    raise ValueError("bootstrap_ci needs at least one array to resample")
  if not 0.0 < confidence < 1.0:
    raise ValueError(f"confidence {confidence}: give a level in (0, 1), e.g. 0.95")
  arrays = [np.asarray(a) for a in arrays]
  n = arrays[0].shape[0] if arrays[0].ndim else 0
  if any((a.shape[0] if a.ndim else 0) != n for a in arrays):
    raise ValueError(f"bootstrap_ci resamples items of paired arrays: their first axes differ "
                     f"({[a.shape for a in arrays]}); give one row per item in each")
  if n == 0:
    return float("nan"), float("nan")
  indices = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))  # (resamples, N)
  values = np.array([statistic(*(a[rows] for a in arrays)) for rows in indices], np.float64)  # (resamples,)
  values = values[~np.isnan(values)]
  if values.size == 0:
    return float("nan"), float("nan")
  tail = (1.0 - confidence) / 2.0 * 100.0
  low, high = np.percentile(values, [tail, 100.0 - tail])
  return float(low), float(high)


def with_ci(metrics: dict, name: str, statistic: Callable[..., float], *arrays, **kw) -> None:
  """Set `metrics[name] = statistic(*arrays)` and its bootstrap interval (`bootstrap_ci`, keywords passed on)
  as `name.ci95_low` / `name.ci95_high` (the digits follow `confidence`)."""
  level = round(kw.get("confidence", 0.95) * 100)
  metrics[name] = float(statistic(*arrays))
  metrics[f"{name}.ci{level}_low"], metrics[f"{name}.ci{level}_high"] = bootstrap_ci(statistic, *arrays, **kw)


def ranking_score(pred_ids, true_ids) -> np.ndarray:
  """(N,) float64 in [0, 100]: hit + Kendall score of (N, 3) predicted vs true emotion ids (strongest first,
  -1 missing): `eemo_jax.rl.rewards.ranking_score`, the GRPO ranking reward before its square, so training
  and evaluation score rankings by one formula."""
  pred_ids = np.asarray(pred_ids, np.int32).reshape(-1, 3)  # (N, 3)
  true_ids = np.asarray(true_ids, np.int32).reshape(-1, 3)  # (N, 3)
  if pred_ids.shape != true_ids.shape:
    raise ValueError(f"{len(pred_ids)} predicted rankings for {len(true_ids)} true ones: give one per item")
  if not len(pred_ids):
    return np.zeros(0, np.float64)
  return np.asarray(rewards.ranking_score(pred_ids, true_ids), np.float64)


def confusion_matrix(true, pred, num_classes: int) -> np.ndarray:
  """(classes, classes) int64 counts indexed [true, pred]. Unparsed predictions (-1) have no column: count them
  apart (`classification_metrics` reports them as `unparsed`)."""
  true, pred = _class_ids(true, pred, num_classes)
  parsed = pred != UNPARSED
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (true[parsed], pred[parsed]), 1)
  return matrix


def classification_metrics(true, pred, labels: Sequence[str]) -> dict[str, float]:
  """Flat metrics of a single-label classification: `accuracy`, `macro_f1`, `weighted_f1`, `unparsed` (count)
  and per class `class.<label>.precision|recall|f1|support`.

  `true` and `pred` are class ids into `labels` (pred -1 = unparsed) or the label strings themselves (a
  prediction that is not a label is unparsed). Unparsed predictions count as wrong: they lower recall, not
  precision. A precision or recall with a zero denominator is 0 (scikit-learn's `zero_division=0`); the macro
  mean runs over the classes that occur in the truth or the parsed predictions, as scikit-learn's default.
  """
  labels = [str(label) for label in labels]
  true, pred = _label_ids(true, labels, is_truth=True), _label_ids(pred, labels, is_truth=False)
  matrix = confusion_matrix(true, pred, len(labels)).astype(np.float64)  # (C, C)
  hits = np.diag(matrix)  # (C,)
  support = np.bincount(true, minlength=len(labels)).astype(np.float64)  # (C,): unparsed rows included
  predicted = matrix.sum(axis=0)  # (C,)
  precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
  recall = np.divide(hits, support, out=np.zeros_like(hits), where=support > 0)
  f1 = np.divide(2 * precision * recall, precision + recall, out=np.zeros_like(hits), where=precision + recall > 0)
  present = (support > 0) | (predicted > 0)
  out = {
      "accuracy": accuracy(true == pred),
      "macro_f1": float(f1[present].mean()) if present.any() else float("nan"),
      "weighted_f1": float(np.sum(f1 * support) / support.sum()) if support.sum() else float("nan"),
      "unparsed": float(np.sum(pred == UNPARSED)),
  }
  for i, label in enumerate(labels):
    out[f"class.{label}.precision"] = float(precision[i])
    out[f"class.{label}.recall"] = float(recall[i])
    out[f"class.{label}.f1"] = float(f1[i])
    out[f"class.{label}.support"] = float(support[i])
  return out


def _label_ids(values, labels: list[str], *, is_truth: bool) -> np.ndarray:
  values = np.asarray(values)
  if values.dtype.kind not in "USO":
    return values.astype(np.int64).reshape(-1)
  index = {label: i for i, label in enumerate(labels)}
  if is_truth:
    unknown = sorted({str(v) for v in values.reshape(-1)} - set(index))
    if unknown:
      raise ValueError(f"true labels {unknown} are not among {labels}: pass the full label set")
  return np.array([index.get(str(v), UNPARSED) for v in values.reshape(-1)], np.int64)


def _class_ids(true, pred, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  true, pred = np.asarray(true, np.int64).reshape(-1), np.asarray(pred, np.int64).reshape(-1)
  if true.shape != pred.shape:
    raise ValueError(f"{pred.size} predictions for {true.size} true labels: give one prediction per item")
  if true.size and (true.min() < 0 or true.max() >= num_classes):
    raise ValueError(f"true class ids must lie in [0, {num_classes}); got {sorted(set(true.tolist()))}")
  if pred.size and (pred.min() < UNPARSED or pred.max() >= num_classes):
    raise ValueError(f"predicted class ids must lie in [0, {num_classes}) or be -1 (unparsed); got "
                     f"{sorted(set(pred.tolist()))}")
  return true, pred


def top_k_accuracy(probs, true, k: int) -> float:
  """Fraction of items whose true class is among the k most probable of `probs` (N, C); ties go to the lower
  class id. NaN for no items."""
  probs, true = np.asarray(probs, np.float64), np.asarray(true, np.int64).reshape(-1)
  if probs.ndim != 2 or probs.shape[0] != true.size:
    raise ValueError(f"top_k_accuracy needs probs of shape (N, C) with N = {true.size} true labels; got "
                     f"{probs.shape}")
  if k < 1:
    raise ValueError(f"k = {k}: give k >= 1")
  top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
  return accuracy(np.any(top == true[:, None], axis=1))


def box_iou(a, b) -> np.ndarray:
  """(N,) intersection over union of (N, 4) boxes `x1 y1 x2 y2` row by row. A degenerate box (zero or negative
  width or height, or NaN: an unparsed box) scores 0."""
  a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)  # (N, 4)
  if a.shape != b.shape:
    raise ValueError(f"{len(a)} boxes against {len(b)}: give one predicted box per true box")
  proper = (a[:, 2] > a[:, 0]) & (a[:, 3] > a[:, 1]) & (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])  # (N,)
  width = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0.0, None)
  height = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0.0, None)
  inter = width * height  # (N,)
  union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
  return np.where(proper, np.divide(inter, union, out=np.zeros_like(inter), where=proper & (union > 0)), 0.0)


def cosine_similarity(a, b) -> np.ndarray:
  """(N,) cosine of (N, D) vectors row by row; 0 where either vector is zero (it has no direction) or NaN
  (unparsed), so a missing prediction scores as a miss."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)  # (N, D)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"cosine_similarity needs two (N, D) arrays of one shape; got {a.shape} and {b.shape}")
  norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)  # (N,)
  dots = np.sum(a * b, axis=1)
  return np.divide(dots, norms, out=np.zeros_like(dots), where=norms > 0)


__all__ = ["UNPARSED", "accuracy", "bootstrap_ci", "box_iou", "classification_metrics", "confusion_matrix",
           "cosine_similarity", "plcc", "ranking_score", "srcc", "top_k_accuracy", "with_ci"]
