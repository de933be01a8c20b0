"""EmoVerse metrics from scored items: the 8 Mikels categories from the head's distribution and from the
generated answer, DES cosine to the reference where the record has one, and for B-A-S answers the parse
rate and the subject box's IoU.

The head (when the model has one) is what EmoVerse's classifier reads, so `emoverse.ces.*` are the head's;
the generated word is scored apart as `emoverse.answer.*` (the same figure for a model without a head,
which then has only that one, under both names). Items come from `eval.run.prediction_item`.
"""

from __future__ import annotations

import numpy as np

from data_pipeline import tasks
from eemo_jax.eval import metrics as m

LABELS = tuple(e.lower() for e in tasks.MIKELS_8)  # the head's class order (pipeline: ces_label)


def score(items: list[dict], model_name: str, *, n_resamples: int = 1000) -> tuple[dict, list[dict]]:
  response_key = f"response({model_name})"
  true = np.asarray([_label(i["correct_answer"]) for i in items], np.int64)  # (N,)
  answers = [_answer_emotion(i.get(response_key) or "", i.get("task", "")) for i in items]
  generated = np.asarray([_label(a) if a else -1 for a in answers], np.int64)  # (N,), -1 unparsed
  out: dict[str, float] = {}
  _classification(out, "emoverse.answer", true, generated, n_resamples)
  has_head = all("head_probs" in i for i in items)
  if has_head:
    probs = np.asarray([i["head_probs"] for i in items], np.float64)  # (N, 8)
    head_pred = probs.argmax(axis=-1)
    _classification(out, "emoverse.ces", true, head_pred, n_resamples)
    out["emoverse.head.top1"] = m.top_k_accuracy(probs, true, 1)
    out["emoverse.head.top3"] = m.top_k_accuracy(probs, true, 3)
  else:
    head_pred = None
    _classification(out, "emoverse.ces", true, generated, n_resamples)
  # DES is compared only where the head's space is the reference's (a head trained without DES targets may
  # have another width: it has no DES to score).
  des_rows = [i for i in items if i.get("correct_des") and i.get("des") and len(i["des"]) == len(i["correct_des"])]
  if des_rows:
    cos = m.cosine_similarity(np.asarray([i["des"] for i in des_rows]),
                              np.asarray([i["correct_des"] for i in des_rows]))
    m.with_ci(out, "emoverse.des.cosine", np.mean, cos, n_resamples=n_resamples)
  bas = [i for i in items if i.get("task") in ("emoverse_bas", "emoverse_des")]
  if bas:
    parsed = [tasks.parse_emoverse_answer(i.get(response_key) or "") for i in bas]
    out["emoverse.bas.parse_rate"] = float(np.mean([p is not None and p.description is not None for p in parsed]))
    boxed = [(p.boxes[0] if p is not None and p.boxes else None, i["correct_box"]) for p, i in zip(parsed, bas)
             if i.get("correct_box")]
    if boxed:  # a missing or unreadable box scores 0
      iou = np.asarray([m.box_iou(np.asarray([pred], float), np.asarray([truth], float))[0] if pred is not None
                        else 0.0 for pred, truth in boxed])
      m.with_ci(out, "emoverse.box.iou", np.mean, iou, n_resamples=n_resamples)
      out["emoverse.box.iou50"] = float(np.mean(iou >= 0.5))
  scored = []
  for index, item in enumerate(items):
    row = dict(item)
    row[f"parsed({model_name})"] = answers[index]
    row[f"correct({model_name})"] = int(generated[index] == true[index])
    if head_pred is not None:
      row[f"head_prediction({model_name})"] = LABELS[int(head_pred[index])]
    scored.append(row)
  return out, scored


def confusion(items: list[dict], model_name: str) -> tuple[np.ndarray, tuple[str, ...]]:
  """The (8, 8) [true, predicted] counts of the head (or of the generated answers without a head)."""
  true = np.asarray([_label(i["correct_answer"]) for i in items])
  if all("head_probs" in i for i in items):
    pred = np.asarray([np.argmax(i["head_probs"]) for i in items])
  else:
    pred = np.asarray([_label(i.get(f"parsed({model_name})") or "") for i in items])
  return m.confusion_matrix(true, pred, len(LABELS)), LABELS


def _answer_emotion(text: str, task: str) -> str | None:
  """The Mikels class a generated answer names: a B-A-S answer's `emotion` field, a CES answer's one word."""
  if task in ("emoverse_bas", "emoverse_des"):
    parsed = tasks.parse_emoverse_answer(text)
    return parsed.emotion if parsed is not None else None
  return tasks.parse_ces_answer(text)


def _label(name: str) -> int:
  name = (name or "").strip().lower()
  return LABELS.index(name) if name in LABELS else -1


def _classification(out: dict, prefix: str, true: np.ndarray, pred: np.ndarray, n_resamples: int) -> None:
  for key, value in m.classification_metrics(true, pred, LABELS).items():
    out[f"{prefix}.{key}"] = value
  m.with_ci(out, f"{prefix}.accuracy", lambda t, p: float(np.mean(t == p)), true, pred, n_resamples=n_resamples)
  m.with_ci(out, f"{prefix}.macro_f1", lambda t, p: m.classification_metrics(t, p, LABELS)["macro_f1"], true, pred,
            n_resamples=min(n_resamples, 200))
