"""Emotion rewards for GRPO: pure `jnp` functions of a whole batch of parsed completions, jitted once.

Completions are parsed once on the host (`eemo_jax.rl.parsing`); the prompts' ground truth travels as
arrays (`GroundTruth`); every reward maps `(parsed, truth, **options)` to an (N,) float32 column, NaN on the
rows it cannot score (another task's rows, or a row whose truth is missing), as TRL's reward functions
return None. A config names rewards with weights and options; `compute_rewards` evaluates them in one
jitted call into an (N, F) matrix plus metrics, and the GRPO engine weights and sums the matrix.

    parsed = parsing.parse_completions(texts, parsing.questions(records))
    truth = rewards.GroundTruth.from_records(records)
    specs = rewards.reward_specs([("format", 0.5, {}), ("eemo_task", 1.0, {"score_mode": "gaussian"})])
    matrix, metrics = rewards.compute_rewards(parsed, truth, specs)      # (N, F) float32, dict of scalars

Task ids (`TASKS`; `GroundTruth.task`):

| id | task             | reward in `eemo_task` | truth used                          |
|----|------------------|-----------------------|-------------------------------------|
| 0  | yes_no           | `choice`              | `choice` (letter index)             |
| 1  | multiple_choice  | `choice`              | `choice`                            |
| 2  | dominant_emotion | `dominant`            | `option_set`, `emotion`             |
| 3  | emotion_ranking  | `ranking`             | `ranking` (3 emotion ids)           |
| 4  | valence          | `score`               | `score` in [0, 1]                   |
| 5  | arousal          | `score`               | `score`                             |
| 6  | dominance        | `score`               | `score`                             |
| 7  | ces              | `ces`                 | `emotion` in Mikels-8 (set 0)       |
| 8  | open_ended       | none (NaN)            |                                     |

Sources (reference/papers.md): the dominant-emotion matrix and its formula §3.5 (the authors' `vad_distance.py`
and `dominant_reward_dict.py`); the exact-match mode is their `use_seven`; the ranking reward is the
hit + Kendall score of their `thinking_consistancy.py` (§3.5), with τ over positions (see `ranking_reward`);
the V/A/D levels are that file's bins, the threshold reward Q-Insight's and the Gaussian OmniQuality-R's (§5.1).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import inspect
import json
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import tasks
from data_pipeline.errors import UnknownLabelError
from eemo_jax.rl import parsing
from eemo_jax.rl.advantages import nanstd
from eemo_jax.rl.parsing import ParsedCompletions

TASKS = ("yes_no", "multiple_choice", "dominant_emotion", "emotion_ranking", "valence", "arousal", "dominance",
         parsing.CES, "open_ended")
TASK_ID = {task: i for i, task in enumerate(TASKS)}
VAD = tasks.VAD_DIMENSIONS
RANKING_HIT_WEIGHTS = (25.0, 15.0, 10.0)  # ground-truth ranks 1, 2, 3 (thinking_consistancy.py `hit_score`)
# Q-Insight's score threshold, 0.35 on its 1-5 scale, on EEmo's 0-1 scale: 0.35 / 4.
SCORE_THRESHOLD = 0.0875
# OmniQuality-R's Gaussian width is not released; 0.1 gives 0.61 at 0.1 off and 0.14 at 0.2 off.
SCORE_SIGMA = 0.1
SCORE_LEVELS = (0.4, 0.6)  # low <= 0.4 < moderate < 0.6 <= high (thinking_consistancy.py `similarity_score`)
MIKELS_SET = parsing.OPTION_SET_NAMES.index("mikels8")

# --------------------------------------------------------------------------------------------------
# Similarity matrices of the dominant-emotion option sets
# --------------------------------------------------------------------------------------------------


def dominant_reward_matrix(option_words: Sequence[str], *, vad_weights: Sequence[float] = (0.5, 0.3, 0.2),
                           vad_share: float = 0.6, definition_power: float = 2.0, power: float = 3.0,
                           missing_vad: Sequence[float] = (5.0, 5.0, 5.0),
                           lexicon: Mapping[str, Sequence[float]] | None = None,
                           definition_similarity=None) -> np.ndarray:
  """(K, K) float64 partial credit `M[truth, prediction]` of an option set, by the authors' formula.

  `(vad_share · S_vad + (1 − vad_share) · S_def ** definition_power) ** power`, where
    S_vad[i, j] = 1 − d_ij / max_j d_ij, d_ij the Euclidean distance of the words' lexicon (V, A, D) vectors
      weighted by `vad_weights` (a row whose distances are all 0 is 1, as theirs);
    S_def = `definition_similarity` divided by its largest off-diagonal entry (when positive), diagonal 1,
      clipped to [0, 1].
  `lexicon` defaults to the shipped `emotion_vad_scores.json`, looked up in lower case; a word missing from
  it gets `missing_vad` with a warning, as the authors' code does. `definition_similarity` defaults to the
  shipped `definition_similarity.json` entry with the same words (any order or case); other sets must give
  their own (K, K) matrix.
  """
  words = [str(w).strip() for w in option_words]
  if not words:
    raise ValueError("an option set needs at least one emotion word")
  s_vad = _vad_similarity(words, np.asarray(vad_weights, np.float64), _lexicon() if lexicon is None else lexicon,
                          np.asarray(missing_vad, np.float64))
  raw = _shipped_definition_similarity(words) if definition_similarity is None else np.array(
      definition_similarity, np.float64)
  if raw.shape != (len(words), len(words)):
    raise ValueError(f"definition_similarity has shape {raw.shape} for {len(words)} option words: give a (K, K) "
                     "matrix, row and column i for option word i")
  off_diagonal = raw[~np.eye(len(words), dtype=bool)]
  top = off_diagonal.max() if off_diagonal.size else 1.0
  s_def = raw / top if top > 0 else raw.copy()
  np.fill_diagonal(s_def, 1.0)
  s_def = np.clip(s_def, 0.0, 1.0)
  return (vad_share * s_vad + (1.0 - vad_share) * s_def ** definition_power) ** power


def _vad_similarity(words: list[str], weights: np.ndarray, lexicon: Mapping, missing: np.ndarray) -> np.ndarray:
  absent = [w for w in words if w.lower() not in lexicon]
  if absent:
    warnings.warn(f"{absent} are not in the VAD lexicon: using (V, A, D) = {tuple(missing.tolist())} for them, as "
                  "the EEmo-Logic authors do; pass lexicon= with their values for a meaningful matrix",
                  stacklevel=3)
  vectors = np.array([lexicon.get(w.lower(), missing) for w in words], np.float64)  # (K, 3)
  diff = vectors[:, None, :] - vectors[None, :, :]  # (K, K, 3)
  distance = np.sqrt(np.sum(weights * diff ** 2, axis=-1))  # (K, K)
  row_max = distance.max(axis=1, keepdims=True)  # (K, 1)
  return np.where(row_max == 0, 1.0, 1.0 - distance / np.where(row_max == 0, 1.0, row_max))


def _shipped_definition_similarity(words: list[str]) -> np.ndarray:
  lowered = [w.lower() for w in words]
  for key, matrix in _definitions().items():
    names = [n.strip().lower() for n in key.split(",")]
    if sorted(names) == sorted(lowered):
      order = [names.index(w) for w in lowered]
      return np.asarray(matrix, np.float64)[np.ix_(order, order)]
  raise ValueError(f"no definition similarities ship for the option set {words}: they exist for "
                   f"{list(_definitions())}; pass definition_similarity= a (K, K) matrix for this set")


@functools.cache
def _lexicon() -> dict[str, tuple[float, float, float]]:
  return {word: tuple(values) for word, values in _data("emotion_vad_scores.json").items()}


@functools.cache
def _definitions() -> dict[str, list[list[float]]]:
  return _data("definition_similarity.json")


def _data(name: str):
  return json.loads(importlib.resources.files("eemo_jax.rl").joinpath("data", name).read_text("utf-8"))


@functools.cache
def option_set_matrices() -> np.ndarray:
  """(S, K_max, K_max) float32: `dominant_reward_matrix` of each set of `parsing.OPTION_SET_NAMES`, zero-padded.

  The jitted rewards gather `M[set, truth, prediction]` per row from this stack, with no branching per row.
  """
  sets = [tasks.OPTION_SETS[name] for name in parsing.OPTION_SET_NAMES]
  size = max(len(s) for s in sets)
  stack = np.zeros((len(sets), size, size), np.float32)
  for i, words in enumerate(sets):
    stack[i, :len(words), :len(words)] = dominant_reward_matrix(words)
  stack.setflags(write=False)
  return stack


# --------------------------------------------------------------------------------------------------
# Ground truth as arrays
# --------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GroundTruth:
  """The prompts' ground truth for N rows, as arrays that travel through the batch (a JAX pytree).

  task        (N,) int32     `TASK_ID` of the row's task
  choice      (N,) int32     answer letter index (A = 0) of yes_no / multiple_choice rows, else -1
  option_set  (N,) int32     index in `parsing.OPTION_SET_NAMES` of the row's emotion set (dominant_emotion,
                             emotion_ranking, ces), -1 for other sets and tasks
  emotion     (N,) int32     the dominant emotion (or CES class) as an id in that set, else -1
  ranking     (N, 3) int32   the three ranked emotions' ids, strongest first, else -1
  score       (N,) float32   the V/A/D score in [0, 1] of valence / arousal / dominance rows, else NaN
  Emotion ids index the option set of the row's `parsing.Question`, so parsed and true ids agree.
  """
  task: np.ndarray
  choice: np.ndarray
  option_set: np.ndarray
  emotion: np.ndarray
  ranking: np.ndarray
  score: np.ndarray

  def __len__(self) -> int:
    return self.task.shape[0]

  @classmethod
  def from_records(cls, records: Sequence) -> GroundTruth:
    """From the data pipeline's validated records: `EEmoRecord`, `EmoVerseRecord` (a CES row), their feature
    dicts, or prompt-builder dicts. The labels are read as the prompt builder reads them (`tasks.eemo_answer`),
    the target that SFT trains on."""
    rows = [_truth_row(record) for record in records]
    custom = sum(1 for row in rows if row[0] == TASK_ID["dominant_emotion"] and row[2] < 0)
    if custom:
      warnings.warn(f"{custom} dominant_emotion records offer an option set other than the five of "
                    f"{parsing.OPTION_SET_NAMES}: the similarity reward gives NaN on them (exact=True scores them)",
                    stacklevel=2)
    n = len(rows)
    columns = list(zip(*rows)) if rows else [()] * 6
    return cls(task=np.asarray(columns[0], np.int32).reshape(n), choice=np.asarray(columns[1], np.int32).reshape(n),
               option_set=np.asarray(columns[2], np.int32).reshape(n),
               emotion=np.asarray(columns[3], np.int32).reshape(n),
               ranking=np.asarray(columns[4], np.int32).reshape(n, 3),
               score=np.asarray(columns[5], np.float32).reshape(n))

  def repeat(self, group_size: int) -> GroundTruth:
    """Each row `group_size` times in a row: the truth of a GRPO group's completions."""
    return jax.tree.map(lambda x: np.repeat(np.asarray(x), group_size, axis=0), self)


def _truth_row(record) -> tuple:
  q = parsing.question(record)
  fields = parsing.record_fields(record)
  record_id = str(fields.get("id", "?"))
  choice, option_set, emotion, ranking, score = -1, -1, -1, (-1, -1, -1), math.nan
  if q.task in (parsing.CES, "dominant_emotion", "emotion_ranking"):
    option_set = parsing.option_set_id(q.options)
  if q.task == parsing.CES:
    value = next((fields[k] for k in ("emotion", "emotion_category") if fields.get(k)), "")
    emotion = _emotion_id(str(value), q.options, record_id, "emotion")
  elif q.task != "open_ended":
    value = tasks.eemo_answer(fields)
    if q.task in ("yes_no", "multiple_choice"):
      choice = ord(value) - ord("A")
    elif q.task == "dominant_emotion":
      emotion = _emotion_id(value, q.options, record_id, "emotion")
    elif q.task == "emotion_ranking":
      ranking = tuple(_emotion_id(name, q.options, record_id, "ranking") for name in value)
    else:
      score = float(value)
  return TASK_ID[q.task], choice, option_set, emotion, ranking, score


def _emotion_id(name: str, names: tuple[str, ...], record_id: str, field: str) -> int:
  found = tasks.match_emotion(name, names)
  if found is None:
    raise UnknownLabelError(record_id, field, f"{name!r} is not among the options {names}",
                            "give the answer from the record's option set")
  return names.index(found)


# --------------------------------------------------------------------------------------------------
# Rewards: (parsed, truth, **options) -> (N,) float32, NaN where the reward does not apply
# --------------------------------------------------------------------------------------------------


def _is_task(truth: GroundTruth, *names: str) -> jax.Array:
  task = jnp.asarray(truth.task)
  return functools.reduce(jnp.logical_or, [task == TASK_ID[name] for name in names])


def _only(rows: jax.Array, values: jax.Array) -> jax.Array:
  return jnp.where(rows, values.astype(jnp.float32), jnp.float32(jnp.nan))


def format_reward(parsed: ParsedCompletions, truth: GroundTruth, *, variant: str = "answer") -> jax.Array:
  """1 when the completion follows its prompt's template, else 0, on every row.

  variant="answer": `<think>…</think><answer>…</answer>` and nothing else (the bare class name for CES);
  variant="response": the authors' released `format_reward` ("… response <emotion> …", papers.md §3.5).
  """
  if variant not in ("answer", "response"):
    raise ValueError(f"format variant {variant!r}: use 'answer' or 'response'")
  flags = parsed.well_formed if variant == "answer" else parsed.response_formed
  return jnp.asarray(flags).astype(jnp.float32)


def choice_reward(parsed: ParsedCompletions, truth: GroundTruth) -> jax.Array:
  """Yes/no and multiple choice: 1 for the right option letter, 0 otherwise (unreadable included)."""
  truth_choice = jnp.asarray(truth.choice)
  rows = _is_task(truth, "yes_no", "multiple_choice") & (truth_choice >= 0)
  return _only(rows, jnp.asarray(parsed.choice) == truth_choice)


def dominant_reward(parsed: ParsedCompletions, truth: GroundTruth, *, exact: bool = False) -> jax.Array:
  """Dominant emotion: `M[truth, prediction]` of the row's option set (`dominant_reward_matrix`), 0 when
  unreadable; `exact=True` gives 1 for the right emotion and 0 otherwise (the authors' `use_seven`)."""
  rows = _is_task(truth, "dominant_emotion")
  return _only(rows & _emotion_rows(truth, exact), _emotion_credit(parsed, truth, exact))


def ces_reward(parsed: ParsedCompletions, truth: GroundTruth, *, soft: bool = False) -> jax.Array:
  """EmoVerse CES: 1 for the right Mikels class, 0 otherwise; `soft=True` gives the Mikels-8 matrix's credit."""
  rows = _is_task(truth, parsing.CES)
  return _only(rows & _emotion_rows(truth, not soft), _emotion_credit(parsed, truth, not soft))


def _emotion_rows(truth: GroundTruth, exact: bool) -> jax.Array:
  known = jnp.asarray(truth.emotion) >= 0
  return known if exact else known & (jnp.asarray(truth.option_set) >= 0)


def _emotion_credit(parsed: ParsedCompletions, truth: GroundTruth, exact: bool) -> jax.Array:
  predicted, true = jnp.asarray(parsed.emotion), jnp.asarray(truth.emotion)
  if exact:
    return (predicted == true).astype(jnp.float32)
  matrices = jnp.asarray(option_set_matrices())  # (S, K, K)
  credit = matrices[jnp.maximum(jnp.asarray(truth.option_set), 0), jnp.maximum(true, 0), jnp.maximum(predicted, 0)]
  return jnp.where(predicted >= 0, credit, 0.0)


def ranking_reward(pred, truth) -> jax.Array:
  """(`ranking_score` / 100)² for (N, 3) int32 emotion ids, strongest first, -1 = missing -> (N,) float32.

  The square is the authors' reward; evaluation reports the unsquared score (`eemo_jax.eval.metrics`).
  """
  return (ranking_score(pred, truth) / 100.0) ** 2


def ranking_score(pred, truth) -> jax.Array:
  """hit + kendall in [0, 100] for (N, 3) int32 emotion ids, strongest first, -1 = missing -> (N,) float32.

  hit = Σ over the ground-truth ranks 1, 2, 3 whose emotion is among the prediction's of 25, 15, 10;
  kendall = 25 · (τ + 1), with τ Kendall's tau between the ground-truth and the predicted *positions* of the
  emotions both share, × 2/3 when they share two and 0 when they share one or none.
  The authors' `thinking_consistancy.py` gives `scipy.stats.kendalltau` the emotion *names*, which it ranks
  alphabetically: for three shared emotions that is a different τ in 8 of the 36 orderings, so positions
  are used here. Their score is also rounded to 2 decimals before `ranking_reward`'s square; this one is not.
  An emotion repeated in a row counts at its first position only; -1 entries are missing.
  """
  pred, truth = jnp.asarray(pred, jnp.int32), jnp.asarray(truth, jnp.int32)  # (N, 3)
  match = (_first_occurrences(truth)[:, :, None] & _first_occurrences(pred)[:, None, :]
           & (truth[:, :, None] == pred[:, None, :]))  # (N, 3, 3): truth rank i is predicted at j
  shared = match.any(axis=-1)  # (N, 3)
  position = jnp.argmax(match, axis=-1)  # (N, 3): predicted position of truth rank i, where shared
  hit = jnp.sum(jnp.where(shared, jnp.asarray(RANKING_HIT_WEIGHTS, jnp.float32), 0.0), axis=-1)
  first, second = np.triu_indices(3, k=1)  # the 3 pairs of truth ranks, first < second
  both = shared[:, first] & shared[:, second]  # (N, 3)
  concordant = jnp.sum(both & (position[:, first] < position[:, second]), axis=-1)
  discordant = jnp.sum(both & (position[:, first] > position[:, second]), axis=-1)
  pairs = jnp.sum(both, axis=-1)
  tau = (concordant - discordant).astype(jnp.float32) / jnp.maximum(pairs, 1).astype(jnp.float32)
  count = jnp.sum(shared, axis=-1)
  scale = jnp.where(count == 3, 1.0, jnp.where(count == 2, 2.0 / 3.0, 0.0)).astype(jnp.float32)
  kendall = 25.0 * (tau + 1.0) * scale
  return hit + kendall


def _first_occurrences(ids: jax.Array) -> jax.Array:
  """(N, 3) bool: the id is valid (>= 0) and not equal to an earlier one of its row."""
  earlier = jnp.asarray(np.tril(np.ones((3, 3), bool), k=-1))  # [j, k]: k comes before j
  repeated = jnp.any((ids[:, :, None] == ids[:, None, :]) & earlier, axis=-1)
  return (ids >= 0) & ~repeated


def ranking_task_reward(parsed: ParsedCompletions, truth: GroundTruth) -> jax.Array:
  """Emotion ranking rows: `ranking_reward` of the parsed ranking against the true one."""
  true = jnp.asarray(truth.ranking)
  rows = _is_task(truth, "emotion_ranking") & jnp.any(true >= 0, axis=-1)
  return _only(rows, ranking_reward(parsed.ranking, true))


def score_reward(parsed: ParsedCompletions, truth: GroundTruth, *, mode: str = "threshold",
                 threshold: float = SCORE_THRESHOLD, sigma: float = SCORE_SIGMA,
                 levels: Sequence[float] = SCORE_LEVELS, dimensions: Sequence[str] = VAD) -> jax.Array:
  """V/A/D score rows (of `dimensions`), 0 when unreadable:

  mode="level": 1 when prediction and truth fall in the same level, low <= levels[0] < moderate < levels[1]
    <= high (the bins of the authors' thinking_consistancy.py);
  mode="threshold": 1 when |prediction − truth| < threshold (Q-Insight);
  mode="gaussian": exp(−(prediction − truth)² / 2σ²) (OmniQuality-R).
  """
  if mode not in ("level", "threshold", "gaussian"):
    raise ValueError(f"score mode {mode!r}: use 'level', 'threshold' or 'gaussian'")
  unknown = set(dimensions) - set(VAD)
  if unknown or not dimensions:
    raise ValueError(f"score dimensions {tuple(dimensions)}: name some of {VAD}")
  predicted, true = jnp.asarray(parsed.score, jnp.float32), jnp.asarray(truth.score, jnp.float32)
  rows = _is_task(truth, *dimensions) & ~jnp.isnan(true)
  if mode == "level":
    low, high = (jnp.float32(v) for v in levels)
    level = lambda x: jnp.where(x <= low, 0, jnp.where(x >= high, 2, 1))  # noqa: E731
    credit = (level(predicted) == level(true)).astype(jnp.float32)
  elif mode == "threshold":
    credit = (jnp.abs(predicted - true) < jnp.float32(threshold)).astype(jnp.float32)
  else:
    credit = jnp.exp(-(predicted - true) ** 2 / jnp.float32(2.0 * sigma ** 2))
  return _only(rows, jnp.where(jnp.isnan(predicted), 0.0, credit))


def eemo_task_reward(parsed: ParsedCompletions, truth: GroundTruth, *, score_mode: str = "threshold",
                     threshold: float = SCORE_THRESHOLD, sigma: float = SCORE_SIGMA,
                     levels: Sequence[float] = SCORE_LEVELS, exact: bool = False, soft_ces: bool = False) -> jax.Array:
  """Each row scored by the reward of its own task (the table in the module docstring), selected by task id,
  so a mixed batch of every task is one call; NaN on open_ended rows and rows without truth."""
  task = jnp.asarray(truth.task)
  per_task = [
      (_is_task(truth, "yes_no", "multiple_choice"), choice_reward(parsed, truth)),
      (task == TASK_ID["dominant_emotion"], dominant_reward(parsed, truth, exact=exact)),
      (task == TASK_ID["emotion_ranking"], ranking_task_reward(parsed, truth)),
      (_is_task(truth, *VAD), score_reward(parsed, truth, mode=score_mode, threshold=threshold, sigma=sigma,
                                           levels=levels)),
      (task == TASK_ID[parsing.CES], ces_reward(parsed, truth, soft=soft_ces)),
  ]
  return jnp.select([rows for rows, _ in per_task], [values for _, values in per_task], jnp.float32(jnp.nan))


RewardFn = Callable[..., jax.Array]
REWARDS: dict[str, RewardFn] = {
    "format": format_reward,
    "choice": choice_reward,
    "dominant": dominant_reward,
    "ranking": ranking_task_reward,
    "score": score_reward,
    "ces": ces_reward,
    "eemo_task": eemo_task_reward,
}

# --------------------------------------------------------------------------------------------------
# Rewards named by a config, evaluated in one jitted call
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  """One reward of a config: its `REWARDS` name, weight, keyword options and metric label."""
  name: str
  weight: float = 1.0
  options: tuple[tuple[str, Any], ...] = ()
  label: str = ""


def reward_specs(config) -> tuple[RewardSpec, ...]:
  """A config's rewards, checked: each entry a `RewardSpec`, a name, `(name,)`, `(name, weight)`,
  `(name, weight, options)` or a mapping with `name` and optional `weight`, `options`, `label`.

  Unknown names and options fail here, naming what exists. A label defaults to the name, with `_2`, `_3`, ...
  for later repeats of a name (the metrics' keys).
  """
  if isinstance(config, tuple) and config and all(isinstance(s, RewardSpec) and s.label for s in config):
    return config
  entries = [config] if isinstance(config, (str, Mapping, RewardSpec)) else list(config)
  if not entries:
    raise ValueError("no rewards: name at least one of " + ", ".join(REWARDS))
  specs, seen = [], {}
  for entry in entries:
    spec = _spec(entry)
    label = spec.label
    if not label:
      seen[spec.name] = seen.get(spec.name, 0) + 1
      label = spec.name if seen[spec.name] == 1 else f"{spec.name}_{seen[spec.name]}"
    specs.append(dataclasses.replace(spec, label=label))
  labels = [s.label for s in specs]
  if len(set(labels)) != len(labels):
    raise ValueError(f"reward labels repeat: {labels}; give each reward its own label")
  return tuple(specs)


def _spec(entry) -> RewardSpec:
  if isinstance(entry, RewardSpec):
    name, weight, options, label = entry.name, entry.weight, dict(entry.options), entry.label
  elif isinstance(entry, str):
    name, weight, options, label = entry, 1.0, {}, ""
  elif isinstance(entry, Mapping) or hasattr(entry, "to_dict"):
    entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
    unknown = set(entry) - {"name", "weight", "options", "label"}
    if unknown or "name" not in entry:
      raise ValueError(f"reward entry {entry}: give 'name' and optionally 'weight', 'options', 'label'")
    name, weight, options, label = entry["name"], entry.get("weight", 1.0), entry.get("options") or {}, \
        entry.get("label", "")
  elif isinstance(entry, Sequence) and 1 <= len(entry) <= 3:
    name, weight, options, label = entry[0], entry[1] if len(entry) > 1 else 1.0, \
        (entry[2] if len(entry) > 2 else None) or {}, ""
  else:
    raise ValueError(f"reward entry {entry!r}: give a name, (name, weight) or (name, weight, options)")
  if name not in REWARDS:
    raise ValueError(f"unknown reward {name!r}: use one of {', '.join(REWARDS)}")
  options = dict(options.to_dict() if hasattr(options, "to_dict") else options)
  allowed = [p.name for p in inspect.signature(REWARDS[name]).parameters.values() if p.kind == p.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    raise ValueError(f"reward {name!r} has no option {unknown}: its options are {allowed or 'none'}")
  weight = float(weight)
  if not math.isfinite(weight):
    raise ValueError(f"reward {name!r} has weight {weight}: give a finite number")
  return RewardSpec(name=str(name), weight=weight, options=tuple(sorted((k, _frozen(v)) for k, v in options.items())),
                    label=str(label))


def _frozen(value):
  """Option values as hashable constants (lists from configs become tuples): they are static under jit."""
  return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def reward_weights(specs) -> np.ndarray:
  """(F,) float32 weights of the matrix's columns, in the order of `reward_specs(specs)`."""
  return np.asarray([s.weight for s in reward_specs(specs)], np.float32)


def compute_rewards(parsed: ParsedCompletions, truth: GroundTruth, specs) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The rewards of a config over a batch: ((N, F) float32 matrix, metrics), in one jitted call.

  Column f is `REWARDS[spec.name](parsed, truth, **spec.options)`, NaN where that reward does not apply.
  The metrics (scalars; TRL's names) are, per reward label, `rewards/{label}/mean` and `rewards/{label}/std`
  over the rows it scores (NaN-ignoring; the std with Bessel's correction, as TRL's `nanstd`), and per task
  of `TASKS`, `parse_failure/{task}`: the fraction of its rows whose answer did not read (NaN when the batch
  has none), plus `parse_failure/all`. Batches of the same size compile once.
  """
  return _compute_rewards(parsed, truth, reward_specs(specs))


@functools.partial(jax.jit, static_argnames=("specs",))
def _compute_rewards(parsed: ParsedCompletions, truth: GroundTruth, specs: tuple[RewardSpec, ...]):
  rows = jnp.shape(truth.task)[0]
  if jnp.shape(parsed.choice)[0] != rows:
    raise ValueError(f"{jnp.shape(parsed.choice)[0]} parsed completions for {rows} ground-truth rows: repeat the "
                     "truth for each completion of a group (GroundTruth.repeat)")
  matrix = jnp.stack([REWARDS[s.name](parsed, truth, **dict(s.options)) for s in specs], axis=1)  # (N, F)
  metrics = {}
  for f, spec in enumerate(specs):
    metrics[f"rewards/{spec.label}/mean"] = jnp.nanmean(matrix[:, f])
    metrics[f"rewards/{spec.label}/std"] = nanstd(matrix[:, f])
  failed = ~jnp.asarray(parsed.parse_ok)
  task = jnp.asarray(truth.task)
  for task_id, name in enumerate(TASKS):
    of_task = task == task_id
    metrics[f"parse_failure/{name}"] = jnp.sum(failed & of_task) / jnp.sum(of_task)
  metrics["parse_failure/all"] = jnp.mean(failed)
  return matrix, metrics


def compiled_variants() -> int:
  """How many versions of `compute_rewards` jit has compiled (for recompilation checks)."""
  return _compute_rewards._cache_size()


__all__ = ["GroundTruth", "MIKELS_SET", "REWARDS", "RANKING_HIT_WEIGHTS", "RewardSpec", "SCORE_LEVELS",
           "SCORE_SIGMA", "SCORE_THRESHOLD", "TASKS", "TASK_ID", "ces_reward", "choice_reward", "compiled_variants",
           "compute_rewards", "dominant_reward", "dominant_reward_matrix", "eemo_task_reward", "format_reward",
           "option_set_matrices", "ranking_reward", "ranking_score", "ranking_task_reward", "reward_specs",
           "reward_weights", "score_reward"]
