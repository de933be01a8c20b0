"""Two chained tiny runs made through the CLI, once per test session, and the trusted way to read their steps.

Stage 1 is the tiny recipe shortened as tests/train/test_run.py shortens it: the pooled head and LoRA adapters
(rank 4 on the text layers' q/v projections; adapters and head train, the preset's random base weights stay),
3 steps with a checkpoint after each, and its HF export at the end. Stage 2 starts from stage 1's run directory
(`model.init_from`) with another head (a pooled head of other widths) and objective (the head's classification
loss alone) and its own LoRA adapters on frozen base weights, as EmoVerse's stage 2 and EEmo-Logic's GRPO start
from their stage 1. (LoRA on two projections, not all linear layers, keeps the two compilations short.)

`restore_step` reads a step back the way a resumed run does (the whole train state of the run's config), so
the tests compare what `model.init_from` and `export-hf RUN_DIR` read against the run's own resume path.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os

import jax
import ml_collections
import numpy as np
from flax import nnx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny_demo.py")
STAGE1_STEPS = 3
LORA = {"lora__rank": 4, "lora__targets": "('q_proj', 'v_proj')", "trainable__adapters_only": True}


@dataclasses.dataclass(frozen=True)
class Chain:
  tokenizer_dir: str
  data_dir: str
  dataset_config: str
  stage1: str  # run directory
  stage1_export: str  # its HF export at the end (train.export_dir)
  stage2: str  # run directory, model.init_from=stage1
  stage2_log: str  # what `eemo-jax train` printed for stage 2


def overrides(chain_or_assets, run_dir, **extra) -> list[str]:
  """The tiny recipe, shortened: 8 rows a step over 8 FSDP devices, no evaluation; `a__b=v` sets `a.b`."""
  c = chain_or_assets
  fields = {"train.run_dir": str(run_dir), "train.global_batch_size": 8, "train.log_every": 1,
            "data.data_dir": c.data_dir, "data.dataset_config": c.dataset_config,
            "data.tokenizer_dir": c.tokenizer_dir, "eval.batches": 0, "mesh.fsdp": 8}
  fields.update({k.replace("__", "."): v for k, v in extra.items()})
  return [f"--config.{k}={v}" for k, v in fields.items()]


_BUILT: dict[str, Chain] = {}


def chain_runs(tmp_path_factory) -> Chain:
  """The two runs, trained on the first call of a session (a test module's fixture calls this)."""
  key = str(tmp_path_factory.getbasetemp())
  if key not in _BUILT:
    _BUILT[key] = _train_both(str(tmp_path_factory.mktemp("chain")))
  return _BUILT[key]


def _train_both(root: str) -> Chain:
  from data_pipeline.builders import build
  from data_pipeline.tokenizer import build_offline_tokenizer
  from eemo_jax import cli
  tokenizer_dir, data_dir = os.path.join(root, "tokenizer"), os.path.join(root, "data")
  build_offline_tokenizer(tokenizer_dir)
  report = build("synthetic", data_dir, config="emoverse", num_train=64, num_test=16)
  assets = Chain(tokenizer_dir, data_dir, report.config, *[os.path.join(root, n) for n in ("stage1", "export")],
                 os.path.join(root, "stage2"), "")
  stage1 = overrides(assets, assets.stage1, train__steps=STAGE1_STEPS, train__checkpoint_every=1,
                     train__export_dir=assets.stage1_export, **LORA)
  assert cli.main(["train", "--config", TINY, *stage1]) == 0
  # Stage 2 takes its tokenizer from stage 1's record: data.tokenizer_dir is cleared.
  stage2 = overrides(assets, assets.stage2, train__steps=2, train__checkpoint_every=2, model__init_from=assets.stage1,
                     data__tokenizer_dir="", head__classifier_hidden=16, loss__lm_weight=0.0, loss__ces_weight=1.0,
                     **LORA)
  log = io.StringIO()
  with contextlib.redirect_stderr(log):
    code = cli.main(["train", "--config", TINY, *stage2])
  assert code == 0, log.getvalue()
  return dataclasses.replace(assets, stage2_log=log.getvalue())


def run_config(run_dir: str) -> ml_collections.ConfigDict:
  with open(os.path.join(run_dir, "config.json")) as f:
    return ml_collections.ConfigDict(json.load(f))


def restore_step(run_dir: str, step: int, tokenizer_dir: str):
  """Checkpoint `step` of a run as its resume restores it: the whole train state of the run's config.json,
  built the way `train` builds it (the preset and the tokenizer); returns the `EmotionSFTModel`."""
  from data_pipeline.tokenizer import load_tokenizer
  from eemo_jax.parallel.sharding import make_mesh
  from eemo_jax.train import run
  from eemo_jax.train.checkpointing import RunCheckpoints
  from eemo_jax.train.optimizer import make_optimizer
  from eemo_jax.train.state import abstract_train_state
  config = run_config(run_dir)
  tokenizer = load_tokenizer(tokenizer_dir)
  arch = run.model_config(config, tokenizer)
  head = run.head_config(config, arch, tokenizer)
  mesh = make_mesh(dict(config.mesh.items()))
  rules = tuple(tuple(r) for r in config.rules)
  optimizer = make_optimizer(run.optimizer_settings(config, int(config.train.steps)))
  with jax.set_mesh(mesh):
    graphdef, abstract = abstract_train_state(lambda: run.build_model(config, arch, head), optimizer, mesh, rules,
                                              trainable=run.trainable_set(config, head is not None),
                                              seed=int(config.train.seed))
    checkpoints = RunCheckpoints(run_dir, save_every=1)
    try:
      _, state = checkpoints.restore(abstract, step=step)
    finally:
      checkpoints.close()
  return nnx.merge(graphdef, state.params, state.frozen)


def backbone_weights(backbone) -> dict[str, np.ndarray]:
  """'/'-joined parameter path -> host array, the LoRA factors left out."""
  from eemo_jax.model.lora import LoraParam
  from eemo_jax.train.freeze import path_string
  return {path_string(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(backbone, nnx.Param))
          if not isinstance(v, LoraParam)}


@nnx.jit
def _logits(model, x):
  return model(x.input_ids, x.attention_mask, position_ids=x.position_ids, vision=x.vision).logits


def jax_logits(backbone, batch) -> np.ndarray:
  """(rows, seq, vocab) logits of a `Qwen25VL` (dropout off) on an hf_fixtures batch."""
  from eemo_jax.model.qwen25vl import prepare_inputs
  x = prepare_inputs(backbone.config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                     batch["image_grid_thw"])
  return np.asarray(_logits(nnx.view(backbone, deterministic=True, raise_if_not_found=False), x))
