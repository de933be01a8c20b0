"""`eemo-jax eval` on EEmo-Bench questions with a tiny random model: every question answered, written in the
leaderboard format and scored; the written file scores the same when given back with --predictions."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from eemo_jax import cli
from eemo_jax.eval import BENCH_DATA
from eval_fixtures import ROOT, export_tiny_model

CONFIG = os.path.join(ROOT, "configs", "eemo_bench_eval.py")
ITEMS = {"single": ("Ebench_single.json", [0, 1, 2, 3, 5, 8]), "pair": ("Ebench_pair.json", [0, 1, 2, 3])}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  from data_pipeline.builders import build
  root = tmp_path_factory.mktemp("eval_bench")
  model_dir = export_tiny_model(str(root / "export"), with_head=False)
  for config, (name, picked) in ITEMS.items():
    items = json.load(open(os.path.join(BENCH_DATA, name), encoding="utf-8"))
    subset = [items[i] for i in picked]
    (root / f"{config}.json").write_text(json.dumps(subset))
    for item in subset:
      for key in ("image_name", "image1_url", "image2_url"):
        if key in item:
          (root / "images").mkdir(exist_ok=True)
          Image.new("RGB", (70, 50), (len(item[key]) * 20 % 256, 90, 30)).save(root / "images" / item[key])
    build("eemo_bench", str(root / "data"), manual_dir=str(root), config=config, annotations=f"{config}.json",
          image_root=str(root / "images"))
  return model_dir, str(root / "data")


def _eval(assets, config, out, *extra):
  model_dir, data_dir = assets
  return cli.main(["eval", "--config", CONFIG, "--hf-dir", model_dir, "--out", str(out), "--max-new-tokens", "8",
                   "--batch-size", "4", "--bootstrap", "30", f"--config.data.data_dir={data_dir}",
                   f"--config.data.dataset_config={config}", "--config.data.min_pixels=3136",
                   "--config.data.max_pixels=12544", "--config.model.dtype=float32", *extra])


def test_single_image_questions_are_answered_written_and_scored(assets, tmp_path, capsys):
  out = tmp_path / "single"
  assert _eval(assets, "single", out) == 0, capsys.readouterr().err
  items = json.loads((out / "predictions.json").read_text())
  kinds = Counter(i["question_type"] for i in items)
  open_ended = sum(1 for i in ITEMS["single"][1] if json.load(open(os.path.join(BENCH_DATA, "Ebench_single.json"),
                                                                     encoding="utf-8"))[i].get("open_ended_Q"))
  assert kinds == {"Yes-or-No": 6, "What/How": 6, "Ranking": 6, "Assessment": 18, "Open_ended": open_ended}
  # ids count items in the annotation file given (here the 6-item subset)
  assert {i["id"] for i in items if i["question_type"] == "Yes-or-No"} == {f"single/{k}/yes_no" for k in range(6)}
  metrics = json.loads((out / "metrics.json").read_text())
  model = "export"
  yes_no = [i[f"correct({model})"] for i in items if i["question_type"] == "Yes-or-No"]
  assert metrics["perception.single.yes_no.accuracy"] == pytest.approx(np.mean(yes_no))
  assert metrics["perception.single.n"] == 12
  levels = [i[f"level_score({model})"] for i in items if i["question_type"] == "Assessment"]
  assert len(levels) == 18 and all(0 <= v <= 1 for v in levels)
  assert "assessment.level.valence.srcc" in metrics and "ranking.emotion_score" in metrics
  truth = {i["id"]: i["correct_answer"] for i in items if i["question_type"] == "Assessment"}
  source = json.load(open(os.path.join(BENCH_DATA, "Ebench_single.json"), encoding="utf-8"))
  assert truth["single/4/arousal"] == pytest.approx((source[ITEMS["single"][1][4]]["Arousal"][0] - 1) / 8)
  assert (out / "report.md").read_text().count("|") > 10 and (out / "vad_level_scatter.png").exists()


def test_pair_questions_and_the_written_file_scores_the_same_again(assets, tmp_path, capsys):
  out = tmp_path / "pair"
  assert _eval(assets, "pair", out) == 0, capsys.readouterr().err
  first = json.loads((out / "metrics.json").read_text())
  items = json.loads((out / "predictions.json").read_text())
  assert all("image2_url" in i for i in items)
  assert Counter(i["question_type"] for i in items)["Yes-or-No"] == 4
  assert "perception.pair.overall.accuracy" in first and "perception.single.n" not in first
  again = tmp_path / "again"
  assert cli.main(["eval", "--predictions", str(out / "predictions.json"), "--out", str(again), "--bootstrap",
                   "30"]) == 0
  second = json.loads((again / "metrics.json").read_text())
  for key, value in first.items():
    if key.startswith("perception."):
      assert second[key] == pytest.approx(value, nan_ok=True), key


def test_a_broken_predictions_file_is_one_line(tmp_path, capsys):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  assert cli.main(["eval", "--predictions", str(bad), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "cannot read the prediction file" in err[0]
