"""What an evaluation leaves in `--out`: metrics.json (flat dotted names), predictions.json (every item with
its parse and verdict, in the leaderboard format), report.md and the plots it shows."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

import numpy as np

from eemo_jax import paths
from eemo_jax.eval import plots as plotlib
from eemo_jax.eval.report import markdown_report

HEADLINES = ("perception.single.overall.accuracy", "perception.pair.overall.accuracy", "perception.judged_agreement",
             "ranking.emotion_score", "assessment.mean.srcc", "assessment.level.mean.srcc",
             "description.pair.overall.score", "description.single.overall.score", "emoverse.ces.accuracy",
             "emoverse.ces.macro_f1", "emoverse.answer.accuracy")


def write_outputs(out_dir: str, items: list[dict], metrics: Mapping[str, float], *, model: str,
                  extra: Mapping[str, float] | None = None, run_dir: str | None = None) -> dict[str, str]:
  """Writes the folder; returns the paths written by name (metrics, predictions, report, and each plot).

  A bucket `out_dir` is written as a local folder first (matplotlib saves to real files), then uploaded.
  """
  out_dir = paths.absolute(out_dir)
  with paths.local_folder(out_dir) as local:
    written = {"metrics": os.path.join(local, "metrics.json"), "predictions": os.path.join(local, "predictions.json"),
               "report": os.path.join(local, "report.md")}
    flat = {k: _number(v) for k, v in {**metrics, **(extra or {})}.items()}
    _write_json(written["metrics"], dict(sorted(flat.items())))
    _write_json(written["predictions"], [_plain(i) for i in items])
    plots = _plots(local, items, metrics, model, run_dir)
    written.update(plots)
    report = markdown_report(metrics, model=model, title=f"Evaluation of {model}",
                             plots={name: os.path.relpath(p, local) for name, p in plots.items()})
    with open(written["report"], "w") as f:
      f.write(report)
  return {name: paths.join(out_dir, os.path.relpath(p, local)) for name, p in written.items()}


def headline(metrics: Mapping[str, float]) -> str:
  """The few figures a terminal shows, as `name value` lines (the rest is in metrics.json)."""
  lines = []
  for name in HEADLINES:
    if name in metrics and not _is_nan(metrics[name]):
      low, high = metrics.get(f"{name}.ci95_low"), metrics.get(f"{name}.ci95_high")
      ci = f"  [{low:.4f}, {high:.4f}]" if low is not None and high is not None else ""
      lines.append(f"  {name} {metrics[name]:.4f}{ci}")
  return "\n".join(lines) or "  (no headline metric: see metrics.json)"


def _plots(out_dir: str, items: list[dict], metrics: Mapping[str, float], model: str, run_dir: str | None) -> dict:
  from eemo_jax.eval import emoverse
  plots = {}
  ces = [i for i in items if i.get("question_type") == "CES"]
  if ces:
    confusion, labels = emoverse.confusion(ces, model)
    plots["emoverse.confusion"] = plotlib.confusion_matrix_png(
        os.path.join(out_dir, "confusion_matrix.png"), confusion, [label.capitalize() for label in labels],
        f"CES confusion ({'head' if all('head_probs' in i for i in ces) else 'generated answers'})")
  vad = _vad_pairs(items, model, f"parsed({model})")
  if vad:
    plots["assessment.scatter"] = plotlib.vad_scatter_png(os.path.join(out_dir, "vad_scatter.png"), vad,
                                                          title="V/A/D: parsed scores against the human mean")
  level = _vad_pairs(items, model, f"level_score({model})")
  if level:
    plots["assessment.level_scatter"] = plotlib.vad_scatter_png(
        os.path.join(out_dir, "vad_level_scatter.png"), level, title="V/A/D: level-word probability scores")
  for setting in ("single", "pair"):
    prefix = f"perception.{setting}.dimension."
    groups = {k[len(prefix):-len(".accuracy")].replace("_", " ").capitalize(): v for k, v in metrics.items()
              if k.startswith(prefix) and k.endswith(".accuracy")}
    if groups:
      plots[f"perception.{setting}.by_dimension"] = plotlib.accuracy_by_group_png(
          os.path.join(out_dir, f"perception_{setting}_by_dimension.png"), groups,
          f"Perception accuracy by dimension ({setting})")
  if run_dir and paths.exists(paths.join(run_dir, "metrics.jsonl")):
    plots["training_curves"] = plotlib.training_curves_png(os.path.join(out_dir, "training_curves.png"),
                                                           paths.join(run_dir, "metrics.jsonl"))
  return plots


def _vad_pairs(items: list[dict], model: str, key: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  pairs: dict[str, tuple[list, list]] = {}
  for item in items:
    if item.get("question_type") == "Assessment" and key in item:
      true, pred = pairs.setdefault(item["assessment_dimension"], ([], []))
      true.append(float(item["correct_answer"]))
      pred.append(float(item[key]) if isinstance(item[key], (int, float)) else math.nan)
  return {dim: (np.asarray(t), np.asarray(p)) for dim, (t, p) in pairs.items()}


def _plain(value):
  """JSON-ready: numpy scalars and arrays to Python, tuples to lists, NaN kept (JSON's NaN, as Python writes it)."""
  if isinstance(value, Mapping):
    return {str(k): _plain(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain(v) for v in value]
  if isinstance(value, np.ndarray):
    return _plain(value.tolist())
  if isinstance(value, np.generic):
    return value.item()
  return value


def _number(value) -> float | int | None:
  value = value.item() if isinstance(value, np.generic) else value
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, (int, float)):
    return None if isinstance(value, float) and math.isnan(value) else value
  raise TypeError(f"metrics.json holds numbers only, got {type(value).__name__}: {value!r}")


def _is_nan(value) -> bool:
  return value is None or (isinstance(value, float) and math.isnan(value))


def _write_json(path: str, value) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)
