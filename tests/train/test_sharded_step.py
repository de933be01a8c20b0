"""The SFT step on 8 fake CPU devices (tests/conftest.py) against the same step unsharded.

Meshes (data, fsdp, tensor) = 2x2x2 and 8x1x1 must give the unsharded loss and updated parameters;
every parameter and Adam moment must sit in the sharding `spec_for` derives from its logical axes,
before and after the donated step; and two accumulated microbatches must equal one step on the
whole batch (the loss is one token mean over the window).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from flax import nnx
from hf_fixtures import make_batch
from jax.sharding import PartitionSpec

from eemo_jax.model import config as cfglib
from eemo_jax.model.qwen25vl import Qwen25VL, prepare_inputs
from eemo_jax.parallel.sharding import make_mesh, spec_for
from eemo_jax.train.losses import IGNORE_INDEX
from eemo_jax.train.optimizer import OptimizerConfig, learning_rate_schedule, make_optimizer
from eemo_jax.train.state import abstract_train_state, create_train_state
from eemo_jax.train.step import Batch, jit_train_step, make_train_step, stack_microbatches

MESHES = {"2x2x2": {"data": 2, "fsdp": 2, "tensor": 2}, "8x1x1": {"data": 8}}
CONFIG = cfglib.tiny()
# One image per row (each within one 4x4 merged-token window, so 64 vision slots per frame).
GRIDS = [(1, 4, 6), (1, 2, 2), (1, 4, 4), (1, 2, 4), (1, 6, 4), (1, 2, 2), (1, 4, 2), (1, 8, 8)]
FRAME_SLOTS = 64
# eps well above fp32 gradient noise: see test_step_parity.py (the first Adam step is a sign function).
OPT = OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10, eps=1e-4, weight_decay=0.1,
                      max_grad_norm=1.0)
TOL = 1e-5


def factory():
  return Qwen25VL(CONFIG, rngs=nnx.Rngs(0))


def microbatch(rows: slice) -> Batch:
  """Rows of one right-padded SFT batch (same sequence length for every split), prompt and pads -100."""
  full = make_batch([[g] for g in GRIDS], pad="right", seed=3)
  labels = np.where(full["attention_mask"] == 1, full["input_ids"], IGNORE_INDEX)
  labels[:, :4] = IGNORE_INDEX
  grids = full["image_grid_thw"][rows]
  patches = np.cumsum([0] + [int(np.prod(g)) for g in full["image_grid_thw"]])
  pixels = full["pixel_values"][patches[rows.start]:patches[rows.stop]]
  inputs = prepare_inputs(CONFIG, full["input_ids"][rows], full["attention_mask"][rows], pixels, grids,
                          patch_budget=FRAME_SLOTS * len(grids), frame_budget=FRAME_SLOTS)
  return Batch.from_inputs(inputs, labels[rows])


WHOLE = stack_microbatches([microbatch(slice(0, 8))])  # one step, one microbatch of 8 rows
ACCUMULATED = stack_microbatches([microbatch(slice(0, 4)), microbatch(slice(4, 8))])  # 2 microbatches of 4


# The comparisons are of numbers, not speed: compiling without LLVM's optimisations makes each
# step compile about 3x faster on CPU, and every run here (sharded or not) is compiled the same way.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@functools.cache
def initial_model_state():
  """The parameters every run starts from: created by the factory directly into the 2x2x2 shardings
  (the born-sharded path), kept on the host, plus those creation-time shardings."""
  mesh = make_mesh(MESHES["2x2x2"])
  graphdef, state = create_train_state(factory, make_optimizer(OPT), mesh)
  placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  return graphdef, jax.device_get((state.params, state.frozen)), placed


@functools.cache
def run(mesh_name: str | None, batch_name: str):
  """(mesh, state before (host copy), state after, metrics) of one step from `initial_model_state`;
  the compiled step's batch shardings go to `run.batch_shardings`."""
  mesh = make_mesh(MESHES[mesh_name]) if mesh_name else None
  batch = {"whole": WHOLE, "accumulated": ACCUMULATED}[batch_name]
  optimizer = make_optimizer(OPT)
  model_graphdef, host_state, _ = initial_model_state()
  model = nnx.merge(model_graphdef, *jax.tree.map(np.array, host_state))
  graphdef, state = create_train_state(model, optimizer, mesh)
  before = jax.device_get(state)
  step = jit_train_step(make_train_step(graphdef, optimizer, schedule=learning_rate_schedule(OPT), mesh=mesh),
                        state, batch, mesh)
  compiled = step.lower(state, batch).compile(FAST_COMPILE)
  after, metrics = compiled(state, batch)
  run.batch_shardings[(mesh_name, batch_name)] = compiled.input_shardings[0][1]
  return mesh, before, after, jax.device_get(metrics)


run.batch_shardings = {}


def flat_params(state) -> dict:
  return {p: v.get_value() for p, v in nnx.to_flat_state(state.params)}


def assert_close_params(a, b):
  pa, pb = flat_params(a), flat_params(b)
  assert sorted(pa) == sorted(pb)
  for path in pa:
    np.testing.assert_allclose(np.asarray(pa[path]), np.asarray(pb[path]), rtol=0, atol=TOL, err_msg=str(path))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharded_step_matches_unsharded(mesh_name):
  _, initial, reference, ref_metrics = run(None, "whole")
  _, _, sharded, metrics = run(mesh_name, "whole")
  for key in ("loss", "lm_loss", "token_accuracy", "tokens", "grad_norm", "lr"):
    np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=0, atol=TOL, err_msg=key)
  assert_close_params(sharded, reference)
  head = ("lm_head", "kernel")
  moved = np.abs(np.asarray(flat_params(reference)[head]) - np.asarray(flat_params(initial)[head]))
  assert moved.max() > 100 * TOL  # the comparison is not trivially between two unchanged states


def adam_moments(opt_state):
  adam = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu")) if hasattr(s, "mu")]
  assert len(adam) == 1
  return {"mu": adam[0].mu, "nu": adam[0].nu}


def assert_placed_by_spec_for(trees: dict, mesh):
  """Each Variable's array (or ShapeDtypeStruct) has the sharding spec_for gives its logical axes."""
  split = 0
  for name, tree in trees.items():
    for path, var in nnx.to_flat_state(tree):
      value = var.get_value()
      want = spec_for(var.get_metadata()["axes"], value.shape, mesh)
      assert value.sharding.mesh.shape == mesh.shape and value.sharding.spec == want, (name, path, want)
      split += not value.sharding.is_fully_replicated
  # Parameters use only `fsdp` and `tensor`; on 8x1x1 (pure data parallelism) all are replicated.
  assert bool(split) == (mesh.shape["fsdp"] * mesh.shape["tensor"] > 1)


def test_factory_creates_the_state_already_sharded():
  """create_train_state(factory, ..., mesh): params and Adam moments come out of the jitted init in
  their target shardings."""
  _, _, placed = initial_model_state()
  mesh = make_mesh(MESHES["2x2x2"])
  trees = {"params": placed.params, **adam_moments(placed.opt_state)}
  assert_placed_by_spec_for(trees, mesh)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_state_shardings_follow_spec_for(mesh_name):
  """After the donated step (its out_shardings) every parameter and both Adam moments sit where
  spec_for puts them, and the abstract state for AOT compilation says the same. The batch is split
  over (data, fsdp): token arrays on their batch axis, the vision slots on theirs."""
  mesh, _, after, _ = run(mesh_name, "whole")
  batch = run.batch_shardings[(mesh_name, "whole")]
  data = ("data", "fsdp") if mesh_name == "2x2x2" else "data"
  assert batch.input_ids.spec == PartitionSpec(None, data, None)
  assert batch.position_ids.spec == PartitionSpec(None, None, data, None)
  assert batch.vision.pixel_values.spec == PartitionSpec(None, data, None)
  assert_placed_by_spec_for({"params": after.params, **adam_moments(after.opt_state)}, mesh)
  _, abstract = abstract_train_state(factory, make_optimizer(OPT), mesh)
  assert jax.tree.structure(abstract) == jax.tree.structure(after)
  assert_placed_by_spec_for({"params": abstract.params, **adam_moments(abstract.opt_state)}, mesh)


def test_accumulated_microbatches_equal_one_whole_batch():
  """accum_steps=2 (2 x 4 rows, each microbatch with its own images) == one step on the 8 rows."""
  _, _, whole, whole_metrics = run("2x2x2", "whole")
  _, _, accumulated, metrics = run("2x2x2", "accumulated")
  for key in ("loss", "token_accuracy", "tokens", "grad_norm"):
    np.testing.assert_allclose(metrics[key], whole_metrics[key], rtol=0, atol=TOL, err_msg=key)
  assert_close_params(accumulated, whole)
