"""The Markdown report of an evaluation: the flat `metrics.json` laid out as the papers' tables.

EEmo-Bench publishes perception as yes/no, what/how and overall accuracy per setting (single image, image
pair), ranking as an emotion score, assessment as SRCC/PLCC per V/A/D dimension, description as a judge score
per describing dimension, and EEmo-Logic adds cross-domain dominant-emotion F1; the report keeps those columns
so a run reads side by side with the published leaderboards. Each figure carries its 95% bootstrap interval
where the metrics have one. A section appears only when its metrics are present, and any metric no table shows
is listed at the end, so nothing computed is hidden.

    text = markdown_report(json.load(open("out/metrics.json")), model="eemo-7b", title="EEmo-Bench",
                           plots={"perception.dimension": "plots/perception_dimension.png"})
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

SETTINGS = ("single", "pair")
VAD = ("valence", "arousal", "dominance")
DATASET_NAMES = {"artemis": "ArtEmis", "artphoto": "ArtPhoto"}
# Sections in report order: (metric-name prefix, heading). Plots whose name starts with the prefix go under it.
SECTIONS = (
    ("perception", "EEmo-Bench perception"),
    ("ranking", "EEmo-Bench ranking"),
    ("assessment", "EEmo-Bench assessment"),
    ("description", "EEmo-Bench description"),
    ("dominant", "Cross-domain dominant emotion"),
    ("emoverse", "EmoVerse"),
)
MISSING = "—"


def markdown_report(metrics: Mapping[str, float], *, model: str, title: str,
                    plots: Mapping[str, str] | None = None) -> str:
  """The report of one model's flat metrics (`eemo_jax.eval.metrics` names, fractions; see the issue-15 contract).

  `plots` maps a name to a PNG path written into the Markdown as is: give paths relative to the folder the
  report is saved in. A plot whose name starts with a section's prefix (`perception`, `ranking`, `assessment`,
  `description`, `dominant`, `emoverse`) is shown at the end of that section, any other under "Figures".
  """
  view = _Metrics(metrics, model)
  plots = dict(plots or {})
  lines = [f"# {title}", "", f"Model: `{model}`", "",
           "Percentages have two decimals; brackets hold the 95% bootstrap confidence interval over items. "
           "Answers the parser could not read count as wrong.", ""]
  builders = {"perception": _perception, "ranking": _ranking, "assessment": _assessment,
              "description": _description, "dominant": _dominant, "emoverse": _emoverse}
  for prefix, heading in SECTIONS:
    body = builders[prefix](view)
    if not body:
      continue
    lines += [f"## {heading}", ""] + body
    for name in [n for n in plots if n.startswith(prefix)]:
      lines += _image(name, plots.pop(name))
  if plots:
    lines += ["## Figures", ""]
    for name, path in plots.items():
      lines += _image(name, path)
  others = view.unused()
  if others:
    lines += ["## Other metrics", ""] + _table(["Metric", "Value"], [[f"`{n}`", _plain(metrics[n])] for n in others])
  return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------------------------------
# Sections: each returns its Markdown lines, or [] when none of its metrics is present
# --------------------------------------------------------------------------------------------------


def _perception(view: _Metrics) -> list[str]:
  settings = [s for s in SETTINGS if view.matching(rf"perception\.{s}\.")]
  if not settings:
    return []
  header, row = ["Model"], [view.model]
  for s in settings:
    for part, label in (("yes_no", "yes/no"), ("what_how", "what/how"), ("overall", "overall")):
      header.append(f"{s.capitalize()} {label} (%)")
      row.append(view.cell(f"perception.{s}.{part}.accuracy", "percent"))
  lines = ["Accuracy, as the benchmark's leaderboard (overall = mean of yes/no and what/how).", ""]
  lines += _table(header, [row])
  counts = [f"{s} {view.count(f'perception.{s}.n')} ({view.count(f'perception.{s}.unparsed')} unparsed)"
            for s in settings if view.has(f"perception.{s}.n") or view.has(f"perception.{s}.unparsed")]
  if counts:
    lines += ["", "Questions: " + "; ".join(counts) + "."]
  if view.has("perception.judged_agreement"):
    lines += ["", f"The parser's verdict agrees with the file's judged `eval_result` on "
              f"{view.cell('perception.judged_agreement', 'percent', interval=False)}% of "
              f"{view.count('perception.judged_n')} "
              "judged perception items."]
  for group, heading in (("dimension", "perceptual dimension"), ("concern", "question concern")):
    grouped = [s for s in settings if view.matching(rf"perception\.{s}\.{group}\.")]
    slugs = _slugs(view, rf"perception\.(?:{'|'.join(settings)})\.{group}\.([^.]+)\.accuracy$")
    if slugs:
      rows = [[_pretty(slug)] + [view.cell(f"perception.{s}.{group}.{slug}.accuracy", "percent") for s in grouped]
              for slug in slugs]
      lines += ["", f"Accuracy by {heading} (%):", ""]
      lines += _table([heading.capitalize()] + [s.capitalize() for s in grouped], rows)
  return lines + [""]


def _ranking(view: _Metrics) -> list[str]:
  if not view.matching(r"ranking\."):
    return []
  row = [view.model, view.cell("ranking.emotion_score", "score"), view.cell("ranking.top1_hit", "percent"),
         view.count("ranking.n"), view.count("ranking.unparsed")]
  lines = ["Emotion score: hit + Kendall on 0–100, the GRPO ranking reward before its square; top-1 hit: the "
           "strongest emotion named first.", ""]
  return lines + _table(["Model", "Emotion score (0–100)", "Top-1 hit (%)", "Items", "Unparsed"], [row]) + [""]


def _assessment(view: _Metrics) -> list[str]:
  sources = [(prefix, label) for prefix, label in (("assessment", "parsed score"),
                                                    ("assessment.level", "level-word probabilities"))
             if any(view.has(f"{prefix}.{d}.{c}") for d in VAD + ("mean",) for c in ("srcc", "plcc"))]
  if not sources:
    return []
  columns = [d for d in VAD if any(view.has(f"{p}.{d}.srcc") or view.has(f"{p}.{d}.plcc") for p, _ in sources)]
  rows = [[label] + [view.cell(f"{prefix}.{d}.srcc", "corr") + " / " + view.cell(f"{prefix}.{d}.plcc", "corr")
                     for d in columns + ["mean"]]
          for prefix, label in sources]
  lines = ["SRCC / PLCC against the SAM ratings, per dimension and their mean (the benchmark's overall).", ""]
  return lines + _table(["Scores from"] + [d.capitalize() for d in columns] + ["Overall"], rows) + [""]


def _description(view: _Metrics) -> list[str]:
  settings = [s for s in SETTINGS if view.matching(rf"description\.{s}\.")]
  if not settings:
    return []
  slugs = [s for s in _slugs(view, rf"description\.(?:{'|'.join(settings)})\.([^.]+)\.score$") if s != "overall"]
  slugs.sort(key=lambda slug: slug == "other")  # the benchmark's catch-all after the named dimensions
  rows = [[_pretty(slug)] + [view.cell(f"description.{s}.{slug}.score", "percent") for s in settings]
          for slug in slugs + ["overall"]]
  lines = ["Judge score (%): per question the sum of five 0–2 ratings / 10, averaged over the questions.", ""]
  return lines + _table(["Describing dimension"] + [s.capitalize() for s in settings], rows) + [""]


def _dominant(view: _Metrics) -> list[str]:
  datasets = _slugs(view, r"dominant\.([^.]+)\.")
  if not datasets:
    return []
  counts = [(k, label) for k, label in (("n", "Items"), ("unparsed", "Unparsed"))
            if any(view.has(f"dominant.{d}.{k}") for d in datasets)]
  rows = [[DATASET_NAMES.get(d, _pretty(d))]
          + [view.cell(f"dominant.{d}.{k}", "percent") for k in ("accuracy", "macro_f1", "weighted_f1")]
          + [view.count(f"dominant.{d}.{k}") for k, _ in counts] for d in datasets]
  lines = _table(["Dataset", "Accuracy (%)", "Macro-F1 (%)", "Weighted-F1 (%)"] + [label for _, label in counts], rows)
  for d in datasets:
    lines += _per_class(view, f"dominant.{d}", f"{DATASET_NAMES.get(d, _pretty(d))} per class")
  return lines + [""]


def _emoverse(view: _Metrics) -> list[str]:
  headline = (("emoverse.ces.accuracy", "CES accuracy (%)", "percent"),
              ("emoverse.ces.macro_f1", "CES macro-F1 (%)", "percent"),
              ("emoverse.ces.weighted_f1", "CES weighted-F1 (%)", "percent"),
              ("emoverse.answer.accuracy", "Generated answer accuracy (%)", "percent"),
              ("emoverse.answer.macro_f1", "Generated answer macro-F1 (%)", "percent"),
              ("emoverse.head.top1", "Head top-1 (%)", "percent"),
              ("emoverse.head.top3", "Head top-3 (%)", "percent"),
              ("emoverse.des.cosine", "DES cosine", "corr"),
              ("emoverse.bas.parse_rate", "B-A-S parse rate (%)", "percent"),
              ("emoverse.box.iou", "Subject box IoU", "corr"),
              ("emoverse.box.iou50", "Boxes with IoU ≥ 0.5 (%)", "percent"))
  rows = [[label, view.cell(name, kind)] for name, label, kind in headline if view.has(name)]
  if not rows:
    return []
  rows += [[label, view.count(name)] for name, label in (("emoverse.ces.unparsed", "CES unparsed answers"),
                                                          ("emoverse.answer.unparsed", "Generated answers unparsed"))
           if view.has(name)]
  lines = _table(["Metric", view.model], rows)
  lines += _per_class(view, "emoverse.ces", "CES per class")
  lines += _per_class(view, "emoverse.answer", "Generated answer per class")
  return lines + [""]


def _per_class(view: _Metrics, prefix: str, heading: str) -> list[str]:
  """Precision / recall / F1 (and support) per class of `classification_metrics`' `<prefix>.class.<label>.*`."""
  labels = _slugs(view, rf"{re.escape(prefix)}\.class\.(.+)\.(?:precision|recall|f1|support)$")
  if not labels:
    return []
  with_support = any(view.has(f"{prefix}.class.{label}.support") for label in labels)
  rows = [[label] + [view.cell(f"{prefix}.class.{label}.{k}", "percent") for k in ("precision", "recall", "f1")]
          + ([view.count(f"{prefix}.class.{label}.support")] if with_support else []) for label in labels]
  header = ["Class", "Precision (%)", "Recall (%)", "F1 (%)"] + (["Support"] if with_support else [])
  return ["", f"{heading}:", ""] + _table(header, rows)


# --------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------


class _Metrics:
  """The flat metrics with a record of which names a table has shown (the rest go to "Other metrics")."""

  def __init__(self, metrics: Mapping[str, float], model: str):
    self.metrics = dict(metrics)
    self.shown: set[str] = set()
    self.model = model

  def has(self, name: str) -> bool:
    return name in self.metrics

  def matching(self, pattern: str) -> list[str]:
    return [n for n in self.metrics if re.match(pattern, n)]

  def cell(self, name: str, kind: str, *, interval: bool = True) -> str:
    """`value [low, high]` in the `kind`'s scale and digits (percent, score, corr), `—` when absent."""
    if name not in self.metrics:
      return MISSING
    self.shown.update((name, f"{name}.ci95_low", f"{name}.ci95_high"))
    scale, digits = {"percent": (100.0, 2), "score": (1.0, 2), "corr": (1.0, 3)}[kind]
    text = _number(self.metrics[name], scale, digits)
    low, high = self.metrics.get(f"{name}.ci95_low"), self.metrics.get(f"{name}.ci95_high")
    if interval and low is not None and high is not None and not (_is_nan(low) and _is_nan(high)):
      text += f" [{_number(low, scale, digits)}, {_number(high, scale, digits)}]"
    return text

  def count(self, name: str) -> str:
    if name not in self.metrics:
      return MISSING
    self.shown.add(name)
    value = self.metrics[name]
    return "n/a" if _is_nan(value) else f"{int(round(float(value))):,}"

  def unused(self) -> list[str]:
    return [n for n in self.metrics if n not in self.shown]


def _slugs(view: _Metrics, pattern: str) -> list[str]:
  """The first group of `pattern` over the metric names, once each, in the metrics' order."""
  found = []
  for name in view.metrics:
    match = re.match(pattern, name)
    if match and match.group(1) not in found:
      found.append(match.group(1))
  return found


def _pretty(slug: str) -> str:
  return slug.replace("_", " ").capitalize()


def _number(value, scale: float, digits: int) -> str:
  return "n/a" if _is_nan(value) else f"{float(value) * scale:.{digits}f}"


def _plain(value) -> str:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return str(value)
  if _is_nan(value):
    return "n/a"
  return f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"


def _is_nan(value) -> bool:
  return value is None or (isinstance(value, float) and math.isnan(value))


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  """A Markdown table: the first column left-aligned (names), the others right-aligned (numbers)."""
  cells = lambda row: "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"  # noqa: E731
  return [cells(header), "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"] + [cells(r) for r in rows]


def _image(name: str, path: str) -> list[str]:
  return [f"![{name}]({path.replace(chr(92), '/')})", ""]


__all__ = ["SECTIONS", "markdown_report"]
