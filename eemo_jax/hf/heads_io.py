"""An emotion head <-> `emotion_head.safetensors` + `emotion_head_config.json`, beside an HF model folder.

The tensors use the authors' PyTorch state-dict names and layouts (Linear weights `(out, in)`), so
a torch user loads them with `load_state_dict` into the authors' modules:

| kind | key | our parameter |
|---|---|---|
| pooled | `feature_projection.0.{weight,bias}` | `projection.fc1` (Linear H -> P) |
| pooled | `feature_projection.3.{weight,bias}` | `projection.fc2` (Linear P -> D) |
| pooled | `attention.in_proj_weight` (3D, D), `attention.in_proj_bias` | `attention.in_proj` (rows q; k; v) |
| pooled | `attention.out_proj.{weight,bias}` | `attention.out_proj` |
| token | `emotion_head.net.0.{weight,bias}` | `projection.fc1` (Linear H -> P) |
| token | `emotion_head.net.2.{weight,bias}` | `projection.norm` (LayerNorm P) |
| token | `emotion_head.net.3.{weight,bias}` | `projection.fc2` (Linear P -> D) |
| classifier_hidden > 0 | `classify_head.0.{weight,bias}`, `classify_head.3.{...}` | `classifier.fc1`, `.fc2` |
| classifier_hidden = 0 | `cls_emotion.fc.{weight,bias}` | `classifier.fc` |

These are `ClassifyModelImprove`'s `feature_projection` / `attention` / `classify_head` and
`EmoModel`'s `emotion_head` / `cls_emotion`. Tensors are written in float32; the JSON holds the
`HeadConfig`. Missing, unexpected or mis-shaped tensors and unknown config fields fail, naming them.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from eemo_jax import paths
from eemo_jax.hf.safetensors_io import CheckpointError
from eemo_jax.model.heads import EmotionHead, HeadConfig
from eemo_jax.parallel.sharding import DEFAULT_RULES, current_mesh, spec_for

WEIGHTS = "emotion_head.safetensors"
CONFIG = "emotion_head_config.json"
FORMAT = "eemo-jax-emotion-head"
VERSION = 1


@dataclasses.dataclass(frozen=True)
class HeadKey:
  torch: str  # key in emotion_head.safetensors
  path: tuple[str, ...]  # parameter path in nnx.state(head)
  transpose: bool  # a Linear weight: torch (out, in) <-> our kernel (in, out)


def head_key_table(config: HeadConfig) -> list[HeadKey]:
  """Every tensor of a head with this config, in state-dict order."""

  def linear(torch_prefix: str, path: tuple[str, ...], weight: str = "weight", bias: str = "bias"):
    return [HeadKey(f"{torch_prefix}{weight}", path + ("kernel",), True),
            HeadKey(f"{torch_prefix}{bias}", path + ("bias",), False)]

  if config.kind == "pooled":
    keys = [*linear("feature_projection.0.", ("projection", "fc1")),
            *linear("feature_projection.3.", ("projection", "fc2")),
            *linear("attention.", ("attention", "in_proj"), "in_proj_weight", "in_proj_bias"),
            *linear("attention.out_proj.", ("attention", "out_proj"))]
  else:
    keys = [*linear("emotion_head.net.0.", ("projection", "fc1")),
            HeadKey("emotion_head.net.2.weight", ("projection", "norm", "weight"), False),
            HeadKey("emotion_head.net.2.bias", ("projection", "norm", "bias"), False),
            *linear("emotion_head.net.3.", ("projection", "fc2"))]
  if config.classifier_hidden:
    keys += [*linear("classify_head.0.", ("classifier", "fc1")), *linear("classify_head.3.", ("classifier", "fc2"))]
  else:
    keys += linear("cls_emotion.fc.", ("classifier", "fc"))
  return keys


def save_head(head: EmotionHead, folder: str) -> tuple[str, str]:
  """Writes `emotion_head.safetensors` and `emotion_head_config.json` into `folder`; returns their paths.

  Every process must call this; only process 0 writes.
  """
  if nnx.state(head, lambda path, _: "lora" in path):
    raise ValueError("the head has LoRA adapters; fold them in with eemo_jax.model.lora.merge_lora(head) first")
  params = dict(nnx.to_flat_state(nnx.state(head, nnx.Param)))
  tensors = {}
  for key in head_key_table(head.config):
    value = _to_host(params[key.path].get_value()).astype(np.float32)
    tensors[key.torch] = np.ascontiguousarray(value.T if key.transpose else value)
  weights, config = paths.join(folder, WEIGHTS), paths.join(folder, CONFIG)
  if jax.process_index() == 0:
    from safetensors.numpy import save
    paths.makedirs(folder)
    paths.write_bytes(weights, save(tensors, metadata={"format": "pt"}))  # the head is small: bytes, to any path
    paths.write_text(config, json.dumps({"format": FORMAT, "version": VERSION, "config": head.config.to_dict()},
                                        indent=2) + "\n")
  return weights, config


def read_head_config(folder: str) -> HeadConfig:
  path = paths.join(folder, CONFIG)
  if not paths.isfile(path):
    raise CheckpointError(f"{folder} has no {CONFIG}; write the head with eemo_jax.hf.heads_io.save_head")
  try:
    data = json.loads(paths.read_text(path))
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("config"), dict):
    raise CheckpointError(f"{path} is not an emotion head config (expected {{'format': '{FORMAT}', 'config': ...}})")
  if data.get("version") != VERSION:
    raise CheckpointError(f"{path} has format version {data.get('version')}; this EEmo-JAX reads version {VERSION}")
  try:
    return HeadConfig.from_dict(data["config"])
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{path}: {e}") from None


def load_head(folder: str, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None, mesh=None,
              rules=DEFAULT_RULES) -> EmotionHead:
  """Reads a head written by `save_head` (or by torch under the same names).

  `rngs` feeds the head's dropout (default `nnx.Rngs(0)`). With a mesh (argument, or the one set by
  `jax.set_mesh`) parameters are placed by `rules`.
  """
  config = read_head_config(folder)
  tensors = _read_tensors(paths.join(folder, WEIGHTS))
  table = head_key_table(config)
  expected = {k.torch for k in table}
  missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
  if missing or unexpected:
    raise CheckpointError(f"{folder}/{WEIGHTS} does not match {CONFIG} (kind {config.kind!r}): missing tensors "
                          f"{missing}, unexpected tensors {unexpected}")
  head = EmotionHead(config, rngs=rngs if rngs is not None else nnx.Rngs(0), param_dtype=param_dtype)
  params = dict(nnx.to_flat_state(nnx.state(head, nnx.Param)))
  mesh = mesh if mesh is not None else current_mesh()
  for key in table:
    var = params[key.path]
    want = tuple(var.shape[::-1]) if key.transpose else tuple(var.shape)
    have = tuple(tensors[key.torch].shape)
    if have != want:
      raise CheckpointError(f"{folder}/{WEIGHTS}: tensor {key.torch} has shape {have}, but {CONFIG} implies {want}")
    value = jnp.asarray(tensors[key.torch].T if key.transpose else tensors[key.torch], dtype=var.dtype)
    if mesh is not None:
      axes = var.get_metadata().get("axes") or (None,) * value.ndim
      value = jax.device_put(value, NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules)))
    var.set_value(value)
  return head


def _read_tensors(path: str) -> dict[str, np.ndarray]:
  if not paths.isfile(path):
    raise CheckpointError(f"{path} is missing; write the head with eemo_jax.hf.heads_io.save_head")
  from safetensors import SafetensorError
  from safetensors.flax import load  # the flax backend reads bfloat16 too
  try:
    return {k: np.asarray(v, np.float32) for k, v in load(paths.read_bytes(path)).items()}
  except (SafetensorError, OSError, ValueError) as e:
    raise CheckpointError(f"{path} is not a readable safetensors file ({e}); write it again with save_head") from None


def _to_host(x: jax.Array) -> np.ndarray:
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
