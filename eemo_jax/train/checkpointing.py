"""Orbax checkpoints of a training run: train state, step and the Grain iterator, saved asynchronously.

One `CheckpointManager` per run directory (`<run_dir>/checkpoints/<step>/{state,data}`): every
`save_every` steps, the last `keep` kept. The state is restored straight into the shardings of the
abstract state the caller builds for the *current* mesh, so a run saved on one mesh shape resumes on
another. Typed PRNG keys are stored as their raw key data and re-wrapped on restore.

Nothing is lost silently:
* a save runs in the background, so its failure surfaces later; `poll` (every step) and `wait` report a
  save only once it is complete on disk and raise `CheckpointSaveError` for one that failed, so the loop
  stops at once instead of training on without checkpoints;
* a newest checkpoint that cannot be read (a preemption during a save on a pod, a lost file) does not
  block a resume: `restore_newest_intact` falls back to the newest older one that restores and moves
  the damaged ones aside under `<run_dir>/damaged_checkpoints/`, never deleting them.
"""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from eemo_jax import paths

log = logging.getLogger("eemo_jax.train")


class RunCheckpointError(RuntimeError):
  """No checkpoint of the run can be read; the message says what to do."""


class CheckpointSaveError(RunCheckpointError):
  """A checkpoint could not be written; the run stops at once."""


class ProcessCountError(RunCheckpointError):
  """The checkpoint was saved by another number of JAX processes than this run has; it is not damaged."""


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
    clean_up: remove what killed saves left behind (`<step>.orbax-checkpoint-tmp` folders). Only the run that
      owns the directory may: a reader doing it would delete the save in progress of a run writing there.
  """

  def __init__(self, run_dir: str, *, save_every: int, keep: int = 3, async_save: bool = True,
               clean_up: bool = False):
    self.run_dir = paths.absolute(run_dir)  # Orbax takes absolute paths only
    self.directory = paths.join(self.run_dir, "checkpoints")
    self.save_every = max(1, int(save_every))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                                           cleanup_tmp_directories=clean_up)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._pending: int | None = None  # a started save not yet confirmed on disk
    self._unreported: list[int] = []  # saves confirmed on disk that `poll` / `wait` have not returned yet

  @staticmethod
  def present(run_dir: str) -> bool:
    """Whether the run directory has a checkpoint folder (complete checkpoints or not), without creating one."""
    return paths.isdir(paths.join(paths.absolute(run_dir), "checkpoints"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iterator=None, *, force: bool = False) -> bool:
    """Starts a save when `step` is a multiple of `save_every` (or `force`); returns whether one started.

    A previous save still running is waited for first (and raises `CheckpointSaveError` if it failed); the
    new one is only started: `poll` or `wait` says when it is on disk.
    """
    if not force and step % self.save_every:
      return False
    self._confirm_pending()
    items = {"state": ocp.args.StandardSave(_keys_to_data(state))}
    if data_iterator is not None:
      import grain
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      started = self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
    except Exception as error:  # a synchronous save, or the start of an asynchronous one, failed
      raise CheckpointSaveError(self._save_failed(step, error)) from error
    if started:
      self._pending = int(step)
    return started

  def poll(self) -> int | None:
    """The step of the newest save that completed since the last call, if one did; never blocks.

    Raises `CheckpointSaveError` when that save failed.
    """
    if self._pending is not None and not self._manager.is_saving_in_progress():
      self._confirm_pending()
    return self._report()

  def _report(self) -> int | None:
    newest = max(self._unreported, default=None)
    self._unreported.clear()
    return newest

  def _confirm_pending(self) -> None:
    """Waits for the pending save and checks that its step folder is complete on disk."""
    step, self._pending = self._pending, None
    if step is None:
      return
    try:
      self._manager.wait_until_finished()
    except Exception as error:
      raise CheckpointSaveError(self._save_failed(step, error)) from error
    self._manager.reload()  # the steps on disk, not the ones the manager started
    if step not in self._manager.all_steps():  # Orbax logs some failures and skips finalisation
      raise CheckpointSaveError(self._save_failed(step, None))
    self._unreported.append(step)

  def _save_failed(self, step: int, error: BaseException | None) -> str:
    cause = f": {_one_line(error)}" if error is not None else " (its folder was not finalised)"
    self._manager.reload()
    complete = [s for s in self._manager.all_steps() if s != step]
    last = f"the last complete checkpoint is step {max(complete)}" if complete else "no earlier checkpoint exists"
    return (f"checkpoint {step} could not be written to {self.directory}{cause}. The run stopped; {last}. "
            "Fix the cause (disk space, permissions, bucket access), then run the same command to resume")

  def restore(self, abstract_state: Any, data_iterator=None, *, step: int | None = None) -> tuple[int, Any]:
    """Restores into `abstract_state`'s shapes, dtypes and shardings; sets `data_iterator`'s position.

    Returns (step, state). Raises FileNotFoundError when the run has no checkpoint.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    items = {"state": ocp.args.StandardRestore(_abstract_key_data(abstract_state))}
    if data_iterator is not None:
      self._check_process_count(step)
      import grain
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    return int(step), _data_to_keys(restored["state"], abstract_state)

  def restore_newest_intact(self, abstract_state: Any, data_iterator=None) -> tuple[int, Any, list[str]]:
    """Restores the newest checkpoint that can be read; returns (step, state, warnings).

    Checkpoints newer than the one restored failed to restore: they are moved to
    `<run_dir>/damaged_checkpoints/` (one warning line each). Nothing is moved unless an older checkpoint
    restores, so a mismatch that breaks every checkpoint alike (another model) is reported, not "repaired".
    Raises FileNotFoundError without checkpoints, RunCheckpointError when none restores.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint under {self.directory}")
    failures: list[tuple[int, BaseException]] = []
    for step in steps:
      try:
        restored = self.restore(abstract_state, data_iterator, step=step)
      except ProcessCountError:
        raise
      except Exception as error:  # damage shows as any of Orbax's, tensorstore's or Grain's errors
        failures.append((step, error))
        _quiet_abandoned_reads(paths.join(self.directory, str(step)))
        continue
      warnings = [self._move_aside(bad, error, restored_step=step) for bad, error in failures]
      if failures:
        self._manager.reload()
      return (*restored, warnings)
    detail = "; ".join(f"step {s}: {_one_line(e)}" for s, e in failures)
    raise RunCheckpointError(f"no checkpoint under {self.directory} can be restored ({detail}). They are left as they "
                          "are. If they belong to another model or config, use a new train.run_dir; to start this "
                          "run over, move that folder aside")

  def stored_tree(self, step: int) -> dict:
    """The stored structure of checkpoint `step`'s train state (`params`, `frozen`, `opt_state`, ...: nested dicts
    whose leaves hold shape and dtype), read from its metadata alone."""
    from etils import epath
    handler = ocp.PyTreeCheckpointHandler()
    try:
      return handler.metadata(epath.Path(self._state_dir(step))).tree
    finally:
      handler.close()

  def restore_weights(self, step: int, params: Any, frozen: Any) -> tuple[Any, Any]:
    """The model of checkpoint `step` alone: its `params` and `frozen` parts, restored into the shapes, dtypes
    (stored arrays are cast) and shardings of the abstract states given.

    The optimizer state (twice the trainable parameters) and the data position are not read: a new run that
    starts from this one, or an export, needs only the weights.
    """
    target = {"params": _abstract_key_data(params), "frozen": _abstract_key_data(frozen)}
    args = ocp.args.PyTreeRestore(item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                  partial_restore=True)
    with ocp.PyTreeCheckpointer() as checkpointer:
      restored = checkpointer.restore(self._state_dir(step), args=args)
    return _data_to_keys(restored["params"], params), _data_to_keys(restored["frozen"], frozen)

  def _state_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)), "state")

  def _check_process_count(self, step: int) -> None:
    """Raises `ProcessCountError` when checkpoint `step`'s data iterator was saved by another number of processes.

    Each process saves the position in its own shard of the stream (Grain: `data/process_<i>-of-<n>.json`),
    and another process count shards the stream differently, so no saved position fits it. Without this
    check Grain's missing-file error would pass for damage, and the checkpoint be moved aside.
    """
    from etils import epath  # what Orbax and Grain write through (local or gs://)
    folder = epath.Path(self.directory) / str(step) / "data"
    names = [p.name for p in folder.iterdir()] if folder.exists() else []
    counts = {int(m.group(1)) for m in (re.fullmatch(r"process_\d+-of-(\d+)\.json", n) for n in names) if m}
    if counts and jax.process_count() not in counts:
      saved = max(counts)
      raise ProcessCountError(
          f"checkpoint {step} of {self.run_dir} was saved by {saved} JAX processes and this run has "
          f"{jax.process_count()}: the data iterator's position is saved per process. Resume it with {saved} "
          f"processes (the same command on {saved} hosts, or --num-processes {saved}), or start a new "
          "train.run_dir from its weights (model.init_from)")

  def _move_aside(self, step: int, error: BaseException, *, restored_step: int) -> str:
    aside = paths.join(self.run_dir, "damaged_checkpoints", f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_index() == 0:
      paths.makedirs(paths.dirname(aside))
      paths.move(paths.join(self.directory, str(step)), aside)  # in a bucket: a copy, then a delete
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"eemo_jax_checkpoint_aside_{step}")
    return (f"checkpoint {step} is damaged ({_one_line(error)}); moved to {aside}; resuming from checkpoint "
            f"{restored_step}")

  def delete(self, step: int) -> None:
    """Removes one checkpoint (every process calls it)."""
    self._manager.delete(int(step))

  def wait(self) -> int | None:
    """Blocks until a pending save is on disk; returns the newest step saved since the last `poll`/`wait`.

    Raises `CheckpointSaveError` when it failed.
    """
    self._confirm_pending()
    return self._report()

  def close(self) -> None:
    """Waits for a pending save (errors are for `wait` to report) and releases the manager."""
    try:
      self._manager.wait_until_finished()
    except Exception as error:  # already reported, or about to be by the caller's own exception
      log.warning("a checkpoint save failed while closing: %s", _one_line(error))
    finally:
      self._pending = None
      self._manager.close()


class _AbandonedReadsFilter(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records about reads of a checkpoint already reported."""

  def __init__(self):
    super().__init__()
    self.paths: set[str] = set()

  def filter(self, record: logging.LogRecord) -> bool:
    text = record.getMessage()
    return not any(path in text for path in self.paths)


_ABANDONED = _AbandonedReadsFilter()


def _quiet_abandoned_reads(step_dir: str) -> None:
  """A failed restore leaves tensorstore reads of the damaged step that fail later, at garbage collection
  and on closed event loops: hundreds of traceback lines about what the one warning line already says.
  Silences exactly those (records naming that step's folder, and the closed-loop errors), nothing else."""
  import gc
  import sys
  _ABANDONED.paths.add(step_dir)
  asyncio_log = logging.getLogger("asyncio")
  if _ABANDONED not in asyncio_log.filters:
    asyncio_log.addFilter(_ABANDONED)
    previous = sys.unraisablehook

    def hook(unraisable):
      error = unraisable.exc_value
      if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return
      previous(unraisable)

    sys.unraisablehook = hook
  gc.collect()  # the abandoned futures report now, while the filter is on


class _TracebackFreeFilter(logging.Filter):
  """Keeps Orbax's error lines but not their tracebacks: the run reports the failure itself, in one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
      record.exc_info, record.exc_text = None, None
    return True


def quiet_orbax_tracebacks() -> None:
  """For a training run: a failed background save logs hundreds of traceback lines from Orbax's threads
  before the loop stops with `CheckpointSaveError`'s one line, which says what failed and what to do."""
  absl_log = logging.getLogger("absl")
  if not any(isinstance(f, _TracebackFreeFilter) for f in absl_log.filters):
    absl_log.addFilter(_TracebackFreeFilter())


def _one_line(error: BaseException, limit: int = 240) -> str:
  """`Type: first line of the message`, short enough for one log line."""
  text = str(error).strip().splitlines()
  first = text[0] if text else ""
  line = f"{type(error).__name__}: {first}" if first else type(error).__name__
  return line if len(line) <= limit else line[:limit - 3] + "..."
