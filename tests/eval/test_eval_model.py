"""`eemo-jax eval --config` on a model: generation over a built split, written and scored as a predictions file.

The EmoVerse path runs on the synthetic set with a tiny random model exported with its head; the CES figures
are checked against the head's own forward on the same prompts and against the answers the model generated.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image

from eemo_jax import cli
from eval_fixtures import TINY_DEMO, export_tiny_model


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  from data_pipeline.builders import build
  root = tmp_path_factory.mktemp("eval_model")
  model_dir = export_tiny_model(str(root / "export"))
  report = build("synthetic", str(root / "data"), config="emoverse", num_train=8, num_test=12)
  return model_dir, str(root / "data"), report


def test_eval_on_the_synthetic_split_writes_scored_predictions_metrics_report_and_plots(assets, tmp_path, capsys):
  model_dir, data_dir, report = assets
  out = tmp_path / "eval"
  code = cli.main(["eval", "--config", TINY_DEMO, "--hf-dir", model_dir, "--out", str(out), "--max-new-tokens", "6",
                   "--batch-size", "4", "--bootstrap", "50", f"--config.data.data_dir={data_dir}",
                   f"--config.data.dataset_config={report.config}"])
  printed = capsys.readouterr()
  assert code == 0, printed.err
  assert "evaluated 12 records" in printed.out and "emoverse.ces.accuracy" in printed.out
  metrics = json.loads((out / "metrics.json").read_text())
  items = json.loads((out / "predictions.json").read_text())
  assert len(items) == 12 and metrics["examples"] == 12
  name = os.path.basename(model_dir)
  heads = np.asarray([i["head_probs"] for i in items])
  true = [i["correct_answer"].lower() for i in items]
  labels = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
  head_accuracy = np.mean([labels[int(k)] == t for k, t in zip(heads.argmax(1), true)])
  assert metrics["emoverse.ces.accuracy"] == pytest.approx(head_accuracy)
  generated = np.mean([i[f"correct({name})"] for i in items])
  assert metrics["emoverse.answer.accuracy"] == pytest.approx(generated)
  assert metrics["emoverse.ces.accuracy.ci95_low"] <= metrics["emoverse.ces.accuracy"] <= \
      metrics["emoverse.ces.accuracy.ci95_high"]
  assert all(isinstance(i[f"response({name})"], str) for i in items)
  report = (out / "report.md").read_text()
  assert "confusion_matrix.png" in report
  with Image.open(out / "confusion_matrix.png") as png:
    assert png.size[0] > 200 and png.size[1] > 200


def test_the_head_figures_equal_the_heads_forward_on_the_prompts(assets):
  """The head's probabilities in the predictions are those of a plain forward over each prompt alone."""
  import jax

  from data_pipeline.builders import load_records
  from data_pipeline.pipeline import PipelineConfig
  from eemo_jax.eval.loading import load_eval_model
  from eemo_jax.eval.run import EvalSettings, generate_predictions
  from eemo_jax.config import load_config
  from eemo_jax.train import run as runlib
  model_dir, data_dir, report = assets
  model = load_eval_model(hf_dir=model_dir)
  config = load_config(TINY_DEMO, [f"--config.data.data_dir={data_dir}",
                                   f"--config.data.dataset_config={report.config}"])
  pcfg = runlib.pipeline_config(config, model.backbone.config, split="test", eval_mode=True)
  import dataclasses
  pcfg = dataclasses.replace(pcfg, batch_size=4)
  items, _ = generate_predictions(model, pcfg, EvalSettings(max_new_tokens=2, limit=5, level_scores=False))
  assert len(items) == 5
  source = load_records("synthetic", data_dir, "test", config=report.config)
  one = dataclasses.replace(pcfg, batch_size=1)
  for index in (0, 3):
    alone, _ = generate_predictions(model, one, EvalSettings(max_new_tokens=2, limit=index + 1, level_scores=False),
                                    source=source)
    np.testing.assert_allclose(alone[index]["head_probs"], items[index]["head_probs"], atol=2e-5)
  del jax, PipelineConfig
