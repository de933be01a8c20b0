"""Task prompts and answers: every task renders and encodes, its answer reads back through its parser (and
through the authors' own readers: `ast.literal_eval` and their regexes), and malformed answers give None."""

from __future__ import annotations

import ast
import os
import re

import numpy as np
import pytest

from data_pipeline import tasks
from data_pipeline.errors import InvalidFieldError, MissingFieldError, RecordError, UnknownLabelError
from data_pipeline.prompts import IGNORE_INDEX, encode_chat, render_chat
from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer

SIZES = {"image_hw": (480, 640), "resized_hw": (476, 644)}  # spec §5.2: (480, 640) -> (476, 644)
GRID = [1, 34, 46]  # the grid of a 476x644 image
EMOVERSE = {"id": "ev-1", "description": "A child's kite over the sea.", "emotion": "awe", "confidence": 8,
            "background": "beach", "attribute": "soaring", "subject": "kite",
            "bbox": [{"x1": 10, "y1": 20, "x2": 300, "y2": 400}]}
EEMO = {
    "yes_no": ({"question": "Is surprise one of the three main emotions?", "answer": "Yes"}, "B", None),
    "multiple_choice": ({"question": "How strong is the sense of control?", "answer": "Moderate control feeling",
                         "options": ["A strong sense of dominance", "Moderate control feeling",
                                     "A weaker sense of control"]}, "B", None),
    "dominant_emotion": ({"options": "artphoto8", "answer": "sad"}, "Sad", "artphoto8"),
    "emotion_ranking": ({"answer": "Joy, surprise, neutral"}, ("joy", "surprise", "neutral"), None),
    "valence": ({"answer": 0.8125}, 0.8125, None),
    "arousal": ({"answer": 0.0}, 0.0, None),
    "dominance": ({"answer": 1}, 1.0, None),
    "open_ended": ({"question": "Why does this image evoke fear?", "answer": "The dark alley and the shadow."},
                   "The dark alley and the shadow.", None),
}
# The authors' readers (workerred/EEmo-Logic inference/*.py): the last <answer> block, then per task.
AUTHORS_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>(?!.*<answer>)")
AUTHORS_EMOTION_RE = re.compile(r"'emotion':\s*'([^']+)'")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
  return load_tokenizer(build_offline_tokenizer(os.fspath(tmp_path_factory.mktemp("offline_tokenizer"))))


def eemo_record(task: str, **extra) -> dict:
  return {"id": f"q-{task}", "task": task, "think": "The sky is grey and the street is empty.",
          **EEMO[task][0], **extra}


def all_prompts() -> dict[str, list[dict]]:
  prompts = {"ces": tasks.ces_messages(EMOVERSE), "bas": tasks.bas_messages(EMOVERSE, **SIZES),
             "des": tasks.des_messages(EMOVERSE, **SIZES)}
  prompts.update({task: tasks.eemo_messages(eemo_record(task)) for task in EEMO})
  prompts["image_pair"] = tasks.eemo_messages(eemo_record("open_ended", num_images=2),
                                              system=tasks.EEMO_SYSTEM_MESSAGE)
  return prompts


def test_label_sets():
  assert len(tasks.MIKELS_8) == len(set(tasks.MIKELS_8)) == 8
  assert sorted(m.lower() for m in tasks.MIKELS_8) == sorted(tasks.MIKELS_8_FI)
  assert sorted(tasks.EKMAN_7) == sorted(tasks.EKMAN_7_EEMO) == list(tasks.EKMAN_7)
  sizes = {name: len(set(names)) for name, names in tasks.OPTION_SETS.items()}
  assert sizes == {"mikels8": 8, "artphoto8": 8, "emotic26": 26, "plutchik24": 24, "ekman7": 7}


@pytest.mark.parametrize("name", sorted(all_prompts()))
def test_every_task_renders_and_encodes(tokenizer, name):
  messages = all_prompts()[name]
  images = sum(1 for m in messages if not isinstance(m["content"], str)
               for item in m["content"] if item.get("type") == "image")
  assert images == (2 if name == "image_pair" else 1)
  text = render_chat(messages)
  answer = messages[-1]["content"]
  assert messages[-1]["role"] == "assistant" and text.endswith(f"<|im_start|>assistant\n{answer}<|im_end|>\n")
  encoded = encode_chat(messages, tokenizer, [GRID] * images, train=True)
  assert encoded.num_images == images
  assert tokenizer.decode(encoded.labels[encoded.labels != IGNORE_INDEX]) == answer + "<|im_end|>\n"
  prompt_only = messages[:-1]
  assert messages[0]["role"] == ("system" if name == "image_pair" else "user")
  assert render_chat(prompt_only, add_generation_prompt=True) == text[:-len(answer + "<|im_end|>\n")]


def test_prompt_only_builders_leave_out_the_answer():
  assert [m["role"] for m in tasks.ces_messages(EMOVERSE, with_answer=False)] == ["user"]
  assert [m["role"] for m in tasks.des_messages(EMOVERSE, with_answer=False, **SIZES)] == ["user"]
  assert [m["role"] for m in tasks.eemo_messages(eemo_record("valence"), with_answer=False)] == ["user"]


# ------------------------------------------------------------------------------------------------
# EmoVerse
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("emotion", tasks.MIKELS_8)
def test_ces_answer_round_trips(emotion):
  answer = tasks.ces_messages({**EMOVERSE, "emotion": emotion.upper()})[-1]["content"]
  assert answer == emotion and tasks.parse_ces_answer(answer) == emotion
  assert tasks.parse_ces_answer(f"The image evokes {emotion.lower()}.") == emotion
  assert tasks.parse_ces_answer("{'emotion': '" + emotion + "', 'intensity': 3}") == emotion


@pytest.mark.parametrize("text", ["", "joy", "Awe or fear?", "{'emotion': 'Joy'}", "amusements"])
def test_ces_malformed_answers_give_none(text):
  assert tasks.parse_ces_answer(text) is None


def test_bas_answer_is_the_authors_dict_and_round_trips():
  answer = tasks.bas_messages(EMOVERSE, **SIZES)[-1]["content"]
  payload = ast.literal_eval(answer)  # how the authors read it
  assert list(payload) == ["description", "emotion", "background", "adjective", "noun", "intensity", "bbox"]
  assert AUTHORS_EMOTION_RE.search(answer).group(1) == "Awe"
  # 640x480 -> 644x476: x * 644/640, y * 476/480, rounded half up.
  assert payload["bbox"] == [{"x1": 10, "y1": 20, "x2": 302, "y2": 397}]
  assert tasks.parse_emoverse_answer(answer) == tasks.BasAnswer(
      emotion="Awe", description="A child's kite over the sea.", background="beach", adjective="soaring",
      noun="kite", intensity=8.0, boxes=((10.0, 20.0, 302.0, 397.0),))


def test_bas_accepts_the_parquet_field_names():
  parquet = {"id": "ev-2", "description": "d", "emotion_category": "Fear", "confidence_score": 5,
             "background": "b", "attribute": "a", "subject": "s", "bounding_box": [0, 0, 640, 480]}
  parsed = tasks.parse_emoverse_answer(tasks.bas_messages(parquet, **SIZES)[-1]["content"])
  assert parsed.emotion == "Fear" and parsed.boxes == ((0.0, 0.0, 644.0, 476.0),)


def test_stored_feature_dicts_make_the_same_prompts():
  """The features `data_pipeline.records` stores (numpy values, structured labels beside the released text)."""
  emoverse = {"id": "ev-1", "emotion": "awe", "description": EMOVERSE["description"], "background": "beach",
              "attribute": "soaring", "subject": "kite", "confidence": np.float32(8.0), "height": np.int32(480),
              "width": np.int32(640), "boxes": np.array([[10, 20, 300, 400]], np.int32)}
  stored = tasks.bas_messages(emoverse, resized_hw=SIZES["resized_hw"])[-1]["content"]
  assert tasks.parse_emoverse_answer(stored) == tasks.parse_emoverse_answer(
      tasks.bas_messages(EMOVERSE, **SIZES)[-1]["content"])
  assert "'intensity': 8.0" in stored  # a plain float, not np.float32(8.0)
  common = {"id": "q", "question": "", "images": [b"a", b"b"], "scores": np.full(3, np.nan, np.float32)}
  features = {
      "yes_no": {"question": "Is it sad?", "answer": "B: Yes", "choice": "B", "options": ["No", "Yes"]},
      "dominant_emotion": {"answer": "Dominant emotion: Sad", "emotion": "sad", "option_set": ", ".join(
          tasks.ARTPHOTO_8)},
      "emotion_ranking": {"answer": "Emotion ranking: awe, fear, anger", "ranking": ["awe", "fear", "anger"],
                          "option_set": ", ".join(tasks.MIKELS_8_FI)},
      "arousal": {"answer": "Arousal: 0.2500", "scores": np.array([np.nan, 0.25, np.nan], np.float32)},
  }
  expected = {"yes_no": "B", "dominant_emotion": "Sad", "emotion_ranking": ("awe", "fear", "anger"), "arousal": 0.25}
  for task, fields in features.items():
    messages = tasks.eemo_messages({**common, "task": task, **fields})
    assert sum(item.get("type") == "image" for item in messages[0]["content"]) == 2
    options = fields.get("option_set") if task == "emotion_ranking" else None
    assert tasks.parse_answer(messages[-1]["content"], task, options=options) == expected[task]


def test_scale_box():
  assert tasks.scale_box((10, 20, 300, 400), (480, 640), (476, 644)) == (10, 20, 302, 397)
  assert tasks.scale_box((0, 0, 640, 480), (480, 640), (240, 320)) == (0, 0, 320, 240)
  assert tasks.scale_box((-5, 3, 700, 500), (480, 640), (480, 640)) == (0, 3, 640, 480)  # clipped to the image
  assert tasks.scale_box((1, 1, 3, 3), (4, 4), (2, 2)) == (1, 1, 2, 2)  # 0.5 and 1.5 round half up
  with pytest.raises(ValueError, match="positive"):
    tasks.scale_box((0, 0, 1, 1), (0, 4), (2, 2))


def test_parse_emoverse_answer_fallbacks():
  truncated = "{'description': 'a storm', 'emotion': 'Fear', 'bbox': [{'x1': 1, 'y1"
  assert tasks.parse_emoverse_answer(truncated) == tasks.BasAnswer(emotion="Fear")
  as_json = '{"emotion": "sadness", "intensity": "7/10", "bbox_2d": [[1, 2, 3, 4]]}'
  assert tasks.parse_emoverse_answer(as_json) == tasks.BasAnswer(emotion="Sadness", intensity=7.0,
                                                                 boxes=((1.0, 2.0, 3.0, 4.0),))
  assert tasks.parse_emoverse_answer("Sure! " + repr({"emotion": "Awe"}) + " Hope it helps.").emotion == "Awe"


@pytest.mark.parametrize("text", ["", "no dict here", "{'emotion': 'Joy', 'bbox': []}", "{'intensity': 3}",
                                  "{'emotion': Fear}", "{broken: [}"])
def test_parse_emoverse_malformed_gives_none(text):
  assert tasks.parse_emoverse_answer(text) is None


def test_des_slot_is_the_marker_token_and_a_label(tokenizer):
  messages = tasks.des_messages(EMOVERSE, **SIZES)
  encoded = encode_chat(messages, tokenizer, [GRID], train=True)
  slot = tasks.des_slot(encoded.input_ids, tokenizer)
  assert tokenizer.decode(encoded.input_ids[slot:slot + 1]) == tasks.DES_SLOT_TEXT
  assert encoded.input_ids[slot + 1] == tokenizer.special.im_end  # the answer ends right after the slot
  assert encoded.labels[slot] == encoded.input_ids[slot]  # the model learns to emit the marker
  # The marker's ids do not depend on the text before it (a preceding "}" absorbs the newline).
  assert tokenizer.encode("}" + tasks.DES_MARKER)[-1] == tokenizer.encode(tasks.DES_SLOT_TEXT)[-1]
  assert tasks.parse_emoverse_answer(messages[-1]["content"]).emotion == "Awe"
  with pytest.raises(ValueError, match="des_messages"):
    tasks.des_slot(encode_chat(tasks.bas_messages(EMOVERSE, **SIZES), tokenizer, [GRID]).input_ids, tokenizer)


# ------------------------------------------------------------------------------------------------
# EEmo-Logic
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", sorted(EEMO))
def test_eemo_answer_round_trips(task):
  _, value, options = EEMO[task]
  answer = tasks.eemo_messages(eemo_record(task))[-1]["content"]
  assert tasks.is_well_formed(answer)
  assert answer.startswith("<think>The sky is grey and the street is empty.</think><answer>")
  assert tasks.parse_answer(answer, task, options=options) == value
  if task not in ("yes_no", "multiple_choice"):  # "Answer" is shared by both choice tasks
    assert tasks.parse_answer(answer) == value


def test_eemo_answers_read_with_the_authors_readers():
  answer = lambda task: tasks.eemo_messages(eemo_record(task))[-1]["content"]  # noqa: E731
  content = lambda task: AUTHORS_ANSWER_RE.search(answer(task)).group(1)  # noqa: E731
  assert float(content("valence").split(":")[-1][1:]) == 0.8125  # evaluate_vad.py
  assert content("emotion_ranking").split(":")[-1].replace(" ", "") == "joy,surprise,neutral"  # evaluate_ranking
  dominant = re.search(r"<answer>Dominant emotion:(.*?)</answer>(?!.*<answer>)", answer("dominant_emotion"))
  assert dominant.group(1).replace(" ", "").lower() == "sad"  # evaluate_Artphoto_think.py


def test_eemo_prompts_follow_the_authors():
  yes_no = tasks.eemo_messages(eemo_record("yes_no"))[0]["content"][-1]["text"]
  assert "The question is as follows: Is surprise one of the three main emotions? Choose between one of the " \
         "following options: A: No B: Yes" in yes_no
  valence = tasks.eemo_messages(eemo_record("valence"))[0]["content"][-1]["text"]
  assert valence.count("Valence: x.xxxx") == 2 and "rate the level of valence" in valence
  assert valence.endswith("<think></think><answer>Valence: x.xxxx</answer>")
  ranking = tasks.eemo_messages(eemo_record("emotion_ranking"))[0]["content"][-1]["text"]
  assert "include: anger, disgust, fear, joy, neutral, sadness, and surprise. Show the all three" in ranking
  dominant = tasks.eemo_messages(eemo_record("dominant_emotion"))[0]["content"][-1]["text"]
  assert "[" + ", ".join(tasks.ARTPHOTO_8) + "]" in dominant


@pytest.mark.parametrize("text,task,options", [
    ("", None, None),
    ("<think>x</think>", "valence", None),
    ("<answer>0.5</answer>", "valence", None),  # no key
    ("<answer>Valence: 0.5</answer>", "arousal", None),  # another task's key
    ("<answer>Valence: 1.2</answer>", "valence", None),
    ("<answer>Valence: high</answer>", "valence", None),
    ("<answer>Valence: 0.5 (moderate)</answer>", "valence", None),
    ("<answer>Emotion ranking: joy,fear</answer>", "emotion_ranking", None),
    ("<answer>Emotion ranking: joy,joy,fear</answer>", "emotion_ranking", None),
    ("<answer>Emotion ranking: joy,fear,awe</answer>", "emotion_ranking", None),
    ("<answer>Dominant emotion: joy</answer>", "dominant_emotion", "mikels8"),
    ("<answer>Dominant emotion: </answer>", "dominant_emotion", None),
    ("<answer>Answer: C</answer>", "yes_no", None),
    ("<answer>Answer: B: No</answer>", "yes_no", None),
    ("<answer>Answer: maybe</answer>", "multiple_choice", ["x", "y"]),
    ("<answer>Mood: calm</answer>", None, None),
    ("<answer>Answer: maybe</answer>", None, None),
])
def test_parse_answer_malformed_gives_none(text, task, options):
  assert tasks.parse_answer(text, task, options=options) is None


def test_parse_answer_reads_the_last_answer_and_option_text():
  text = "<think>maybe <answer>Valence: 0.1</answer></think><answer>Valence: 0.9</answer>"
  assert tasks.parse_answer(text, "valence") == 0.9
  assert tasks.parse_answer("<answer>Answer: Yes</answer>", "yes_no") == "B"
  assert tasks.parse_answer("<answer>Answer: (A)</answer>", "yes_no") == "A"
  assert tasks.parse_answer("<answer>Answer: B. Yes</answer>", "yes_no") == "B"
  assert tasks.parse_answer("<answer>Answer: y</answer>", "multiple_choice", options={"A": "x", "B": "y"}) == "B"
  assert tasks.parse_answer("<answer>Answer: D</answer>") == "D"  # no task, no options: any option letter
  assert tasks.parse_answer("<answer>Dominant emotion: Awe.</answer>", "dominant_emotion",
                            options=tasks.MIKELS_8_FI) == "awe"


def test_is_well_formed():
  assert tasks.is_well_formed("<think>a\nb</think>\n<answer>Valence: 0.5</answer>\n")
  assert not tasks.is_well_formed("<answer>Valence: 0.5</answer>")
  assert not tasks.is_well_formed("<think>a</think><answer>x</answer> trailing")
  assert not tasks.is_well_formed("<think>a</think>")


@pytest.mark.parametrize("record,error,field", [
    ({k: v for k, v in EMOVERSE.items() if k != "description"}, MissingFieldError, "description"),
    ({**EMOVERSE, "emotion": "joy"}, UnknownLabelError, "emotion"),
    ({**EMOVERSE, "confidence": 11}, InvalidFieldError, "confidence"),
    ({**EMOVERSE, "bbox": [{"x1": 5, "y1": 0, "x2": 1, "y2": 1}]}, InvalidFieldError, "bbox"),
    ({**EMOVERSE, "bbox": []}, MissingFieldError, "bbox"),
    ({**EMOVERSE, "confidence": float("nan")}, MissingFieldError, "confidence"),
])
def test_bad_emoverse_records_name_the_field(record, error, field):
  with pytest.raises(error) as info:
    tasks.bas_messages(record, **SIZES)
  assert isinstance(info.value, RecordError) and (info.value.record_id, info.value.field) == ("ev-1", field)


@pytest.mark.parametrize("record,error,field", [
    ({"id": "q", "task": "sentiment"}, UnknownLabelError, "task"),
    ({"id": "q", "task": "valence", "answer": 7.0}, InvalidFieldError, "answer"),
    ({"id": "q", "task": "valence", "answer": True}, InvalidFieldError, "answer"),
    ({"id": "q", "task": "emotion_ranking", "answer": "joy,fear"}, InvalidFieldError, "answer"),
    ({"id": "q", "task": "dominant_emotion", "options": "ekman7", "answer": "awe"}, UnknownLabelError, "answer"),
    ({"id": "q", "task": "multiple_choice", "question": "?", "options": ["only one"], "answer": "A"},
     InvalidFieldError, "options"),
    ({"id": "q", "task": "yes_no", "question": "?", "answer": "Perhaps"}, InvalidFieldError, "answer"),
    ({"id": "q", "task": "open_ended", "answer": "x"}, MissingFieldError, "question"),
    ({"id": "q", "task": "open_ended", "question": "?", "answer": "x", "num_images": 0}, InvalidFieldError,
     "num_images"),
])
def test_bad_eemo_records_name_the_field(record, error, field):
  with pytest.raises(error) as info:
    tasks.eemo_messages(record)
  assert (info.value.record_id, info.value.field) == ("q", field)


def test_yes_no_accepts_letters_words_and_booleans():
  answers = {a: tasks.eemo_messages({"task": "yes_no", "question": "?", "answer": a})[-1]["content"]
             for a in ("A", "No", False, "B", "Yes", True)}
  assert {a: tasks.parse_answer(t, "yes_no") for a, t in answers.items()} == {
      "A": "A", "No": "A", False: "A", "B": "B", "Yes": "B", True: "B"}
  assert np.unique([tasks.parse_answer(t) for t in answers.values()]).tolist() == ["A", "B"]


def test_every_synthetic_eemo_record_renders_with_its_own_options():
  """Stored records (both yes/no orders, Mikels rankings) become prompts whose answer parses back."""
  from data_pipeline.synthetic import synthetic_eemo_records
  seen = set()
  for index in range(24):
    for record in synthetic_eemo_records(0, index):
      features = record.to_features()
      messages = tasks.eemo_messages(features)
      answer = messages[-1]["content"] if isinstance(messages[-1]["content"], str) else messages[-1]["content"][0]["text"]
      assert tasks.is_well_formed(answer), (record.id, answer)
      seen.add(record.task)
  assert {"yes_no", "emotion_ranking", "multiple_choice", "dominant_emotion"} <= seen


def test_is_well_formed_needs_exactly_one_think_and_one_answer():
  assert not tasks.is_well_formed("<think>a</think><answer>Valence: 0.1</answer><answer>Valence: 0.9</answer>")
  assert not tasks.is_well_formed("<think>a</think><answer>Valence: 0.1 <think>b</think></answer>")
  assert not tasks.is_well_formed("<think><think>a</think><answer>Valence: 0.1</answer>")
  assert tasks.is_well_formed("<think></think><answer>Valence: 0.1</answer>")  # an empty think is the SFT target's


@pytest.mark.parametrize("said,options,expected", [
    ("Sadness", tasks.ARTPHOTO_8, "Sad"),  # the authors' Sad / Sadness and Content / Contentment
    ("sad", tasks.MIKELS_8_FI, "sadness"),
    ("Contentment", tasks.ARTPHOTO_8, "Content"),
    ("content", tasks.MIKELS_8_FI, "contentment"),
    ("Neutrality", tasks.EKMAN_7_EEMO, "neutral"),  # thinking_consistancy.py exclude_emo's replacements
    ("Joyful", tasks.EKMAN_7_EEMO, "joy"),
    ("Shock", tasks.EKMAN_7_EEMO, "surprise"),
    ("Pleasure", tasks.EKMAN_7_EEMO, "joy"),
    ("Pleasure", tasks.EMOTIC_26, "Pleasure"),  # a synonym only where the word itself is no option
    ("Fears.", tasks.MIKELS_8_FI, "fear"),  # plural
    ("surprises", tasks.EKMAN_7_EEMO, "surprise"),
    ("AWE (the mountain)", tasks.MIKELS_8_FI, "awe"),  # the authors' handle_label drops the remark
    ("joy", tasks.MIKELS_8_FI, None),
    ("fearful", tasks.MIKELS_8_FI, None),
])
def test_dominant_answers_fold_case_plurals_and_synonyms(said, options, expected):
  assert tasks.parse_answer(f"<answer>Dominant emotion: {said}</answer>", "dominant_emotion",
                            options=options) == expected


def test_partial_rankings_keep_the_first_three_distinct_emotions():
  read = lambda value, **kw: tasks.parse_answer(f"<answer>Emotion ranking: {value}</answer>",  # noqa: E731
                                                "emotion_ranking", **kw)
  assert read("joy, joy, fear") is None and read("joy, joy, fear", partial=True) == ("joy", "fear")
  assert read("joy, awe, fear, sadness", partial=True) == ("joy", "fear", "sadness")  # awe is no option
  assert read("awe, calm", partial=True) is None
  assert read("joy; surprise; neutral") == read("joy > surprise > neutral") == ("joy", "surprise", "neutral")
  assert read("Joyful, Shock, Neutrality,") == ("joy", "surprise", "neutral")  # synonyms; a trailing comma


def test_answer_options_are_what_the_builders_show():
  assert tasks.answer_options({"task": "yes_no"}) == tasks.YES_NO_OPTIONS
  assert tasks.answer_options({"task": "yes_no", "options": ["Yes", "No"]}) == {"A": "Yes", "B": "No"}
  assert tasks.answer_options({"task": "multiple_choice", "options": ["x", "y"]}) == {"A": "x", "B": "y"}
  assert tasks.answer_options({"task": "dominant_emotion", "option_set": "artphoto8"}) == tasks.ARTPHOTO_8
  assert tasks.answer_options({"task": "emotion_ranking", "option_set": ""}) == tasks.EKMAN_7
  assert tasks.answer_options({"task": "valence"}) is None
  with pytest.raises(MissingFieldError):
    tasks.answer_options({"id": "q", "task": "dominant_emotion"})


@pytest.mark.parametrize("task", sorted(EEMO))
def test_eemo_answer_is_the_builders_target(task):
  _, value, _ = EEMO[task]
  assert tasks.eemo_answer(eemo_record(task)) == value


def test_is_well_formed_is_the_template_regex_with_each_tag_once():
  """The string scans of `is_well_formed` against the regex they replace, on random tag soups."""
  template = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
  pieces = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "\u00a0", "x", "Valence: 0.5", "<", ">", "/"]
  rng = np.random.default_rng(0)
  agreed = 0
  for _ in range(5000):
    text = "".join(pieces[i] for i in rng.integers(0, len(pieces), int(rng.integers(0, 10))))
    if rng.random() < 0.5:  # many texts near the template
      text = f"{text[:3]}<think>{text[3:6]}</think>{text[6:8]}<answer>{text[8:]}</answer>{text[:2]}"
    expected = all(text.count(t) == 1 for t in ("<think>", "</think>", "<answer>", "</answer>")) and bool(
        template.fullmatch(text))
    assert tasks.is_well_formed(text) == expected, repr(text)
    agreed += expected
  assert agreed > 200  # well-formed texts are reached often (349 times with this seed)
