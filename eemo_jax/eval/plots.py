"""PNG figures of an evaluation and of a training run, one file per function.

Each function draws on its own figure of a fixed size and dpi (the pixel sizes are the `*_PIXELS` constants,
so a report can lay them out and tests can check them), writes the PNG, closes the figure and returns the
path. The Agg backend is forced at import: evaluation runs on headless TPU/GPU hosts where an interactive
backend would fail to start.

    plots.confusion_matrix_png("out/plots/dominant_artphoto.png", matrix, labels, "ArtPhoto dominant emotion")
    plots.vad_scatter_png("out/plots/assessment.png", {"valence": (true, pred), ...})
    plots.accuracy_by_group_png("out/plots/perception_dimension.png", {"Emotion perception": 0.71, ...}, "…")
    plots.training_curves_png("out/plots/training.png", "runs/sft/metrics.jsonl")
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from eemo_jax import paths  # noqa: E402
from eemo_jax.eval import metrics  # noqa: E402

DPI = 100
CONFUSION_SIZE = (9.0, 8.0)  # inches
VAD_SIZE = (15.0, 6.0)
GROUPS_SIZE = (9.0, 6.0)
CURVES_SIZE = (15.0, 9.0)
CONFUSION_PIXELS, VAD_PIXELS, GROUPS_PIXELS, CURVES_PIXELS = (
    (round(w * DPI), round(h * DPI)) for w, h in (CONFUSION_SIZE, VAD_SIZE, GROUPS_SIZE, CURVES_SIZE))
VAD_ORDER = ("valence", "arousal", "dominance")


def confusion_matrix_png(path: str, confusion, labels: Sequence[str], title: str, *, unparsed=None) -> str:
  """A (classes, classes) `[true, pred]` count matrix: each cell shows its count, coloured by its share of the
  true class's row (so rare classes read as clearly as common ones). `unparsed` (classes,) counts of each
  true class's unreadable answers adds a grey last column; rows are normalised over it too."""
  counts = np.asarray(confusion, np.int64)  # (C, C)
  if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] != len(labels):
    raise ValueError(f"confusion matrix of shape {counts.shape} for {len(labels)} labels: give a square "
                     "[true, pred] matrix with one row per label")
  columns = [str(label) for label in labels]
  if unparsed is not None:
    counts = np.concatenate([counts, np.asarray(unparsed, np.int64).reshape(-1, 1)], axis=1)  # (C, C + 1)
    columns.append("(unparsed)")
  totals = counts.sum(axis=1, keepdims=True)  # (C, 1)
  shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)  # (C, C or C + 1)
  figure, axes = plt.subplots(figsize=CONFUSION_SIZE, dpi=DPI, layout="constrained")
  image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto")
  if unparsed is not None:  # the unparsed column in grey, apart from the emotion classes
    grey = np.ma.masked_array(shares, mask=np.ones_like(shares, bool))
    grey.mask[:, -1] = False
    axes.imshow(grey, cmap="Greys", vmin=0.0, vmax=1.5, aspect="auto")
  size = len(labels)
  font = max(5.0, min(10.0, 130.0 / max(size, 1)))
  for row in range(size):
    for col in range(len(columns)):
      if counts[row, col] or row == col:
        text = f"{counts[row, col]}" if size > 10 else f"{counts[row, col]}\n{shares[row, col]:.0%}"
        axes.text(col, row, text, ha="center", va="center", fontsize=font,
                  color="white" if shares[row, col] > 0.55 else "black")
  ticks = max(7.0, font + 1)
  axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right", rotation_mode="anchor", fontsize=ticks)
  axes.set_yticks(range(size), [f"{label} ({total})" for label, total in zip(labels, totals[:, 0])], fontsize=ticks)
  axes.set_xlabel("predicted")
  axes.set_ylabel("true (items)")
  axes.set_title(title)
  figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true class")
  return _save(figure, path)


def vad_scatter_png(path: str, scores: Mapping[str, tuple], *, title: str | None = None) -> str:
  """Predicted against true score, one panel per V/A/D dimension given (`{dim: (true, pred)}`, in [0, 1]),
  with the y = x line and the SRCC / PLCC over the readable predictions in each title; unreadable (NaN)
  predictions are left out of the panel and counted in its title."""
  dims = [d for d in VAD_ORDER if d in scores] + [d for d in scores if d not in VAD_ORDER]
  if not dims:
    raise ValueError("vad_scatter_png needs at least one dimension: {'valence': (true, pred), ...}")
  figure, panels = plt.subplots(1, len(dims), figsize=VAD_SIZE, dpi=DPI, layout="constrained", squeeze=False)
  for axes, dim in zip(panels[0], dims):
    true, pred = (np.asarray(v, np.float64).reshape(-1) for v in scores[dim])  # (N,) each
    readable = np.isfinite(true) & np.isfinite(pred)
    true, pred, missing = true[readable], pred[readable], int(np.sum(~readable))
    low = min(0.0, true.min(), pred.min()) if true.size else 0.0  # scores live in [0, 1]; show any outside
    high = max(1.0, true.max(), pred.max()) if true.size else 1.0
    axes.plot([low, high], [low, high], color="0.4", linestyle="--", linewidth=1, label="y = x")
    axes.scatter(true, pred, s=10, alpha=min(0.8, max(0.15, 60.0 / max(true.size, 1))), color="tab:blue",
                 edgecolors="none")
    axes.set_xlim(low, high)
    axes.set_ylim(low, high)
    axes.set_aspect("equal")
    axes.set_xlabel(f"true {dim}")
    axes.set_ylabel(f"predicted {dim}")
    caption = f"{dim.capitalize()}: SRCC {_fixed(metrics.srcc(true, pred))}, PLCC {_fixed(metrics.plcc(true, pred))}"
    axes.set_title(caption + f"\n{true.size} items" + (f", {missing} unreadable left out" if missing else ""),
                   fontsize=11)
    axes.grid(alpha=0.3)
  if title:
    figure.suptitle(title)
  return _save(figure, path)


def accuracy_by_group_png(path: str, accuracies: Mapping[str, float], title: str, *,
                          intervals: Mapping[str, tuple[float, float]] | None = None) -> str:
  """Horizontal bars of fractions in [0, 1] (e.g. perception accuracy by perceptual dimension), first group on
  top, each labelled with its percentage; `intervals` {group: (low, high)} adds error bars (95% CIs)."""
  if not accuracies:
    raise ValueError("accuracy_by_group_png needs at least one group: {'Emotion perception': 0.71, ...}")
  names = list(accuracies)
  values = np.array([accuracies[n] for n in names], np.float64)  # (G,)
  figure, axes = plt.subplots(figsize=GROUPS_SIZE, dpi=DPI, layout="constrained")
  rows = np.arange(len(names))
  errors = None
  if intervals:
    bounds = np.array([intervals.get(n, (v, v)) for n, v in zip(names, values)], np.float64)  # (G, 2)
    errors = np.abs(np.stack([values - bounds[:, 0], bounds[:, 1] - values]))  # (2, G)
    errors = np.nan_to_num(errors)
  axes.barh(rows, np.nan_to_num(values), xerr=errors, color="tab:blue", alpha=0.85, capsize=3,
            error_kw={"elinewidth": 1, "ecolor": "0.25"})
  ends = np.nan_to_num(values) + (errors[1] if errors is not None else 0.0)  # (G,): the label goes past the bar
  for row, value, end in zip(rows, values, ends):
    text = "n/a" if math.isnan(value) else f"{value:.1%}"
    axes.text(min(end, 1.0) + 0.01, row, text, va="center", ha="left", fontsize=10)
  axes.set_yticks(rows, names)
  axes.invert_yaxis()
  axes.set_xlim(0.0, 1.12)
  axes.set_xticks(np.linspace(0, 1, 6), [f"{x:.0%}" for x in np.linspace(0, 1, 6)])
  axes.grid(axis="x", alpha=0.3)
  axes.set_title(title)
  return _save(figure, path)


# Panels of `training_curves_png`: (title, metric names); a panel is drawn when any of its metrics was logged.
CURVE_PANELS = (
    ("loss", ("loss",)),
    ("reward", ("reward",)),
    ("reward by function", ()),  # every `rewards/<label>/mean`
    ("accuracy", ("token_accuracy", "ces_accuracy")),
    ("loss terms", ("lm_loss", "ces_loss", "des_loss")),
    ("KL and entropy", ("kl", "entropy")),
    ("unparsed answers", ("parse_failure/all",)),
    ("gradient norm", ("grad_norm",)),
    ("learning rate", ("lr",)),
)


def training_curves_png(path: str, metrics_jsonl_path: str) -> str:
  """The curves of a training run's `metrics.jsonl` (SFT or GRPO, `eemo_jax.train.metrics.MetricsWriter`), one
  panel per `CURVE_PANELS` entry that was logged: train steps as a faint line with a centred running mean on top
  (the learning rate unsmoothed: it is not noisy), held-out evaluations (`split: eval`) as dashed lines with
  markers. A resumed run that logged a step twice is drawn with the step's last record."""
  series = read_curves(metrics_jsonl_path)
  panels = []
  for title, names in CURVE_PANELS:
    if not names:
      names = tuple(sorted({n for _, n in series if n.startswith("rewards/") and n.endswith("/mean")}))
    present = [n for n in names if any((split, n) in series for split in ("train", "eval"))]
    if present:
      panels.append((title, present))
  if not panels:
    raise ValueError(f"{metrics_jsonl_path} has no curve to plot: expected some of "
                     f"{[n for _, names in CURVE_PANELS for n in names]} in its records")
  columns = 3 if len(panels) > 4 else 2 if len(panels) > 1 else 1
  rows = math.ceil(len(panels) / columns)
  figure, grid = plt.subplots(rows, columns, figsize=CURVES_SIZE, dpi=DPI, layout="constrained", squeeze=False)
  for axes, (title, names) in zip(grid.flat, panels):
    for index, name in enumerate(names):
      colour = f"C{index % 10}"
      label = name.removeprefix("rewards/").removesuffix("/mean")
      if ("train", name) in series:
        steps, values = series["train", name]
        smooth = len(values) > 25 and name != "lr"
        axes.plot(steps, values, color=colour, alpha=0.3 if smooth else 0.9, linewidth=0.8 if smooth else 1.4,
                  label=None if smooth else f"{label} (train)")
        if smooth:
          axes.plot(steps, _running_mean(values, len(values) // 25), color=colour, linewidth=1.6,
                    label=f"{label} (train, running mean)")
      if ("eval", name) in series:
        steps, values = series["eval", name]
        axes.plot(steps, values, color=colour, linestyle="--", marker="o", markersize=4, linewidth=1.2,
                  label=f"{label} (eval)")
    if title == "learning rate":
      axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2), useOffset=False)
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
  for axes in list(grid.flat)[len(panels):]:
    axes.set_visible(False)
  figure.suptitle(paths.basename(paths.dirname(paths.absolute(metrics_jsonl_path))) or metrics_jsonl_path)
  return _save(figure, path)


def read_curves(metrics_jsonl_path: str) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
  """{(split, metric): ((T,) steps, (T,) values)} of a `metrics.jsonl`, by step, finite numbers only; a step
  logged twice (a resumed run) keeps its last value."""
  if not paths.isfile(metrics_jsonl_path):
    raise FileNotFoundError(f"{metrics_jsonl_path} does not exist: give the metrics.jsonl of a training run "
                            "(it sits in the run directory)")
  points: dict[tuple[str, str], dict[int, float]] = {}
  with paths.open_file(metrics_jsonl_path, encoding="utf-8") as file:
    for number, line in enumerate(file, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        raise ValueError(f"{metrics_jsonl_path} line {number} is not JSON: a training run writes one JSON object "
                         "per line; remove the damaged line") from None
      step, split = record.get("step"), record.get("split", "train")
      if not isinstance(step, int):
        continue
      for name, value in record.items():
        if name in ("step", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
          continue
        if math.isfinite(value):
          points.setdefault((split, name), {})[step] = float(value)
  return {key: (np.array(sorted(by_step)), np.array([by_step[s] for s in sorted(by_step)]))
          for key, by_step in points.items()}


def _running_mean(values: np.ndarray, half_width: int) -> np.ndarray:
  """(T,) mean over the values up to `half_width` steps either side (centred, so a trend is not drawn late;
  the window shrinks at the ends, so the curve spans every step)."""
  sums = np.cumsum(np.concatenate([[0.0], values]))  # (T + 1,)
  index = np.arange(values.size)
  starts, ends = np.maximum(index - half_width, 0), np.minimum(index + half_width + 1, values.size)
  return (sums[ends] - sums[starts]) / (ends - starts)


def _fixed(value: float) -> str:
  return "n/a" if math.isnan(value) else f"{value:.3f}"


def _save(figure, path: str) -> str:
  """Writes without `bbox_inches="tight"`, which would crop the figure to a size that depends on its text."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  figure.savefig(path, dpi=DPI)
  plt.close(figure)
  return path


__all__ = ["CONFUSION_PIXELS", "CURVES_PIXELS", "CURVE_PANELS", "GROUPS_PIXELS", "VAD_PIXELS", "accuracy_by_group_png",
           "confusion_matrix_png", "read_curves", "training_curves_png", "vad_scatter_png"]
