"""`Qwen25VL` -> an HF folder that `transformers`' `from_pretrained` loads with no missing keys.

Export walks the same key table as import (`eemo_jax.hf.keys.key_table`), applying each rule's
inverse transform, and writes what `save_pretrained` writes: the on-disk (4.x) key layout,
`model.safetensors` or shards with an index, `config.json`, `generation_config.json`, and the
tokenizer / processor files of the source folder. Parameters are gathered to the host one
(per-layer) tensor at a time and streamed to disk, so a sharded 7B model is never whole on a host.

The folder is written beside its target and put in place whole (`export_folder`, built on
`eemo_jax.hf.staging`), so an export never clobbers another half-way, whatever stops it.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eemo_jax import paths
from eemo_jax.hf.keys import KeyRule, key_table, num_layers
from eemo_jax.hf.safetensors_io import TensorSpec, write_sharded
from eemo_jax.hf.staging import ExportError, check_target, staged_folder
from eemo_jax.model.config import Qwen25VLConfig

# Files of an HF model folder that belong to the tokenizer and the processor, not to the weights.
ASSET_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "preprocessor_config.json", "chat_template.json", "chat_template.jinja",
    "video_preprocessor_config.json",
)
TRANSFORMERS_VERSION = "5.23.0"


def save_hf(model, out_dir: str, *, source_dir: str | None = None, dtype=None,
            max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> list[str]:
  """Writes `model` as an HF Qwen2.5-VL folder; returns the safetensors file names written.

  `dtype` (e.g. "bfloat16") casts every tensor on the device before it is gathered; None keeps
  the parameters' dtype. `source_dir` (an HF folder or the `hf_assets` of a checkpoint) provides
  the tokenizer / processor files and `generation_config.json`. The folder is written beside
  `out_dir` and put in place whole (`export_folder`): an `out_dir` that holds files is refused
  unless `overwrite`, and then replaced only once the new export is complete. Every process must
  call this; only process 0 writes.
  """
  check_exportable(model)
  with export_folder(out_dir, overwrite=overwrite) as folder:
    return write_hf(model, folder, source_dir=source_dir, dtype=dtype, max_shard_bytes=max_shard_bytes)


@contextlib.contextmanager
def export_folder(out_dir: str, *, overwrite: bool = False) -> Iterator[str]:
  """Yields the folder to write a whole export into; it replaces `out_dir` when the block ends.

  Write everything that belongs to the export (`write_hf`, `heads_io.save_head`, ...) into the
  yielded folder; see `eemo_jax.hf.staging` for the guarantees. Every process must enter it
  (the target check and the end are agreed across processes); only process 0 writes.
  """
  writer = jax.process_index() == 0
  if jax.process_count() > 1:
    _agree_on_target(out_dir, overwrite, writer)
  with staged_folder(out_dir, overwrite=overwrite, writer=writer) as folder:
    yield folder
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("eemo_jax.export_folder")


def _agree_on_target(out_dir: str, overwrite: bool, writer: bool) -> None:
  """Process 0 checks the target and tells the others, so no process starts gathering alone."""
  from jax.experimental import multihost_utils
  error = None
  if writer:
    try:
      check_target(out_dir, overwrite=overwrite)
    except ExportError as e:
      error = e
  refused = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
  if error is not None:
    raise error
  if int(refused):
    raise ExportError(f"process 0 refused to export to {out_dir}; see its error message")


def check_exportable(model) -> None:
  """Raises before anything is written if `model` holds what an HF folder cannot."""
  params = nnx.state(model, nnx.Param)
  adapters = sorted("/".join(map(str, path)) for path, _ in nnx.to_flat_state(params) if "lora" in path)
  if adapters:
    raise ValueError(f"the model still has {len(adapters)} LoRA adapter tensors (e.g. {adapters[0]}), which an HF "
                     "Qwen2.5-VL folder cannot hold; fold them in first with eemo_jax.model.lora.merge_lora(model)")


def write_hf(model, folder: str, *, source_dir: str | None = None, dtype=None,
             max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes the HF files of `model` into `folder`, the (empty) folder yielded by `export_folder`.

  Arguments as in `save_hf`. Every process must call this (the gathers are collective); only
  process 0 writes.
  """
  check_exportable(model)
  config: Qwen25VLConfig = model.config
  params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  embedding = _value(params[("language_model", "embed_tokens", "embedding")])
  out_dtype = jnp.dtype(dtype) if dtype is not None else embedding.dtype
  tensors = hf_tensors(config, params, out_dtype)
  if jax.process_index() != 0:
    for _ in tensors:  # the gathers are collective: every process walks the same tensors
      pass
    return []
  names = write_sharded(folder, hf_layout(config, params, out_dtype), tensors, max_shard_bytes=max_shard_bytes,
                        metadata={"format": "pt"})
  _write_json(paths.join(folder, "config.json"), hf_config_dict(config, out_dtype))
  _write_generation_config(config, folder, source_dir)
  copy_assets(source_dir, folder)
  return names


def hf_layout(config: Qwen25VLConfig, params: dict, dtype) -> list[TensorSpec]:
  """(HF key, dtype, HF shape) of every tensor `hf_tensors` yields, in the same order, without gathering."""
  specs = []
  for rule, layer in _ordered_keys(config):
    shape = tuple(_value(params[rule.path]).shape)
    shape = shape[1:] if layer is not None else shape
    specs.append(TensorSpec(rule.hf_key(layer), np.dtype(dtype), tuple(rule.transform.hf_shape(shape, config))))
  return specs


def hf_tensors(config: Qwen25VLConfig, params: dict, dtype) -> Iterator[tuple[str, np.ndarray]]:
  """(HF key, host tensor) pairs in the order of HF's state dict, one layer slice at a time."""
  for rule, layer in _ordered_keys(config):
    value = _value(params[rule.path])
    if layer is not None:  # sliced on the device: only one layer of a stacked parameter is gathered
      value = _layer(value, jnp.int32(layer), dtype=jnp.dtype(dtype))
    elif value.dtype != dtype:
      value = value.astype(dtype)
    host = _to_host(value)
    hf_shape = rule.transform.hf_shape(tuple(host.shape), config)
    yield rule.hf_key(layer), rule.transform.to_hf(host, hf_shape)


def _ordered_keys(config: Qwen25VLConfig) -> Iterator[tuple[KeyRule, int | None]]:
  """Table rules expanded per layer, layer-major within each stacked group, as HF lists them.

  Layer-major order keeps one layer's tensors in the same shard, like `save_pretrained`.
  """
  rules = key_table(config)
  i = 0
  while i < len(rules):
    if not rules[i].stacked:
      yield rules[i], None
      i += 1
      continue
    group = _group(rules[i])
    j = i
    while j < len(rules) and rules[j].stacked and _group(rules[j]) == group:
      j += 1
    for layer in range(num_layers(rules[i], config)):
      for rule in rules[i:j]:
        yield rule, layer
    i = j


@functools.partial(jax.jit, static_argnames="dtype")
def _layer(value: jax.Array, layer: jax.Array, *, dtype) -> jax.Array:
  """One layer of a stacked parameter, cast; the index is traced so each parameter compiles once."""
  return jax.lax.dynamic_index_in_dim(value, layer, keepdims=False).astype(dtype)


def _group(rule: KeyRule) -> str:
  return rule.hf.split("{i}")[0]


def _value(var):
  return var.get_value() if hasattr(var, "get_value") else var.value


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole array on this host; across processes when the array spans several."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def hf_config_dict(config: Qwen25VLConfig, dtype) -> dict:
  """`config.json` as transformers 5.23 writes it, with the dtype of the exported tensors."""
  return {**config.to_hf(), "dtype": jnp.dtype(dtype).name}


def generation_config_dict(config: Qwen25VLConfig) -> dict:
  """What `GenerationConfig.from_model_config` writes: the special ids that are set."""
  ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
         "pad_token_id": config.pad_token_id}
  ids = {k: (list(v) if isinstance(v, tuple) else v) for k, v in ids.items() if v is not None}
  return {"_from_model_config": True, **ids, "output_attentions": False, "output_hidden_states": False,
          "transformers_version": TRANSFORMERS_VERSION, "use_cache": True}


def _write_generation_config(config: Qwen25VLConfig, out_dir: str, source_dir: str | None) -> None:
  """Copies the source's generation config (it holds sampling defaults), or derives one."""
  source = paths.join(source_dir, "generation_config.json") if source_dir else None
  if source and paths.isfile(source):
    _copy(source, paths.join(out_dir, "generation_config.json"))
  else:
    _write_json(paths.join(out_dir, "generation_config.json"), generation_config_dict(config))


def copy_assets(source_dir: str | None, out_dir: str) -> list[str]:
  """Copies the tokenizer / processor files present in `source_dir`; returns their names."""
  if not source_dir:
    return []
  if not paths.isdir(source_dir):
    raise ValueError(f"source_dir {source_dir} is not a directory; pass the HF folder the model came from")
  copied = []
  present = set(paths.listdir(source_dir))  # one listing, not a request per name in a bucket
  for name in ASSET_FILES:
    src = paths.join(source_dir, name)
    if name in present and paths.isfile(src):
      _copy(src, paths.join(out_dir, name))
      copied.append(name)
  return copied


def _copy(src: str, dst: str) -> None:
  paths.copy_file(src, dst)  # into a fresh folder: never onto the source, never through a symlink


def _write_json(path: str, data: dict) -> None:
  paths.write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")
