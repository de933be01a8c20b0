"""The Markdown report: its tables have the benchmark's rows and columns, with the hand-computed percentages and
intervals of a hand-written metrics dict; sections without metrics are left out; plots land in their section."""

import math
import re

from eemo_jax.eval import report

FULL = {
    # Perception: GPT-4o's pair figures of the EEmo-Bench leaderboard, and made-up single-image ones.
    "perception.single.yes_no.accuracy": 0.70126, "perception.single.yes_no.accuracy.ci95_low": 0.68,
    "perception.single.yes_no.accuracy.ci95_high": 0.722,
    "perception.single.what_how.accuracy": 0.6231, "perception.single.overall.accuracy": 0.66218,
    "perception.single.n": 3920, "perception.single.unparsed": 7,
    "perception.single.dimension.emotion_perception.accuracy": 0.6,
    "perception.pair.yes_no.accuracy": 0.644135, "perception.pair.yes_no.accuracy.ci95_low": 0.61431,
    "perception.pair.yes_no.accuracy.ci95_high": 0.67197,
    "perception.pair.what_how.accuracy": 0.615308, "perception.pair.overall.accuracy": 0.6297215,
    "perception.pair.n": 2012, "perception.pair.unparsed": 0,
    "perception.pair.dimension.emotion_perception.accuracy": 0.6074,
    "perception.pair.dimension.valence_perception.accuracy": 0.7672,
    "perception.pair.concern.similarity_perception.accuracy": 0.6392,
    "perception.pair.concern.differences_comparison.accuracy": 0.6207,
    "perception.judged_agreement": 0.99851, "perception.judged_agreement.ci95_low": 0.99,
    "perception.judged_agreement.ci95_high": 1.0, "perception.judged_n": 2012,
    "ranking.emotion_score": 67.974, "ranking.emotion_score.ci95_low": 65.1, "ranking.emotion_score.ci95_high": 70.0,
    "ranking.top1_hit": 0.5, "ranking.n": 1960, "ranking.unparsed": 12,
    "assessment.valence.srcc": 0.8512, "assessment.valence.srcc.ci95_low": 0.83,
    "assessment.valence.srcc.ci95_high": 0.87, "assessment.valence.plcc": 0.74,
    "assessment.arousal.srcc": 0.46, "assessment.arousal.plcc": 0.461,
    "assessment.dominance.srcc": 0.32, "assessment.dominance.plcc": 0.31,
    "assessment.mean.srcc": 0.5437, "assessment.mean.plcc": 0.5037,
    "assessment.level.valence.srcc": 0.8, "assessment.level.valence.plcc": 0.79,
    "description.pair.detailed_comparison.score": 0.5696, "description.pair.other.score": 0.825,
    "description.pair.valence_comparison.score": 0.9067, "description.pair.overall.score": 0.7393,
    "description.pair.overall.score.ci95_low": 0.7032, "description.pair.overall.score.ci95_high": 0.7752,
    "dominant.artemis.accuracy": 0.35, "dominant.artemis.macro_f1": 0.3158, "dominant.artemis.weighted_f1": 0.33,
    "dominant.artphoto.accuracy": 0.41, "dominant.artphoto.macro_f1": 0.3868, "dominant.artphoto.weighted_f1": 0.4,
    "emoverse.ces.accuracy": 0.6, "emoverse.ces.macro_f1": 0.55, "emoverse.ces.unparsed": 3,
    "emoverse.ces.class.awe.precision": 0.5, "emoverse.ces.class.awe.recall": 0.25, "emoverse.ces.class.awe.f1": 1 / 3,
    "emoverse.ces.class.fear.precision": 1.0, "emoverse.ces.class.fear.recall": 0.75,
    "emoverse.ces.class.fear.f1": 6 / 7,
    "emoverse.head.top1": 0.6, "emoverse.head.top3": 0.9, "emoverse.des.cosine": 0.71234,
    "emoverse.bas.parse_rate": 0.97, "emoverse.box.iou": 0.5512, "emoverse.box.iou50": 0.61,
    "examples_per_second": 3.5,
}


def section(text: str, heading: str) -> str:
  """The body of `## heading`, up to the next section."""
  start = text.index(f"## {heading}\n")
  end = text.find("\n## ", start + 1)
  return text[start:] if end < 0 else text[start:end]


def tables(text: str) -> list[list[list[str]]]:
  """Every Markdown table of `text` as rows of cells, the alignment row left out."""
  found, current = [], []
  for line in text.splitlines() + [""]:
    if line.startswith("|"):
      cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
      if not all(set(c) <= set(":-") for c in cells):
        current.append(cells)
    elif current:
      found.append(current)
      current = []
  return found


def headings(text: str) -> list[str]:
  return [line[3:] for line in text.splitlines() if line.startswith("## ")]


def test_every_section_in_the_benchmark_order():
  text = report.markdown_report(FULL, model="eemo-7b", title="EEmo-Bench run")
  assert text.startswith("# EEmo-Bench run\n") and "`eemo-7b`" in text
  assert headings(text) == ["EEmo-Bench perception", "EEmo-Bench ranking", "EEmo-Bench assessment",
                            "EEmo-Bench description", "Cross-domain dominant emotion", "EmoVerse", "Other metrics"]


def test_perception_tables():
  body = section(report.markdown_report(FULL, model="eemo-7b", title="t"), "EEmo-Bench perception")
  main, by_dimension, by_concern = tables(body)
  assert main == [
      ["Model", "Single yes/no (%)", "Single what/how (%)", "Single overall (%)", "Pair yes/no (%)",
       "Pair what/how (%)", "Pair overall (%)"],
      ["eemo-7b", "70.13 [68.00, 72.20]", "62.31", "66.22", "64.41 [61.43, 67.20]", "61.53", "62.97"],
  ]
  assert by_dimension == [["Perceptual dimension", "Single", "Pair"],
                          ["Emotion perception", "60.00", "60.74"],
                          ["Valence perception", "—", "76.72"]]
  # No single-image concern metrics: that column is left out.
  assert by_concern == [["Question concern", "Pair"], ["Similarity perception", "63.92"],
                        ["Differences comparison", "62.07"]]
  assert "single 3,920 (7 unparsed); pair 2,012 (0 unparsed)" in body
  assert "on 99.85% of 2,012 judged perception items" in body


def test_ranking_and_assessment_tables():
  text = report.markdown_report(FULL, model="m", title="t")
  assert tables(section(text, "EEmo-Bench ranking")) == [[
      ["Model", "Emotion score (0–100)", "Top-1 hit (%)", "Items", "Unparsed"],
      ["m", "67.97 [65.10, 70.00]", "50.00", "1,960", "12"]]]
  assert tables(section(text, "EEmo-Bench assessment")) == [[
      ["Scores from", "Valence", "Arousal", "Dominance", "Overall"],
      ["parsed score", "0.851 [0.830, 0.870] / 0.740", "0.460 / 0.461", "0.320 / 0.310", "0.544 / 0.504"],
      ["level-word probabilities", "0.800 / 0.790", "— / —", "— / —", "— / —"]]]


def test_description_dominant_and_emoverse_tables():
  text = report.markdown_report(FULL, model="m", title="t")
  assert tables(section(text, "EEmo-Bench description")) == [[
      ["Describing dimension", "Pair"], ["Detailed comparison", "56.96"], ["Valence comparison", "90.67"],
      ["Other", "82.50"], ["Overall", "73.93 [70.32, 77.52]"]]]
  assert tables(section(text, "Cross-domain dominant emotion")) == [[
      ["Dataset", "Accuracy (%)", "Macro-F1 (%)", "Weighted-F1 (%)"],
      ["ArtEmis", "35.00", "31.58", "33.00"], ["ArtPhoto", "41.00", "38.68", "40.00"]]]
  headline, per_class = tables(section(text, "EmoVerse"))
  assert headline == [["Metric", "m"], ["CES accuracy (%)", "60.00"], ["CES macro-F1 (%)", "55.00"],
                      ["Head top-1 (%)", "60.00"], ["Head top-3 (%)", "90.00"], ["DES cosine", "0.712"],
                      ["B-A-S parse rate (%)", "97.00"], ["Subject box IoU", "0.551"],
                      ["Boxes with IoU ≥ 0.5 (%)", "61.00"], ["CES unparsed answers", "3"]]
  assert per_class == [["Class", "Precision (%)", "Recall (%)", "F1 (%)"], ["awe", "50.00", "25.00", "33.33"],
                       ["fear", "100.00", "75.00", "85.71"]]


def test_metrics_no_table_shows_are_listed_once():
  text = report.markdown_report(FULL, model="m", title="t")
  assert tables(section(text, "Other metrics")) == [[["Metric", "Value"], ["`examples_per_second`", "3.5"]]]


def test_sections_without_metrics_are_left_out():
  only_ranking = {k: v for k, v in FULL.items() if k.startswith("ranking.")}
  text = report.markdown_report(only_ranking, model="m", title="t")
  assert headings(text) == ["EEmo-Bench ranking"]
  only_emoverse = {k: v for k, v in FULL.items() if k.startswith("emoverse.")}
  assert headings(report.markdown_report(only_emoverse, model="m", title="t")) == ["EmoVerse"]
  empty = report.markdown_report({}, model="m", title="nothing yet")
  assert headings(empty) == [] and empty.startswith("# nothing yet\n")
  assert "|" not in empty


def test_a_pair_only_run_has_only_pair_columns():
  pair = {k: v for k, v in FULL.items() if k.startswith("perception.pair.")}
  main = tables(section(report.markdown_report(pair, model="m", title="t"), "EEmo-Bench perception"))[0]
  assert main[0] == ["Model", "Pair yes/no (%)", "Pair what/how (%)", "Pair overall (%)"]


def test_nan_reads_as_not_available():
  metrics = {"assessment.valence.srcc": math.nan, "assessment.valence.plcc": 0.5, "assessment.mean.srcc": math.nan,
             "assessment.mean.plcc": 0.5}
  table = tables(section(report.markdown_report(metrics, model="m", title="t"), "EEmo-Bench assessment"))[0]
  assert table == [["Scores from", "Valence", "Overall"], ["parsed score", "n/a / 0.500", "n/a / 0.500"]]


def test_plots_are_linked_in_their_section_or_under_figures():
  plots = {"perception.dimension": "plots/perception_dimension.png", "emoverse.confusion": "plots/ces.png",
           "training": "plots\\training.png", "dominant.artphoto": "plots/artphoto.png"}
  metrics = {k: v for k, v in FULL.items() if k.startswith(("perception.", "emoverse."))}
  text = report.markdown_report(metrics, model="m", title="t", plots=plots)
  assert "![perception.dimension](plots/perception_dimension.png)" in section(text, "EEmo-Bench perception")
  assert "![emoverse.confusion](plots/ces.png)" in section(text, "EmoVerse")
  # No dominant-emotion metrics: its plot goes with the others under Figures; paths use forward slashes.
  figures = section(text, "Figures")
  assert "![training](plots/training.png)" in figures and "![dominant.artphoto](plots/artphoto.png)" in figures
