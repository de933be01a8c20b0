"""The accelerator benchmark script runs end to end here (CPU, the tiny demo config), so that it works
the first time a GPU is lent; its synthetic batch has exactly the pipeline's static batch structure."""

import json
import os
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import accelerator_train_step as bench  # noqa: E402
from data_pipeline.pipeline import abstract_batch, to_train_batch  # noqa: E402
from eemo_jax.commands.aot import sft_step_parts  # noqa: E402
from eemo_jax.config import load_config  # noqa: E402

CONFIG = os.path.join(ROOT, "configs", "tiny_demo.py")
SMALL = ["--config.train.global_batch_size=16", "--config.optimizer.accum_steps=2"]  # 8 rows: 1 per device


def test_synthetic_batch_has_the_pipelines_batch_structure():
  config = load_config(CONFIG, SMALL)
  parts = sft_step_parts(config, jax.devices())
  arch, pcfg = parts.arch, parts.pcfg
  batch = bench.synthetic_batch(pcfg, arch)
  expected = to_train_batch(abstract_batch(pcfg))
  assert jax.tree.structure(batch) == jax.tree.structure(expected)
  for got, want in zip(jax.tree.leaves(batch), jax.tree.leaves(expected)):
    assert (got.shape, got.dtype) == (want.shape, want.dtype)
  ids = np.asarray(batch.input_ids)  # (microbatches, rows, seq): every row full, one image each
  assert (np.asarray(batch.attention_mask) == 1).all()
  assert ((ids == arch.image_token_id).sum(-1) > 0).all()
  labels = np.asarray(batch.labels)
  assert ((labels >= 0).sum(-1) > ids.shape[-1] // 4).all() and not (labels == arch.image_token_id).any()
  assert (labels[..., :ids.shape[-1] // 2] < 0).all()  # the prompt half has no labels


def test_script_times_the_step_and_reports_missing_cudnn(tmp_path):
  out = tmp_path / "report.json"
  assert bench.main(["--config", CONFIG, *SMALL, "--config.train.peak_flops=1e12", "--attention", "xla,cudnn",
                     "--steps", "1", "--json", str(out)]) == 0
  report = json.loads(out.read_text())
  xla = report["steps"]["xla"]
  assert xla["finite"] and len(xla["losses"]) == 3 and xla["microbatches"] == 2
  assert xla["mfu"] == pytest.approx(xla["step_flops"] / (xla["step_ms"] / 1e3) / (1e12 * jax.device_count()))
  assert "cuDNN" in report["steps"]["cudnn"]["error"]  # no GPU here: said, not raised
  assert report["attention"]["xla"]["ms"] > 0 and "error" in report["attention"]["cudnn"]
