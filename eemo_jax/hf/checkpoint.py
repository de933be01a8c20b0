"""`Qwen25VL` parameters <-> an Orbax checkpoint folder, restored straight into target shardings.

A checkpoint folder holds `params/` (Orbax, a nested dict of arrays: `nnx.State.to_pure_dict()`,
so it does not depend on Flax's Variable classes) and `model_config.json` (the HF-style config
from `Qwen25VLConfig.to_hf()`), which is all that is needed to rebuild the model. Restoring builds
the model abstractly and asks Orbax for each array in its final sharding, so each host reads only
its own shards and a checkpoint can be restored onto a different mesh than it was saved from.
"""

from __future__ import annotations

import json

import jax
import orbax.checkpoint as ocp
from flax import nnx

from eemo_jax import paths
from eemo_jax.hf.load import abstract_model, read_config_file
from eemo_jax.hf.safetensors_io import CheckpointError
from eemo_jax.model.config import Qwen25VLConfig
from eemo_jax.parallel.sharding import DEFAULT_RULES, current_mesh, state_shardings

PARAMS = "params"
CONFIG = "model_config.json"


def save_checkpoint(model, ckpt_dir: str) -> str:
  """Writes the model's parameters and config to `ckpt_dir`; returns the params path.

  Every process must call this (Orbax writes each host's shards). Refuses to overwrite an
  existing checkpoint, so an import cannot silently replace trained weights.
  """
  ckpt_dir = paths.absolute(ckpt_dir)
  params_dir = paths.join(ckpt_dir, PARAMS)
  check_new_checkpoint_dir(ckpt_dir)
  paths.makedirs(ckpt_dir)
  params = nnx.state(model, nnx.Param).to_pure_dict()
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    paths.write_text(paths.join(ckpt_dir, CONFIG), json.dumps(model.config.to_hf(), indent=2, sort_keys=True) + "\n")
  return params_dir


def check_new_checkpoint_dir(ckpt_dir: str) -> None:
  """Refuses a folder that already holds a checkpoint, so an import cannot replace trained weights."""
  ckpt_dir = paths.absolute(ckpt_dir)
  if paths.exists(paths.join(ckpt_dir, PARAMS)):
    raise CheckpointError(f"{ckpt_dir} already holds a checkpoint ({PARAMS}/); choose a new folder or "
                          "delete the old checkpoint first")
  if paths.lexists(ckpt_dir) and not paths.isdir(ckpt_dir):
    raise CheckpointError(f"{ckpt_dir} exists and is not a folder; choose a new folder for the checkpoint")


def read_checkpoint_config(ckpt_dir: str) -> Qwen25VLConfig:
  path = paths.join(ckpt_dir, CONFIG)
  if not paths.isdir(paths.join(ckpt_dir, PARAMS)) or not paths.isfile(path):
    raise CheckpointError(f"{ckpt_dir} is not an EEmo-JAX checkpoint (it needs {PARAMS}/ and {CONFIG}); "
                          "create one with `eemo-jax import-hf HF_DIR CKPT_DIR`")
  return read_config_file(path)


def stored_dtype(ckpt_dir: str) -> str:
  """The dtype the parameters were saved in (that of the token embedding)."""
  ckpt_dir = paths.absolute(ckpt_dir)
  read_checkpoint_config(ckpt_dir)
  with ocp.StandardCheckpointer() as checkpointer:
    tree = _stored_tree(checkpointer, ckpt_dir)
  try:
    return str(tree["language_model"]["embed_tokens"]["embedding"].dtype)
  except (KeyError, TypeError, AttributeError):
    raise CheckpointError(f"{ckpt_dir}/{PARAMS} has no language_model.embed_tokens.embedding; it is not a "
                          "Qwen2.5-VL checkpoint written by `eemo-jax import-hf`") from None


def load_checkpoint(ckpt_dir: str, *, dtype="float32", param_dtype=None, mesh=None, rules=DEFAULT_RULES,
                    **model_kwargs):
  """Restores a `Qwen25VL` from `ckpt_dir`, each parameter created in its target sharding.

  `dtype` / `param_dtype` are as in `load_hf` (stored arrays are cast on restore). With a mesh
  (argument, or the one set by `jax.set_mesh`) parameters are sharded by `rules`; without one
  they land on the first local device.
  """
  ckpt_dir = paths.absolute(ckpt_dir)
  config = read_checkpoint_config(ckpt_dir)
  model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise AssertionError("Qwen25VL has non-parameter state; save_checkpoint/load_checkpoint must store it")
  target = _abstract_target(params, mesh if mesh is not None else current_mesh(), rules)
  params_dir = paths.join(ckpt_dir, PARAMS)
  with ocp.StandardCheckpointer() as checkpointer:
    _check_tree(_stored_tree(checkpointer, ckpt_dir), target, ckpt_dir)
    try:
      restored = checkpointer.restore(params_dir, target)
    except Exception as e:  # Orbax and tensorstore raise many types for missing or damaged array files
      raise _damaged(ckpt_dir, e) from None
  nnx.replace_by_pure_dict(params, restored)
  return nnx.merge(graphdef, params)


def _stored_tree(checkpointer, ckpt_dir: str) -> dict:
  """The stored parameter tree (shapes and dtypes), or one line saying the checkpoint is damaged."""
  try:
    metadata = checkpointer.metadata(paths.join(ckpt_dir, PARAMS))
  except Exception as e:  # Orbax and tensorstore raise many types for a damaged checkpoint
    raise _damaged(ckpt_dir, e) from None
  tree = getattr(getattr(metadata, "item_metadata", None), "tree", None)
  if not isinstance(tree, dict):
    raise _damaged(ckpt_dir, None)
  return tree


def _damaged(ckpt_dir: str, error: Exception | None) -> CheckpointError:
  if error is None:
    cause = " (its metadata cannot be read)"
  else:  # the first sentence: TensorStore appends pages of details
    first = (str(error).strip().splitlines() or [""])[0].split(". See ")[0][:200]
    cause = f" ({type(error).__name__}: {first})"
  return CheckpointError(f"{ckpt_dir}/{PARAMS} is damaged or incomplete{cause}; import the model again with "
                         "`eemo-jax import-hf` or restore the folder from a copy")


def _abstract_target(params: nnx.State, mesh, rules) -> dict:
  """The pure-dict tree Orbax restores into: shape, dtype and final sharding of every parameter."""
  if mesh is not None:
    shardings = state_shardings(params, mesh, rules).to_pure_dict()
  else:
    single = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: single, params.to_pure_dict())
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      params.to_pure_dict(), shardings)


def _check_tree(stored: dict, target: dict, ckpt_dir: str) -> None:
  """Names the parameter that differs, instead of Orbax's tree-structure error."""
  stored_flat = {_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(stored)[0]}
  target_flat = {_name(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(target)[0]}
  missing = sorted(set(target_flat) - set(stored_flat))
  unexpected = sorted(set(stored_flat) - set(target_flat))
  if missing or unexpected:
    raise CheckpointError(f"{ckpt_dir} does not match its {CONFIG}: missing parameters {missing[:5]}, "
                          f"unexpected parameters {unexpected[:5]}")
  for name, want in target_flat.items():
    have = tuple(stored_flat[name].shape)
    if have != tuple(want.shape):
      raise CheckpointError(f"{ckpt_dir}: parameter {name} has shape {have}, but {CONFIG} implies "
                            f"{tuple(want.shape)}")


def _name(path) -> str:
  return ".".join(str(getattr(k, "key", k)) for k in path)
