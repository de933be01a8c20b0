"""`model.init_from`: stage 1 -> stage 2 through `eemo-jax train`, the other kinds of source, and the mistakes.

The chained runs are tests/chain_fixtures.py's (stage 1: tiny recipe with the pooled head and LoRA; stage 2:
`init_from=<stage 1's run directory>`, a pooled head of other widths, the classification loss alone, new LoRA
on frozen base weights). What stage 2 starts from is checked against stage 1's HF export read by `load_hf`:
the path every export is checked by against transformers, independent of the checkpoint reading that
`init_from` does.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil

import jax
import numpy as np
import pytest
from chain_fixtures import (STAGE1_STEPS, TINY, backbone_weights, chain_runs, overrides, restore_step,
                            run_config)
from flax import nnx

from eemo_jax import cli
from eemo_jax.config import load_config
from eemo_jax.hf.load import load_hf, read_config_file
from eemo_jax.parallel.sharding import make_mesh
from eemo_jax.train import init_from, run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_GRPO = os.path.join(ROOT, "configs", "tiny_grpo.py")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
  return chain_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def stage1_weights(chain):
  """Stage 1's final weights, LoRA merged, as its end-of-run HF export holds them."""
  return backbone_weights(load_hf(chain.stage1_export))


def assert_same_weights(got: dict, want: dict):
  assert got.keys() == want.keys()
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)


def test_stage2_trains_on_stage1s_weights(chain, stage1_weights):
  """Stage 2's base weights are frozen, so at its last step they are still what it started from: they must
  be stage 1's final weights with its adapters merged, bit for bit, not the preset's random ones. Its start
  lines say so; its own LoRA adapters trained on top."""
  log = chain.stage2_log
  assert f"starting from run {chain.stage1}, checkpoint {STAGE1_STEPS}, its LoRA adapters merged into the weights" \
      in log, log
  assert "emotion head: a new pooled head (the source's pooled head has another kind or shape)" in log, log

  stage2 = restore_step(chain.stage2, 2, chain.tokenizer_dir)
  assert_same_weights(backbone_weights(stage2.backbone), stage1_weights)
  random_start = restore_step(chain.stage1, 1, chain.tokenizer_dir)  # stage 1's base weights never trained
  differs = [p for p, v in backbone_weights(random_start.backbone).items() if not np.array_equal(v, stage1_weights[p])]
  assert differs, "stage 1's adapters should have moved the merged weights away from the random preset"
  assert stage2.head.config.classifier_hidden == 16
  lora_b = np.asarray(stage2.backbone.language_model.layers.self_attn.q_proj.lora.lora_b[...])
  assert np.abs(lora_b).max() > 0  # stage 2's own adapters trained


def test_stage2_records_the_model_it_trains(chain):
  """A run records its architecture and tokenizer files, so it can itself be a source or exported after
  the folders it came from are gone: stage 2 took both from stage 1 (data.tokenizer_dir was empty)."""
  for run_dir in (chain.stage1, chain.stage2):
    assert os.path.isfile(os.path.join(run_dir, "model_config.json"))
  with open(os.path.join(chain.stage1, "model_config.json")) as a, open(os.path.join(chain.stage2,
                                                                                    "model_config.json")) as b:
    assert json.load(a) == json.load(b)
  for name in ("tokenizer.json", "tokenizer_config.json"):
    assert filecmp.cmp(os.path.join(chain.tokenizer_dir, name), os.path.join(chain.stage2, "hf_assets", name),
                       shallow=False)
  assert run_config(chain.stage2).model.init_from == chain.stage1


def _start(chain, tmp_path, init, **extra):
  """The initial model `train` builds for a tiny config that starts from `init` (no step is compiled)."""
  config = load_config(TINY, overrides(chain, tmp_path / "run", model__init_from=init, **extra))
  source = init_from.resolve(config)
  mesh = make_mesh({"fsdp": 8})
  rules = tuple(tuple(r) for r in config.rules)
  with jax.set_mesh(mesh):
    model, lines = init_from.initial_model(source, config, source.arch, run.head_config(config, source.arch, None),
                                           mesh=mesh, rules=rules)
  return source, model, lines


def test_an_import_hf_checkpoint_is_a_source(chain, stage1_weights, tmp_path):
  """`eemo-jax import-hf` of stage 1's export: its weights, its architecture and its `hf_assets/` tokenizer files."""
  ckpt = str(tmp_path / "ckpt")
  assert cli.main(["import-hf", chain.stage1_export, ckpt]) == 0
  source, model, lines = _start(chain, tmp_path, ckpt, data__tokenizer_dir="")
  assert (source.kind, source.tokenizer_dir) == ("checkpoint", os.path.join(ckpt, "hf_assets"))
  assert source.arch == read_config_file(os.path.join(chain.stage1, "model_config.json"))
  assert lines == [f"starting from the checkpoint {ckpt}"]
  assert_same_weights(backbone_weights(model.backbone), stage1_weights)


@pytest.mark.parametrize("named", ["run", "step", "export"])
def test_a_head_of_the_same_kind_and_shape_is_kept(chain, stage1_weights, tmp_path, named):
  """A pooled config on stage 1 keeps stage 1's pooled head: from its run directory (the newest step), from
  RUN_DIR/checkpoints/N (that step), or from its HF export (emotion_head.safetensors beside the weights)."""
  from eemo_jax.hf.heads_io import load_head
  init = {"run": chain.stage1, "step": os.path.join(chain.stage1, "checkpoints", "2"), "export": chain.stage1_export}
  source, model, lines = _start(chain, tmp_path, init[named])
  assert lines[-1] == "emotion head: the source's pooled head, kept"
  if named == "step":
    reference = restore_step(chain.stage1, 2, chain.tokenizer_dir)
    want_head, want_backbone = reference.head, backbone_weights(_merged(reference.backbone))
  else:
    want_head, want_backbone = load_head(chain.stage1_export), stage1_weights
  assert_same_weights(backbone_weights(model.head), backbone_weights(want_head))
  assert_same_weights(backbone_weights(model.backbone), want_backbone)


def _merged(backbone):
  from eemo_jax.model.lora import merge_lora
  return merge_lora(backbone)


def test_grpo_starts_from_a_run_directory(chain, stage1_weights):
  """`eemo-jax grpo`'s start (train.run.initial_state without a head) takes stage 1 the same way: adapters merged, its head left
  out (GRPO trains answers), new adapters of its own."""
  from eemo_jax.train.optimizer import make_optimizer
  config = load_config(TINY_GRPO, [f"--config.model.init_from={chain.stage1}", "--config.lora.rank=2",
                                   "--config.trainable.adapters_only=true", "--config.mesh.fsdp=8"])
  source = init_from.resolve(config)
  mesh = make_mesh({"fsdp": 8})
  rules = tuple(tuple(r) for r in config.rules)
  optimizer = make_optimizer(run.optimizer_settings(config, 1))
  with jax.set_mesh(mesh):
    graphdef, state, lines = run.initial_state(config, source.arch, None, optimizer, mesh, rules,
                                               run.trainable_set(config, False), source)
  model = nnx.merge(graphdef, state.params, state.frozen)
  assert model.head is None and lines[-1] == "emotion head: the source's pooled head is not used (head.kind is none)"
  assert_same_weights(backbone_weights(model.backbone), stage1_weights)


# --------------------------------------------------------------------------------------------------
# Mistakes: one line naming the path and what was expected, exit 2, nothing written
# --------------------------------------------------------------------------------------------------


def test_a_bad_init_from_exits_2_and_writes_nothing(chain, tmp_path, capsys):
  no_checkpoints = tmp_path / "stopped_run"
  no_checkpoints.mkdir()
  shutil.copy(os.path.join(chain.stage1, "config.json"), no_checkpoints / "config.json")
  a_file = tmp_path / "weights.bin"
  a_file.write_bytes(b"\0")
  empty = tmp_path / "empty"
  empty.mkdir()
  expected = "expected an HF Qwen2.5-VL folder (config.json + *.safetensors), an `eemo-jax import-hf` checkpoint"
  cases = {
      "missing": (tmp_path / "no_such_run", f"does not exist; {expected}"),
      "file": (a_file, f"is not a folder; {expected}"),
      "none_of_the_kinds": (empty, f"is none of the folders a run starts from: {expected[9:]}"),
      "no_checkpoints": (no_checkpoints, "is a run directory without a saved checkpoint"),
      "missing_step": (os.path.join(chain.stage1, "checkpoints", "7"),
                       f"has no checkpoint 7; its saved steps are {', '.join(map(str, range(1, STAGE1_STEPS + 1)))}"),
  }
  run_dir = tmp_path / "run"
  for case, (init, message) in cases.items():
    shown = str(init) if case != "missing_step" else chain.stage1
    for command, config in (("train", TINY), ("grpo", TINY_GRPO)):
      code = cli.main([command, "--config", config, *overrides(chain, run_dir, model__init_from=init)])
      err = capsys.readouterr().err
      assert code == 2 and err.count("\n") == 1, (case, command, err)
      assert err.startswith(f"eemo-jax {command}: model.init_from: {shown} ") and message in err, (case, err)
      assert not run_dir.exists(), case
  both = overrides(chain, run_dir, model__init_from=chain.stage1, model__hf_dir=chain.stage1_export)
  assert cli.main(["train", "--config", TINY, *both]) == 2
  err = capsys.readouterr().err
  assert "model.init_from" in err and "model.hf_dir" in err and "are both set" in err and not run_dir.exists()
