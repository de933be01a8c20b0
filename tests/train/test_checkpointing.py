"""Run checkpoints: state restored onto another mesh, the Grain iterator position, keep-K, PRNG keys."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eemo_jax.parallel.sharding import make_mesh
from eemo_jax.train.checkpointing import RunCheckpoints


def _state(mesh, spec):
  sharding = NamedSharding(mesh, spec)
  weight = jax.device_put(np.arange(64 * 8, dtype=np.float32).reshape(64, 8), sharding)
  return {"params": {"w": weight}, "step": jnp.int32(5), "rng": jax.random.key(3)}


def _abstract(mesh, spec):
  return {"params": {"w": jax.ShapeDtypeStruct((64, 8), jnp.float32, sharding=NamedSharding(mesh, spec))},
          "step": jax.ShapeDtypeStruct((), jnp.int32), "rng": jax.eval_shape(lambda: jax.random.key(0))}


def _iterator():
  return iter(grain.MapDataset.range(100).shuffle(seed=1).batch(4))


def test_restore_onto_another_mesh_with_iterator(tmp_path):
  saved_on = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  state = _state(saved_on, P("fsdp", "tensor"))
  data = _iterator()
  for _ in range(3):
    next(data)
  ckpt = RunCheckpoints(str(tmp_path), save_every=1)
  assert ckpt.save(7, state, data)
  expected_next = [next(data).tolist() for _ in range(2)]
  ckpt.close()

  target = make_mesh({"fsdp": 8})
  resumed = _iterator()
  ckpt = RunCheckpoints(str(tmp_path), save_every=1)
  step, restored = ckpt.restore(_abstract(target, P("fsdp", None)), resumed)
  ckpt.close()
  assert step == 7
  np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), np.asarray(state["params"]["w"]))
  assert restored["params"]["w"].sharding.is_equivalent_to(NamedSharding(target, P("fsdp", None)), 2)
  assert int(restored["step"]) == 5
  np.testing.assert_array_equal(jax.random.key_data(restored["rng"]), jax.random.key_data(state["rng"]))
  assert [next(resumed).tolist() for _ in range(2)] == expected_next


def test_keeps_the_newest_and_saves_on_schedule(tmp_path):
  mesh = make_mesh({"fsdp": 8})
  ckpt = RunCheckpoints(str(tmp_path), save_every=2, keep=2)
  started = [ckpt.save(step, _state(mesh, P("fsdp"))) for step in range(1, 8)]
  ckpt.wait()
  assert started == [False, True, False, True, False, True, False]
  assert ckpt.all_steps() == [4, 6] and ckpt.latest_step() == 6
  assert ckpt.save(7, _state(mesh, P("fsdp")), force=True)
  ckpt.close()
  assert RunCheckpoints(str(tmp_path), save_every=2, keep=2).all_steps() == [6, 7]


def test_restore_without_checkpoint_explains(tmp_path):
  ckpt = RunCheckpoints(str(tmp_path), save_every=1)
  with pytest.raises(FileNotFoundError, match="no checkpoint under"):
    ckpt.restore(_abstract(make_mesh({"fsdp": 8}), P()))
