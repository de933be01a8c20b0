"""The synthetic data set: deterministic, self-consistent, and its emotion learnable from the pixels."""

import io
import re

import numpy as np
import pytest
from PIL import Image

import data_pipeline.synthetic as synthetic
from data_pipeline.records import EEMO_TASKS, MIKELS_8, OPTION_SETS, parse_eemo_stage2
from data_pipeline.synthetic import (PAIR_OFFSET, STYLES, SYNTHETIC_NOTICE, synthetic_eemo_records,
                                     synthetic_emoverse_record, synthetic_sample)


def test_it_says_it_is_synthetic():
  assert "SYNTHETIC" in SYNTHETIC_NOTICE and "not human judgements" in SYNTHETIC_NOTICE
  assert "SYNTHETIC" in synthetic.__doc__


def test_same_seed_same_bytes_other_seed_other_bytes():
  for index in (0, 5, 13):
    a, b = synthetic_sample(7, index), synthetic_sample(7, index)
    assert a.image_bytes == b.image_bytes and a.description == b.description and a.vad == b.vad
    np.testing.assert_array_equal(a.des, b.des)
    assert synthetic_emoverse_record(7, index) == synthetic_emoverse_record(7, index)
    assert synthetic_eemo_records(7, index) == synthetic_eemo_records(7, index)
    assert synthetic_sample(8, index).image_bytes != a.image_bytes


def test_sizes_vary_and_classes_are_balanced():
  samples = [synthetic_sample(0, i) for i in range(48)]
  sizes = {(s.width, s.height) for s in samples}
  assert len(sizes) > 30 and all(64 <= w <= 160 and 64 <= h <= 160 for w, h in sizes)
  assert any(w / h > 1.4 for w, h in sizes) and any(h / w > 1.4 for w, h in sizes)
  counts = {e: sum(s.emotion == e for s in samples) for e in MIKELS_8}
  assert set(counts.values()) == {6}


@pytest.mark.parametrize("index", range(0, 40))
def test_emoverse_fields_are_consistent(index):
  s = synthetic_sample(3, index)
  record = synthetic_emoverse_record(3, index, split="train")  # validates itself
  image = Image.open(io.BytesIO(record.image))
  assert image.format == "JPEG" and image.size == (record.width, record.height) == (s.width, s.height)
  x1, y1, x2, y2 = s.box
  assert 0 <= x1 < x2 <= s.width and 0 <= y1 < y2 <= s.height
  assert (x2 - x1) * (y2 - y1) < s.width * s.height  # the subject, not the whole frame
  np.testing.assert_array_equal(record.boxes, [s.box])
  style = STYLES[s.emotion]
  assert record.emotion == s.emotion == MIKELS_8[index % 8] and record.label == index % 8
  assert (s.background, s.attribute, s.subject) == (record.background, record.attribute, record.subject)
  assert s.background in style.backgrounds and s.attribute in style.attributes and s.subject in style.subjects
  for words in (s.background, s.attribute, s.subject, s.emotion):
    assert words in record.description
  assert all(0.0 <= v <= 1.0 for v in s.vad) and np.abs(np.subtract(s.vad, style.vad)).max() < 0.2
  assert s.ranking[0] == s.emotion and len(set(s.ranking)) == 3 and set(s.ranking) <= set(MIKELS_8)
  assert 0 <= record.confidence <= 10 and record.des.shape == (1024,) and record.source == "synthetic"


def test_ranking_follows_the_vad_prototypes():
  # The runner-up emotions are the ones whose VAD prototype is nearest; e.g. fear's neighbours are negative.
  for index in range(8):
    s = synthetic_sample(0, index)
    valence = STYLES[s.emotion].vad[0]
    assert all(abs(STYLES[e].vad[0] - valence) < 0.5 for e in s.ranking[1:])


@pytest.mark.parametrize("index", range(0, 16))
def test_eemo_answers_agree_with_the_labels(index):
  s = synthetic_sample(1, index)
  records = synthetic_eemo_records(1, index, split="test")
  assert {r.task for r in records} == set(EEMO_TASKS)
  for record in records:
    # The released-format parser reads the same labels back from the question and answer text.
    item = {"id": record.id, "problem": {"question": record.question}, "solution": {"answer": record.answer},
            "video_path": list(record.images) if len(record.images) > 1 else record.images[0]}
    parsed = parse_eemo_stage2(item, None, default_id="unused", split="test")
    assert parsed == record.__class__(**{**record.__dict__, "source": ""}), record.task

    if record.task == "yes_no" and len(record.images) == 1:
      asked = re.search(r"Do you think (\w+) is", record.question).group(1)
      said = record.options["AB".index(record.choice)]
      assert said == ("Yes" if asked == s.emotion else "No")
    elif record.task == "multiple_choice" and len(record.images) == 1:
      assert record.options["ABCD".index(record.choice)] == s.emotion
    elif record.task == "multiple_choice":  # the image pair: which evokes a more positive feeling
      partner = synthetic_sample(1, index + PAIR_OFFSET)
      assert record.images == (s.image_bytes, partner.image_bytes)
      assert record.choice == ("A" if s.vad[0] >= partner.vad[0] else "B")
    elif record.task == "dominant_emotion":
      assert record.emotion == s.emotion and record.option_set == OPTION_SETS[0]
    elif record.task == "emotion_ranking":
      assert record.ranking == s.ranking
    elif record.task in ("valence", "arousal", "dominance"):
      dim = ("valence", "arousal", "dominance").index(record.task)
      assert record.scores[dim] == np.float32(s.vad[dim]) and np.isnan(np.delete(record.scores, dim)).all()
    else:
      assert record.answer == s.description


def _image_statistics(image_bytes: bytes) -> np.ndarray:
  """Cheap features: per-channel mean and std, and edge energy (mean absolute gradient)."""
  pixels = np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"), np.float32) / 255.0  # (h, w, 3)
  grey = pixels.mean(-1)
  edges = np.abs(np.diff(grey, axis=0)).mean() + np.abs(np.diff(grey, axis=1)).mean()
  return np.concatenate([pixels.mean((0, 1)), pixels.std((0, 1)), [edges]])


def _softmax_regression(x, y, classes, steps=300, lr=0.5):
  """Multinomial logistic regression by full-batch gradient descent (numpy)."""
  w = np.zeros((x.shape[1], classes))
  b = np.zeros(classes)
  onehot = np.eye(classes)[y]
  for _ in range(steps):
    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    w -= lr * x.T @ (p - onehot) / len(x)
    b -= lr * (p - onehot).mean(0)
  return w, b


def test_emotion_is_learnable_from_cheap_image_statistics():
  seed = 11
  train = [synthetic_sample(seed, i) for i in range(400)]
  test = [synthetic_sample(seed, i) for i in range(400, 600)]  # held out: indices never trained on
  x_train = np.array([_image_statistics(s.image_bytes) for s in train])
  x_test = np.array([_image_statistics(s.image_bytes) for s in test])
  y_train = np.array([MIKELS_8.index(s.emotion) for s in train])
  y_test = np.array([MIKELS_8.index(s.emotion) for s in test])
  mean, std = x_train.mean(0), x_train.std(0) + 1e-8
  x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

  centroids = np.stack([x_train[y_train == c].mean(0) for c in range(8)])
  nearest = np.argmin(((x_test[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
  w, b = _softmax_regression(x_train, y_train, 8)
  logistic = np.argmax(x_test @ w + b, axis=1)
  # Chance is 1/8; both simple classifiers must be far above it on held-out images.
  assert (nearest == y_test).mean() >= 0.5
  assert (logistic == y_test).mean() >= 0.5
