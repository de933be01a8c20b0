"""EEmo-Bench scoring against independent references: the benchmark authors' judged leaderboard files and their
published table, scipy's correlations, and ranking / classification figures computed by hand."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from eemo_jax.eval import BENCH_DATA, eemo_bench, predictions

LEADERBOARD = Path(BENCH_DATA) / "leaderboard"
FILES = {"gpt-4o": LEADERBOARD / "EEmo-Bench(gpt-4o-pair).json",
         "qwen2-7b": LEADERBOARD / "EEmo-Bench(qwen2-7b-pair).json"}
needs_leaderboard = pytest.mark.skipif(not all(f.exists() for f in FILES.values()),
                                       reason="the EEmo-Bench leaderboard files are not here")
# EEmo-Bench README, image-pair columns (percent), as in /work/shared/data/eemo-bench/README.md.
PUBLISHED = {
    "gpt-4o": {"yes_no": 64.41, "what_how": 61.49, "overall": 62.95, "detailed_comparison": 56.96,
               "valence_comparison": 90.67, "arousal_comparison": 79.33, "dominance_comparison": 64.44},
    "qwen2-7b": {"yes_no": 54.97, "what_how": 54.43, "overall": 54.70, "detailed_comparison": 43.29,
                 "valence_comparison": 72.40, "arousal_comparison": 57.50, "dominance_comparison": 47.96},
}
PERCEPTION_ITEMS = 2012


@pytest.fixture(scope="module", params=sorted(FILES))
def leaderboard(request):
  """(model, the file's raw items, our metrics, our scored items)."""
  if not FILES[request.param].exists():
    pytest.skip("the EEmo-Bench leaderboard files are not here")
  raw = json.loads(FILES[request.param].read_text())
  file = predictions.read_predictions(raw, strict=False)
  metrics, scored = eemo_bench.score(file, n_resamples=200)
  return file.model, raw, metrics, scored


@needs_leaderboard
def test_the_parser_agrees_with_the_authors_verdicts(leaderboard):
  """Our verdict equals the authors' judged `eval_result` on >= 99% of the 2,012 perception questions; an item
  we cannot read (Qwen2-VL's item 220, whose verdict is five ratings) counts as a disagreement."""
  model, raw, metrics, scored = leaderboard
  ours = {p.id: p.correct for p in scored if p.question_type in predictions.PERCEPTION_TYPES}
  verdicts = {item["id"]: item[f"eval_result({model})"] for item in raw
              if item["question_type"] in ("Yes-or-No", "What/How")}
  assert len(verdicts) == PERCEPTION_ITEMS
  agree = sum(ours.get(i) == int(v) for i, v in verdicts.items() if not isinstance(v, list))
  assert agree / PERCEPTION_ITEMS >= 0.99, f"{model}: {agree} of {PERCEPTION_ITEMS} verdicts agree"
  judged = [i for i, v in verdicts.items() if not isinstance(v, list)]
  assert metrics["perception.judged_n"] == len(judged)
  assert metrics["perception.judged_agreement"] == pytest.approx(agree / len(judged))


# Every perception item whose verdict (our parser's letter == correct_answer) differs from the authors' 0/1
# `eval_result`, with the reason; a parser change that moves any verdict, either way, shows up here.
# ("ours" is the letter the parser reads; Qwen2-VL's item 220 has five ratings as its verdict and is not scored.)
DISAGREEMENTS = {
    "gpt-4o": {
        174: "one answer per image to 'does each image contain disgust?', No and Yes; ours A: No (rule 7, "
             "correct), judge 0",
        237: "walks through every option and chooses none; ours D (the last named), the judge credits C",
        290: "concludes 'A and B'; ours B (the only marked letter), the judge credits A",
        403: "one answer per image, 'A: Yes (for Image 2). B: No (for Image 1).'; ours B: No (rule 7, correct), "
             "judge 0",
        1915: "one answer per image to 'does each image contain sadness?', 'Likely A: No' and 'Possibly B: Yes'; "
              "ours A: No (rule 7), the judge credits B: Yes",
        2254: "judge error: the response concludes '**C: Anger**', the judge credits B",
    },
    "qwen2-7b": {
        34: "describes both images, names no option; the judge credits A",
        117: "describes both images, names no option; the judge credits B",
        147: "walks through every option, no conclusion; ours D (the last named), the judge credits C",
        1080: "describes both images, names no option; the judge credits C",
        1867: "says 'The first image has a lower level of dominance' (A); the judge credits B",
        2076: "copies the question and its option list, chooses none; the judge credits B",
        2195: "copies the option list, then describes without choosing; the judge credits C",
    },
}


@needs_leaderboard
def test_the_items_where_the_parser_and_the_judge_disagree(leaderboard):
  model, raw, _, scored = leaderboard
  ours = {p.id: p.correct for p in scored if p.question_type in predictions.PERCEPTION_TYPES}
  differ = {item["id"] for item in raw if item["question_type"] in ("Yes-or-No", "What/How")
            and not isinstance(item[f"eval_result({model})"], list)
            and ours[item["id"]] != int(item[f"eval_result({model})"])}
  assert sorted(differ) == sorted(DISAGREEMENTS[model])


# The published table's cells our accuracies miss by more than 0.2 points, and why: in each, the judge credits
# answers that choose no option, two options or the other option (DISAGREEMENTS), which this parser does not.
BEYOND_THE_BAR = {("gpt-4o", "what_how"): (237, 290, 2254),
                  ("qwen2-7b", "what_how"): (147, 1080, 1867, 2076, 2195),
                  ("qwen2-7b", "overall"): (34, 117, 147, 1080, 1867, 2076, 2195)}


@needs_leaderboard
def test_our_accuracies_against_the_published_table(leaderboard):
  """Within 0.2 points of the EEmo-Bench table, except where the judge credited non-answers: there the gap is
  those items exactly (each 1/1006 of its column; overall is the mean of the two columns)."""
  model, raw, metrics, _ = leaderboard
  questions = {kind: sum(item["question_type"] == name for item in raw)
               for kind, name in (("yes_no", "Yes-or-No"), ("what_how", "What/How"))}
  types = {item["id"]: item["question_type"] for item in raw}
  for kind in ("yes_no", "what_how", "overall"):
    ours, published = 100 * metrics[f"perception.pair.{kind}.accuracy"], PUBLISHED[model][kind]
    credited = BEYOND_THE_BAR.get((model, kind))
    if credited is None:
      assert ours == pytest.approx(published, abs=0.2), kind
      continue
    assert set(credited) <= set(DISAGREEMENTS[model]), kind
    gap = sum(100 / questions["yes_no" if types[i] == "Yes-or-No" else "what_how"] for i in credited)
    gap /= 2 if kind == "overall" else 1
    assert published - ours == pytest.approx(gap, abs=0.05), kind  # the table's rounding and judge rows


@needs_leaderboard
def test_the_authors_verdicts_aggregate_to_the_published_table(leaderboard):
  """Scoring a response that is right exactly where the authors judged it right reproduces their table: the
  aggregation (accuracy by type, overall as the mean of the two types) is theirs."""
  model, raw, _, _ = leaderboard
  replayed = []
  for item in raw:
    verdict = item[f"eval_result({model})"]
    if item["question_type"] == "Open_ended" or isinstance(verdict, list):
      continue
    letters = sorted(predictions.read_predictions([item]).items[0].options)
    wrong = next(letter for letter in letters if letter != item["correct_answer"])
    replayed.append({**item, f"response({model})": item["correct_answer"] if int(verdict) else wrong})
  metrics, _ = eemo_bench.score(predictions.read_predictions(replayed), n_resamples=0)
  for kind in ("yes_no", "what_how", "overall"):
    assert 100 * metrics[f"perception.pair.{kind}.accuracy"] == pytest.approx(PUBLISHED[model][kind], abs=0.2)


@needs_leaderboard
def test_description_scores_equal_the_published_ones(leaderboard):
  model, _, metrics, _ = leaderboard
  for dimension in ("detailed_comparison", "valence_comparison", "arousal_comparison", "dominance_comparison"):
    assert round(100 * metrics[f"description.pair.{dimension}.score"], 2) == PUBLISHED[model][dimension]
  assert metrics["description.pair.n"] == 300 and metrics["description.pair.unjudged"] == 0


@needs_leaderboard
def test_every_headline_figure_has_its_interval(leaderboard):
  _, _, metrics, _ = leaderboard
  headline = [k for k in metrics if k.endswith((".accuracy", ".score")) and "judged" not in k]
  assert headline
  for name in headline:
    assert metrics[f"{name}.ci95_low"] <= metrics[name] <= metrics[f"{name}.ci95_high"], name


# --------------------------------------------------------------------------------------------------
# Hand-made items
# --------------------------------------------------------------------------------------------------


def choice(i, question_type, response, *, correct="B", pair=True, dimension="Emotion perception",
           concern="Similarity perception", judged=None):
  item = {"id": i, "image1_url": "1.jpg", "question": "?", "options": {"A": "No.", "B": "Yes."},
          "correct_answer": correct, "question_type": question_type, "perceptual_dimension": dimension,
          "question_concern": concern, "response(m)": response}
  if pair:
    item["image2_url"] = "2.jpg"
  if judged is not None:
    item["eval_result(m)"] = judged
  return item


def score(items, **kw):
  return eemo_bench.score(predictions.read_predictions(items), n_resamples=kw.pop("n_resamples", 50), **kw)


def test_perception_accuracies_by_type_dimension_and_concern():
  items = [choice(0, "Yes-or-No", "B: Yes.", judged=1), choice(1, "Yes-or-No", "A", judged=1),
           choice(2, "Yes-or-No", "Maybe both.", judged=0),  # unparsed: counted, and wrong
           choice(3, "What/How", "(B)", dimension="Valence perception", concern="Differences comparison"),
           choice(4, "Yes-or-No", "yes", pair=False)]
  metrics, scored = score(items)
  assert [p.correct for p in scored] == [1, 0, 0, 1, 1] and scored[2].parsed is None
  assert metrics["perception.pair.yes_no.accuracy"] == pytest.approx(1 / 3)
  assert metrics["perception.pair.what_how.accuracy"] == 1.0
  # The benchmark's overall: the mean of the two type accuracies (2/3), not the pooled 2/4.
  assert metrics["perception.pair.overall.accuracy"] == pytest.approx((1 / 3 + 1) / 2)
  assert (metrics["perception.pair.n"], metrics["perception.pair.unparsed"]) == (4, 1)
  assert metrics["perception.pair.dimension.emotion_perception.accuracy"] == pytest.approx(1 / 3)
  assert metrics["perception.pair.dimension.valence_perception.accuracy"] == 1.0
  assert metrics["perception.pair.concern.differences_comparison.accuracy"] == 1.0
  assert metrics["perception.single.yes_no.accuracy"] == 1.0 and metrics["perception.single.n"] == 1
  assert math.isnan(metrics["perception.single.what_how.accuracy"])
  assert metrics["perception.judged_n"] == 3 and metrics["perception.judged_agreement"] == pytest.approx(2 / 3)
  assert eemo_bench.slug("Emotion perception") == "emotion_perception"
  assert eemo_bench.slug("Doubt/Confusion -- x") == "doubt_confusion_x"


def test_our_own_answer_format_is_read():
  metrics, scored = score([choice(0, "What/How", "<think>It looks bright.</think><answer>Answer: B</answer>"),
                           choice(1, "What/How", "<think>B: Yes?</think><answer>Answer: A</answer>")])
  assert [p.parsed for p in scored] == ["B", "A"]


RANKED = ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]


def ranking(i, response, truth=("joy", "surprise", "neutral")):
  return {"id": i, "image1_url": "1.jpg", "question": "Rank.", "options": RANKED, "correct_answer": list(truth),
          "question_type": "Ranking", "response(m)": response}


def test_ranking_emotion_score_by_hand():
  """hit (25, 15, 10 for the true ranks found) + kendall 25 (tau + 1), x 2/3 with two shared, 0 with one."""
  items = [ranking(0, "<answer>Emotion ranking: joy,surprise,neutral</answer>"),  # 50 + 50 = 100
           ranking(1, "<answer>Emotion ranking: neutral,surprise,joy</answer>"),  # 50 + 25 (-1 + 1) = 50
           ranking(2, "<answer>Emotion ranking: joy,surprise,fear</answer>"),  # 40 + 50 * 2/3
           ranking(3, "<answer>Emotion ranking: fear,anger,neutral</answer>"),  # 10 + 0
           ranking(4, "I see no emotion.")]  # unparsed: 0
  metrics, scored = score(items)
  expected = [100.0, 50.0, 40 + 100 / 3, 10.0, 0.0]
  assert metrics["ranking.emotion_score"] == pytest.approx(np.mean(expected))
  assert metrics["ranking.top1_hit"] == pytest.approx(2 / 5)
  assert (metrics["ranking.n"], metrics["ranking.unparsed"]) == (5, 1)
  assert [p.correct for p in scored] == [1, 0, 1, 0, 0]


def assessment(i, dimension, truth, response, level=None):
  item = {"id": i, "image1_url": "1.jpg", "question": "?", "question_type": "Assessment",
          "assessment_dimension": dimension, "correct_answer": truth, "response(m)": response}
  if level is not None:
    item["level_score(m)"] = level
  return item


def test_assessment_correlations_equal_scipy():
  rng = np.random.default_rng(0)
  items, expected = [], {}
  for d, dimension in enumerate(("valence", "arousal", "dominance")):
    truth = rng.uniform(size=30)
    pred = np.clip(truth * (0.8 - 0.3 * d) + rng.normal(scale=0.2, size=30), 0, 1).round(2)  # ties included
    level = np.clip(truth + rng.normal(scale=0.3, size=30), 0, 1)
    for j in range(30):
      response = f"<answer>{dimension.capitalize()}: {pred[j]:.4f}</answer>" if j % 10 else "about 0.5"
      items.append(assessment(100 * d + j, dimension, float(truth[j]), response, level=float(level[j])))
    read = np.arange(30) % 10 != 0  # "about 0.5" is no score: left out of the correlations, counted
    expected[dimension] = (stats.spearmanr(truth[read], pred[read]).statistic,
                           stats.pearsonr(truth[read], pred[read]).statistic,
                           stats.spearmanr(truth, level).statistic, stats.pearsonr(truth, level).statistic)
  metrics, _ = score(items)
  for dimension, (srcc, plcc, level_srcc, level_plcc) in expected.items():
    assert metrics[f"assessment.{dimension}.srcc"] == pytest.approx(srcc, abs=1e-9)
    assert metrics[f"assessment.{dimension}.plcc"] == pytest.approx(plcc, abs=1e-9)
    assert metrics[f"assessment.level.{dimension}.srcc"] == pytest.approx(level_srcc, abs=1e-9)
    assert metrics[f"assessment.level.{dimension}.plcc"] == pytest.approx(level_plcc, abs=1e-9)
    assert (metrics[f"assessment.{dimension}.n"], metrics[f"assessment.{dimension}.unparsed"]) == (30, 3)
  assert metrics["assessment.mean.srcc"] == pytest.approx(np.mean([e[0] for e in expected.values()]), abs=1e-9)
  assert metrics["assessment.level.mean.plcc"] == pytest.approx(np.mean([e[3] for e in expected.values()]),
                                                               abs=1e-9)


def test_assessment_reads_no_other_dimensions_key():
  _, scored = score([assessment(0, "arousal", 0.5, "<answer>Valence: 0.7</answer>"),
                     assessment(1, "arousal", 0.5, "<answer>Arousal: 0.7</answer>")])
  assert [p.parsed for p in scored] == [None, 0.7]


def dominant(i, dataset, truth, answer):
  return {"id": i, "image1_url": "1.jpg", "question": "?", "question_type": "Dominant", "dataset": dataset,
          "options": ["Anger", "Sad", "Fear"], "correct_answer": truth,
          "response(m)": f"<answer>Dominant emotion: {answer}</answer>"}


def test_dominant_accuracy_and_f1_by_hand():
  pairs = [("Anger", "Anger"), ("Anger", "Sad"), ("Sad", "Sad"), ("Sad", "Sad"), ("Fear", "Anger"),
           ("Fear", "calm")]  # the last is no option: unparsed, wrong
  items = [dominant(i, "ArtPhoto", t, p) for i, (t, p) in enumerate(pairs)] + [dominant(9, "artemis", "Fear", "fear")]
  metrics, _ = score(items)
  # Anger: P 1/2, R 1/2, F1 1/2; Sad: P 2/3, R 1, F1 4/5; Fear: P 0, R 0, F1 0 (supports 2, 2, 2).
  assert metrics["dominant.artphoto.accuracy"] == pytest.approx(3 / 6)
  assert metrics["dominant.artphoto.macro_f1"] == pytest.approx((1 / 2 + 4 / 5 + 0) / 3)
  assert metrics["dominant.artphoto.weighted_f1"] == pytest.approx((2 * 1 / 2 + 2 * 4 / 5 + 0) / 6)
  assert (metrics["dominant.artphoto.n"], metrics["dominant.artphoto.unparsed"]) == (6, 1)
  assert metrics["dominant.artemis.accuracy"] == 1.0


def open_ended(i, ratings=None, dimension="Valence comparison"):
  item = {"id": i, "image1_url": "1.jpg", "image2_url": "2.jpg", "question": f"q{i}", "correct_answer": f"r{i}",
          "question_type": "Open_ended", "describing_dimension": dimension, "response(m)": f"a{i}"}
  if ratings is not None:
    item["eval_result(m)"] = ratings
  return item


def test_description_from_file_ratings_and_from_a_judge():
  calls = []

  def judge(question, reference, response):
    calls.append((question, reference, response))
    return [1, 1, 1, 1, 0]

  items = [open_ended(0, ["2", "2", "2", "2", "2"]), open_ended(1, [0, 1, 2, 1, 0], "Detailed comparison"),
           open_ended(2)]
  metrics, scored = score(items, judge=judge)
  assert calls == [("q2", "r2", "a2")]  # only the unrated item is judged
  assert scored[2].judged == (1, 1, 1, 1, 0)
  assert metrics["description.pair.valence_comparison.score"] == pytest.approx((1.0 + 0.4) / 2)
  assert metrics["description.pair.detailed_comparison.score"] == pytest.approx(0.4)
  assert metrics["description.pair.overall.score"] == pytest.approx((1.0 + 0.4 + 0.4) / 3)
  unjudged, _ = score(items)
  assert (unjudged["description.pair.n"], unjudged["description.pair.unjudged"]) == (2, 1)
  with pytest.raises(ValueError, match="item 2"):
    score(items, judge=lambda q, r, a: [3, 0, 0, 0, 0])
