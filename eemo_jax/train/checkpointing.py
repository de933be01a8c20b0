"""Orbax checkpoints of a training run: train state, step and the Grain iterator, saved asynchronously.

One `CheckpointManager` per run directory (`<run_dir>/checkpoints/<step>/{state,data}`): every
`save_every` steps, the last `keep` kept. The state is restored straight into the shardings of the
abstract state the caller builds for the *current* mesh, so a run saved on one mesh shape resumes on
another. Typed PRNG keys are stored as their raw key data and re-wrapped on restore.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree):
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_key_data(tree):
  """Abstract leaves for the stored form: key arrays become their uint32 key data (same sharding)."""
  def leaf(x):
    if not _is_key(x):
      return x
    data = jax.eval_shape(jax.random.key_data, x)
    sharding = getattr(x, "sharding", None)
    if sharding is not None and hasattr(sharding, "spec"):  # key data has one more (trailing) dimension
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec))
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)
  return jax.tree.map(leaf, tree)


def _data_to_keys(restored, abstract):
  def leaf(value, target):
    if not _is_key(target):
      return value
    impl = getattr(target.dtype, "_impl", None)  # abstract keys carry their impl only on the dtype
    return jax.random.wrap_key_data(value, impl=impl) if impl is not None else jax.random.wrap_key_data(value)
  return jax.tree.map(leaf, restored, abstract)


class RunCheckpoints:
  """Saves and restores `(state, data iterator)` under `<run_dir>/checkpoints`.

  Args:
    run_dir: the run directory (a local path, or a bucket path Orbax understands such as gs://...).
    save_every: steps between checkpoints (a forced save ignores it).
    keep: how many checkpoints to keep (the newest).
    async_save: write in a background thread while training continues.
  """

  def __init__(self, run_dir: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = os.path.join(run_dir, "checkpoints")
    self.save_every = max(1, int(save_every))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep,
                                           enable_async_checkpointing=async_save, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    """Starts a save when `step` is a multiple of `save_every` (or `force`); returns whether one started."""
    if not force and step % self.save_every:
      return False
    items = {"state": ocp.args.StandardSave(_keys_to_data(state))}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, abstract_state: Any, data_iterator=None, *, step: int | None = None) -> tuple[int, Any]:
    """Restores into `abstract_state`'s shapes, dtypes and shardings; sets `data_iterator`'s position.

    Returns (step, state). Raises FileNotFoundError when the run has no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    items = {"state": ocp.args.StandardRestore(_abstract_key_data(abstract_state))}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    return int(step), _data_to_keys(restored["state"], abstract_state)

  def delete(self, step: int) -> None:
    """Removes one checkpoint (every process calls it)."""
    self._manager.delete(int(step))

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
