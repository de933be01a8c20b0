"""Logical axis names -> mesh axes, through one short rules table.

Modules label each parameter dimension with a logical name (`embed`, `mlp`, `q_heads`, ...). The
rules say which mesh axis (`data`, `fsdp`, `tensor`) shards each name. A dimension that the mesh
axis does not divide, or a mesh axis already used by the same array, stays replicated, so one table
serves every model size and mesh shape.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# (logical name, mesh axis or None). FSDP shards the model dimension, tensor parallelism the
# head and MLP dimensions; stacked layers, norms and patch columns are replicated.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("layers", None),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("heads", "tensor"),
    ("qkv", "tensor"),
    ("vocab", "tensor"),
    ("merge", "fsdp"),
    ("patch", None),
    ("norm", None),
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_vision", ("data", "fsdp")),  # vision patch slots / attention groups of a batch's images
)


def make_mesh(shape: Mapping[str, int] | Sequence[int] = (), devices=None) -> Mesh:
  """A mesh over (`data`, `fsdp`, `tensor`); a -1 takes the remaining devices. `()` = all on `fsdp`.

  The axes are `AxisType.Auto`: parameters and batches carry NamedShardings (jit in/out shardings,
  constraints at layer boundaries) and XLA's propagation places the activations in between.
  Explicit axes (sharding in types) would make every gather and every contraction over an FSDP-
  sharded dimension name its output sharding inside the model code.
  """
  devices = devices if devices is not None else jax.devices()
  sizes = dict(zip(MESH_AXES, shape)) if not isinstance(shape, Mapping) else dict(shape)
  sizes = {a: int(sizes.get(a, 1)) for a in MESH_AXES}
  if not any(v != 1 for v in sizes.values()):
    sizes["fsdp"] = -1
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  for a, v in sizes.items():
    if v == -1:
      sizes[a] = len(devices) // known
  if int(np.prod(list(sizes.values()))) != len(devices):
    raise ValueError(f"mesh {sizes} needs {int(np.prod(list(sizes.values())))} devices; {len(devices)} are present")
  axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, axis_types=axis_types, devices=devices)


def spec_for(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Sequence[tuple[str, str | tuple[str, ...] | None]] = DEFAULT_RULES) -> PartitionSpec:
  table = dict(rules)
  used: set[str] = set()
  out = []
  for name, dim in zip(axes, shape):
    target = table.get(name) if name is not None else None
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used and mesh.shape.get(t, 1) > 1)
    size = int(np.prod([mesh.shape[t] for t in targets])) if targets else 1
    if not targets or dim % size:
      out.append(None)
      continue
    used.update(targets)
    out.append(targets[0] if len(targets) == 1 else targets)
  return PartitionSpec(*out)


def current_mesh() -> Mesh | None:
  """The concrete mesh set with `jax.set_mesh`, if any; None inside a trace (jit, eval_shape), where the
  caller's out_shardings place the arrays."""
  try:
    mesh = jax.sharding.get_mesh()
  except ValueError:  # "get_mesh can only be used outside of jax.jit"
    return None
  return mesh if isinstance(mesh, Mesh) and mesh.devices.size > 0 and mesh.axis_names else None


def state_shardings(state: nnx.State, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedSharding for every variable of an (abstract) NNX state, from its `axes` metadata."""

  def one(var):
    axes = var.get_metadata().get("axes") if isinstance(var, nnx.Variable) else None
    shape = var.shape if hasattr(var, "shape") else var.value.shape
    spec = spec_for(axes, shape, mesh, rules) if axes else PartitionSpec()
    return NamedSharding(mesh, spec)

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
