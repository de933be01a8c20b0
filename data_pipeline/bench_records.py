"""EEmo-Bench and EEmo-Logic cross-domain test items -> one `EEmoRecord` per benchmark question.

The benchmark files are not question-answer records: one item of `Ebench_single.json` holds five kinds of
question about one image (a yes/no one, a what/how one, the top-3 emotion ranking, the SAM V/A/D means and
sometimes an open-ended question), one of `Ebench_pair.json` three about two images, and the cross-domain
files one dominant-emotion label each. Here every question becomes its own record, stored in the layout the
training data uses, so that `tasks.eemo_messages` builds its prompt and `eemo_jax.rl.parsing.question`
gives the options its answers are read against, as for any EEmoDB record.

A record's id is `<config>/<index in the file>/<task>` (`single/17/yes_no`): predictions map back to the
item and the question they answer, and `source` names the file and item (`Ebench_single.json#17`).
Each question is parsed on its own (`parse_bench_record`), so a malformed field costs only the questions
that read it: a bad `judge_answer` skips `single/17/yes_no` and keeps the ranking and V/A/D of item 17.

What each config reads (file formats: eemo_jax/eval/data/eemo_bench/README.md):
  single:   `image_name`; yes_no from `judge_Q`/`judge_A`/`judge_answer`; multiple_choice from
            `choose_Q`/`choose_A`/`choose_answer`; emotion_ranking from `emotion_list` (top 3 `[emotion, votes]`,
            strongest first); valence/arousal/dominance from the first figure (the mean) of `Valence`/...
            on the 1-9 SAM scale, rescaled (x - 1) / 8; open_ended from `open_ended_Q` when it is text, with
            `open_ended_answer` as its reference if the file has one (the released files have none).
  pair:     `image1_url`, `image2_url`; `judge_question`/`judge_options`/`judge_answer`,
            `choose_question`/`choose_options`/`choose_answer`, `open_ended_question`.
  artemis:  `img_path` (Windows separators), `dominant_emotion`.
  artphoto: `image_path`, `emotion`.
Yes/no options keep the file's letters (half the items are A: Yes, B: No), so the prompt lists them as the
benchmark does and the answer letter means what the file says.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from data_pipeline import records, tasks
from data_pipeline.errors import InvalidFieldError, MissingFieldError, UnknownLabelError
from data_pipeline.records import EEmoRecord

SINGLE_TASKS = ("yes_no", "multiple_choice", "emotion_ranking", "valence", "arousal", "dominance")
PAIR_TASKS = ("yes_no", "multiple_choice")
DOMINANT_TASKS = ("dominant_emotion",)
OPEN_ENDED = "open_ended"
CONFIG_TASKS = {"single": SINGLE_TASKS + (OPEN_ENDED,), "pair": PAIR_TASKS + (OPEN_ENDED,),
                "artemis": DOMINANT_TASKS, "artphoto": DOMINANT_TASKS}  # every question a config can ask
SAM_RANGE = (1.0, 9.0)  # EEmo-Bench's V/A/D are means of 9-point Self-Assessment Manikin ratings

# The emotions a ranking is drawn from, listed in the order of the authors' ranking prompt
# (EEmo-Logic inference/evaluate_ranking.py: "anger, disgust, fear, joy, neutral, sadness, and surprise").
RANKING_OPTIONS = tasks.EKMAN_7
# The cross-domain option sets. The authors' scripts (inference/evaluate_ArtEmis__think.py,
# evaluate_Artphoto_think.py) offer the set of labels the file holds: for ArtEmis the 8 Mikels emotions of
# `dominant_emotion` (ArtEmis's ninth category, "something else", labels no test item and is not offered);
# for ArtPhoto its 8 labels, which are the EEmo-Logic `artphoto8` set. Both are option sets the model was
# trained on (`tasks.OPTION_SETS`), so the prompt lists them as in training and the rewards' similarity
# matrices apply.
DOMINANT_OPTIONS = {"artemis": tasks.MIKELS_8_FI, "artphoto": tasks.ARTPHOTO_8}
# EEmo-Bench releases no reference answer for its open-ended questions (they are scored by a judge), but a
# record needs answer text to make a prompt: this stands in for it, and says so to anyone who reads it.
NO_REFERENCE_ANSWER = "(EEmo-Bench gives no reference answer for this open-ended question)"

_FIELDS = {  # config -> task -> (question, options, answer) field names
    "single": {"yes_no": ("judge_Q", "judge_A", "judge_answer"),
               "multiple_choice": ("choose_Q", "choose_A", "choose_answer"),
               OPEN_ENDED: ("open_ended_Q", None, "open_ended_answer")},
    "pair": {"yes_no": ("judge_question", "judge_options", "judge_answer"),
             "multiple_choice": ("choose_question", "choose_options", "choose_answer"),
             OPEN_ENDED: ("open_ended_question", None, "open_ended_answer")},
}
_IMAGE_FIELDS = {"single": ("image_name",), "pair": ("image1_url", "image2_url"), "artemis": ("img_path",),
                 "artphoto": ("image_path",)}
_LABEL_FIELD = {"artemis": "dominant_emotion", "artphoto": "emotion"}
_VAD_FIELDS = {"valence": "Valence", "arousal": "Arousal", "dominance": "Dominance"}
_YES_NO = {"yes", "no"}
_LETTERS = "ABCDEFGH"  # EEmoRecord's option letters


def record_id(config: str, index: int, task: str) -> str:
  """`single/17/yes_no`: the config, the item's index in its file, and the question."""
  return f"{config}/{index}/{task}"


def item_tasks(config: str, item: Any) -> tuple[str, ...]:
  """The questions an item asks, each one record. Open-ended only where the item has such a question: a
  missing, null or empty one asks nothing, while any other value is a question to parse (and refuse)."""
  if config in ("artemis", "artphoto"):
    return DOMINANT_TASKS
  fixed = SINGLE_TASKS if config == "single" else PAIR_TASKS
  question = item.get(_FIELDS[config][OPEN_ENDED][0]) if isinstance(item, Mapping) else None
  asked = question is not None and not (isinstance(question, str) and not question.strip())
  return fixed + (OPEN_ENDED,) if asked else fixed


def parse_bench_record(config: str, item: Any, index: int, task: str, image_root: str | os.PathLike, *,
                       source: str = "", split: str = "test", max_image_pixels: int | None = None) -> EEmoRecord:
  """One benchmark question of item `index` of a `config` file -> its `EEmoRecord`, images read under
  `image_root` (nothing outside it). A malformed field or a missing image raises a `RecordError` naming the
  record id, the field and the fix."""
  if task not in CONFIG_TASKS.get(config, ()):
    raise ValueError(f"EEmo-Bench config {config!r} asks no {task!r} question; the configs and their questions "
                     f"are {CONFIG_TASKS}")
  rid = record_id(config, index, task)
  if not isinstance(item, Mapping):
    raise InvalidFieldError(rid, "<item>", f"is a {type(item).__name__}, not a JSON object",
                            f"each item of the {config} file must be an object as released")
  fields = _question_fields(config, item, task, rid)
  images = [records.read_image(image_root, _image_name(item, key, rid), rid, key, max_image_pixels=max_image_pixels)
            for key in _IMAGE_FIELDS[config]]
  return EEmoRecord(id=rid, images=tuple(d for d, _, _ in images), widths=tuple(w for _, w, _ in images),
                    heights=tuple(h for _, _, h in images), task=task, source=source, split=split, **fields)


def _question_fields(config: str, item: Mapping, task: str, rid: str) -> dict[str, Any]:
  if task in ("yes_no", "multiple_choice"):
    return _choice_fields(item, *_FIELDS[config][task], task, rid)
  if task == OPEN_ENDED:
    question_key, _, answer_key = _FIELDS[config][task]
    answer = item.get(answer_key)
    if answer is not None and not isinstance(answer, str):
      raise InvalidFieldError(rid, answer_key, f"must be text, got {type(answer).__name__}",
                              "give the reference answer as text, or leave it out")
    return {"question": _text(item, question_key, rid), "answer": (answer or "").strip() or NO_REFERENCE_ANSWER}
  if task == "emotion_ranking":
    ranking = _ranking(item, rid)
    return {"question": _ranking_question(), "answer": f"{tasks.ANSWER_KEYS[task]}: {', '.join(ranking)}",
            "ranking": ranking, "options": RANKING_OPTIONS, "option_set": _option_set(tasks.EKMAN_7_EEMO)}
  if task in _VAD_FIELDS:
    score = _sam_score(item, _VAD_FIELDS[task], rid)
    scores = np.full((3,), np.nan, np.float32)  # (3,) V, A, D: this question says only its own
    scores[tasks.VAD_DIMENSIONS.index(task)] = score
    return {"question": tasks.VAD_PROMPT.format(dimension=task), "scores": scores,
            "answer": f"{tasks.ANSWER_KEYS[task]}: {score:.4f}"}
  options = DOMINANT_OPTIONS[config]
  emotion = _dominant(item, _LABEL_FIELD[config], options, rid)
  return {"question": tasks.DOMINANT_PROMPT.format(options=", ".join(options)),
          "answer": f"{tasks.ANSWER_KEYS[task]}: {emotion}", "emotion": emotion.lower(), "options": options,
          "option_set": _option_set(options)}


def _choice_fields(item: Mapping, question_key: str, options_key: str, answer_key: str, task: str,
                   rid: str) -> dict[str, Any]:
  """A perception question with its lettered options in the file's order and the answer letter."""
  question = _text(item, question_key, rid)
  given = item.get(options_key)
  if given is None:
    raise MissingFieldError(rid, options_key, "is missing", "add the options as {'A': ..., 'B': ...}")
  if not isinstance(given, Mapping) or not given:
    raise InvalidFieldError(rid, options_key, f"must be an object of letter -> option text, got {given!r:.80}",
                            "give the options as {'A': ..., 'B': ...}")
  letters = sorted(str(k) for k in given)
  if letters != list(_LETTERS[:len(letters)]) or len(letters) < 2:
    raise InvalidFieldError(rid, options_key, f"has letters {letters}", f"letter 2 to {len(_LETTERS)} options "
                            "A, B, C... without gaps")
  texts = tuple(given[letter] for letter in letters)
  # An empty text is kept: the benchmark scores pair item 356 by its letter, though its right option B is "".
  if not all(isinstance(t, str) for t in texts):
    raise InvalidFieldError(rid, options_key, f"has an option that is not text: {texts!r:.80}",
                            "give every option as text")
  texts = tuple(t.strip() for t in texts)
  if task == "yes_no" and (len(texts) != 2 or {t.rstrip(".").lower() for t in texts} != _YES_NO):
    raise InvalidFieldError(rid, options_key, f"{dict(zip(letters, texts))} are not the options Yes and No",
                            "give a yes/no question the options Yes and No")
  answer = item.get(answer_key)
  if answer is None:
    raise MissingFieldError(rid, answer_key, "is missing", "add the correct option's letter")
  if not isinstance(answer, str) or answer.strip() not in letters:
    raise InvalidFieldError(rid, answer_key, f"{answer!r:.40} is not one of the option letters {letters}",
                            "give the correct option's letter")
  choice = answer.strip()
  return {"question": question, "options": texts, "choice": choice, "answer": choice}


def _ranking(item: Mapping, rid: str) -> tuple[str, str, str]:
  """The three strongest emotions of `emotion_list`, in the spelling of `RANKING_OPTIONS`."""
  given = item.get("emotion_list")
  if given is None:
    raise MissingFieldError(rid, "emotion_list", "is missing", "add the top 3 [emotion, votes], strongest first")
  entries = given[:3] if isinstance(given, list) else []
  if len(entries) < 3 or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                 and _is_number(e[1]) for e in entries):
    raise InvalidFieldError(rid, "emotion_list", f"is not a list of at least 3 [emotion, votes]: {given!r:.120}",
                            "give the top 3 emotions as [[emotion, votes], ...], strongest first")
  names, votes = [e[0] for e in entries], [e[1] for e in entries]
  top = tuple(tasks.match_emotion(name, RANKING_OPTIONS) for name in names)
  unknown = [name for name, found in zip(names, top) if found is None]
  if unknown:
    raise UnknownLabelError(rid, "emotion_list", f"{unknown} are not EEmo-Bench emotions",
                            f"use emotions of {', '.join(RANKING_OPTIONS)}")
  if len(set(top)) != 3:
    raise InvalidFieldError(rid, "emotion_list", f"repeats an emotion among its top 3: {names}",
                            "rank three different emotions")
  if any(a < b for a, b in zip(votes, votes[1:])):
    raise InvalidFieldError(rid, "emotion_list", f"is not strongest first: votes {votes}",
                            "list the emotions by votes, strongest first")
  return top


def _sam_score(item: Mapping, key: str, rid: str) -> float:
  """The SAM mean (the first of `[mean, std, ...]`, or a bare number) rescaled from 1-9 to 0-1."""
  given = item.get(key)
  if given is None:
    raise MissingFieldError(rid, key, "is missing", "add [mean, std, ...] of the 1-9 SAM ratings")
  mean = given[0] if isinstance(given, list) and given else given
  low, high = SAM_RANGE
  if not _is_number(mean) or not low <= mean <= high:
    raise InvalidFieldError(rid, key, f"mean {mean!r:.40} is not a number on the {low:g}-{high:g} SAM scale",
                            "give the mean rating first, on the 1-9 scale")
  return (float(mean) - low) / (high - low)


def _dominant(item: Mapping, key: str, options: tuple[str, ...], rid: str) -> str:
  """The item's dominant emotion in the spelling of `options` ('sad' -> 'Sad', 'contentment' -> 'Content')."""
  given = item.get(key)
  if given is None:
    raise MissingFieldError(rid, key, "is missing", "add the item's dominant emotion")
  found = tasks.match_emotion(given, options) if isinstance(given, str) else None
  if found is None:
    raise UnknownLabelError(rid, key, f"{given!r:.60} is not one of the emotions offered ({', '.join(options)})",
                            "give one of these emotions, or leave the item out")
  return found


def _image_name(item: Mapping, key: str, rid: str) -> Any:
  """The image path as the file names it; ArtEmis's Windows separators become '/'."""
  if key not in item:
    raise MissingFieldError(rid, key, "is missing", "name the item's image")
  name = item[key]
  return name.replace("\\", "/") if isinstance(name, str) else name


def _text(item: Mapping, key: str, rid: str) -> str:
  value = item.get(key)
  if value is None:
    raise MissingFieldError(rid, key, "is missing", "add the question text")
  if not isinstance(value, str) or not value.strip():
    raise InvalidFieldError(rid, key, f"must be non-empty text, got {value!r:.60}", "give the question as text")
  return value.strip()


def _ranking_question() -> str:
  listed = ", ".join(RANKING_OPTIONS[:-1]) + ", and " + RANKING_OPTIONS[-1]
  return tasks.RANKING_PROMPT.format(emotions=listed)


def _option_set(names: tuple[str, ...]) -> str:
  """The `records.OPTION_SETS` entry of a set of names (what `EEmoRecord.option_set` stores)."""
  return ", ".join(names)


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
