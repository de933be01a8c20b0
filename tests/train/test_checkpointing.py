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


# --------------------------------------------------------------------------------------------------
# Nothing lost: relative paths, failed saves, damaged checkpoints
# --------------------------------------------------------------------------------------------------


def _saved_run(run_dir, steps=(1, 2, 3)):
  """Checkpoints of `steps`, each after one more batch; returns the batches each one would resume with."""
  mesh = make_mesh({"fsdp": 8})
  data = _iterator()
  ckpt = RunCheckpoints(str(run_dir), save_every=1, keep=len(steps))
  resumes_with = {}
  for step in steps:
    next(data)
    ckpt.save(step, _state(mesh, P("fsdp")), data)
    assert ckpt.wait() == step
    resumes_with[step] = next(iter(_copy_of(data))).tolist()
  ckpt.close()
  return resumes_with


def _copy_of(data):
  copy = _iterator()
  copy.set_state(data.get_state())
  return copy


def test_a_relative_run_dir_is_made_absolute_and_resumes_from_another_directory(tmp_path, monkeypatch):
  """Orbax refuses relative paths; a run started with `runs/x` from one directory resumes from another."""
  monkeypatch.chdir(tmp_path)
  ckpt = RunCheckpoints("runs/x", save_every=1)
  assert ckpt.directory == str(tmp_path / "runs" / "x" / "checkpoints")
  assert ckpt.save(1, _state(make_mesh({"fsdp": 8}), P("fsdp")))
  assert ckpt.wait() == 1
  ckpt.close()
  (tmp_path / "elsewhere").mkdir()
  monkeypatch.chdir(tmp_path / "elsewhere")
  ckpt = RunCheckpoints("../runs/x", save_every=1)
  step, _ = ckpt.restore(_abstract(make_mesh({"fsdp": 8}), P("fsdp")))
  ckpt.close()
  assert step == 1


def test_a_failed_asynchronous_save_is_reported_not_claimed(tmp_path, monkeypatch):
  """The background rename of a finished save fails (a full disk, a lost bucket): the next poll or wait
  raises one line naming the step, the folder and the last complete checkpoint; the step is never
  reported as saved."""
  from orbax.checkpoint._src.path import atomicity

  from eemo_jax.train.checkpointing import CheckpointSaveError
  mesh = make_mesh({"fsdp": 8})
  ckpt = RunCheckpoints(str(tmp_path), save_every=1)
  assert ckpt.save(1, _state(mesh, P("fsdp")))
  assert ckpt.wait() == 1

  async def disk_full(*args, **kwargs):
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(atomicity.async_path, "rename", disk_full)
  assert ckpt.save(2, _state(mesh, P("fsdp")))
  reported = []
  with pytest.raises(CheckpointSaveError) as failed:
    for _ in range(10_000):  # poll, as the loop does once per step, until the background save has ended
      reported.append(ckpt.poll())
    ckpt.wait()
  assert reported == [None] * len(reported)
  message = str(failed.value)
  assert "\n" not in message
  assert f"checkpoint 2 could not be written to {tmp_path / 'checkpoints'}" in message
  assert "No space left on device" in message and "the last complete checkpoint is step 1" in message
  monkeypatch.undo()
  ckpt.close()
  assert RunCheckpoints(str(tmp_path), save_every=1).all_steps() == [1]


def _damage(step_dir, how: str) -> None:
  import shutil
  if how == "data iterator file":
    (step_dir / "data" / "process_0-of-1.json").unlink()
  elif how == "state chunk":
    chunks = sorted(p for p in (step_dir / "state").rglob("*") if p.parent.name == "d")  # OCDBT data files
    assert chunks
    for chunk in chunks:
      chunk.unlink()
  elif how == "_METADATA":
    (step_dir / "state" / "_METADATA").unlink()
  elif how == "manifest.ocdbt":
    (step_dir / "state" / "manifest.ocdbt").unlink()
  elif how == "state folder":
    shutil.rmtree(step_dir / "state")
  else:
    raise ValueError(how)


@pytest.mark.parametrize("how", ["data iterator file", "state chunk", "_METADATA", "manifest.ocdbt", "state folder"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, how):
  """What a preemption during a save on a pod can leave: the newest checkpoint is moved aside (not deleted)
  with one warning line, and the run resumes from the one before it, data iterator included."""
  resumes_with = _saved_run(tmp_path)
  _damage(tmp_path / "checkpoints" / "3", how)
  data = _iterator()
  ckpt = RunCheckpoints(str(tmp_path), save_every=1)
  step, state, warnings = ckpt.restore_newest_intact(_abstract(make_mesh({"fsdp": 8}), P("fsdp")), data)
  assert step == 2 and ckpt.latest_step() == 2
  ckpt.close()
  assert int(state["step"]) == 5 and next(data).tolist() == resumes_with[2]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert warnings[0].startswith("checkpoint 3 is damaged (") and warnings[0].endswith("resuming from checkpoint 2")
  aside = list((tmp_path / "damaged_checkpoints").iterdir())
  assert len(aside) == 1 and aside[0].name.startswith("3-") and f"moved to {aside[0]}" in warnings[0]
  assert not (tmp_path / "checkpoints" / "3").exists()
  assert RunCheckpoints(str(tmp_path), save_every=1).all_steps() == [1, 2]


def test_no_intact_checkpoint_is_reported_and_nothing_is_moved(tmp_path):
  """When every checkpoint fails alike (here all damaged; in practice often another model's config), the
  fallback must not "repair" anything: one message, every checkpoint left in place."""
  from eemo_jax.train.checkpointing import RunCheckpointError
  _saved_run(tmp_path, steps=(1, 2))
  for step in (1, 2):
    _damage(tmp_path / "checkpoints" / str(step), "_METADATA")
  ckpt = RunCheckpoints(str(tmp_path), save_every=1)
  with pytest.raises(RunCheckpointError, match=r"no checkpoint under .* can be restored \(step 2: .*; step 1: .*\)"):
    ckpt.restore_newest_intact(_abstract(make_mesh({"fsdp": 8}), P("fsdp")), _iterator())
  ckpt.close()
  assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2"]
  assert not (tmp_path / "damaged_checkpoints").exists()
