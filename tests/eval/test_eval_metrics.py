"""Evaluation metrics against independent references: scipy's correlations, the bootstrap's coverage of a known
mean, hand-computed classification tables, boxes and rankings."""

import math

import numpy as np
import pytest
from scipy import stats

from eemo_jax.eval import metrics
from eemo_jax.rl import rewards


def test_accuracy_is_the_mean_and_nan_when_empty():
  assert metrics.accuracy([True, False, True, True]) == 0.75
  assert metrics.accuracy(np.array([1, 0, 0, 0, 1])) == pytest.approx(0.4)
  assert math.isnan(metrics.accuracy([]))


@pytest.mark.parametrize("seed", range(4))
def test_correlations_equal_scipy_with_and_without_ties(seed):
  rng = np.random.default_rng(seed)
  x, y = rng.normal(size=57), rng.normal(size=57)
  y = 0.6 * x + y
  assert metrics.srcc(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
  assert metrics.plcc(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
  tied_x, tied_y = rng.integers(1, 6, size=40), rng.integers(1, 4, size=40)  # SAM-like levels: many ties
  assert metrics.srcc(tied_x, tied_y) == pytest.approx(stats.spearmanr(tied_x, tied_y).statistic, abs=1e-12)
  assert metrics.plcc(tied_x, tied_y) == pytest.approx(stats.pearsonr(tied_x, tied_y).statistic, abs=1e-12)


def test_correlations_by_hand():
  # Ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]; of [1, 3, 2, 2] they are [1, 4, 2.5, 2.5]: r = 0.5.
  assert metrics.srcc([1, 2, 2, 3], [1, 3, 2, 2]) == pytest.approx(0.5)
  assert metrics.srcc([1, 2, 3], [10, 200, 3000]) == pytest.approx(1.0)
  assert metrics.plcc([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


@pytest.mark.parametrize("x, y", [([1.0], [2.0]), ([], []), ([1, 1, 1], [1, 2, 3]), ([1, 2, 3], [0.5, 0.5, 0.5]),
                                  ([1, 2, np.nan], [1, 2, 3])])
def test_correlations_are_nan_when_undefined(x, y):
  assert math.isnan(metrics.srcc(x, y)) and math.isnan(metrics.plcc(x, y))


def test_correlations_reject_unpaired_columns():
  with pytest.raises(ValueError, match="paired"):
    metrics.srcc([1, 2, 3], [1, 2])


def test_bootstrap_ci_covers_the_true_mean_at_about_its_level():
  rng = np.random.default_rng(7)
  true_mean, sigma, n, trials = 3.0, 2.0, 100, 60
  covered, widths = 0, []
  for trial in range(trials):
    sample = rng.normal(true_mean, sigma, size=n)
    low, high = metrics.bootstrap_ci(np.mean, sample, n_resamples=400, seed=trial)
    covered += low <= true_mean <= high
    widths.append(high - low)
  # Coverage of a 95% interval over 60 trials: a binomial(60, 0.95) is below 51 with probability < 0.2%.
  assert covered >= 51
  # The normal-theory width 2 · 1.96 · σ/√n.
  assert np.mean(widths) == pytest.approx(2 * 1.96 * sigma / math.sqrt(n), rel=0.1)


def test_bootstrap_ci_is_deterministic_per_seed():
  sample = np.random.default_rng(0).exponential(size=80)
  assert metrics.bootstrap_ci(np.mean, sample, seed=3) == metrics.bootstrap_ci(np.mean, sample, seed=3)
  assert metrics.bootstrap_ci(np.mean, sample, seed=3) != metrics.bootstrap_ci(np.mean, sample, seed=4)
  narrow = metrics.bootstrap_ci(np.mean, sample, confidence=0.5)
  wide = metrics.bootstrap_ci(np.mean, sample, confidence=0.99)
  assert wide[0] < narrow[0] < narrow[1] < wide[1]


def test_bootstrap_ci_resamples_arrays_as_pairs():
  x = np.arange(50.0)
  boxes = np.stack([x, x, x + 1, x + 1], axis=1)  # (50, 4): rows travel with their item
  same = lambda a, b, c: float(np.array_equal(a, b) and np.array_equal(c[:, 0], a))  # noqa: E731
  assert metrics.bootstrap_ci(same, x, x.copy(), boxes) == (1.0, 1.0)


def test_bootstrap_ci_drops_nan_resamples():
  x = np.array([0.0, 1.0, 2.0, 3.0])
  without_zero_mean = lambda a: float("nan") if 0.0 in a else float(np.mean(a))  # noqa: E731
  low, high = metrics.bootstrap_ci(without_zero_mean, x, n_resamples=300)
  assert 1.0 <= low <= high <= 3.0
  assert all(math.isnan(v) for v in metrics.bootstrap_ci(lambda a: float("nan"), x))
  assert all(math.isnan(v) for v in metrics.bootstrap_ci(np.mean, np.zeros(0)))


def test_bootstrap_ci_rejects_arrays_of_different_lengths():
  with pytest.raises(ValueError, match="first axes differ"):
    metrics.bootstrap_ci(metrics.srcc, np.arange(4), np.arange(5))


def test_with_ci_sets_the_value_and_its_interval():
  out = {}
  truth, pred = np.arange(30.0), np.arange(30.0) + np.random.default_rng(1).normal(size=30)
  metrics.with_ci(out, "assessment.valence.srcc", metrics.srcc, truth, pred, n_resamples=200)
  assert set(out) == {"assessment.valence.srcc", "assessment.valence.srcc.ci95_low",
                      "assessment.valence.srcc.ci95_high"}
  assert out["assessment.valence.srcc"] == pytest.approx(stats.spearmanr(truth, pred).statistic)
  assert out["assessment.valence.srcc.ci95_low"] <= out["assessment.valence.srcc"] <= \
      out["assessment.valence.srcc.ci95_high"]


@pytest.mark.parametrize("pred, score", [
    ([0, 1, 2], 100.0),
    ([2, 1, 0], 50.0),  # every hit, τ = −1
    ([1, 0, 2], 50.0 + 25.0 * (1 + 1 / 3)),  # one discordant pair of three
    ([0, 1, -1], 40.0 + 25.0 * 2 * 2 / 3),  # two shared, in order: τ = 1, scaled by 2/3
    ([1, 5, 0], 40.0 + 25.0 * 0 * 2 / 3),  # two shared, reversed: τ = −1
    ([2, 5, 6], 10.0),  # one shared: no Kendall term
    ([4, 5, 6], 0.0),
    ([-1, -1, -1], 0.0),
])
def test_ranking_score_by_hand(pred, score):
  out = metrics.ranking_score([pred], [[0, 1, 2]])
  assert out.shape == (1,) and out.dtype == np.float64
  assert out[0] == pytest.approx(score, rel=1e-6)


def test_ranking_score_is_the_root_of_the_reward():
  rng = np.random.default_rng(0)
  pred = np.array([rng.permutation(7)[:3] for _ in range(200)], np.int32)
  pred[rng.random(pred.shape) < 0.1] = -1
  truth = np.array([rng.permutation(7)[:3] for _ in range(200)], np.int32)
  np.testing.assert_allclose(metrics.ranking_score(pred, truth),
                             np.sqrt(np.asarray(rewards.ranking_reward(pred, truth), np.float64)) * 100, rtol=1e-5)
  assert metrics.ranking_score(np.zeros((0, 3)), np.zeros((0, 3))).shape == (0,)


def test_confusion_matrix_by_hand_with_unparsed_predictions():
  true = [0, 0, 1, 1, 2, 2, 2]
  pred = [0, 1, 1, -1, 2, 0, -1]
  expected = np.array([[1, 1, 0],
                       [0, 1, 0],
                       [1, 0, 1]])
  out = metrics.confusion_matrix(true, pred, 3)
  assert out.dtype == np.int64
  np.testing.assert_array_equal(out, expected)
  assert out.sum() == len(true) - 2  # the two unparsed predictions are counted apart


@pytest.mark.parametrize("true, pred", [([0, 3], [0, 0]), ([0, 1], [0, -2]), ([0, 1], [0, 3]), ([0], [0, 1])])
def test_confusion_matrix_rejects_ids_out_of_range(true, pred):
  with pytest.raises(ValueError):
    metrics.confusion_matrix(true, pred, 3)


def test_classification_metrics_by_hand():
  # labels a, b, c; truth a a b b c c c; prediction a b b (unparsed) c a (unparsed).
  labels = ["a", "b", "c"]
  out = metrics.classification_metrics([0, 0, 1, 1, 2, 2, 2], [0, 1, 1, -1, 2, 0, -1], labels)
  # a: tp 1, predicted 2, support 2 -> P 1/2, R 1/2; b: tp 1, predicted 2, support 2 -> 1/2, 1/2;
  # c: tp 1, predicted 1, support 3 -> P 1, R 1/3, F1 = 2 · 1/3 / (4/3) = 1/2.
  expected = {"a": (0.5, 0.5, 0.5, 2), "b": (0.5, 0.5, 0.5, 2), "c": (1.0, 1 / 3, 0.5, 3)}
  for label, (p, r, f1, support) in expected.items():
    assert out[f"class.{label}.precision"] == pytest.approx(p)
    assert out[f"class.{label}.recall"] == pytest.approx(r)
    assert out[f"class.{label}.f1"] == pytest.approx(f1)
    assert out[f"class.{label}.support"] == support
  assert out["accuracy"] == pytest.approx(3 / 7)
  assert out["macro_f1"] == pytest.approx(0.5)
  assert out["weighted_f1"] == pytest.approx(0.5)
  assert out["unparsed"] == 2


def test_classification_metrics_reads_label_strings_and_averages_over_present_classes():
  labels = ["Amusement", "Anger", "Awe", "Fear"]
  # Fear never occurs nor is predicted: it is left out of the macro mean. "Joy" is not a label: unparsed.
  out = metrics.classification_metrics(["Anger", "Anger", "Awe", "Amusement"], ["Anger", "Awe", "Awe", "Joy"],
                                       labels)
  # Amusement: P 0 (nothing predicted), R 0 -> F1 0; Anger: P 1, R 1/2 -> F1 2/3; Awe: P 1/2, R 1 -> F1 2/3.
  assert out["class.Anger.f1"] == pytest.approx(2 / 3) and out["class.Awe.f1"] == pytest.approx(2 / 3)
  assert out["class.Amusement.f1"] == 0 and out["class.Fear.f1"] == 0 and out["class.Fear.support"] == 0
  assert out["macro_f1"] == pytest.approx((0 + 2 / 3 + 2 / 3) / 3)
  assert out["weighted_f1"] == pytest.approx((0 * 1 + 2 / 3 * 2 + 2 / 3 * 1) / 4)
  assert out["accuracy"] == pytest.approx(0.5) and out["unparsed"] == 1
  with pytest.raises(ValueError, match="not among"):
    metrics.classification_metrics(["Joy"], ["Anger"], labels)


def test_top_k_accuracy_by_hand():
  probs = np.array([[0.1, 0.6, 0.3],
                    [0.5, 0.2, 0.3],
                    [0.2, 0.2, 0.6]])
  true = [2, 1, 1]
  assert metrics.top_k_accuracy(probs, true, 1) == 0.0
  # Top 2: row 0 {1, 2} hits; row 1 {0, 2} misses; row 2 {2, 0} misses, its tie of classes 0 and 1 going to 0.
  assert metrics.top_k_accuracy(probs, true, 2) == pytest.approx(1 / 3)
  assert metrics.top_k_accuracy(probs, true, 3) == 1.0
  assert math.isnan(metrics.top_k_accuracy(np.zeros((0, 3)), [], 1))


@pytest.mark.parametrize("a, b, iou", [
    ([0, 0, 2, 2], [3, 3, 5, 5], 0.0),  # disjoint
    ([0, 0, 2, 2], [2, 0, 4, 2], 0.0),  # touching edges
    ([0, 0, 4, 4], [1, 1, 3, 3], 4 / 16),  # nested
    ([1, 2, 5, 7], [1, 2, 5, 7], 1.0),  # identical
    ([0, 0, 2, 2], [1, 1, 3, 3], 1 / 7),  # overlap of 1 over 4 + 4 - 1
    ([0, 0, 10, 1], [5, 0, 15, 2], 5 / 25),
    ([1, 1, 1, 3], [0, 0, 3, 3], 0.0),  # zero width
    ([2, 2, 1, 1], [0, 0, 3, 3], 0.0),  # inverted corners
    ([np.nan] * 4, [0, 0, 3, 3], 0.0),  # unparsed
])
def test_box_iou_by_hand(a, b, iou):
  out = metrics.box_iou([a, a], [b, b])
  np.testing.assert_allclose(out, [iou, iou])
  np.testing.assert_allclose(metrics.box_iou([b], [a]), [iou])


def test_cosine_similarity_by_hand():
  a = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 0.0], [2.0, 0.0], [np.nan, 1.0]])
  b = np.array([[0.0, 3.0], [2.0, 2.0], [1.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
  np.testing.assert_allclose(metrics.cosine_similarity(a, b), [0.0, 1.0, 0.0, -1.0, 0.0], atol=1e-12)
