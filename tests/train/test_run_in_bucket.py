"""A whole SFT run with every path in a bucket: data, tokenizer, run directory and export all `gs://` URLs.

The bucket is a GCS emulator on localhost (tests/gcs_emulator.py) that gcsfs, tensorstore and array_record all
talk to with their own GCS clients, so this is the code path a TPU pod takes, with no network. The tiny
recipe (4 steps of 8 rows, a checkpoint every 2) is interrupted after step 3, resumed from checkpoint 2, and
exported; then the bucket must hold every file of the run and the working directory nothing. (No evaluation
batches: the test split is read the same way as the train split.)
"""

import io
import json
import os

import numpy as np
import pytest
from gcs_emulator import BUCKET, bucket_files, gcs_emulator, read_object

from eemo_jax import paths
from eemo_jax.config import load_config
from eemo_jax.train.run import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny_demo.py")
STEPS = 4


class Interrupted(Exception):
  """Stands for a preemption after step 3 (checkpoint 2 is complete, step 3 is logged)."""


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
  """The emulator, with the tiny data set and tokenizer built locally and uploaded through the path layer."""
  from data_pipeline.builders import build
  from data_pipeline.tokenizer import build_offline_tokenizer
  local = tmp_path_factory.mktemp("local_assets")
  build_offline_tokenizer(str(local / "tokenizer"))
  report = build("synthetic", str(local / "data"), config="emoverse", num_train=32, num_test=8)
  with gcs_emulator():
    for name in ("tokenizer", "data"):
      for rel in paths.files_under(str(local / name)):
        paths.copy_file(str(local / name / rel), f"gs://{BUCKET}/assets/{name}/{rel}")
    yield report.config


def _config(dataset_config: str):
  base = f"gs://{BUCKET}"
  fields = {"train.run_dir": f"{base}/runs/tiny", "train.export_dir": f"{base}/exports/tiny",
            "data.data_dir": f"{base}/assets/data", "data.tokenizer_dir": f"{base}/assets/tokenizer",
            "data.dataset_config": dataset_config, "train.steps": STEPS, "train.checkpoint_every": 2,
            "train.global_batch_size": 8, "train.log_every": 1, "eval.batches": 0, "mesh.fsdp": 8}
  return load_config(TINY, [f"--config.{k}={v}" for k, v in fields.items()])


def _rows(text: str) -> list[dict]:
  return [row for row in map(json.loads, text.splitlines()) if row["split"] == "train"]


def test_run_resume_and_export_all_in_a_bucket(bucket, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a relative local path written by mistake (./gs:/...) would land here

  def preempt(step, metrics):
    if step == 3:
      raise Interrupted

  with pytest.raises(Interrupted):
    train(_config(bucket), on_step=preempt)
  interrupted = _rows(paths.read_text(f"gs://{BUCKET}/runs/tiny/metrics.jsonl"))
  assert [row["step"] for row in interrupted] == [1, 2, 3]
  assert "runs/tiny/checkpoints/2/_CHECKPOINT_METADATA" in bucket_files("runs/tiny/checkpoints")

  progress = io.StringIO()
  summary = train(_config(bucket), progress_stream=progress)
  assert summary.resumed_from == 2 and summary.steps == STEPS, progress.getvalue()
  assert summary.export_dir == f"gs://{BUCKET}/exports/tiny"

  # The resumed run appended to the interrupted run's metrics; its step 3 is the interrupted run's step 3, bit
  # for bit: the state and the data position came back from the bucket exactly.
  rows = _rows(paths.read_text(f"gs://{BUCKET}/runs/tiny/metrics.jsonl"))
  assert [row["step"] for row in rows] == [1, 2, 3, 3, 4]
  assert rows[3]["loss"] == interrupted[2]["loss"] and rows[3]["grad_norm"] == interrupted[2]["grad_norm"]

  run_files = bucket_files("runs/tiny")
  assert {"runs/tiny/config.json", "runs/tiny/exports.json", "runs/tiny/metrics.jsonl"} <= set(run_files)
  assert json.loads(paths.read_text(f"gs://{BUCKET}/runs/tiny/config.json"))["train"]["run_dir"] == \
      f"gs://{BUCKET}/runs/tiny"
  assert json.loads(paths.read_text(f"gs://{BUCKET}/runs/tiny/exports.json")) == [summary.export_dir]
  events = [f for f in run_files if f.startswith("runs/tiny/tensorboard/events.out.tfevents.")]
  assert len(events) == 2, run_files  # one event file per run, as locally
  steps_saved = sorted({int(f.split("/")[3]) for f in run_files if f.startswith("runs/tiny/checkpoints/")})
  assert steps_saved == [2, 4]

  _check_tensorboard(events, tmp_path / "tb", rows)
  _check_export(summary.export_dir)
  assert os.listdir(tmp_path) == ["tb"], os.listdir(tmp_path)  # nothing else was written locally


def _check_tensorboard(events: list[str], local, rows: list[dict]) -> None:
  """The event files, downloaded, read by TensorBoard itself: each run's losses, as in metrics.jsonl."""
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  local.mkdir()
  logged = []
  for index, event in enumerate(events):
    run = local / f"run{index}"
    run.mkdir()
    paths.copy_file(f"gs://{BUCKET}/{event}", str(run / event.rsplit("/", 1)[1]))
    accumulator = EventAccumulator(str(run))
    accumulator.Reload()
    logged += [(e.step, e.value) for e in accumulator.Scalars("train/loss")]
  assert sorted(logged) == sorted((row["step"], np.float32(row["loss"])) for row in rows)


def _check_export(export_dir: str) -> None:
  """The export is complete (config.json, the weights, the head, the tokenizer) with nothing left beside it, and
  reading it back from the bucket gives the bytes the bucket holds."""
  from safetensors.numpy import load

  from eemo_jax.hf.heads_io import load_head
  from eemo_jax.hf.load import read_config
  from eemo_jax.hf.safetensors_io import SafetensorsFolder
  names = {f.removeprefix("exports/tiny/") for f in bucket_files("exports")}
  assert {"config.json", "generation_config.json", "model.safetensors", "emotion_head.safetensors",
          "emotion_head_config.json", "tokenizer.json", "tokenizer_config.json"} <= names, names
  assert not [n for n in bucket_files("exports") if not n.startswith("exports/tiny/")]  # no .tiny.partial-*
  assert read_config(export_dir).text.num_hidden_layers == 2
  assert load_head(export_dir).config.kind == "pooled"
  reference = load(read_object("exports/tiny/model.safetensors"))
  folder = SafetensorsFolder(export_dir)
  assert sorted(folder.keys()) == sorted(reference)
  for key, value in reference.items():
    np.testing.assert_array_equal(np.asarray(folder.get(key)), value)
