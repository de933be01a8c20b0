"""Records: parsing the released EmoVerse / EEmoDB formats, every failure kind, and the stored round trip.

The inputs are annotation files written here in the released layouts (papers.md §2.1, §2.4, §3.1, §3.3);
the expected values are what those files say.
"""

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline.errors import (CorruptImageError, ImageTooLargeError, InvalidFieldError, MissingFieldError,
                                  MissingFileError, RecordError, UnknownLabelError, UnsafePathError)
from data_pipeline.records import (DES_DIM, MIKELS_8, OPTION_SETS, EEmoRecord, EmoVerseRecord, image_size,
                                   parse_eemo, parse_emoverse, parse_options)


def _image_bytes(width, height, colour=(200, 30, 60), fmt="JPEG"):
  buffer = io.BytesIO()
  Image.new("RGB", (width, height), colour).save(buffer, format=fmt)
  return buffer.getvalue()


@pytest.fixture
def root(tmp_path):
  """A data set root with two good images."""
  root = tmp_path / "root"
  (root / "images").mkdir(parents=True)
  (root / "images" / "a.jpg").write_bytes(_image_bytes(40, 30))
  (root / "images" / "b.png").write_bytes(_image_bytes(24, 36, fmt="PNG"))
  return root


def _github_item(**changes):
  des = [round(0.001 * i - 0.5, 4) for i in range(DES_DIM)]
  item = {"id": "ev-001", "image_path": "images/a.jpg", "description": "A child laughs at a clown.",
          "emotion": "Amusement", "confidence": 8, "background": "circus tent", "attribute": "playful",
          "subject": "clown", "B-A-S": "circus tent-playful-clown", "DES": des,
          "bbox": [{"x1": 3, "y1": 4, "x2": 20, "y2": 25}], "mask_path": "masks/a.png"}
  item.update(changes)
  return {k: v for k, v in item.items() if v is not _DROP}


_DROP = object()


# ----------------------------------------------------------------------------------------- EmoVerse


def test_emoverse_github_json_and_jsonl(root):
  (root / "train.json").write_text(json.dumps([_github_item()]))
  (root / "test.jsonl").write_text(json.dumps(_github_item(id="ev-002", emotion="sad", DES=_DROP)) + "\n")
  [item] = json.loads((root / "train.json").read_text())
  record = parse_emoverse(item, root, default_id="train.json#0", split="train")
  assert record.id == "ev-001" and record.split == "train"
  assert record.image == (root / "images" / "a.jpg").read_bytes()
  assert (record.width, record.height) == (40, 30)
  assert record.emotion == "amusement" and record.label == MIKELS_8.index("amusement")
  assert record.confidence == 8.0
  assert record.bas == item["B-A-S"]
  np.testing.assert_array_equal(record.des, np.asarray(item["DES"], np.float32))
  np.testing.assert_array_equal(record.boxes, [[3, 4, 20, 25]])
  assert record.boxes.dtype == np.int32

  line = (root / "test.jsonl").read_text().splitlines()[0]
  other = parse_emoverse(json.loads(line), root, default_id="test.jsonl#0", split="test")
  assert other.emotion == "sadness" and not other.has_des and other.des is None


def test_emoverse_hf_parquet_names(root):
  png = _image_bytes(50, 20, fmt="PNG")
  row = {"image": {"bytes": png, "path": "x.png"}, "description": "A dark sky.", "emotion_category": "Awe",
         "confidence_score": 5, "background": "night sky", "attribute": "vast", "subject": "moon",
         "DES_representation": np.linspace(-1, 1, DES_DIM).tolist(), "bounding_box": [10, 2, 30, 12, 0, 0, 5, 5],
         "source": "EmoSet"}
  record = parse_emoverse(row, None, default_id="data/train-00000.parquet#7")
  assert record.id == "data/train-00000.parquet#7"  # the parquet has no id column
  assert record.image == png and (record.width, record.height) == (50, 20)
  assert record.emotion == "awe" and record.confidence == 5.0 and record.source == "EmoSet"
  np.testing.assert_array_equal(record.boxes, [[10, 2, 30, 12], [0, 0, 5, 5]])
  np.testing.assert_allclose(record.des, np.linspace(-1, 1, DES_DIM), atol=1e-7)


def test_emoverse_boxes_spilling_over_the_border_are_clipped(root):
  record = parse_emoverse(_github_item(bbox=[{"x1": -2, "y1": 5, "x2": 43.4, "y2": 31}]), root, default_id="x")
  np.testing.assert_array_equal(record.boxes, [[0, 5, 40, 30]])


def test_absolute_path_inside_the_root_is_accepted(root):
  record = parse_emoverse(_github_item(image_path=str(root / "images" / "b.png")), root, default_id="x")
  assert (record.width, record.height) == (24, 36)


# ------------------------------------------------------------------------------------------------ EEmo


_YES_NO = ("Assume you are an expert in emotional psychology. Do you feel surprise is one of the three main "
           "emotions? Choose between one of the following options: A: No B: Yes")
_CHOOSE = "How much dominance do you feel?\nA. A strong sense of dominance\nB. Moderate control\nC. A weaker sense"


@pytest.mark.parametrize("question, answer, task, expected", [
    (_YES_NO, "B", "yes_no", {"options": ("No", "Yes"), "choice": "B"}),
    (_CHOOSE, "C. A weaker sense", "multiple_choice",
     {"options": ("A strong sense of dominance", "Moderate control", "A weaker sense"), "choice": "C"}),
    (_CHOOSE, "Moderate control", "multiple_choice", {"choice": "B"}),
    (f"What is the dominant emotion? Options: {OPTION_SETS[0]}",
     "<think>The dominant emotion is fear.</think><answer>Dominant emotion: Fear</answer>", "dominant_emotion",
     {"emotion": "fear", "option_set": OPTION_SETS[0]}),
    ("Identify the three main emotions, strongest first. The emotion categories include anger, disgust, fear, "
     "joy, neutral, sadness, and surprise.", "<answer>Emotion ranking: joy, surprise, neutral</answer>",
     "emotion_ranking", {"ranking": ("joy", "surprise", "neutral"), "option_set": OPTION_SETS[4]}),
    ("Rate the level of valence from 0 to 1.", "Valence: 0.6543", "valence", {"scores": (0.6543, None, None)}),
    ("Rate the level of arousal from 0 to 1.", "<think>calm</think><answer>Arousal: 0.1200</answer>", "arousal",
     {"scores": (None, 0.12, None)}),
    ("Rate the level of dominance from 0 to 1.", "Dominance: 1.0000", "dominance", {"scores": (None, None, 1.0)}),
    ("Which elements evoke your response?", "Warm colours. Its valence: high, because of the sun.", "open_ended",
     {"options": (), "choice": ""}),
])
def test_eemo_conversation_task_types(root, question, answer, task, expected):
  item = {"id": "q1", "image": "images/a.jpg",
          "conversations": [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]}
  [record] = parse_eemo(json.loads(json.dumps(item)), root, default_id="QA.json#0", split="train")
  assert record.task == task and record.id == "q1" and record.answer == answer
  assert record.question == question  # the <image> placeholder is removed
  assert record.images == ((root / "images" / "a.jpg").read_bytes(),) and record.widths == (40,)
  for name, value in expected.items():
    if name == "scores":
      want = [math.nan if v is None else v for v in value]
      np.testing.assert_allclose(record.scores, want, rtol=1e-6)
    else:
      assert getattr(record, name) == value, name


def test_eemo_pair_and_multi_turn_conversation(root):
  item = {"image": ["images/a.jpg", "images/b.png"], "conversations": [
      {"from": "human", "value": "<image>\n<image>\nWhich image is calmer? A. The first B. The second"},
      {"from": "gpt", "value": "B"},
      {"from": "human", "value": "Describe the second image."},
      {"from": "gpt", "value": "A grey street in the rain."}]}
  first, second = parse_eemo(item, root, default_id="pair.json#3")
  assert (first.id, second.id) == ("pair.json#3#0", "pair.json#3#1")
  assert first.task == "multiple_choice" and first.choice == "B" and first.options == ("The first", "The second")
  assert first.widths == (40, 24) and first.heights == (30, 36) and len(first.images) == 2
  assert second.task == "open_ended" and second.images == first.images


def test_eemo_stage2_items(root):
  arousal = {"problem": {"question": "Please rate the level of arousal the image evokes, from 0 to 1."},
             "solution": {"answer": "<answer>Arousal: 0.7312</answer>"}, "video_path": "images/b.png"}
  [record] = parse_eemo(arousal, root, default_id="RL(conversation_train).json#5")
  assert record.task == "arousal" and record.id == "RL(conversation_train).json#5"
  np.testing.assert_allclose(record.scores, [np.nan, 0.7312, np.nan], rtol=1e-6)
  assert (record.widths, record.heights) == ((24,), (36,))

  dominant = {"id": 9, "problem": {"question": f"Choose the dominant emotion from: {OPTION_SETS[1]}."},
              "solution": {"answer": "Dominant emotion: Awe"}, "video_path": "images/a.jpg"}
  [record] = parse_eemo(dominant, root, default_id="unused")
  assert (record.id, record.task, record.emotion, record.option_set) == ("9", "dominant_emotion", "awe",
                                                                         OPTION_SETS[1])


def test_parse_options_takes_the_last_lettered_list():
  assert parse_options("Plan A: wait. Choose: A: No B: Yes") == ("No", "Yes")
  assert parse_options("No options here.") == ()


# ---------------------------------------------------------------------------------------------- failures


def _outside_file(root):
  outside = root.parent / "outside"
  outside.mkdir(exist_ok=True)
  (outside / "x.jpg").write_bytes(_image_bytes(8, 8))
  return outside / "x.jpg"


def _case_corrupt(root):
  (root / "images" / "bad.jpg").write_bytes(b"\xff\xd8 this is not a jpeg")
  return _github_item(image_path="images/bad.jpg")


def _case_truncated(root):
  data = _image_bytes(64, 64)
  (root / "images" / "cut.jpg").write_bytes(data[: len(data) // 2])
  return _github_item(image_path="images/cut.jpg")


def _case_symlink(root):
  os.symlink(_outside_file(root), root / "images" / "link.jpg")
  return _github_item(image_path="images/link.jpg")


def _case_symlinked_dir(root):
  os.symlink(_outside_file(root).parent, root / "linked_dir")
  return _github_item(image_path="linked_dir/x.jpg")


FAILURES = {
    "corrupt image bytes": (_case_corrupt, CorruptImageError, "image_path"),
    "truncated image": (_case_truncated, CorruptImageError, "image_path"),
    "missing file": (lambda root: _github_item(image_path="images/nope.jpg"), MissingFileError, "image_path"),
    "dot-dot escape": (lambda root: (_outside_file(root), _github_item(image_path="../outside/x.jpg"))[1],
                       UnsafePathError, "image_path"),
    "absolute path escape": (lambda root: _github_item(image_path=str(_outside_file(root))), UnsafePathError,
                             "image_path"),
    "symlink escape": (_case_symlink, UnsafePathError, "image_path"),
    "symlinked folder escape": (_case_symlinked_dir, UnsafePathError, "image_path"),
    "DES of length 1000": (lambda root: _github_item(DES=[0.5] * 1000), InvalidFieldError, "DES"),
    "DES with text": (lambda root: _github_item(DES="0.1, 0.2"), InvalidFieldError, "DES"),
    "unknown emotion": (lambda root: _github_item(emotion="joy"), UnknownLabelError, "emotion"),
    "missing emotion": (lambda root: _github_item(emotion=_DROP), MissingFieldError, "emotion"),
    "missing subject": (lambda root: _github_item(subject=_DROP), MissingFieldError, "subject"),
    "description not text": (lambda root: _github_item(description=42), InvalidFieldError, "description"),
    "confidence not a number": (lambda root: _github_item(confidence="high"), InvalidFieldError, "confidence"),
    "confidence off scale": (lambda root: _github_item(confidence=80), InvalidFieldError, "confidence"),
    "inverted box": (lambda root: _github_item(bbox=[{"x1": 20, "y1": 4, "x2": 3, "y2": 25}]), InvalidFieldError,
                     "bbox"),
    "box missing a corner": (lambda root: _github_item(bbox=[{"x1": 1, "y1": 4, "x2": 3}]), InvalidFieldError,
                             "bbox"),
}


@pytest.mark.parametrize("case", sorted(FAILURES))
def test_emoverse_failures_name_the_record_field_and_fix(root, case):
  make_item, error_type, field = FAILURES[case]
  item = make_item(root)
  with pytest.raises(error_type) as caught:
    parse_emoverse(item, root, default_id="fallback")
  error = caught.value
  assert isinstance(error, RecordError)
  assert (error.record_id, error.field) == ("ev-001", field)
  message = str(error)
  assert "'ev-001'" in message and f"'{field}'" in message and error.fix and error.fix in message
  if field == "image_path":
    assert item["image_path"] in message  # the path at fault is named


def _qa(question, answer, image="images/a.jpg"):
  return {"id": "q9", "image": image,
          "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


EEMO_FAILURES = {
    "valence on the 1-9 scale": (_qa("Rate the valence.", "Valence: 6.0"), InvalidFieldError, "answer"),
    "ranking names nothing": (_qa("Rank the emotions.", "Emotion ranking:"), InvalidFieldError, "answer"),
    "ranking repeats an emotion": (_qa("Rank.", "Emotion ranking: joy, joy"), InvalidFieldError, "ranking"),
    "answer is no option": (_qa("Pick: A: No B: Yes", "Maybe"), InvalidFieldError, "answer"),
    "letter beyond the options": (_qa("Pick: A: No B: Yes", "C"), InvalidFieldError, "answer"),
    "three images": (_qa("Q", "A", ["images/a.jpg"] * 3), InvalidFieldError, "image"),
    "placeholders do not match": (_qa("<image><image> Q", "A"), InvalidFieldError, "question"),
    "turns out of order": ({"id": "q9", "image": "images/a.jpg", "conversations": [
        {"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}]}, InvalidFieldError, "conversations[0]"),
    "no image": ({"id": "q9", "conversations": []}, MissingFieldError, "image"),
    "neither format": ({"id": "q9", "question": "Q"}, MissingFieldError, "conversations"),
    "escaping image": (_qa("Q", "A", "../outside/x.jpg"), UnsafePathError, "image"),
}


@pytest.mark.parametrize("case", sorted(EEMO_FAILURES))
def test_eemo_failures_name_the_record_field_and_fix(root, case):
  item, error_type, field = EEMO_FAILURES[case]
  _outside_file(root)
  with pytest.raises(error_type) as caught:
    parse_eemo(item, root, default_id="fallback")
  assert (caught.value.record_id, caught.value.field) == ("q9", field)
  assert "'q9'" in str(caught.value) and caught.value.fix in str(caught.value)


def test_records_validate_when_built_directly(root):
  image = (root / "images" / "a.jpg").read_bytes()
  common = dict(id="r", image=image, width=40, height=30, description="d", background="b", attribute="a",
                subject="s")
  with pytest.raises(UnknownLabelError, match="'r', field 'emotion'"):
    EmoVerseRecord(emotion="Amusement", **common)  # records hold canonical (lower-case) names
  with pytest.raises(InvalidFieldError, match="boxes"):
    EmoVerseRecord(emotion="anger", boxes=np.array([[0, 0, 41, 10]], np.int32), **common)
  with pytest.raises(UnknownLabelError, match="task"):
    EEmoRecord(id="e", images=(image,), widths=(40,), heights=(30,), task="caption", question="q", answer="a")
  with pytest.raises(MissingFieldError, match="valence score"):
    EEmoRecord(id="e", images=(image,), widths=(40,), heights=(30,), task="valence", question="q", answer="a")


# ------------------------------------------------------------------------------------------- round trip


def _as_stored(features):
  """What a TFDS reader hands back: text as bytes, sequences as lists, arrays as arrays."""
  out = {}
  for key, value in features.items():
    if isinstance(value, str):
      out[key] = value.encode()
    elif isinstance(value, list):
      out[key] = [v.encode() if isinstance(v, str) else v for v in value]
    else:
      out[key] = np.array(value)
  return out


def test_round_trip_record_features_record(root):
  records = [parse_emoverse(_github_item(), root, default_id="x", split="train"),
             parse_emoverse(_github_item(DES=_DROP, bbox=_DROP, confidence=_DROP, description="Ünïcode ✓"), root,
                            default_id="x")]
  for record in records:
    features = record.to_features()
    assert set(features) >= {"id", "image", "width", "height", "emotion", "des", "has_des", "boxes"}
    assert features["des"].shape == (DES_DIM,) and features["des"].dtype == np.float32
    assert EmoVerseRecord.from_features(features) == record
    assert EmoVerseRecord.from_features(_as_stored(features)) == record
  assert np.isnan(records[1].to_features()["des"]).all() and not records[1].to_features()["has_des"]
  assert math.isnan(records[1].confidence) and records[1].boxes.shape == (0, 4)

  [qa] = parse_eemo(_qa("<image>Pick: A: No B: Yes", "B"), root, default_id="x")
  [vad] = parse_eemo(_qa("Rate.", "Dominance: 0.25"), root, default_id="x")
  for record in (qa, vad):
    assert EEmoRecord.from_features(record.to_features()) == record
    assert EEmoRecord.from_features(_as_stored(record.to_features())) == record
  assert qa != vad


def test_records_are_immutable(root):
  record = parse_emoverse(_github_item(), root, default_id="x")
  with pytest.raises(AttributeError):
    record.emotion = "anger"
  with pytest.raises(ValueError):
    record.des[0] = 1.0


# ------------------------------------------------------------------------------------------ pixel limit


def test_images_over_the_pixel_limit_are_refused_from_their_header(root):
  with pytest.raises(ImageTooLargeError) as caught:
    parse_emoverse(_github_item(), root, default_id="x", max_image_pixels=1199)  # a.jpg is 40x30
  error = caught.value
  assert (error.record_id, error.field, error.size, error.limit) == ("ev-001", "image_path", 1200, 1199)
  assert str(error) == (f"record 'ev-001', field 'image_path': {root / 'images' / 'a.jpg'} is 40x30 = 1,200 pixels, "
                        "more than max_image_pixels=1,199. To fix: downscale the image (or remove the record), or "
                        "raise max_image_pixels.")
  assert parse_emoverse(_github_item(), root, default_id="x", max_image_pixels=1200).width == 40  # cached now
  with pytest.raises(ImageTooLargeError):  # the cached size is checked against the new limit too
    parse_emoverse(_github_item(), root, default_id="x", max_image_pixels=1000)
  with pytest.raises(ImageTooLargeError, match="field 'image': the image bytes is 24x36"):
    parse_eemo(_qa("Q", "A", image={"bytes": (root / "images" / "b.png").read_bytes()}), root, default_id="x",
               max_image_pixels=100)
  from huge_image_probe import huge_png
  with pytest.raises(ImageTooLargeError, match="the image is larger than PIL opens"):  # over twice its bomb limit
    image_size(huge_png(14000), "bomb", "image")


def test_a_huge_image_is_refused_in_little_memory(tmp_path):
  probe = os.path.join(os.path.dirname(__file__), "huge_image_probe.py")
  run = subprocess.run([sys.executable, probe, "records", str(tmp_path)], capture_output=True, text=True,
                       timeout=600, cwd=os.path.join(os.path.dirname(__file__), os.pardir, os.pardir))
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.splitlines()[-1])
  assert result["outcome"].startswith("ImageTooLargeError: record 'huge', field 'image': the image is 12000x12000 = "
                                      "144,000,000 pixels, more than max_image_pixels=89,478,485")
  assert result["extra_mb"] < 64  # decoding it took 139 MB before the limit
