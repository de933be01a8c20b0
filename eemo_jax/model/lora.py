"""LoRA on any `Linear` of the model, including the scanned (stacked) decoder layers and vision blocks.

`apply_lora` attaches a `LoraAdapter` to each selected `Linear`, which then returns
`x W + b + (dropout(x) A B) * alpha / r`. A is (in, r), B is (r, out) and starts at zero, so a freshly
adapted model computes exactly what the base model computes. In a stacked layer group A and B carry
the group's leading `layers` axis, like the kernel they adapt, and the scan slices them per layer.

A and B are `LoraParam`s (a subclass of `nnx.Param`), so `lora_filter` selects them for an optimizer
or a `DiffState`, while filters by path (`eemo_jax.train.freeze`) freeze the base weights. `merge_lora`
folds `A B * alpha / r` into the kernels and removes the adapters, which is what export needs:
`save_hf` writes base weights only.

Targets are patterns over module paths, in which a stacked group shows the layer index as a path
segment: `language_model/layers/3/self_attn/q_proj`, `visual/blocks/0/mlp/gate_proj`,
`visual/merger/mlp_0`, `lm_head`.

* `"all-linear"` selects every `Linear`.
* A pattern with a `/` is an `fnmatch` glob over the whole path (`*` also crosses `/`), e.g.
  `language_model/layers/*/self_attn/*`, `visual/blocks/*/mlp/*`.
* A pattern without `/` is matched against the module's own name, as PEFT's `target_modules` are:
  `q_proj` selects the `q_proj` of every layer.

A scanned group shares one set of shapes across its layers, so a pattern must select all of a
group's layers or none of them.

Dropout on the LoRA input needs a fresh key every step. Each adapter keeps its key as state
(`LoraDropoutKey`) and only reads it in the forward pass: the layers run inside `lax.scan`, where a
module may not advance an RNG counter. Call
`reseed_lora_dropout(model, key)` once per training step, before the forward pass; without it every
step reuses the same masks. `nnx.view(model, deterministic=True)` (or `model.eval()`) turns dropout off.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from eemo_jax.model.layers import Linear, matmul
from eemo_jax.parallel.sharding import DEFAULT_RULES, current_mesh, spec_for

ALL_LINEAR = "all-linear"
RANK_AXIS = "lora_rank"  # logical name of the rank dimension; no rule shards it
# Dropout masks come from XLA's RngBitGenerator ("rbg" keys): it compiles faster than threefry and
# runs much faster on TPU; dropout needs no bit-exact masks across shardings.
DROPOUT_KEY_IMPL = "rbg"
DROPOUT_KEY_WORDS = 4  # uint32 words of one rbg key


class LoraParam(nnx.Param):
  """A LoRA factor (A or B). Trainable while the base weights stay frozen."""


class LoraDropoutKey(nnx.Variable):
  """Raw uint32 rbg key data (*lead, 4) for one adapter's dropout mask (one key per layer in a scanned group)."""


lora_filter = LoraParam  # nnx filter: the LoRA factors and nothing else
lora_dropout_filter = LoraDropoutKey


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Which linear layers get an adapter, and its rank, scale and dropout.

  The defaults are EEmo-Logic's Stage-1 recipe (papers.md §3.4): rank 64, alpha 64, dropout 0.05 on
  every linear layer of the LLM and the vision tower (merger included), excluding `lm_head` and the
  patch embedding (a Conv3d in HF, which the authors' `find_target_linear_names` does not pick).
  """
  rank: int = 64
  alpha: float = 64.0
  dropout: float = 0.05
  targets: tuple[str, ...] = (ALL_LINEAR,)
  exclude: tuple[str, ...] = ("lm_head", "*embed*")

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1; got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1); got {self.dropout}")
    if isinstance(self.targets, str) or isinstance(self.exclude, str):
      raise ValueError("LoraConfig.targets and .exclude are tuples of patterns, e.g. ('q_proj', 'v_proj')")
    if not self.targets:
      raise ValueError("LoraConfig.targets is empty; name the layers to adapt, or use ('all-linear',)")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank

  @classmethod
  def eemo_logic(cls) -> LoraConfig:
    """EEmo-Logic Stage 1: r=64, alpha=64, dropout 0.05, all linear layers of LLM and ViT."""
    return cls()

  @classmethod
  def emoverse(cls) -> LoraConfig:
    """EmoVerse `LoRA_new.py`: r=64, alpha=128, dropout 0.05 on PEFT target_modules q,k,v,o,gate,up,down.

    Matched by name as PEFT does, these include the vision blocks' gate/up/down projections.
    """
    return cls(rank=64, alpha=128.0, dropout=0.05,
               targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))


class LoraAdapter(nnx.Module):
  """The low-rank update `(dropout(x) A B) * scale` of one `Linear` (or one stacked group of them).

  a: (*lead, in, rank); b: (*lead, rank, out); dropout_key: (*lead, 4) uint32 or None, where lead is
  `(layers,)` in a scanned group and `()` otherwise. `kernel_axes` are the adapted kernel's logical
  axes; A and B take its lead and in/out axes, and an unsharded rank axis.
  """

  def __init__(self, a: jax.Array, b: jax.Array, dropout_key: jax.Array | None, *, kernel_axes: tuple,
               scale: float, dropout: float, mesh=None, rules=DEFAULT_RULES):
    lead_axes, in_axis, out_axis = kernel_axes[:-2], kernel_axes[-2], kernel_axes[-1]
    self.lora_a = _placed(LoraParam, a, (*lead_axes, in_axis, RANK_AXIS), mesh, rules)
    self.lora_b = _placed(LoraParam, b, (*lead_axes, RANK_AXIS, out_axis), mesh, rules)
    self.scale = float(scale)
    self.dropout = float(dropout)
    self.deterministic = False
    self.enabled = True  # False: the layer computes as the base model (GRPO's reference policy)
    self.dropout_key = nnx.data(None)
    if dropout > 0:
      self.dropout_key = _placed(LoraDropoutKey, dropout_key, (*lead_axes, None), mesh, rules)

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (..., in) -> (..., out) in x's dtype."""
    if self.dropout > 0 and not self.deterministic:
      key = jax.random.wrap_key_data(self.dropout_key[...], impl=DROPOUT_KEY_IMPL)
      keep = jax.random.bernoulli(key, 1.0 - self.dropout, x.shape)
      x = jnp.where(keep, x / (1.0 - self.dropout), jnp.zeros_like(x))
    h = matmul(x, self.lora_a[...].astype(x.dtype))  # (..., rank)
    return matmul(h, self.lora_b[...].astype(x.dtype)) * jnp.asarray(self.scale, x.dtype)

  def set_view(self, deterministic: bool | None = None, lora_enabled: bool | None = None):
    """For `nnx.view(model, deterministic=..., lora_enabled=...)`: `deterministic=True` turns the LoRA
    dropout off; `lora_enabled=False` the adapters themselves, so the same weights give the base model
    (the reference policy of GRPO with LoRA, without a second copy of the weights)."""
    if deterministic is not None:
      self.deterministic = deterministic
    if lora_enabled is not None:
      self.enabled = lora_enabled

  def delta(self) -> jax.Array:
    """`A B * scale` in fp32: (*lead, in, out), the kernel's shape."""
    a = self.lora_a[...].astype(jnp.float32)
    b = self.lora_b[...].astype(jnp.float32)
    return jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST) * self.scale


def _placed(kind, value: jax.Array, axes: tuple, mesh, rules):
  """A variable with logical axes, sharded by `rules` when a mesh is given."""
  value = jnp.asarray(value)
  if mesh is not None:
    value = jax.device_put(value, NamedSharding(mesh, spec_for(axes, value.shape, mesh, rules)))
  return kind(value, axes=axes)


# ---------------------------------------------------------------------------- applying and merging
def apply_lora(model: nnx.Module, config: LoraConfig, rngs: nnx.Rngs, *, mesh=None,
               rules=DEFAULT_RULES) -> list[str]:
  """Attaches adapters to the `Linear`s `config` selects, in place; returns their paths.

  A fresh key for every adapter comes from `rngs.params()`. With a mesh (argument, or the one set
  by `jax.set_mesh`) A and B are sharded like their kernel, the rank axis replicated.
  """
  mesh = mesh if mesh is not None else current_mesh()
  chosen: list[tuple[str, Linear]] = []
  for template, linear, layers in linear_layers(model):
    selected = [_selected(template.format(i=i), config) for i in range(layers or 1)]
    name = template.format(i="*")
    if not any(selected):
      continue
    if not all(selected):
      picked = [i for i, s in enumerate(selected) if s]
      raise ValueError(f"LoRA patterns select layers {picked} of the scanned group {name}, but a scanned group "
                       "is adapted as a whole; use '*' for the layer index (or a name pattern like 'q_proj')")
    if linear.lora is not None:
      raise ValueError(f"{name} already has a LoRA adapter; merge_lora(model) first to stack another one")
    chosen.append((name, linear))
  if not chosen:
    examples = [t.format(i="*") for t, _, _ in linear_layers(model)][:6]
    raise ValueError(f"LoRA targets {list(config.targets)} (excluding {list(config.exclude)}) match no linear "
                     f"layer; paths look like {examples}")
  key = rngs.params()
  traced = isinstance(jax.random.key_data(key), jax.core.Tracer)  # inside jit / eval_shape (sharded init)
  host_rng = None if traced else np.random.default_rng(np.asarray(jax.random.key_data(key)))
  for index, (_, linear) in enumerate(chosen):
    if traced:  # drawn in the traced program, not baked into it as constants
      a, b, keys = _traced_factors(jax.random.fold_in(key, index), linear.kernel.shape, config.rank,
                                   config.dropout > 0)
    else:
      a, b, keys = _initial_factors(host_rng, linear.kernel.shape, config.rank, config.dropout > 0)
    axes = tuple(linear.kernel.get_metadata().get("axes") or (None,) * linear.kernel.ndim)
    linear.lora = LoraAdapter(jnp.asarray(a, linear.kernel.dtype), jnp.asarray(b, linear.kernel.dtype), keys,
                              kernel_axes=axes, scale=config.scale, dropout=config.dropout, mesh=mesh, rules=rules)
  return [name for name, _ in chosen]


def _initial_factors(rng: np.random.Generator, kernel_shape, rank: int, with_dropout: bool):
  """A ~ U(±1/sqrt(in)) (PEFT's kaiming_uniform(a=sqrt(5))), B = 0, and raw dropout keys (*lead, 4).

  Drawn on the host: XLA takes seconds to compile a threefry program per shape on CPU, and every
  host draws the same values from the same seed.
  """
  *lead, d_in, d_out = kernel_shape
  bound = d_in ** -0.5
  a = rng.uniform(-bound, bound, (*lead, d_in, rank)).astype(np.float32)
  b = np.zeros((*lead, rank, d_out), np.float32)
  keys = rng.integers(0, 2**32, (*lead, DROPOUT_KEY_WORDS), dtype=np.uint32) if with_dropout else None
  return a, b, keys


def _traced_factors(key: jax.Array, kernel_shape, rank: int, with_dropout: bool):
  """As `_initial_factors`, drawn with JAX inside a traced init (e.g. `create_train_state(factory)`)."""
  *lead, d_in, d_out = kernel_shape
  bound = d_in ** -0.5
  a_key, drop_key = jax.random.split(key)
  a = jax.random.uniform(a_key, (*lead, d_in, rank), jnp.float32, -bound, bound)
  b = jnp.zeros((*lead, rank, d_out), jnp.float32)
  keys = jax.random.bits(drop_key, (*lead, DROPOUT_KEY_WORDS), jnp.uint32) if with_dropout else None
  return a, b, keys


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel (`W += A B * alpha / r`) and removes the adapters.

  In place, so a 7B model is never copied; returns the model. The sum is taken in fp32 and cast
  to the kernel's dtype; the kernel keeps its sharding.
  """
  for _, linear, _ in linear_layers(model):
    if linear.lora is None:
      continue
    kernel = linear.kernel[...]
    merged = (kernel.astype(jnp.float32) + linear.lora.delta()).astype(kernel.dtype)
    if not isinstance(kernel, jax.core.Tracer):
      merged = jax.device_put(merged, kernel.sharding)
    linear.kernel[...] = merged
    linear.lora = None
  return model


def reseed_lora_dropout(model: nnx.Module, key: jax.Array) -> None:
  """Gives every adapter (each layer of a scanned group its own) a new dropout key derived from `key`.

  Call once per training step, e.g. with `jax.random.fold_in(rng, step)`; it also runs inside `jit`.
  """
  index = 0
  for _, linear, _ in linear_layers(model):
    lora = linear.lora
    if lora is None or lora.dropout_key is None:
      continue
    fresh = jax.random.bits(jax.random.fold_in(key, index), lora.dropout_key.shape, jnp.uint32)
    lora.dropout_key[...] = fresh  # any 4 words make an rbg key
    index += 1


def linear_layers(model: nnx.Module) -> Iterator[tuple[str, Linear, int | None]]:
  """(path template, Linear, layers of its scanned group or None) for every `Linear` in the model.

  The template holds `{i}` where a scanned group's layer index goes: `language_model/layers/{i}/mlp/up_proj`.
  """
  roots = _stacked_roots(model)
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, Linear):
      continue
    path = tuple(str(p) for p in path)
    root = next((r for r in roots if path[:len(r)] == r), None)
    if root is None:
      yield "/".join(path), node, None
    else:
      yield "/".join((*root, "{i}", *path[len(root):])), node, node.kernel.shape[0]


def _stacked_roots(model: nnx.Module) -> list[tuple[str, ...]]:
  """Paths of the modules built by `layers.stacked`: every parameter below has a leading `layers` axis."""
  axes_by_path = {tuple(str(p) for p in path): tuple(var.get_metadata().get("axes") or ())
                  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  roots: list[tuple[str, ...]] = []
  for prefix in sorted({path[:i] for path in axes_by_path for i in range(1, len(path))}, key=len):
    if any(prefix[:len(r)] == r for r in roots):
      continue
    below = [axes for path, axes in axes_by_path.items() if path[:len(prefix)] == prefix]
    if all(axes[:1] == ("layers",) for axes in below):
      roots.append(prefix)
  return roots


def _selected(path: str, config: LoraConfig) -> bool:
  return _matches(path, config.targets) and not _matches(path, config.exclude)


def _matches(path: str, patterns: Sequence[str]) -> bool:
  name = path.rsplit("/", 1)[-1]
  return any(p == ALL_LINEAR or fnmatch.fnmatchcase(path if "/" in p else name, p) for p in patterns)
