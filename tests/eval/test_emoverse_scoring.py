"""EmoVerse scoring on hand-made items: CES from the head and from the answer, B-A-S parse rate and box IoU in the
resized image's pixels, DES cosine only in the reference's space."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline import tasks
from eemo_jax.eval import emoverse
from eemo_jax.eval.run import prediction_item


def _item(truth, response, *, task="emoverse_ces", probs=None, box=None, des=None, ref_des=None):
  item = {"id": truth + response[:8], "question_type": "CES", "task": task, "correct_answer": truth,
          "response(m)": response, "correct_box": box, "correct_des": ref_des}
  if probs is not None:
    item["head_probs"] = probs
  if des is not None:
    item["des"] = des
  return item


def _probs(label, second=None):
  p = np.full(8, 0.01)
  p[emoverse.LABELS.index(label)] = 0.8
  if second:
    p[emoverse.LABELS.index(second)] = 0.1
  return list(p / p.sum())


def test_head_and_answer_are_scored_apart():
  items = [_item("awe", "Awe", probs=_probs("awe")), _item("fear", "Sadness", probs=_probs("sadness", "fear")),
           _item("anger", "I am not sure", probs=_probs("anger")), _item("sadness", "Sadness.", probs=_probs("awe"))]
  metrics, scored = emoverse.score(items, "m", n_resamples=20)
  assert metrics["emoverse.ces.accuracy"] == pytest.approx(2 / 4)  # head: awe, anger right
  assert metrics["emoverse.answer.accuracy"] == pytest.approx(2 / 4)  # answers: awe, sadness right
  assert metrics["emoverse.answer.unparsed"] == 1
  assert metrics["emoverse.head.top3"] == pytest.approx(3 / 4)  # fear is the head's second for item 2
  assert [s["correct(m)"] for s in scored] == [1, 0, 0, 1]
  assert scored[1]["head_prediction(m)"] == "sadness"


def test_bas_answers_give_parse_rate_and_box_iou():
  record = {"id": "x", "emotion": "Awe", "description": "a mountain", "background": "sky", "attribute": "tall",
            "subject": "mountain", "confidence": 7, "bbox": [[0, 0, 200, 100]], "height": 200, "width": 400}
  features = {"id": "x", "width": 400, "height": 200}
  exact = tasks.format_bas_answer(record, resized_hw=(112, 224))  # the answer the model should give
  item = prediction_item(record, features, "emoverse_bas", "m", exact, resized_hw=(112, 224))
  assert item["correct_box"] == [0, 0, 112, 56]  # the record's box in pixels of the resized image
  half = exact.replace("'x2': 112", "'x2': 56")  # half the width: IoU 0.5
  broken = "{'description': 'cut off"
  items = [item, dict(item, **{"response(m)": half}), dict(item, **{"response(m)": broken})]
  metrics, _ = emoverse.score(items, "m", n_resamples=20)
  assert metrics["emoverse.bas.parse_rate"] == pytest.approx(2 / 3)
  assert metrics["emoverse.box.iou"] == pytest.approx((1 + 0.5 + 0) / 3)
  assert metrics["emoverse.box.iou50"] == pytest.approx(2 / 3)
  assert metrics["emoverse.answer.accuracy"] == pytest.approx(2 / 3)


def test_des_cosine_only_where_the_spaces_match():
  a, b = [1.0, 0.0, 0.0], [1.0, 1.0, 0.0]
  items = [_item("awe", "Awe", des=a, ref_des=b), _item("awe", "Awe", des=[1.0, 0.0], ref_des=b)]
  metrics, _ = emoverse.score(items, "m", n_resamples=20)
  assert metrics["emoverse.des.cosine"] == pytest.approx(1 / np.sqrt(2))
