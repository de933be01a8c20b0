"""`eemo-jax predict` on a folder: every readable image predicted, a corrupt one named and skipped; the head's
distribution and DES, the attribution's box drawn on a copy; an EEmo task answer with its parsed value."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from eemo_jax import cli
from eval_fixtures import PHOTOS, export_tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  return export_tiny_model(str(tmp_path_factory.mktemp("predict") / "export"))


@pytest.fixture()
def folder(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  for name in ("astronaut.jpg", "coffee.jpg"):
    shutil.copy(os.path.join(PHOTOS, name), images / name)
  (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
  Image.new("RGB", (90, 60), (200, 30, 30)).save(images / "red.png")
  (images / "notes.txt").write_text("not an image")
  return images


def test_a_folder_with_a_corrupt_file_predicts_the_others_and_names_it(model_dir, folder, tmp_path, capsys):
  out = tmp_path / "out" / "predictions.jsonl"
  code = cli.main(["predict", "--hf-dir", model_dir, "--image", str(folder), "--out", str(out), "--boxes",
                   str(tmp_path / "boxes"), "--max-new-tokens", "8", "--batch-size", "2", "--max-pixels", "12544"])
  err = capsys.readouterr().err
  assert code == 0
  assert "broken.jpg" in err and "skipped" in err and "notes.txt" not in err
  lines = [json.loads(line) for line in out.read_text().splitlines()]
  assert [os.path.basename(line["image"]) for line in lines] == ["astronaut.jpg", "coffee.jpg", "red.png"]
  des = np.load(str(out).replace(".jsonl", ".des.npy"))
  from eemo_jax.hf.heads_io import read_head_config
  assert des.shape == (3, read_head_config(model_dir).des_dim) and np.all(np.isfinite(des))
  for index, line in enumerate(lines):
    assert line["task"] == "bas" and isinstance(line["answer"], str)
    probs = line["probabilities"]
    assert set(probs) == {"Amusement", "Anger", "Awe", "Contentment", "Disgust", "Excitement", "Fear", "Sadness"}
    assert abs(sum(probs.values()) - 1) < 1e-4 and line["emotion"] == max(probs, key=probs.get)
    assert line["des_row"] == index


def test_the_subject_box_is_scaled_to_the_image_and_drawn(model_dir, tmp_path, monkeypatch):
  """The generated attribution's box, in pixels of the resized image, comes back in the image's own pixels."""
  from eemo_jax.eval import predict as predictlib
  from eemo_jax.eval.loading import load_eval_model
  answer = ("{'description': 'a red card', 'emotion': 'Awe', 'background': 'plain', 'adjective': 'red', "
            "'noun': 'card', 'intensity': 6, 'bbox': [{'x1': 14, 'y1': 0, 'x2': 56, 'y2': 28}]}")
  monkeypatch.setattr(predictlib, "_generator", lambda *a, **k: lambda inputs: [answer] * inputs.input_ids.shape[0])
  image = tmp_path / "wide.png"
  Image.new("RGB", (224, 112), (10, 200, 10)).save(image)
  model = load_eval_model(hf_dir=model_dir)
  settings = predictlib.PredictSettings(max_pixels=112 * 56, batch_size=1)  # resized to 112 x 56 (w x h)
  out = tmp_path / "p.jsonl"
  summary = predictlib.predict(model, [str(image)], settings, out_path=str(out), boxes_dir=str(tmp_path / "b"))
  line = json.loads(out.read_text())
  assert summary.predicted == 1 and not summary.failed
  assert line["attribution"]["emotion"] == "Awe" and line["attribution"]["noun"] == "card"
  assert line["attribution"]["boxes"] == [[28.0, 0.0, 112.0, 56.0]]  # x 2, y 2
  with Image.open(line["boxed_image"]) as drawn:
    assert drawn.size == (224, 112)
    assert drawn.getpixel((28, 30)) == (255, 32, 32) and drawn.getpixel((5, 5)) == (10, 200, 10)


def test_an_eemo_task_answer_is_parsed_with_its_reasoning(model_dir, tmp_path, monkeypatch):
  from eemo_jax.eval import predict as predictlib
  from eemo_jax.eval.loading import load_eval_model
  answer = "<think>Bright colours and a smile.</think><answer>Dominant emotion: joy</answer>"
  monkeypatch.setattr(predictlib, "_generator", lambda *a, **k: lambda inputs: [answer] * inputs.input_ids.shape[0])
  model = load_eval_model(hf_dir=model_dir)
  settings = predictlib.PredictSettings(task="dominant_emotion", options=("fear", "joy", "sadness"), batch_size=1,
                                        max_pixels=12544)
  out = tmp_path / "p.jsonl"
  predictlib.predict(model, [os.path.join(PHOTOS, "coffee.jpg")], settings, out_path=str(out))
  line = json.loads(out.read_text())
  assert line["parsed"] == "joy" and line["reasoning"] == "Bright colours and a smile."


def test_bad_inputs_are_one_line_errors(model_dir, tmp_path, capsys):
  assert cli.main(["predict", "--hf-dir", model_dir, "--image", str(tmp_path / "nothing"), "--out",
                   str(tmp_path / "o.jsonl")]) == 2
  assert "neither an image file nor a folder" in capsys.readouterr().err
  assert cli.main(["predict", "--hf-dir", str(tmp_path / "nope"), "--image", PHOTOS, "--out",
                   str(tmp_path / "o.jsonl")]) == 2
  assert "does not exist" in capsys.readouterr().err
  assert cli.main(["predict", "--hf-dir", model_dir, "--image", PHOTOS, "--task", "yes_no", "--out",
                   str(tmp_path / "o.jsonl")]) == 2
  assert "needs --question" in capsys.readouterr().err
