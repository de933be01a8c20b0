"""Emotion rewards: the similarity matrices against the authors' published values and a line-by-line
transcription of their formula; every jitted reward against a plain-Python transcription over random batches
and on hand-made completions; the ranking reward's Kendall tau against scipy; one compilation per batch size.

Float32 rewards are compared with float64 transcriptions at rtol 1e-6 (a few float32 ulps) and atol 1e-7 (the
largest absolute float32 error of exp(-x) is about x·e^-x·2^-24 <= 2.2e-8 for the Gaussian score reward)."""

from __future__ import annotations

import importlib.resources
import itertools
import json
import math

import jax
import numpy as np
import pytest
from scipy.stats import kendalltau

from data_pipeline import tasks
from data_pipeline.synthetic import synthetic_eemo_records, synthetic_emoverse_record
from eemo_jax.rl import parsing, rewards

RTOL, ATOL = 1e-6, 1e-7
SET_WORDS = [tasks.OPTION_SETS[name] for name in parsing.OPTION_SET_NAMES]
NAN = math.nan

# ------------------------------------------------------------------------------------------------
# Similarity matrices
# ------------------------------------------------------------------------------------------------


def transcribed_matrix(words, lexicon, definitions):
  """papers.md §3.5 / the data README, one entry at a time (the authors' vad_distance.py loop)."""
  vectors = [lexicon.get(w.lower(), [5.0, 5.0, 5.0]) for w in words]
  k = len(words)
  s_vad = []
  for i in range(k):
    d = [math.sqrt(0.5 * (vectors[i][0] - vectors[j][0]) ** 2 + 0.3 * (vectors[i][1] - vectors[j][1]) ** 2
                   + 0.2 * (vectors[i][2] - vectors[j][2]) ** 2) for j in range(k)]
    s_vad.append([1.0 if max(d) == 0 else 1.0 - x / max(d) for x in d])
  top = max(definitions[i][j] for i in range(k) for j in range(k) if i != j)
  s_def = [[1.0 if i == j else min(max(definitions[i][j] / top, 0.0), 1.0) for j in range(k)] for i in range(k)]
  return [[(0.6 * s_vad[i][j] + 0.4 * s_def[i][j] ** 2) ** 3 for j in range(k)] for i in range(k)]


def shipped(name):
  """A data file as the package ships it (eemo_jax/rl/data)."""
  return json.loads(importlib.resources.files("eemo_jax.rl").joinpath("data", name).read_text("utf-8"))


@pytest.mark.parametrize("words", SET_WORDS, ids=parsing.OPTION_SET_NAMES)
def test_matrix_is_the_transcribed_formula_with_unit_diagonal(words):
  matrix = rewards.dominant_reward_matrix(words)
  expected = transcribed_matrix(words, shipped("emotion_vad_scores.json"),
                                shipped("definition_similarity.json")[", ".join(words)])
  assert matrix.dtype == np.float64 and matrix.shape == (len(words), len(words))
  np.testing.assert_allclose(matrix, expected, rtol=1e-12, atol=1e-15)
  np.testing.assert_array_equal(np.diag(matrix), 1.0)
  assert matrix.min() >= 0.0 and matrix.max() <= 1.0


def test_matrix_known_values():
  """The issue's values of the authors' Mikels-8 matrix (three decimals), M[truth, prediction]."""
  words = list(tasks.MIKELS_8_FI)
  m = rewards.dominant_reward_matrix(["disgust", "contentment", "sadness", "awe", "anger", "excitement",
                                      "amusement", "fear"])
  at = lambda truth, pred: round(float(m[words.index(truth), words.index(pred)]), 3)  # noqa: E731
  assert (at("anger", "fear"), at("fear", "anger"), at("contentment", "amusement"), at("amusement", "awe")) == (
      0.307, 0.621, 0.291, 0.245)
  positive, negative = ("contentment", "excitement", "amusement"), ("disgust", "sadness", "anger", "fear")
  opposite = [m[words.index(a), words.index(b)] for a in positive for b in negative]
  opposite += [m[words.index(b), words.index(a)] for a in positive for b in negative]
  # Opposite-valence pairs ≈ 0: the largest are excitement -> fear 0.058 and -> anger 0.036 (shared high arousal).
  assert max(opposite) < 0.06 and np.median(opposite) < 0.002


@pytest.mark.parametrize("name,truth,pred,value", [
    # Entries of the authors' released matrices (EEmo-Logic train/Stage_2/reward_matrix_1.json at b353f32).
    ("mikels8", "fear", "anger", 0.6208284382707345),
    ("mikels8", "amusement", "excitement", 0.11804753209228469),
    ("artphoto8", "Fear", "Anger", 0.6208284382707345),
    ("artphoto8", "Amusement", "Fear", 0.0009211733196273774),
    ("emotic26", "Suffering", "Sadness", 0.494064751027463),
    ("emotic26", "Happiness", "Sadness", 0.0004909862648696594),
    ("plutchik24", "Loathing", "Disgust", 0.7046863695382496),
    ("plutchik24", "Admiration", "Trust", 0.1237884358076037),
    ("ekman7", "surprise", "joy", 0.5861257850763563),
    ("ekman7", "joy", "disgust", 0.002334163631301556),
])
def test_matrix_equals_the_authors_released_entries(name, truth, pred, value):
  words = tasks.OPTION_SETS[name]
  m = rewards.dominant_reward_matrix(words)
  assert m[words.index(truth), words.index(pred)] == pytest.approx(value, rel=1e-12)


def test_matrix_of_a_reordered_set_is_the_same_matrix_reordered():
  words = list(tasks.EKMAN_7_EEMO)
  order = [6, 2, 0, 5, 1, 4, 3]
  reordered = rewards.dominant_reward_matrix([words[i].upper() for i in order])
  np.testing.assert_allclose(reordered, rewards.dominant_reward_matrix(words)[np.ix_(order, order)], rtol=1e-15)


def test_matrix_constants_and_own_data():
  words = ["joy", "fear", "blorp"]
  definitions = [[1.0, 0.2, 0.5], [0.1, 1.0, 0.4], [0.3, 0.6, 1.0]]
  with pytest.warns(UserWarning, match="blorp"):
    m = rewards.dominant_reward_matrix(words, definition_similarity=definitions)
  lexicon = {**shipped("emotion_vad_scores.json"), "blorp": [5.0, 5.0, 5.0]}
  np.testing.assert_allclose(m, transcribed_matrix(words, lexicon, definitions), rtol=1e-12)
  plain = rewards.dominant_reward_matrix(words, definition_similarity=definitions, lexicon=lexicon, vad_share=1.0,
                                         power=1.0)  # the VAD part alone
  vectors = np.array([lexicon[w] for w in words])
  d = np.sqrt(((vectors[:, None] - vectors[None]) ** 2 * [0.5, 0.3, 0.2]).sum(-1))
  np.testing.assert_allclose(plain, 1 - d / d.max(1, keepdims=True), rtol=1e-12)
  with pytest.raises(ValueError, match="definition_similarity"):
    rewards.dominant_reward_matrix(["joy", "fear", "awe"])
  with pytest.raises(ValueError, match=r"\(K, K\)"):
    rewards.dominant_reward_matrix(["joy", "fear", "awe"], definition_similarity=[[1.0]])


def test_stacked_matrices():
  stack = rewards.option_set_matrices()
  assert stack.shape == (5, 26, 26) and stack.dtype == np.float32
  for i, words in enumerate(SET_WORDS):
    k = len(words)
    np.testing.assert_array_equal(stack[i, :k, :k], rewards.dominant_reward_matrix(words).astype(np.float32))
    assert not stack[i, k:].any() and not stack[i, :, k:].any()


# ------------------------------------------------------------------------------------------------
# Ranking reward
# ------------------------------------------------------------------------------------------------


def test_ranking_reward_exact_and_misses():
  truth = np.array([[0, 1, 2]] * 4, np.int32)
  pred = np.array([[0, 1, 2], [3, 4, 5], [-1, -1, -1], [2, 1, 0]], np.int32)
  # Reversed (last row): hit 50, tau -1 -> kendall 0: (50/100)^2.
  np.testing.assert_allclose(rewards.ranking_reward(pred, truth), [1.0, 0.0, 0.0, 0.25], rtol=RTOL)


@pytest.mark.parametrize("pred,value", [
    ([0, 1, -1], ((40 + 50 * 2 / 3) / 100) ** 2),  # ranks 1, 2 in order: tau 1, x 2/3
    ([1, 0, 6], (40 / 100) ** 2),  # ranks 1, 2 swapped: tau -1
    ([5, 0, 6], (25 / 100) ** 2),  # one shared: no Kendall part
    ([5, 6, 2], (10 / 100) ** 2),
    ([0, 0, 1], ((40 + 50 * 2 / 3) / 100) ** 2),  # a repeat counts once
    ([2, 0, 1], ((50 + 25 * (1 / 3 - 1 / 3 * 2 + 1)) / 100) ** 2),  # pairs (0,1) +, (0,2) -, (1,2) -: tau -1/3
])
def test_ranking_reward_by_hand(pred, value):
  out = rewards.ranking_reward(np.array([pred], np.int32), np.array([[0, 1, 2]], np.int32))
  np.testing.assert_allclose(out, [value], rtol=RTOL)


def test_ranking_kendall_tau_is_over_positions_in_all_36_orderings():
  emotions = [3, 0, 5]  # any three ids: positions, not ids, decide tau
  names = ["anger", "fear", "joy"]
  truths, preds, expected, by_names = [], [], [], 0
  for truth in itertools.permutations(range(3)):
    for pred in itertools.permutations(range(3)):
      truths.append([emotions[i] for i in truth])
      preds.append([emotions[i] for i in pred])
      tau = kendalltau([truth.index(e) for e in range(3)], [pred.index(e) for e in range(3)]).statistic
      expected.append(((50 + 25 * (tau + 1)) / 100) ** 2)
      authors_tau = kendalltau([names[i] for i in truth], [names[i] for i in pred]).statistic
      by_names += not math.isclose(authors_tau, tau)
  out = rewards.ranking_reward(np.array(preds, np.int32), np.array(truths, np.int32))
  np.testing.assert_allclose(out, expected, rtol=RTOL)
  assert by_names == 8  # the names-based tau of the authors' script differs in 8 of the 36


def transcribed_ranking(pred, truth) -> float:
  """The issue's formula (thinking_consistancy.py with tau over positions), one row, in plain Python."""
  predicted = []
  for e in pred:
    if e >= 0 and e not in predicted:
      predicted.append(e)
  ranks = {}
  for i, e in enumerate(truth):
    if e >= 0 and e not in ranks:
      ranks[e] = i
  hit = sum((25, 15, 10)[i] for e, i in ranks.items() if e in predicted)
  shared = [e for e in ranks if e in predicted]  # in ground-truth order
  kendall = 0.0
  if len(shared) >= 2:
    pairs = list(itertools.combinations(shared, 2))
    concordant = sum(predicted.index(a) < predicted.index(b) for a, b in pairs)
    tau = (concordant - (len(pairs) - concordant)) / len(pairs)
    kendall = 25 * (tau + 1) * (1.0 if len(shared) == 3 else 2 / 3)
  return ((hit + kendall) / 100) ** 2


def test_ranking_reward_equals_the_transcription_on_random_rankings():
  rng = np.random.default_rng(0)
  n = 4000
  sizes = rng.choice([3, 4, 7, 26], n)[:, None]  # small sets: many shared emotions and repeats
  pred = (rng.integers(0, 1 << 30, (n, 3)) % sizes).astype(np.int32)
  truth = (rng.integers(0, 1 << 30, (n, 3)) % sizes).astype(np.int32)
  pred[rng.random((n, 3)) < 0.15] = -1
  truth[rng.random((n, 3)) < 0.05] = -1
  out = np.asarray(rewards.ranking_reward(pred, truth))
  expected = [transcribed_ranking(p.tolist(), t.tolist()) for p, t in zip(pred, truth)]
  np.testing.assert_allclose(out, expected, rtol=RTOL)
  assert len(set(np.round(expected, 6))) >= 12  # the cases reach many outcomes (13 distinct values here)


# ------------------------------------------------------------------------------------------------
# Every registry reward against a plain-Python transcription, random batches
# ------------------------------------------------------------------------------------------------


def random_batch(n: int, seed: int):
  rng = np.random.default_rng(seed)
  task = rng.integers(0, len(rewards.TASKS), n).astype(np.int32)
  option_set = rng.integers(-1, 5, n).astype(np.int32)  # -1: a set with no matrix
  size = np.array([8 if s < 0 else len(SET_WORDS[s]) for s in option_set])
  ids = lambda *shape: np.where(rng.random((n, *shape)) < 0.15, -1,  # noqa: E731
                                (rng.integers(0, 1 << 30, (n, *shape)).T % size).T)
  truth_score = rng.random(n).astype(np.float32)
  truth_score[rng.random(n) < 0.1] = np.nan
  near = truth_score + rng.normal(0, 0.1, n).astype(np.float32)
  score = np.where(rng.random(n) < 0.5, np.clip(near, 0, 1), rng.random(n)).astype(np.float32)
  score[rng.random(n) < 0.2] = np.nan
  truth = rewards.GroundTruth(task=task, choice=rng.integers(-1, 4, n).astype(np.int32), option_set=option_set,
                              emotion=ids().astype(np.int32), ranking=ids(3).astype(np.int32), score=truth_score)
  parsed = parsing.ParsedCompletions(
      well_formed=rng.random(n) < 0.5, response_formed=rng.random(n) < 0.5, parse_ok=rng.random(n) < 0.8,
      choice=rng.integers(-1, 4, n).astype(np.int32), emotion=ids().astype(np.int32),
      ranking=ids(3).astype(np.int32), score=score)
  return parsed, truth


def transcribed(name: str, p, t, i: int, **options) -> float:
  """One reward of one row, from the issue's definitions (task names as in `rewards.TASKS`)."""
  task = rewards.TASKS[t.task[i]]
  if name == "format":
    return float(p.response_formed[i] if options.get("variant") == "response" else p.well_formed[i])
  if name == "choice":
    if task not in ("yes_no", "multiple_choice") or t.choice[i] < 0:
      return NAN
    return float(p.choice[i] == t.choice[i])
  if name in ("dominant", "ces"):
    exact = options.get("exact", False) if name == "dominant" else not options.get("soft", False)
    if task != ("dominant_emotion" if name == "dominant" else "ces") or t.emotion[i] < 0 or (
        not exact and t.option_set[i] < 0):
      return NAN
    if p.emotion[i] < 0:
      return 0.0
    if exact:
      return float(p.emotion[i] == t.emotion[i])
    return rewards.dominant_reward_matrix(SET_WORDS[t.option_set[i]])[t.emotion[i], p.emotion[i]]
  if name == "ranking":
    if task != "emotion_ranking" or max(t.ranking[i]) < 0:
      return NAN
    return transcribed_ranking(p.ranking[i].tolist(), t.ranking[i].tolist())
  if name == "score":
    if task not in options.get("dimensions", rewards.VAD) or np.isnan(t.score[i]):
      return NAN
    pred, true = p.score[i], t.score[i]  # float32, compared as the jitted code does
    if np.isnan(pred):
      return 0.0
    mode = options.get("mode", "threshold")
    if mode == "level":
      low, high = (np.float32(v) for v in options.get("levels", (0.4, 0.6)))
      level = lambda x: "low" if x <= low else "high" if x >= high else "moderate"  # noqa: E731
      return float(level(pred) == level(true))
    if mode == "threshold":
      return float(abs(pred - true) < np.float32(options.get("threshold", 0.0875)))
    sigma = options.get("sigma", 0.1)
    return math.exp(-float(pred - true) ** 2 / (2 * sigma ** 2))
  if name == "eemo_task":
    route = {"yes_no": ("choice", {}), "multiple_choice": ("choice", {}),
             "dominant_emotion": ("dominant", {"exact": options.get("exact", False)}),
             "emotion_ranking": ("ranking", {}), "ces": ("ces", {"soft": options.get("soft_ces", False)})}
    route.update({dim: ("score", {"mode": options.get("score_mode", "threshold"), "sigma": options.get(
        "sigma", 0.1), "threshold": options.get("threshold", 0.0875)}) for dim in rewards.VAD})
    if task == "open_ended":
      return NAN
    other, other_options = route[task]
    return transcribed(other, p, t, i, **other_options)
  raise AssertionError(name)


CASES = [("format", {}), ("format", {"variant": "response"}), ("choice", {}), ("dominant", {}),
         ("dominant", {"exact": True}), ("ranking", {}), ("score", {}), ("score", {"mode": "level"}),
         ("score", {"mode": "gaussian", "sigma": 0.15}), ("score", {"threshold": 0.2, "dimensions": ("arousal",)}),
         ("ces", {}), ("ces", {"soft": True}), ("eemo_task", {}),
         ("eemo_task", {"score_mode": "gaussian", "exact": True, "soft_ces": True})]


@pytest.mark.parametrize("name,options", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_every_reward_equals_its_transcription_on_random_batches(name, options):
  parsed, truth = random_batch(3000, seed=len(name) + len(options))
  out = np.asarray(jax.jit(lambda p, t: rewards.REWARDS[name](p, t, **options))(parsed, truth))
  expected = np.array([transcribed(name, parsed, truth, i, **options) for i in range(len(truth))])
  assert out.dtype == np.float32 and out.shape == (len(truth),)
  np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
  np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
  scored = expected[~np.isnan(expected)]
  assert scored.size > 100 and (name == "format" or (scored == 0).any())  # each case reaches real rows


# ------------------------------------------------------------------------------------------------
# Hand-made completions, end to end: parse, then every reward
# ------------------------------------------------------------------------------------------------

MIKELS = ", ".join(tasks.MIKELS_8_FI)
HAND = [  # (record, completion, eemo_task reward a reader can check)
    ({"task": "yes_no", "question": "Is it sad?", "answer": "B"}, "<think>a</think><answer>Answer: Yes</answer>",
     1.0),
    ({"task": "yes_no", "question": "Is it sad?", "options": ["Yes", "No"], "answer": "No"},
     "<think>a</think><answer>Answer: A</answer>", 0.0),
    ({"task": "multiple_choice", "question": "Which?", "options": ["joy", "awe", "fear"], "answer": "C"},
     "<think>a</think><answer>Answer: fear</answer>", 1.0),
    ({"task": "dominant_emotion", "option_set": MIKELS, "emotion": "anger"},
     "<think>a</think><answer>Dominant emotion: Fear</answer>", 0.30743823076113347),  # anger -> fear
    ({"task": "dominant_emotion", "option_set": MIKELS, "emotion": "fear"},
     "<think>a</think><answer>Dominant emotion: angers</answer>", 0.6208284382707345),  # fear -> anger
    ({"task": "dominant_emotion", "option_set": MIKELS, "emotion": "fear"},
     "<think>a</think><answer>Dominant emotion: joy</answer>", 0.0),  # not an option: unreadable
    ({"task": "dominant_emotion", "option_set": MIKELS, "emotion": "fear"}, "", 0.0),
    ({"task": "emotion_ranking", "ranking": ["joy", "surprise", "neutral"]},
     "<think>a</think><answer>Emotion ranking: Joy, Surprise, Neutral</answer>", 1.0),
    ({"task": "emotion_ranking", "ranking": ["joy", "surprise", "neutral"]},
     "<think>a</think><answer>Emotion ranking: surprise, joy, joy</answer>", (40 / 100) ** 2),
    ({"task": "emotion_ranking", "ranking": ["joy", "surprise", "neutral"]},
     "<answer>Emotion ranking: anger, fear, sadness</answer>", 0.0),
    ({"task": "valence", "scores": [0.5, NAN, NAN]}, "<think>a</think><answer>Valence: 0.5500</answer>", 1.0),
    ({"task": "arousal", "scores": [NAN, 0.5, NAN]}, "<think>a</think><answer>Arousal: 0.6000</answer>", 0.0),
    ({"task": "dominance", "scores": [NAN, NAN, 0.5]}, "<think>a</think><answer>Dominance: 0.7.5</answer>", 0.0),
    ({"task": "open_ended", "question": "Why?", "answer": "x"}, "<think>a</think><answer>Description: y</answer>",
     NAN),
]


def hand_batch():
  records = [{"id": f"h{i}", **record} for i, (record, _, _) in enumerate(HAND)]
  records.append(synthetic_emoverse_record(0, 1))  # CES, anger
  texts = [text for _, text, _ in HAND] + ["Fear."]
  return records, texts


def test_hand_made_completions_score_what_a_reader_expects():
  records, texts = hand_batch()
  parsed = parsing.parse_completions(texts, parsing.questions(records))
  truth = rewards.GroundTruth.from_records(records)
  specs = rewards.reward_specs(["format", ("format", 1.0, {"variant": "response"}), "choice", "dominant",
                                ("dominant", 1.0, {"exact": True}), "ranking", "score",
                                ("score", 1.0, {"mode": "gaussian"}), ("score", 1.0, {"mode": "level"}), "ces",
                                ("ces", 1.0, {"soft": True}), "eemo_task"])
  matrix, metrics = rewards.compute_rewards(parsed, truth, specs)
  column = {s.label: np.asarray(matrix[:, f]) for f, s in enumerate(specs)}
  expected_task = [value for _, _, value in HAND] + [0.0]  # CES anger -> fear, exact match
  np.testing.assert_allclose(column["eemo_task"], expected_task, rtol=RTOL)
  np.testing.assert_allclose(column["format"], [1, 1, 1, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 1])
  np.testing.assert_array_equal(column["format_2"], 0.0)  # no "response ..." completions
  assert column["choice"][:3].tolist() == [1.0, 0.0, 1.0] and np.isnan(column["choice"][3:]).all()
  np.testing.assert_allclose(column["dominant_2"][3:7], [0.0, 0.0, 0.0, 0.0])  # exact match mode
  # Scores: truth 0.5; 0.55 is within 0.0875 (threshold), moderate (level), exp(-0.0025/0.02) (Gaussian).
  np.testing.assert_allclose(column["score"][10:13], [1.0, 0.0, 0.0])
  np.testing.assert_allclose(column["score_2"][10:13], [math.exp(-0.05 ** 2 / 0.02), math.exp(-0.1 ** 2 / 0.02),
                                                        0.0], rtol=RTOL)
  np.testing.assert_allclose(column["score_3"][10:13], [1.0, 0.0, 0.0])  # 0.6 is high, 0.5 moderate
  assert column["ces"][-1] == 0.0 and column["ces_2"][-1] == pytest.approx(0.30743823076113347, rel=RTOL)
  assert np.isnan(column["ces"][:-1]).all()
  assert metrics["parse_failure/dominant_emotion"] == pytest.approx(2 / 4)
  assert metrics["parse_failure/emotion_ranking"] == pytest.approx(1 / 3)  # "surprise, joy, joy" is not strict
  assert metrics["parse_failure/dominance"] == 1.0 and metrics["parse_failure/ces"] == 0.0
  assert metrics["parse_failure/all"] == pytest.approx(np.mean(~parsed.parse_ok))
  for f, spec in enumerate(specs):
    values = column[spec.label][~np.isnan(column[spec.label])]
    assert metrics[f"rewards/{spec.label}/mean"] == pytest.approx(values.mean(), rel=RTOL)
    std = metrics[f"rewards/{spec.label}/std"]
    if values.size > 1:
      assert std == pytest.approx(values.std(ddof=1), rel=RTOL, abs=ATOL)
    else:  # one CES row: no spread to estimate
      assert np.isnan(std)


def test_parse_failure_of_an_absent_task_is_nan():
  records, texts = hand_batch()
  parsed = parsing.parse_completions(texts[:3], parsing.questions(records[:3]))
  _, metrics = rewards.compute_rewards(parsed, rewards.GroundTruth.from_records(records[:3]), ["choice"])
  assert np.isnan(metrics["parse_failure/valence"]) and metrics["parse_failure/yes_no"] == 0.0
  assert metrics["rewards/choice/std"] == pytest.approx(np.std([1.0, 0.0, 1.0], ddof=1), rel=RTOL)
  _, one = rewards.compute_rewards(parsed, rewards.GroundTruth.from_records(records[:3]), ["dominant"])
  assert np.isnan(one["rewards/dominant/mean"]) and np.isnan(one["rewards/dominant/std"])


def test_every_synthetic_records_own_answer_gets_full_reward():
  """GroundTruth and the parser read a record's SFT target (the prompt builder's answer) identically."""
  records = [r for index in range(16) for r in synthetic_eemo_records(0, index)]
  records += [synthetic_emoverse_record(0, index) for index in range(8)]
  texts = [tasks.eemo_messages(r.to_features())[-1]["content"] if hasattr(r, "task") else r.emotion.capitalize()
           for r in records]
  parsed = parsing.parse_completions(texts, parsing.questions(records))
  truth = rewards.GroundTruth.from_records(records)
  matrix, metrics = rewards.compute_rewards(parsed, truth, ["format", "eemo_task"])
  scored = truth.task != rewards.TASK_ID["open_ended"]
  np.testing.assert_array_equal(np.asarray(matrix)[:, 0], 1.0)
  np.testing.assert_array_equal(np.asarray(matrix)[scored, 1], 1.0)
  assert metrics["parse_failure/all"] == 0.0
  assert set(truth.task.tolist()) == set(range(len(rewards.TASKS)))  # every task id occurs


def test_ground_truth_arrays():
  records, _ = hand_batch()
  truth = rewards.GroundTruth.from_records(records)
  assert truth.task.tolist() == [0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 4, 5, 6, 8, 7]
  assert truth.choice.tolist()[:3] == [1, 1, 2] and (truth.choice[3:] == -1).all()
  assert truth.emotion.tolist()[3:7] == [4, 7, 7, 7] and truth.emotion[-1] == tasks.MIKELS_8_FI.index("anger")
  assert truth.option_set.tolist()[3:10] == [0, 0, 0, 0, 4, 4, 4] and truth.option_set[-1] == 0
  ekman = tasks.EKMAN_7_EEMO
  assert truth.ranking[7].tolist() == [ekman.index("joy"), ekman.index("surprise"), ekman.index("neutral")]
  np.testing.assert_array_equal(truth.score[10:13], np.float32(0.5))
  assert np.isnan(truth.score[:10]).all() and np.isnan(truth.score[13:]).all()
  repeated = truth.repeat(3)
  assert len(repeated) == 3 * len(truth) and repeated.ranking.shape == (45, 3)
  assert repeated.task.tolist()[:6] == [0, 0, 0, 0, 0, 0] and repeated.emotion.tolist()[9:12] == [4, 4, 4]
  empty = rewards.GroundTruth.from_records([])
  assert empty.ranking.shape == (0, 3) and empty.task.dtype == np.int32


def test_a_dominant_set_without_a_matrix_scores_only_exactly():
  record = {"id": "c", "task": "dominant_emotion", "options": ["calm", "rage", "glee"], "emotion": "rage"}
  with pytest.warns(UserWarning, match="exact=True"):
    truth = rewards.GroundTruth.from_records([record, record])
  texts = ["<think>a</think><answer>Dominant emotion: rage</answer>", "<answer>Dominant emotion: calm</answer>"]
  parsed = parsing.parse_completions(texts, parsing.questions([record, record]))
  matrix, _ = rewards.compute_rewards(parsed, truth, ["dominant", ("dominant", 1, {"exact": True})])
  assert np.isnan(matrix[:, 0]).all() and np.asarray(matrix[:, 1]).tolist() == [1.0, 0.0]


# ------------------------------------------------------------------------------------------------
# Configs and compilation
# ------------------------------------------------------------------------------------------------


def test_reward_specs_from_config_entries():
  import ml_collections
  specs = rewards.reward_specs([
      "format",
      ("eemo_task", 2.0, {"score_mode": "gaussian", "sigma": 0.05}),
      {"name": "score", "weight": 0.5, "options": {"dimensions": ["valence"]}},
      ml_collections.ConfigDict({"name": "format", "options": {"variant": "response"}, "label": "response"}),
      ("format", 0.25),
  ])
  assert [(s.label, s.weight) for s in specs] == [("format", 1.0), ("eemo_task", 2.0), ("score", 0.5),
                                                  ("response", 1.0), ("format_2", 0.25)]
  assert specs[2].options == (("dimensions", ("valence",)),) and hash(specs)  # static under jit
  np.testing.assert_array_equal(rewards.reward_weights(specs), np.float32([1.0, 2.0, 0.5, 1.0, 0.25]))
  assert rewards.reward_specs(specs) is specs


@pytest.mark.parametrize("config,message", [
    (["accuracy"], "unknown reward 'accuracy': use one of format, choice"),
    ([("score", 1.0, {"sigmaa": 0.1})], r"has no option \['sigmaa'\]: its options are \['mode'"),
    ([("choice", 1.0, {"exact": True})], "its options are none"),
    ([("format", float("nan"))], "finite"),
    ([], "no rewards"),
    ([{"reward": "format"}], "give 'name'"),
    ([{"name": "format", "label": "x"}, {"name": "choice", "label": "x"}], "labels repeat"),
])
def test_bad_reward_configs_say_what_exists(config, message):
  with pytest.raises(ValueError, match=message):
    rewards.reward_specs(config)


def test_bad_options_fail_when_traced():
  parsed, truth = random_batch(4, seed=0)
  with pytest.raises(ValueError, match="'level', 'threshold' or 'gaussian'"):
    rewards.compute_rewards(parsed, truth, [("score", 1.0, {"mode": "linear"})])
  with pytest.raises(ValueError, match="'answer' or 'response'"):
    rewards.compute_rewards(parsed, truth, [("format", 1.0, {"variant": "xml"})])
  short, _ = random_batch(3, seed=0)
  with pytest.raises(ValueError, match="GroundTruth.repeat"):
    rewards.compute_rewards(short, truth, ["format"])


def test_one_compilation_for_every_batch_of_the_same_size():
  """New strings give new arrays of the same shapes and dtypes: the jitted rewards are not traced again."""
  records, texts = hand_batch()
  questions = parsing.questions(records)
  truth = rewards.GroundTruth.from_records(records)
  specs = rewards.reward_specs(["format", ("eemo_task", 1.0, {"score_mode": "level", "soft_ces": True})])
  rng = np.random.default_rng(0)
  before = rewards.compiled_variants()
  results = []
  for step in range(4):
    batch = [t if rng.random() < 0.5 else f"<think>{step}</think><answer>{rng.random()}</answer>" for t in texts]
    matrix, _ = rewards.compute_rewards(parsing.parse_completions(batch, questions), truth, specs)
    results.append(np.asarray(matrix))
  assert rewards.compiled_variants() == before + 1
  rewards.compute_rewards(parsing.parse_completions(texts[:5], questions[:5]),
                          rewards.GroundTruth.from_records(records[:5]), specs)
  assert rewards.compiled_variants() == before + 2  # another batch size compiles once more
  assert not np.array_equal(results[0], results[1])  # the batches differed
