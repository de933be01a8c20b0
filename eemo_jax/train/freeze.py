"""Which parameters train: whole parameters by nnx filter, and layer slices of stacked parameters.

Layers are stacked on a leading `layers` axis and run by one scan, so "all text layers but the last
k" cannot split the arrays; instead those parameters stay in the trainable state with a per-slice
mask, and the step zeroes both their gradients (so the Adam moments of frozen slices stay zero) and
their updates (so weight decay does not touch them either): a frozen slice is bit-identical after
any number of steps. Parameters frozen as a whole are not in the trainable state at all, so they
have no gradient, no optimizer state and, with nothing trainable upstream, no backward pass.

Paths are matched as '/'-joined strings, e.g. `visual/blocks/attn/qkv/kernel` or
`language_model/layers/mlp/up_proj/kernel` (the paths of `nnx.state(model)`).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx import filterlib

# Optional leading segments, so the patterns also match inside a wrapper (`backbone/language_model/...`).
TEXT_LAYERS = r"(.*/)?language_model/layers/.*"
VISION_TOWER = r"(.*/)?visual/(patch_embed|blocks)/.*"  # the ViT without the patch merger
VISION = r"(.*/)?visual/.*"


def path_string(path: Sequence) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def paths(*patterns: str) -> filterlib.Filter:
  """An nnx filter matching parameters whose '/'-joined path fully matches one of the regexes."""
  compiled = [re.compile(p) for p in patterns]

  def matches(path, _value) -> bool:
    s = path_string(path)
    return any(c.fullmatch(s) for c in compiled)

  return matches


@dataclasses.dataclass(frozen=True)
class Trainable:
  """The trainable set: `include` minus `exclude`, with only the last k layers of some stacked params.

  include / exclude are nnx filters (a Variable type such as a LoRA param class, `paths(...)`,
  `nnx.Any(...)`). `last_layers` pairs a path regex with k: the matching stacked parameters train
  only their last k slices along the leading `layers` axis.
  """
  include: filterlib.Filter = nnx.Param
  exclude: filterlib.Filter = nnx.Nothing
  last_layers: tuple[tuple[str, int], ...] = ()

  def __post_init__(self):
    for pattern, k in self.last_layers:
      if k < 1:
        raise ValueError(f"last_layers ({pattern!r}, {k}): k must be >= 1; to freeze those layers entirely, "
                         "put the pattern in `exclude`")

  @property
  def filter(self) -> filterlib.Filter:
    """The nnx filter of parameters that are (at least partly) trainable."""
    return nnx.All(nnx.Param, self.include, nnx.Not(self.exclude))

  def layers_trained(self, path: Sequence) -> int | None:
    s = path_string(path)
    matches = [k for pattern, k in self.last_layers if re.fullmatch(pattern, s)]
    return min(matches) if matches else None


def train_all() -> Trainable:
  return Trainable()


def freeze_vision_tower() -> Trainable:
  """EmoVerse stage 1 (`tune_mm_vision False, tune_mm_mlp True, tune_mm_llm True`): the ViT frozen."""
  return Trainable(exclude=paths(VISION_TOWER))


def freeze_paths(*patterns: str) -> Trainable:
  """Everything trains except the parameters whose paths match `patterns`."""
  return Trainable(exclude=paths(*patterns))


def last_text_layers(k: int, *also: str | filterlib.Filter) -> Trainable:
  """Only the last k text decoder layers train, plus whatever `also` names (e.g. a head's path).

  EmoVerse stage 2 trains the last 2 LLM layers and the classification head (papers.md §2.2).
  """
  extra = [paths(a) if isinstance(a, str) else a for a in also]
  return Trainable(include=nnx.Any(paths(TEXT_LAYERS), *extra), last_layers=((TEXT_LAYERS, k),))


def only(*filters: str | filterlib.Filter) -> Trainable:
  """Only these train, e.g. `only(lora_filter, "head/.*")` for LoRA plus the emotion heads."""
  return Trainable(include=nnx.Any(*(paths(f) if isinstance(f, str) else f for f in filters)))


def split_trainable(model: nnx.Module, trainable: Trainable) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, trainable params, everything else); `nnx.merge(graphdef, params, rest)` rebuilds it."""
  graphdef, params, rest = nnx.split(model, trainable.filter, ...)
  if not jax.tree.leaves(params):
    raise ValueError("No parameter is trainable with this selection; check the include/exclude filters and "
                     "the parameter paths (e.g. nnx.state(model) or freeze.parameter_paths(model))")
  return graphdef, params, rest


def parameter_paths(model_or_state) -> list[str]:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state, nnx.Param)
  return [path_string(p) for p, _ in nnx.to_flat_state(state)]


def update_mask(params: nnx.State, trainable: Trainable):
  """Per-slice masks for the trainable state: same structure, each leaf True or a bool array.

  A bool array has shape (layers, 1, ..., 1) and broadcasts against its parameter. Computed from
  shapes only, so it works on abstract and traced states.
  """

  def one(path, value):
    k = trainable.layers_trained(path)
    if k is None:
      return np.bool_(True)
    n, ndim = value.shape[0], len(value.shape)
    if k > n:
      raise ValueError(f"last_layers asks for {k} trained layers of {path_string(path)}, which has {n}")
    return (np.arange(n) >= n - k).reshape((n,) + (1,) * (ndim - 1))

  return map_with_path(one, params)


def mask_tree(tree, mask):
  """Zeroes the masked-out slices of a params-shaped tree (gradients, updates)."""
  return jax.tree.map(lambda m, x: x if m.ndim == 0 and m else jnp.where(m, x, jnp.zeros_like(x)), mask, tree)


def apply_masked_updates(params, updates, mask):
  """params + updates where the mask allows, the old bits elsewhere (exact, even for -0.0 or NaN updates)."""

  def one(m, p, u):
    new = (p + u).astype(p.dtype)
    return new if m.ndim == 0 and m else jnp.where(m, new, p)

  return jax.tree.map(one, mask, params, updates)


def count_trainable(params: nnx.State, trainable: Trainable) -> int:
  """Number of scalars the optimizer may change (frozen slices excluded)."""
  mask = update_mask(params, trainable)
  sizes = jax.tree.map(lambda m, p: int(np.prod(p.shape)) * (np.mean(m) if m.ndim else 1), mask, params)
  return int(round(sum(jax.tree.leaves(sizes))))


def map_with_path(fn, state: nnx.State):
  """`fn(path, value)` for each variable's value, path as plain keys; the result keeps the state's structure."""

  def one(path, leaf):
    keys = tuple(getattr(k, "key", getattr(k, "idx", None)) for k in path
                 if not isinstance(k, jax.tree_util.GetAttrKey))
    return fn(keys, leaf)

  return jax.tree_util.tree_map_with_path(one, state)
