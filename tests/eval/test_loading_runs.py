"""A training run read as the model to evaluate or predict with (`--checkpoint RUN_DIR[/checkpoints/N]`), and
`eval --config` of a run stopped before its export.

The run is tests/chain_fixtures.py's stage 1 (LoRA adapters and the pooled head, a checkpoint after each of its 3
steps, its HF export at the end). The reference for a step is the run's own resume path
(`chain_fixtures.restore_step`, LoRA merged); for the newest step, also the export the run wrote.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from chain_fixtures import STAGE1_STEPS, TINY, backbone_weights, chain_runs, jax_logits, restore_step
from hf_fixtures import make_batch

from eemo_jax import cli
from eemo_jax.eval.loading import ModelSourceError, load_eval_model
from eemo_jax.model.lora import merge_lora


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  return chain_runs(tmp_path_factory)


def _batch(model):
  arch = model.backbone.config
  return make_batch([[(1, 4, 6)], [(1, 2, 2)]],
                    vision_ids=(arch.image_token_id, arch.vision_start_token_id, arch.vision_end_token_id))


@pytest.mark.parametrize("named", ["step 2", "newest"])
def test_a_runs_step_is_the_model_its_resume_path_restores(chain, named):
  """`RUN_DIR/checkpoints/2` is step 2 and `RUN_DIR` the newest step: the same logits (LoRA merged) and head
  weights as the run's own resume path, with the tokenizer the run recorded."""
  step = 2 if named == "step 2" else STAGE1_STEPS
  source = os.path.join(chain.stage1, "checkpoints", "2") if named == "step 2" else chain.stage1
  model = load_eval_model(checkpoint=source)
  reference = restore_step(chain.stage1, step, chain.tokenizer_dir)
  merged = merge_lora(reference.backbone)
  # The reference is restored on the run's 8-device mesh, this model on one device: the head and the weights
  # without adapters are equal bit for bit; q/v kernels with their adapters merged to within an ulp (the
  # sum A·B·alpha/r is computed by another kernel), and the logits to the reduction order.
  for ours, theirs, atol in ((model.backbone, merged, 1e-7), (model.head, reference.head, 0.0)):
    got, want = backbone_weights(ours), backbone_weights(theirs)
    assert got.keys() == want.keys()
    for path, value in want.items():
      adapted = path.endswith(("q_proj/kernel", "v_proj/kernel")) and "language_model" in path
      np.testing.assert_allclose(got[path], value, rtol=0, atol=atol if adapted else 0.0, err_msg=path)
  batch = _batch(model)
  np.testing.assert_allclose(jax_logits(model.backbone, batch), jax_logits(merged, batch), rtol=0, atol=2e-6)
  assert model.name == f"stage1_step{step}"
  assert model.tokenizer_dir == os.path.join(chain.stage1, "hf_assets")
  assert not [p for p, _ in backbone_weights(model.backbone).items() if "lora" in p]


def test_a_step_the_run_did_not_save_names_the_saved_ones(chain):
  with pytest.raises(ModelSourceError, match=r"has no checkpoint 7; its saved steps are 1, 2, 3"):
    load_eval_model(checkpoint=os.path.join(chain.stage1, "checkpoints", "7"))


def _eval(chain, out, *extra):
  return cli.main(["eval", "--config", TINY, "--out", str(out), "--max-new-tokens", "3", "--batch-size", "4",
                   "--limit", "8", "--bootstrap", "20", "--no-level-scores",
                   f"--config.data.data_dir={chain.data_dir}", f"--config.data.dataset_config={chain.dataset_config}",
                   "--config.mesh.fsdp=1", *extra])


def test_eval_of_a_run_without_an_export_reads_its_newest_checkpoint(chain, tmp_path, capsys):
  """`eval --config` whose export does not exist evaluates the run's newest checkpoint, and answers what the
  run's own export (written from that step) answers, item for item."""
  from_run = tmp_path / "from_run"
  assert _eval(chain, from_run, f"--config.train.run_dir={chain.stage1}",
               f"--config.train.export_dir={tmp_path / 'no_export'}") == 0, capsys.readouterr().err
  assert f"with stage1_step{STAGE1_STEPS}" in capsys.readouterr().out
  from_export = tmp_path / "from_export"
  assert _eval(chain, from_export, "--hf-dir", chain.stage1_export) == 0, capsys.readouterr().err
  run_items = json.loads((from_run / "predictions.json").read_text())
  export_items = json.loads((from_export / "predictions.json").read_text())
  assert len(run_items) == len(export_items) == 8
  run_name, export_name = f"stage1_step{STAGE1_STEPS}", os.path.basename(chain.stage1_export)
  for ours, theirs in zip(run_items, export_items):
    assert ours["id"] == theirs["id"]
    assert ours[f"response({run_name})"] == theirs[f"response({export_name})"]
    np.testing.assert_allclose(ours["head_probs"], theirs["head_probs"], rtol=0, atol=1e-6)
