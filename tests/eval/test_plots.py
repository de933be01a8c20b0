"""Evaluation plots: each writes one PNG that PIL opens, at the pixel size the report lays out, with something
drawn on it; the training-curve reader against a hand-written metrics.jsonl."""

import json

import matplotlib
import numpy as np
import pytest
from PIL import Image

from eemo_jax.eval import plots


def opened(path: str) -> Image.Image:
  image = Image.open(path)
  image.load()
  assert image.format == "PNG"
  return image


def drawn(image: Image.Image) -> bool:
  """More than a blank canvas: a range of grey levels."""
  return len(np.unique(np.asarray(image.convert("L")))) > 20


def test_the_backend_is_headless():
  assert matplotlib.get_backend().lower() == "agg"


@pytest.mark.parametrize("classes, unparsed", [(3, None), (7, [1, 0, 2, 0, 0, 0, 3]), (26, None)])
def test_confusion_matrix_png(tmp_path, classes, unparsed):
  rng = np.random.default_rng(classes)
  confusion = rng.integers(0, 40, size=(classes, classes)) + np.diag(rng.integers(50, 90, size=classes))
  confusion[0] = 0  # a class with no items: its row must not divide by zero
  labels = [f"emotion{i}" for i in range(classes)]
  path = plots.confusion_matrix_png(str(tmp_path / "sub" / "cm.png"), confusion, labels, "dominant emotion",
                                    unparsed=unparsed)
  assert path == str(tmp_path / "sub" / "cm.png")
  image = opened(path)
  assert image.size == (900, 800)
  assert drawn(image)


def test_confusion_matrix_png_rejects_labels_that_do_not_fit(tmp_path):
  with pytest.raises(ValueError, match="one row per label"):
    plots.confusion_matrix_png(str(tmp_path / "cm.png"), np.eye(3, dtype=int), ["a", "b"], "t")


@pytest.mark.parametrize("dims", [("valence", "arousal", "dominance"), ("arousal",)])
def test_vad_scatter_png(tmp_path, dims):
  rng = np.random.default_rng(0)
  scores = {}
  for dim in dims:
    true = rng.random(300)
    pred = np.clip(true + rng.normal(0, 0.1, 300), 0, 1)
    pred[:5] = np.nan  # unreadable answers are left out of the panel
    scores[dim] = (true, pred)
  image = opened(plots.vad_scatter_png(str(tmp_path / "vad.png"), scores, title="assessment"))
  assert image.size == (1500, 600)
  assert drawn(image)


def test_vad_scatter_png_with_a_constant_prediction(tmp_path):
  # SRCC is undefined (NaN) for a constant prediction: the panel still draws, its title says n/a.
  scores = {"valence": (np.linspace(0, 1, 20), np.full(20, 0.5))}
  assert opened(plots.vad_scatter_png(str(tmp_path / "vad.png"), scores)).size == (1500, 600)


def test_accuracy_by_group_png(tmp_path):
  accuracies = {"Emotion perception": 0.71, "Valence perception": 0.85, "Arousal perception": 0.64,
                "Dominance perception": float("nan")}
  intervals = {"Emotion perception": (0.68, 0.74), "Valence perception": (0.80, 0.90)}
  image = opened(plots.accuracy_by_group_png(str(tmp_path / "groups.png"), accuracies, "by dimension",
                                             intervals=intervals))
  assert image.size == (900, 600)
  assert drawn(image)


def write_jsonl(path, records):
  with open(path, "w") as f:
    for record in records:
      f.write((json.dumps(record) if isinstance(record, dict) else record) + "\n")
  return str(path)


def sft_records():
  records = [{"step": s, "split": "train", "loss": 3.0 / s, "lm_loss": 2.5 / s, "token_accuracy": 1 - 1 / (s + 1),
              "ces_loss": 0.5 / s, "ces_accuracy": s / 100, "grad_norm": 1.0, "lr": 1e-5, "skipped": 0.0}
             for s in range(1, 61)]
  records += [{"step": s, "split": "eval", "loss": 3.2 / s, "token_accuracy": 0.5} for s in (20, 40, 60)]
  return records


def test_training_curves_png_of_an_sft_run(tmp_path):
  path = write_jsonl(tmp_path / "metrics.jsonl", sft_records())
  image = opened(plots.training_curves_png(str(tmp_path / "curves.png"), path))
  assert image.size == (1500, 900)
  assert drawn(image)


def test_training_curves_png_of_a_grpo_run(tmp_path):
  records = [{"step": s, "split": "train", "loss": 0.01, "reward": 0.4 + s / 100, "rewards/format/mean": 0.9,
              "rewards/format/std": 0.1, "rewards/eemo_task/mean": 0.3 + s / 100, "kl": 0.001 * s,
              "entropy": 0.7, "parse_failure/all": 0.1, "parse_failure/yes_no": float("nan")} for s in range(1, 31)]
  records += [{"step": 10, "split": "eval", "reward": 0.45, "rewards/format/mean": 0.88}]
  path = write_jsonl(tmp_path / "metrics.jsonl", records)
  assert opened(plots.training_curves_png(str(tmp_path / "curves.png"), path)).size == (1500, 900)


def test_read_curves_keeps_the_last_record_of_a_step_and_only_finite_numbers(tmp_path):
  records = [{"step": 1, "split": "train", "loss": 4.0, "note": "text", "flag": True},
             {"step": 2, "split": "train", "loss": 3.0},
             {"step": 3, "split": "train", "loss": float("nan")},
             "",  # a blank line
             {"step": 2, "split": "train", "loss": 2.5},  # a resumed run logs step 2 again
             {"step": 2, "split": "eval", "loss": 3.5}]
  curves = plots.read_curves(write_jsonl(tmp_path / "metrics.jsonl", records))
  assert set(curves) == {("train", "loss"), ("eval", "loss")}
  steps, values = curves["train", "loss"]
  assert steps.tolist() == [1, 2] and values.tolist() == [4.0, 2.5]
  assert curves["eval", "loss"][0].tolist() == [2] and curves["eval", "loss"][1].tolist() == [3.5]


def test_training_curves_png_explains_a_bad_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    plots.training_curves_png(str(tmp_path / "c.png"), str(tmp_path / "missing" / "metrics.jsonl"))
  with pytest.raises(ValueError, match="line 2 is not JSON"):
    plots.training_curves_png(str(tmp_path / "c.png"), write_jsonl(tmp_path / "bad.jsonl", [{"step": 1}, "{oops"]))
  with pytest.raises(ValueError, match="no curve"):
    plots.training_curves_png(str(tmp_path / "c.png"),
                              write_jsonl(tmp_path / "none.jsonl", [{"step": 1, "tokens_per_s": 10.0}]))
