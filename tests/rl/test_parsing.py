"""Parsing completions into reward arrays: hand-made answers of every task (malformed ones included) give the
arrays a reader can check, rows agree with the one answer parser (`tasks.parse_answer`), any string gives
defined arrays, and the "response" format flag equals the authors' released regex."""

from __future__ import annotations

import re
import string

import numpy as np
import pytest

from data_pipeline import tasks
from data_pipeline.errors import UnknownLabelError
from data_pipeline.synthetic import synthetic_eemo_records, synthetic_emoverse_record
from eemo_jax.rl import parsing

YES_NO = parsing.Question("yes_no", tasks.YES_NO_OPTIONS)  # A: No, B: Yes
YES_FIRST = parsing.question({"task": "yes_no", "options": ["Yes", "No"]})
CHOICE = parsing.question({"task": "multiple_choice", "options": ["joy", "awe", "fear", "anger"]})
ARTPHOTO = parsing.question({"task": "dominant_emotion", "option_set": "artphoto8"})
EKMAN_DOMINANT = parsing.question({"task": "dominant_emotion", "option_set": "ekman7"})
EMOTIC = parsing.question({"task": "dominant_emotion", "option_set": "emotic26"})
MIKELS = parsing.question({"task": "dominant_emotion", "options": ", ".join(tasks.MIKELS_8_FI)})
RANKING = parsing.question({"task": "emotion_ranking"})  # EEmo-Bench's 7 emotions, in the ekman7 set's order
VALENCE = parsing.question({"task": "valence"})
CES = parsing.question(synthetic_emoverse_record(0, 2))


def answer(body: str, think: str = "The sky is grey.") -> str:
  return f"<think>{think}</think><answer>{body}</answer>"


def parse_one(text, q):
  parsed = parsing.parse_completions([text], [q])
  return {name: getattr(parsed, name)[0].tolist() for name in ("well_formed", "response_formed", "parse_ok",
                                                               "choice", "emotion", "ranking", "score")}


def test_questions_are_what_the_prompt_offered():
  assert YES_FIRST.options == {"A": "Yes", "B": "No"}
  assert parsing.question({"task": "yes_no"}).options == tasks.YES_NO_OPTIONS
  assert CHOICE.options == {"A": "joy", "B": "awe", "C": "fear", "D": "anger"}
  assert ARTPHOTO.options == tasks.ARTPHOTO_8
  assert RANKING.options == tasks.EKMAN_7_EEMO  # EEmo-Bench's default set, in the ekman7 set's order
  # An option set's words in another order or case are that set, in its order: ids index its matrix.
  shuffled = parsing.question({"task": "dominant_emotion", "options": list(reversed([e.upper() for e in
                                                                                      tasks.PLUTCHIK_24]))})
  assert shuffled.options == tasks.PLUTCHIK_24 and parsing.option_set_id(shuffled.options) == 3
  custom = parsing.question({"task": "emotion_ranking", "options": ["calm", "joy", "rage"]})
  assert custom.options == ("calm", "joy", "rage") and parsing.option_set_id(custom.options) == -1
  assert CES == parsing.Question("ces", tasks.MIKELS_8_FI)
  assert [parsing.option_set_id(tasks.OPTION_SETS[name]) for name in parsing.OPTION_SET_NAMES] == [0, 1, 2, 3, 4]


def test_records_and_their_stored_features_give_the_same_questions():
  """Records, `to_features()` dicts, and the bytes TFDS gives back for text all read the same."""
  records = synthetic_eemo_records(0, 5) + [synthetic_emoverse_record(0, 5)]
  for record in records:
    features = record.to_features()
    as_bytes = {k: v.encode() if isinstance(v, str) else [x.encode() for x in v] if k in ("options", "ranking")
                else v for k, v in features.items()}
    assert parsing.question(record) == parsing.question(features) == parsing.question(as_bytes), record.id


def test_yes_no_and_multiple_choice():
  row = parse_one(answer("Answer: B"), YES_NO)
  assert np.isnan(row.pop("score")) and row == {"well_formed": True, "response_formed": False, "parse_ok": True,
                                                "choice": 1, "emotion": -1, "ranking": [-1, -1, -1]}
  assert parse_one(answer("Answer: Yes"), YES_NO)["choice"] == 1
  assert parse_one(answer("Answer: Yes"), YES_FIRST)["choice"] == 0  # the option text, in this prompt's order
  assert parse_one(answer("Answer: (A)"), YES_FIRST)["choice"] == 0
  assert parse_one(answer("Answer: C"), YES_NO)["choice"] == -1  # not an option
  assert parse_one(answer("Answer: C: fear"), CHOICE)["choice"] == 2
  assert parse_one(answer("Answer: anger"), CHOICE)["choice"] == 3
  assert parse_one(answer("Answer: E"), CHOICE) | {"score": None} == {
      "well_formed": True, "response_formed": False, "parse_ok": False, "choice": -1, "emotion": -1,
      "ranking": [-1, -1, -1], "score": None}


@pytest.mark.parametrize("q,body,expected", [
    (ARTPHOTO, "Sad", 1),
    (ARTPHOTO, "sadness", 1),  # the authors' Sad/Sadness
    (ARTPHOTO, "Contentment", 7),  # Content/Contentment
    (MIKELS, "Content", 1),
    (MIKELS, "fears", 7),  # plural
    (MIKELS, "Anger (the clenched fists).", 4),  # the authors' handle_label drops the remark
    (EKMAN_DOMINANT, "Joyful", 1),
    (EKMAN_DOMINANT, "Pleasure", 1),  # Pleasure -> Joy where Pleasure is no option...
    (EMOTIC, "Pleasure", 22),  # ...and itself where it is
    (EKMAN_DOMINANT, "Shock", 4),
    (EKMAN_DOMINANT, "Neutrality", 6),
    (EKMAN_DOMINANT, "awe", -1),  # not in the set
    (MIKELS, "joy", -1),
    (MIKELS, "", -1),
])
def test_dominant_emotion_folds_case_plurals_and_the_authors_synonyms(q, body, expected):
  row = parse_one(answer(f"Dominant emotion: {body}"), q)
  assert (row["emotion"], row["parse_ok"], row["choice"]) == (expected, expected >= 0, -1)


@pytest.mark.parametrize("body,ids,ok", [
    ("joy, surprise, neutral", [1, 4, 6], True),
    ("Joy,Surprise,Neutral", [1, 4, 6], True),
    ("joy; shock; neutrality", [1, 4, 6], True),  # synonyms, other separators
    ("joy, joy, fear", [1, 0, -1], False),  # repeats are skipped: the first three distinct emotions
    ("joy, awe, fear, sadness", [1, 0, 3], False),  # unknown words are skipped; strictly a ranking is 3 items
    ("fear", [0, -1, -1], False),
    ("awe, wonder", [-1, -1, -1], False),
    ("", [-1, -1, -1], False),
])
def test_ranking_takes_the_first_three_distinct_emotions(body, ids, ok):
  row = parse_one(answer(f"Emotion ranking: {body}"), RANKING)
  assert (row["ranking"], row["parse_ok"]) == (ids, ok)
  assert ok == (tasks.parse_answer(answer(f"Emotion ranking: {body}"), "emotion_ranking") is not None)


@pytest.mark.parametrize("body,score", [
    ("Valence: 0.7500", 0.75), ("Valence: .5", 0.5), ("Valence: 1", 1.0), ("Valence: 0", 0.0),
    ("Valence: 0.7.5", None), ("Valence: 1.2", None), ("Valence: -0.1", None), ("Valence: high", None),
    ("Valence: nan", None), ("Arousal: 0.5", None), ("0.5", None),
])
def test_score(body, score):
  row = parse_one(answer(body), VALENCE)
  assert row["parse_ok"] == (score is not None)
  assert (np.isnan(row["score"]) if score is None else row["score"] == np.float32(score))


def test_ces_answers_are_the_bare_class_name():
  assert parse_one("Awe", CES) | {"score": None} == {
      "well_formed": True, "response_formed": False, "parse_ok": True, "choice": -1, "emotion": 3,
      "ranking": [-1, -1, -1], "score": None}
  assert parse_one(" sadness.\n", CES)["emotion"] == 2
  assert (parse_one("I feel awe.", CES)["emotion"], parse_one("I feel awe.", CES)["well_formed"]) == (3, False)
  assert parse_one("{'emotion': 'Fear', 'intensity': 3}", CES)["emotion"] == 7  # the B-A-S dict
  assert parse_one("Awe or fear?", CES)["emotion"] == -1
  assert parse_one(answer("Dominant emotion: awe"), CES)["well_formed"] is False


def test_malformed_completions_give_defined_arrays():
  nothing = {"parse_ok": False, "choice": -1, "emotion": -1, "ranking": [-1, -1, -1]}
  for text in ["", "Dominant emotion: fear", "<answer>Dominant emotion: fear", None, 17]:
    row = parse_one(text, MIKELS)
    assert {k: row[k] for k in nothing} == nothing and not row["well_formed"], text
  # Two answers: the last is read (as the authors' evaluation does), but the template is broken.
  two = "<think>a</think><answer>Dominant emotion: awe</answer><answer>Dominant emotion: fear</answer>"
  assert parse_one(two, MIKELS)["emotion"] == 7 and not parse_one(two, MIKELS)["well_formed"]
  assert parse_one(answer("Dominant emotion: fear") + " and more", MIKELS)["well_formed"] is False
  assert parse_one("<think>a</think><answer>Valence: 0.5</answer><think>b</think>", VALENCE)["well_formed"] is False


def random_text(rng: np.random.Generator, length: int) -> str:
  fragments = ["<think>", "</think>", "<answer>", "</answer>", "Answer:", "Dominant emotion:", "Emotion ranking:",
               "Valence:", "response", " fear", "joy,", "Sad", "0.5", "0.7.5", "(", ")", "{'emotion': 'Awe'", "}",
               "\n", " ", "B", ":", "é", "\x00"]
  pieces = []
  while sum(map(len, pieces)) < length:
    if rng.random() < 0.5:
      pieces.append(fragments[rng.integers(len(fragments))])
    else:
      pieces.append("".join(rng.choice(list(string.printable), int(rng.integers(1, 12)))))
  return "".join(pieces)


def test_random_text_gives_defined_arrays_that_agree_with_parse_answer():
  """Any string reads without an exception, and each row is what `tasks.parse_answer` says of it."""
  rng = np.random.default_rng(0)
  qs = [YES_NO, CHOICE, ARTPHOTO, EMOTIC, RANKING, VALENCE, CES, parsing.question({"task": "open_ended"})]
  texts = [random_text(rng, int(rng.integers(0, 300))) for _ in range(2000)]
  texts += [answer(f"{tasks.ANSWER_KEYS[q.task] if q.task != 'ces' else 'X'}: {random_text(rng, 20)}")
            for q in qs for _ in range(100)]
  texts.append("".join(rng.choice(list(string.printable), 10_000)))  # 10,000 characters of noise
  rows = [qs[i % len(qs)] for i in range(len(texts))]
  parsed = parsing.parse_completions(texts, rows)
  assert (parsed.choice.dtype, parsed.emotion.dtype, parsed.ranking.dtype, parsed.score.dtype) == (
      np.int32, np.int32, np.int32, np.float32)
  assert parsed.ranking.shape == (len(texts), 3) and len(parsed) == len(texts)
  for i, (text, q) in enumerate(zip(texts, rows)):
    if q.task == "ces":
      name = tasks.parse_ces_answer(text)
      assert parsed.emotion[i] == (-1 if name is None else tasks.MIKELS_8_FI.index(name.lower()))
      continue
    value = tasks.parse_answer(text, q.task, options=q.options)
    assert parsed.well_formed[i] == tasks.is_well_formed(text)
    assert parsed.parse_ok[i] == (value is not None), text
    if q.task in ("yes_no", "multiple_choice"):
      assert parsed.choice[i] == (-1 if value is None else "ABCDEFGH".index(value))
    elif q.task == "dominant_emotion":
      assert parsed.emotion[i] == (-1 if value is None else q.options.index(value))
    elif q.task == "valence":
      assert (np.isnan(parsed.score[i]) if value is None else parsed.score[i] == np.float32(value))
    elif q.task == "emotion_ranking":
      partial = tasks.parse_answer(text, q.task, options=q.options, partial=True) or ()
      assert parsed.ranking[i].tolist() == [q.options.index(n) for n in partial] + [-1] * (3 - len(partial))


# The authors' released format_reward (EEmo-Logic train/Stage_2/src/open_r1/grpo_emotion.py), for one text.
AUTHORS_PATTERN = r"^<think>.*?</think>\s*response\s*[A-Za-z0-9\s\-/_\(\)]+$|^.*?\s*response\s*[A-Za-z0-9\s\-/_\(\)]+$"
AUTHORS_WORDS = {"disgust", "content", "contentment", "sadness", "sad", "awe", "anger", "annoyance", "excitement",
                 "amusement", "fear", "pain", "joy", "neutral", "surprise", "happiness"}


def authors_format_reward(completion_text: str):
  if re.match(AUTHORS_PATTERN, completion_text, re.DOTALL):
    response_part = completion_text.split("response")[-1].strip()
    emotion_word = response_part.split()[0].strip('.,;:()[]{}').lower()  # IndexError when nothing follows
    return 1.0 if emotion_word in AUTHORS_WORDS else 0.0
  return 0.0


@pytest.mark.parametrize("text,expected", [
    ("<think>grey sky</think> response Sadness", True),
    ("<think>grey sky</think>\nresponse fear (the shadow)\n", True),
    ("The answer is the response awe", True),
    ("response joyful", False),  # not one of the words
    ("response fear.", False),  # "." is not allowed after "response"
    ("<think>a</think><answer>Dominant emotion: fear</answer>", False),
    ("response", False),
    ("fear response response", False),  # the authors' code raises an IndexError here
])
def test_response_format(text, expected):
  assert parsing.response_formed_text(text) is expected


def test_response_format_equals_the_authors_regex_on_random_text():
  rng = np.random.default_rng(1)
  words = ["response", " response ", "fear", "Sad", "joyful", "<think>", "</think>", " ", "\n", ".", "(", ")", "-",
           "awe", "x", "é", "_", "/", "9"]
  rewarded = 0
  for _ in range(4000):
    text = "".join(words[i] for i in rng.integers(0, len(words), int(rng.integers(0, 12))))
    try:
      expected = authors_format_reward(text) == 1.0
    except IndexError:  # nothing after the last "response": no reward here, no crash
      expected = False
    assert parsing.response_formed_text(text) is expected, repr(text)
    rewarded += expected
  assert rewarded > 50  # the random texts reach the rewarded case often (88 times with this seed)


def test_the_response_check_is_linear_where_the_regex_backtracks():
  text = "response " * 20_000 + "."  # the authors' regex takes quadratic time on this
  assert parsing.response_formed_text(text) is False
  assert parsing.response_formed_text(text[:-1]) is False  # the last "response" has nothing after it
  assert parsing.response_formed_text(text[:-1] + "awe") is True


def test_mismatched_lengths_and_unknown_tasks_fail_clearly():
  with pytest.raises(ValueError, match="one question per completion"):
    parsing.parse_completions(["a", "b"], [VALENCE])
  with pytest.raises(UnknownLabelError, match="neither an EEmo-Logic task"):
    parsing.question({"id": "q", "task": "sentiment"})
  with pytest.raises(TypeError, match="EEmoRecord"):
    parsing.question(42)


def test_parsed_completions_is_a_pytree_of_fixed_shapes():
  import jax
  parsed = parsing.parse_completions([answer("Valence: 0.5"), ""], [VALENCE, RANKING])
  leaves, treedef = jax.tree.flatten(parsed)
  assert [leaf.shape for leaf in leaves] == [(2,), (2,), (2,), (2,), (2,), (2, 3), (2,)]
  rebuilt = jax.tree.unflatten(treedef, leaves)
  assert isinstance(rebuilt, parsing.ParsedCompletions) and rebuilt.score is parsed.score
  other = parsing.parse_completions(["x", answer("Emotion ranking: joy, fear, anger")], [YES_NO, RANKING])
  assert jax.tree.structure(other) == treedef
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(other)] == [(x.shape, x.dtype) for x in leaves]
