"""Completions to fixed-shape arrays, once per rollout on the host, so that every reward is a jitted function.

GRPO peers loop over strings inside each reward function, so a batch is parsed once per reward. Here the
batch is read once, with the one answer parser of the project (`data_pipeline.tasks.parse_answer`, which
evaluation uses too), into a `ParsedCompletions` of N rows; `eemo_jax.rl.rewards` then scores it on the
device. The arrays have the same shapes and dtypes for every batch of N rows, so the rewards compile once.

    questions = parsing.questions(records)                # once per prompt: task and the options it offered
    parsed = parsing.parse_completions(texts, questions)  # once per rollout: (N,) and (N, 3) arrays

Emotion ids are indices into the row's option set. An option set that holds the words of one of the five
EEmo-Logic sets (`data_pipeline.tasks.OPTION_SETS`, in any order or case) is put in that set's order, so its
ids index the set's similarity matrix (`rewards.dominant_reward_matrix`); `option_set_id` names the set.
EmoVerse CES rows use the Mikels-8 set in that order (`tasks.MIKELS_8_FI`).

Give the records the prompts were built from (what `tasks.eemo_messages` got), so that each row's options are
the ones the model was shown: a yes/no prompt lists No/Yes in the record's order, or A: No, B: Yes by default.

Any string gives defined arrays: an unreadable answer is -1 (ids) or NaN (score), never an exception.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Mapping, Sequence

import jax
import numpy as np

from data_pipeline import tasks
from data_pipeline.errors import UnknownLabelError

EEMO_TASKS = tuple(tasks.ANSWER_KEYS)  # yes_no, multiple_choice, dominant_emotion, emotion_ranking, V, A, D, open_ended
CES = "ces"  # EmoVerse category answers (`tasks.ces_messages`)
OPTION_SET_NAMES = tuple(tasks.OPTION_SETS)  # option set id -> name: mikels8, artphoto8, emotic26, plutchik24, ekman7
_EMOTION_TASKS = ("dominant_emotion", "emotion_ranking", CES)
_CHOICE_TASKS = ("yes_no", "multiple_choice")

# The authors' released format_reward (grpo_emotion.py): text, "response", then only these characters to the
# end, and the first word after the last "response" one of these emotions.
_RESPONSE_WORDS = frozenset({"disgust", "content", "contentment", "sadness", "sad", "awe", "anger", "annoyance",
                             "excitement", "amusement", "fear", "pain", "joy", "neutral", "surprise", "happiness"})
_NOT_RESPONSE_CHAR_RE = re.compile(r"[^A-Za-z0-9\s\-/_()]")
_CES_ANSWER_RE = re.compile(r"\s*([A-Za-z]+)\.?\s*")  # the CES prompt asks for the emotion only
_MIKELS = frozenset(e.lower() for e in tasks.MIKELS_8)
_IMAGE_FIELDS = ("image", "images")  # encoded bytes, not text
_NO_RANKING = [-1, -1, -1]


@dataclasses.dataclass(frozen=True)
class Question:
  """What the parser must know about a prompt to read its answers: the task and the options it offered.

  `options`: letter -> text for yes_no / multiple_choice (as the prompt listed them), the emotion names for
  dominant_emotion / emotion_ranking / ces, None for the other tasks. Build it with `question(record)`.
  """
  task: str
  options: Mapping[str, str] | tuple[str, ...] | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ParsedCompletions:
  """N parsed completions; a JAX pytree of numpy arrays with the same shapes and dtypes for every batch.

  well_formed      (N,) bool     the row's prompt template: `<think>…</think><answer>…</answer>` and nothing
                                 else for EEmo tasks (`tasks.is_well_formed`), the bare emotion word for CES
  response_formed  (N,) bool     the authors' released "…response <emotion> …" variant of the format reward
  parse_ok         (N,) bool     the answer of the row's task reads strictly (`tasks.parse_answer`; a ranking
                                 needs three distinct emotions of its set): a falling rate is a collapsing format
  choice           (N,) int32    option letter index (A = 0) of yes_no / multiple_choice rows, else -1
  emotion          (N,) int32    emotion id in the row's option set (dominant_emotion, ces), else -1
  ranking          (N, 3) int32  emotion ids, strongest first: the first three distinct emotions of the set
                                 among the answer's items, -1 where fewer (emotion_ranking rows), else -1
  score            (N,) float32  V/A/D score in [0, 1] of valence / arousal / dominance rows, else NaN
  """
  well_formed: np.ndarray
  response_formed: np.ndarray
  parse_ok: np.ndarray
  choice: np.ndarray
  emotion: np.ndarray
  ranking: np.ndarray
  score: np.ndarray

  def __len__(self) -> int:
    return self.choice.shape[0]


def question(record) -> Question:
  """The `Question` of a record: an `EEmoRecord`, an `EmoVerseRecord` (CES), their stored feature dicts, a
  prompt-builder dict of `data_pipeline.tasks`, or a `Question` (returned as is).

  The options are those the prompt builder offered (`tasks.answer_options`), so answers are read against
  what the model was shown. A record that cannot make a prompt raises a `RecordError` naming the field.
  """
  if isinstance(record, Question):
    return record
  fields = record_fields(record)
  task = fields.get("task") or (CES if fields.get("emotion") or fields.get("emotion_category") else None)
  if task == CES:
    return Question(CES, tasks.MIKELS_8_FI)
  if task not in EEMO_TASKS:
    raise UnknownLabelError(str(fields.get("id", "?")), "task", f"{task!r} is neither an EEmo-Logic task nor "
                            "an EmoVerse CES record", f"use one of {EEMO_TASKS} or give an EmoVerse record")
  options = tasks.answer_options(fields)
  if task in _EMOTION_TASKS:
    options = canonical_option_set(tuple(options))
  return Question(task, options)


def questions(records: Sequence) -> list[Question]:
  return [question(r) for r in records]


def option_set_id(names: Sequence[str]) -> int:
  """Index of `names` in `OPTION_SET_NAMES` when it is that set in its order, -1 otherwise."""
  names = tuple(names)
  return next((i for i, key in enumerate(OPTION_SET_NAMES) if tasks.OPTION_SETS[key] == names), -1)


@functools.lru_cache(maxsize=256)
def canonical_option_set(names: tuple[str, ...]) -> tuple[str, ...]:
  """The known option set (`tasks.OPTION_SETS`) with the same words, in its order and spelling; else `names`."""
  words = sorted(n.strip().lower() for n in names)
  for known in tasks.OPTION_SETS.values():
    if len(known) == len(names) and sorted(k.lower() for k in known) == words:
      return known
  return names


def parse_completions(texts: Sequence[str], questions: Sequence) -> ParsedCompletions:
  """Reads N completions against their prompts' `Question`s (or records, see `question`) into arrays.

  The last `<answer>` block is read, as the authors' evaluation does; emotions fold case, plurals and the
  authors' synonyms (`tasks.EMOTION_SYNONYMS`). A text that is not a string is read as "".
  """
  if len(texts) != len(questions):
    raise ValueError(f"{len(texts)} completions for {len(questions)} questions: give one question per "
                     "completion (repeat each prompt's question for its group)")
  n = len(texts)
  well_formed, response_formed, parse_ok = [False] * n, [False] * n, [False] * n
  choice, emotion, score = [-1] * n, [-1] * n, [math.nan] * n
  ranking = [_NO_RANKING] * n
  for i, (text, row) in enumerate(zip(texts, questions)):
    q = row if isinstance(row, Question) else question(row)
    text = text if isinstance(text, str) else ""
    task = q.task
    response_formed[i] = response_formed_text(text)
    if task == CES:
      well_formed[i] = _ces_well_formed(text)
      name = tasks.parse_ces_answer(text)
      if name is not None:
        emotion[i], parse_ok[i] = _index(q.options)[name.lower()], True
      continue
    well_formed[i] = tasks.is_well_formed(text)
    if task == "emotion_ranking":
      names = tasks.parse_answer(text, task, options=q.options, partial=True)
      if names is not None:
        index = _index(q.options)
        ranking[i] = [index[name.lower()] for name in names] + [-1] * (3 - len(names))
        parse_ok[i] = len(names) == 3 and tasks.parse_answer(text, task, options=q.options) is not None
      continue
    value = tasks.parse_answer(text, task, options=q.options)
    if value is None:
      continue
    parse_ok[i] = True
    if task in _CHOICE_TASKS:
      choice[i] = ord(value) - ord("A")
    elif task == "dominant_emotion":
      emotion[i] = _index(q.options)[value.lower()]
    elif task in tasks.VAD_DIMENSIONS:
      score[i] = value
  return ParsedCompletions(
      well_formed=np.array(well_formed, np.bool_), response_formed=np.array(response_formed, np.bool_),
      parse_ok=np.array(parse_ok, np.bool_), choice=np.array(choice, np.int32), emotion=np.array(emotion, np.int32),
      ranking=np.array(ranking, np.int32).reshape(n, 3), score=np.array(score, np.float32))


def response_formed_text(text: str) -> bool:
  """The authors' released format_reward (EEmo-Logic grpo_emotion.py) for one completion, in linear time.

  Their test is `re.match(r"^<think>.*?</think>\\s*response\\s*[C]+$|^.*?\\s*response\\s*[C]+$", text, re.DOTALL)`
  with C = `A-Za-z0-9\\s\\-/_()`, then the first word after the last "response" (stripped of `.,;:()[]{}`) in
  `_RESPONSE_WORDS`. The second alternative contains the first, and it holds exactly when some "response"
  lies inside the text's longest suffix of C characters with at least one character after it; the regex
  itself backtracks quadratically on a long run of "response response ...". A text with nothing after its
  last "response" gives False (the authors' code raises an IndexError there).
  """
  if "response" not in text:
    return False
  bad = _NOT_RESPONSE_CHAR_RE.search(text[::-1])
  suffix_start = 0 if bad is None else len(text) - bad.start()
  if text.rfind("response", suffix_start, len(text) - 1) < 0:
    return False
  words = text.split("response")[-1].split()
  return bool(words) and words[0].strip(".,;:()[]{}").lower() in _RESPONSE_WORDS


def _ces_well_formed(text: str) -> bool:
  match = _CES_ANSWER_RE.fullmatch(text)
  return match is not None and match.group(1).lower() in _MIKELS


@functools.lru_cache(maxsize=256)
def _index(names: tuple[str, ...]) -> dict[str, int]:
  """Lower-case emotion name -> its id in the option set."""
  return {name.lower(): i for i, name in reversed(list(enumerate(names)))}


def record_fields(record) -> dict:
  """A record's fields as a dict of str / tuple / numpy values (text features may come back as bytes)."""
  if isinstance(record, Mapping):
    items = record.items()
  elif dataclasses.is_dataclass(record):
    items = ((f.name, getattr(record, f.name)) for f in dataclasses.fields(record))
  else:
    raise TypeError(f"cannot read a question from a {type(record).__name__}: give an EEmoRecord, an "
                    "EmoVerseRecord, their feature dict or a parsing.Question")
  return {key: _text(value) for key, value in items if key not in _IMAGE_FIELDS}


def _text(value):
  kind = type(value)
  if kind is str:
    return value
  if kind is bytes or kind is np.bytes_:
    return value.decode("utf-8")
  if kind is tuple or kind is list:
    return value if kind is tuple and all(type(v) is str for v in value) else tuple(_text(v) for v in value)
  if kind is np.ndarray and value.dtype.kind in "SOU":
    return tuple(_text(v) for v in value.tolist())
  return value


__all__ = ["CES", "EEMO_TASKS", "OPTION_SET_NAMES", "ParsedCompletions", "Question", "canonical_option_set",
           "option_set_id", "parse_completions", "question", "questions", "record_fields", "response_formed_text"]
