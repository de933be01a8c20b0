"""The train state as one pytree, created already sharded (or only described, for AOT and checks).

Parameters carry logical axis names; `parallel.sharding` turns them into NamedShardings. The Adam
moments are nnx.States of the same Params (same paths and metadata), so they get exactly their
parameters' shardings from the same table; counters and the key are replicated.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from eemo_jax.parallel.sharding import DEFAULT_RULES, state_shardings
from eemo_jax.train.freeze import Trainable, path_string, split_trainable

ModelOrFactory = nnx.Module | Callable[[], nnx.Module]


@struct.dataclass
class TrainState:
  step: jax.Array  # () int32: optimizer updates done
  params: nnx.State  # the trainable parameters, fp32 master weights
  frozen: nnx.State  # the rest of the model: frozen parameters and any other variables
  opt_state: optax.OptState
  rng: jax.Array  # () typed PRNG key; each step folds in `step`


def train_state_shardings(state: TrainState, mesh: Mesh, rules=DEFAULT_RULES):
  """NamedShardings for a (concrete or abstract) TrainState: a pytree prefix of the state."""
  return state_shardings(state, mesh, rules)


def _new_state(params: nnx.State, frozen: nnx.State, optimizer: optax.GradientTransformation,
               seed: int) -> TrainState:
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                    opt_state=optimizer.init(params), rng=jax.random.key(seed))


def _check_master_weights(params: nnx.State) -> None:
  for path, var in nnx.to_flat_state(params):
    dtype = var.get_value().dtype
    if jnp.issubdtype(dtype, jnp.floating) and dtype != jnp.float32:
      raise ValueError(f"trainable parameter {path_string(path)} is {dtype}; train from float32 master weights: "
                       "build or load the model with param_dtype='float32' and dtype='bfloat16' (compute)")


def create_train_state(model_or_factory: ModelOrFactory, optimizer: optax.GradientTransformation,
                       mesh: Mesh | None = None, rules=DEFAULT_RULES, *, trainable: Trainable = Trainable(),
                       seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, state) with every array already in its sharding.

  A factory (`lambda: Qwen25VL(cfg, rngs=nnx.Rngs(0))`) is run inside one `jax.jit` whose output
  shardings come from the logical axes, so each device only ever holds its own slices. A model
  instance (e.g. from `load_hf(..., mesh=mesh)`) keeps its arrays, placed into those shardings if
  they are not already; they are donated by the train step, so do not use that model afterwards.
  """
  if isinstance(model_or_factory, nnx.Module):
    graphdef, params, frozen = split_trainable(model_or_factory, trainable)
    _check_master_weights(params)
    abstract = jax.eval_shape(lambda p, f: _new_state(p, f, optimizer, seed), params, frozen)
    if mesh is None:
      return graphdef, _new_state(params, frozen, optimizer, seed)
    shardings = train_state_shardings(abstract, mesh, rules)
    params = jax.device_put(params, shardings.params)
    frozen = jax.device_put(frozen, shardings.frozen)
    opt_state = jax.jit(optimizer.init, out_shardings=shardings.opt_state)(params)
    step, rng = jax.device_put((jnp.zeros((), jnp.int32), jax.random.key(seed)), (shardings.step, shardings.rng))
    return graphdef, TrainState(step=step, params=params, frozen=frozen, opt_state=opt_state, rng=rng)

  factory = model_or_factory
  graphdef, abstract = abstract_train_state(factory, optimizer, None, rules, trainable=trainable, seed=seed)
  _check_master_weights(abstract.params)

  def init() -> TrainState:
    _, params, frozen = split_trainable(factory(), trainable)
    return _new_state(params, frozen, optimizer, seed)

  shardings = train_state_shardings(abstract, mesh, rules) if mesh is not None else None
  return graphdef, jax.jit(init, out_shardings=shardings)()


def abstract_train_state(model_or_factory: ModelOrFactory, optimizer: optax.GradientTransformation,
                         mesh: Mesh | None = None, rules=DEFAULT_RULES, *, trainable: Trainable = Trainable(),
                         seed: int = 0) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, state of ShapeDtypeStructs): shapes, dtypes and, with a mesh, shardings; nothing allocated.

  Feed it to `jit_train_step(...).lower(state, batch)` to compile ahead of time, or count its bytes.
  """
  if isinstance(model_or_factory, nnx.Module):
    graphdef, params, frozen = split_trainable(model_or_factory, trainable)
    abstract = jax.eval_shape(lambda p, f: _new_state(p, f, optimizer, seed), params, frozen)
  else:
    graphdef, _, _ = split_trainable(nnx.eval_shape(model_or_factory), trainable)

    def init() -> TrainState:
      _, params, frozen = split_trainable(model_or_factory(), trainable)
      return _new_state(params, frozen, optimizer, seed)

    abstract = jax.eval_shape(init)
  if mesh is None:
    return graphdef, abstract
  shardings = train_state_shardings(abstract, mesh, rules)  # a prefix tree: one sharding per Variable

  def place(sharding, subtree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), subtree)

  return graphdef, jax.tree.map(place, shardings, abstract)
