"""HF folder -> `Qwen25VL`, placing every parameter straight into its target sharding.

The model is first built abstractly (`nnx.eval_shape`: no memory), then each parameter is made
with `jax.make_array_from_callback`: every device's callback reads only its own slice of the
memory-mapped safetensors, so a 7B import never holds the whole model on one host.

Reading a real checkpoint takes minutes, so progress is reported on the `eemo_jax.status` logger. A single
host needs every byte of every file (its devices hold the whole model between them), so the files are first
read through once, in order, a line each (`read model-00001-of-00004.safetensors (4.0 GB) 1/4 in 21.3 s`),
and the placing that follows finds their pages in memory. On a multi-host job each host needs only its
slices, and reading whole files would multiply the bytes each host reads; there, and where the files are
larger than the host's free memory (the pass would only evict its own pages), the placing itself reports
every tenth of the parameters.
"""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eemo_jax import paths, status
from eemo_jax.hf.keys import KeyRule, canonical_key, key_table, num_layers
from eemo_jax.hf.safetensors_io import CheckpointError, SafetensorsFolder, read_through
from eemo_jax.model.config import Qwen25VLConfig
from eemo_jax.model.qwen25vl import Qwen25VL
from eemo_jax.parallel.sharding import DEFAULT_RULES, current_mesh, state_shardings


def read_config(folder: str) -> Qwen25VLConfig:
  path = paths.join(folder, "config.json")
  if not paths.exists(path):
    raise CheckpointError(f"{folder} has no config.json; pass an HF model folder (config.json + *.safetensors)")
  return read_config_file(path)


def read_config_file(path: str) -> Qwen25VLConfig:
  """An HF-style config file -> `Qwen25VLConfig`; any problem is one `CheckpointError` naming the file."""
  try:
    data = json.loads(paths.read_text(path))
  except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for a binary file
    raise CheckpointError(f"{path} is not valid JSON ({e}); fix or replace the file") from None
  try:
    return Qwen25VLConfig.from_hf(data)
  except ValueError as e:
    raise CheckpointError(f"{path}: {e}") from None


def abstract_model(config: Qwen25VLConfig, *, dtype="float32", param_dtype=None, **model_kwargs) -> Qwen25VL:
  """The model with ShapeDtypeStruct leaves: shapes and metadata, no memory."""
  param_dtype = param_dtype or dtype
  return nnx.eval_shape(lambda: Qwen25VL(config, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
                                         rngs=nnx.Rngs(0), **model_kwargs))


def load_hf(folder: str, *, dtype="float32", param_dtype=None, mesh=None, rules=DEFAULT_RULES,
            **model_kwargs) -> Qwen25VL:
  """Loads an HF Qwen2.5-VL folder (either key layout, one file or sharded) into a `Qwen25VL`.

  `dtype` is the compute dtype and, unless `param_dtype` is given, the parameter dtype. With a
  mesh (argument, or the one set by `jax.set_mesh`), parameters are created sharded by `rules`.
  """
  config = read_config(folder)
  tensors = SafetensorsFolder(folder)
  present = {canonical_key(k): k for k in tensors.keys()}
  if config.tie_word_embeddings and "lm_head.weight" in present:
    # transformers keeps a stored lm_head untied even when the config says tied (spec §2.2).
    config = config.replace(tie_word_embeddings=False)
  model = abstract_model(config, dtype=dtype, param_dtype=param_dtype, **model_kwargs)
  graphdef, state = nnx.split(model)
  _check_keys(config, present, folder)
  mesh = mesh if mesh is not None else current_mesh()
  shardings = state_shardings(state, mesh, rules) if mesh is not None else None

  read_files_first = read_weight_files(folder, tensors.files)
  started = time.perf_counter()
  flat = dict(nnx.to_flat_state(state))
  flat_shardings = dict(nnx.to_flat_state(shardings)) if shardings is not None else {}
  rules = key_table(config)
  tenth = max(1, len(rules) // 10)
  for index, rule in enumerate(rules, start=1):
    var = flat[rule.path]
    target = var.get_value() if hasattr(var, "get_value") else var.value
    sharding = flat_shardings.get(rule.path)
    sharding = getattr(sharding, "value", sharding)
    var.set_value(_materialize(rule, config, tensors, present, target, sharding))
    if not read_files_first and index % tenth == 0 and index < len(rules):
      status.log.info("placed %d/%d parameters in %.1f s", index, len(rules), time.perf_counter() - started)
  devices = mesh.size if mesh is not None else 1
  status.log.info("placed %d parameters on %d device%s in %.1f s", len(rules), devices, "s" * (devices != 1),
                  time.perf_counter() - started)
  return nnx.merge(graphdef, state)


def read_weight_files(folder: str, files: list[str]) -> bool:
  """Reads each weight file through once, in order, with a status line per file, where that costs no extra reading
  (see the module docstring); returns whether it did."""
  sizes = [os.path.getsize(path) for path in files]
  total = sum(sizes)
  status.log.info("loading %s: %d safetensors file%s, %s", folder, len(files), "s" * (len(files) != 1),
                  status.format_bytes(total))
  hosts = host_count()
  if hosts > 1:
    status.log.info("each of the %d hosts reads only its slices of the weights", hosts)
    return False
  free = available_memory()
  if free is not None and total > free:
    status.log.info("the weights (%s) exceed the free memory (%s): they are read while placed", status.format_bytes(total),
                    status.format_bytes(free))
    return False
  for index, (path, size) in enumerate(zip(files, sizes), start=1):
    started = time.perf_counter()
    read_through(path)
    status.log.info("read %s (%s) %d/%d in %.1f s", os.path.basename(path), status.format_bytes(size), index,
                    len(files), time.perf_counter() - started)
  return True


def host_count() -> int:
  return jax.process_count()


def available_memory() -> int | None:
  """Bytes the kernel can give without swapping (MemAvailable: free memory plus reclaimable page cache), or
  None where /proc/meminfo does not say."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    return None
  return None


def _check_keys(config: Qwen25VLConfig, present: dict[str, str], folder: str) -> None:
  expected = set()
  for rule in key_table(config):
    layers = range(num_layers(rule, config)) if rule.stacked else [None]
    expected.update(rule.hf_key(i) for i in layers)
  missing = sorted(expected - set(present))
  unexpected = sorted(set(present) - expected)
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"missing keys {_few(missing)}")
    if unexpected:
      parts.append(f"unexpected keys {_few(unexpected)}")
    raise CheckpointError(f"{folder} does not match its config.json ({'; '.join(parts)}). Is the folder a "
                          "complete Qwen2.5-VL checkpoint saved by transformers?")


def _few(keys: list[str]) -> str:
  return ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")


def _materialize(rule: KeyRule, config, tensors: SafetensorsFolder, present, target, sharding) -> jax.Array:
  """One parameter from its HF tensors; per layer for stacked rules, checked for shape."""
  per_layer_shape = target.shape[1:] if rule.stacked else target.shape
  hf_shape = rule.transform.hf_shape(tuple(per_layer_shape), config)
  layers = num_layers(rule, config) if rule.stacked else None
  for i in range(layers) if rule.stacked else [None]:
    key = present[rule.hf_key(i)]
    if tuple(tensors.shape(key)) != tuple(hf_shape):
      raise CheckpointError(f"tensor {key} has shape {tuple(tensors.shape(key))}, but config.json implies "
                            f"{tuple(hf_shape)}")

  def read(index: tuple[slice, ...]) -> np.ndarray:
    if not rule.stacked:
      # A copy, not a view: on CPU, make_array_from_callback may alias the host buffer, and a
      # parameter must not change (or fault) when its source file is later overwritten.
      return np.array(rule.transform.to_jax(tensors.get(present[rule.hf_key()]))[index], dtype=target.dtype)
    picked = range(layers)[index[0]]
    return np.stack([np.asarray(rule.transform.to_jax(tensors.get(present[rule.hf_key(i)]))[index[1:]],
                                dtype=target.dtype) for i in picked])

  if sharding is None:
    return jnp.asarray(read(tuple(slice(None) for _ in target.shape)))
  return jax.make_array_from_callback(target.shape, sharding, read)
