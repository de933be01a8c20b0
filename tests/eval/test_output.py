"""`eval --out` in a bucket (a GCS emulator on localhost): the same folder a local `--out` gets, the training
curves read from a run directory in the bucket."""

import json
import os

from gcs_emulator import BUCKET, bucket_files, gcs_emulator, read_object

from eemo_jax import paths
from eemo_jax.eval.output import write_outputs

METRICS = {"perception.single.dimension.valence.accuracy": 0.5, "perception.single.dimension.arousal.accuracy": 0.75,
           "perception.single.overall.accuracy": 0.625}
ROWS = [{"step": 1, "split": "train", "loss": 2.0}, {"step": 2, "split": "train", "loss": 1.5}]


def test_an_eval_folder_in_a_bucket_holds_what_a_local_one_does(tmp_path, monkeypatch):
  local_run = tmp_path / "run"
  local_run.mkdir()
  (local_run / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in ROWS))
  local = write_outputs(str(tmp_path / "out"), [], METRICS, model="m", run_dir=str(local_run))
  work = tmp_path / "cwd"
  work.mkdir()
  monkeypatch.chdir(work)
  with gcs_emulator():
    paths.copy_file(str(local_run / "metrics.jsonl"), f"gs://{BUCKET}/run/metrics.jsonl")
    written = write_outputs(f"gs://{BUCKET}/out", [], METRICS, model="m", run_dir=f"gs://{BUCKET}/run")
    uploaded = {name.removeprefix("out/"): read_object(name) for name in bucket_files("out")}
  assert set(written) == set(local) == {"metrics", "predictions", "report", "perception.single.by_dimension",
                                        "training_curves"}
  assert written["report"] == f"gs://{BUCKET}/out/report.md"
  assert sorted(uploaded) == sorted(p.name for p in (tmp_path / "out").iterdir())
  for name in ("metrics.json", "predictions.json", "report.md"):
    assert uploaded[name] == (tmp_path / "out" / name).read_bytes(), name
  assert os.listdir(work) == []
