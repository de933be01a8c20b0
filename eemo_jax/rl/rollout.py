"""GRPO rollouts: G sampled completions per prompt, from one vision pass and one prefill per prompt.

    rollout_fn = make_rollout_fn(graphdef, mesh, group_size=8, max_completion_length=1024, temperature=1.0)
    out = rollout_fn(state, inputs, rng, eos_ids=[151645, 151643], pad_id=151643)   # a `Rollout`
    # or, unsharded:  out = rollout(model, inputs, group_size=8, max_completion_length=1024, rng=key, ...)

`inputs` are P left-padded prompts with their images (`ModelInputs` from `prepare_inputs`, with the
prompt length and the patch budget the caller's buckets). The decode loop is `eemo_jax.generate`'s
(`sampler.decode` with `group_size`): each prompt is prefilled once, then its KV cache, padding mask,
last logits and next M-RoPE positions are repeated G times inside the compiled function, and the
P*G rows decode together. Row r = p*G + j is prompt p's j-th completion (TRL's RepeatSampler order)
and draws with its own key, `split(rng, P*G)[r]`, folded with the step: the tokens equal those of a
batch that repeats every prompt, its images and positions G times (`group_size=1`).

Sampling log-probs are of the temperature-scaled full distribution, `log_softmax(logits / T)[token]`
in fp32, as TRL computes them, whatever top-k/top-p filtered the draw; a training forward over
prompt + completion with the same weights gives the same numbers (`tests/rl/test_rollout.py`).

The model: `graphdef, state = nnx.split(qwen25vl)`. For a module that holds the backbone, such as
`eemo_jax.train.run.EmotionSFTModel`, split the backbone: `nnx.split(model.backbone)` (after
`nnx.merge(graphdef, params, frozen)` of a train state; merging and splitting concrete arrays copies
nothing). LoRA adapters are used as they are, with their dropout off.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eemo_jax.generate import sampler
from eemo_jax.model.qwen25vl import ModelInputs, Qwen25VL
from eemo_jax.parallel.sharding import DEFAULT_RULES, spec_for, state_shardings


@struct.dataclass
class Rollout:
  """G completions for each of P prompts: R = P * G rows, row p*G + j the j-th of prompt p; T steps."""
  tokens: jax.Array  # (R, T) int32 completion ids; pad_id after the first EOS
  mask: jax.Array  # (R, T) int32, 1 up to and including the first EOS (TRL's completion_mask)
  truncated: jax.Array  # (R,) bool, no EOS within T tokens
  logprobs: jax.Array  # (R, T) float32 log_softmax(logits / temperature)[token], 0 where mask is 0
  next_positions: jax.Array  # (3, P) int32 M-RoPE position of each prompt's first completion token
  steps: jax.Array  # () int32 decode steps run (fewer than T when every row ended early)
  group_size: int = struct.field(pytree_node=False, default=1)

  def completion_positions(self) -> jax.Array:
    """(3, R, T) M-RoPE positions of the completion tokens: next_positions + k (spec §6.2)."""
    start = jnp.repeat(self.next_positions, self.group_size, axis=1)  # (3, R)
    return start[:, :, None] + jnp.arange(self.tokens.shape[1], dtype=jnp.int32)


def completion_mask(tokens: jax.Array, eos_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(R, T) tokens -> (mask (R, T) int32, 1 up to and including the first EOS; truncated (R,) bool)."""
  is_eos = jnp.isin(tokens, eos_ids).astype(jnp.int32)
  eos_before = jnp.cumsum(is_eos, axis=1) - is_eos  # EOS tokens strictly before each position
  return (eos_before == 0).astype(jnp.int32), ~jnp.any(is_eos > 0, axis=1)


def _rollout(graphdef, state, inputs: ModelInputs, rng, temperature, top_p, eos_ids, pad_id, *, group_size: int,
             max_completion_length: int, greedy: bool, top_k: int, use_top_p: bool, constrain=None,
             layer_loop: str | None = None, row_kernel: bool | None = None) -> Rollout:
  decoded = sampler.decode(graphdef, state, inputs, rng, temperature, top_p, eos_ids, pad_id,
                           max_new_tokens=max_completion_length, group_size=group_size, greedy=greedy, top_k=top_k,
                           use_top_p=use_top_p, with_logprobs=True, constrain=constrain, layer_loop=layer_loop,
                           row_kernel=row_kernel)
  mask, truncated = completion_mask(decoded.tokens, eos_ids)
  pin = constrain or (lambda x, axes: x)
  rows = ("act_batch", None)
  return Rollout(tokens=pin(decoded.tokens, rows), mask=pin(mask, rows), truncated=pin(truncated, rows[:1]),
                 logprobs=pin(decoded.logprobs, rows), next_positions=inputs.position_ids[:, :, -1] + 1,
                 steps=decoded.steps, group_size=group_size)


class RolloutFn:
  """The compiled rollout for one model structure, mesh and static sampling settings (`make_rollout_fn`).

  `fn(state, inputs, rng, *, eos_ids, pad_id) -> Rollout`. A new prompt count, prompt length or patch
  budget compiles once more; the key, EOS ids, pad id, temperature and top-p values do not.
  """

  def __init__(self, graphdef: nnx.GraphDef, mesh: Mesh | None, rules, *, group_size: int,
               max_completion_length: int, temperature: float, top_k: int, top_p: float,
               layer_loop: str | None = None):
    if group_size < 1:
      raise ValueError(f"group_size must be >= 1 (GRPO needs >= 2 completions per prompt), got {group_size}")
    cfg = sampler.SamplingConfig(max_new_tokens=max_completion_length, temperature=float(temperature),
                                 top_k=int(top_k), top_p=float(top_p))
    self.mesh, self.rules, self.group_size, self.sampling = mesh, rules, group_size, cfg
    constrain = None if mesh is None else _Constrain(mesh, tuple(rules))
    if layer_loop is None and mesh is not None:  # the mesh's devices, not this host's (AOT for a TPU slice)
      layer_loop = sampler.default_layer_loop(mesh.devices.flat[0].platform)
    self._fn = functools.partial(
        _rollout, graphdef, group_size=group_size, max_completion_length=cfg.max_new_tokens, greedy=cfg.greedy,
        top_k=0 if cfg.greedy else cfg.top_k, use_top_p=not cfg.greedy and cfg.top_p < 1.0, constrain=constrain,
        layer_loop=layer_loop, row_kernel=mesh is None or mesh.devices.size == 1)  # the kernel has no sharding rule
    self.jitted = jax.jit(self._fn)

  def __call__(self, state, inputs: ModelInputs, rng: jax.Array, *, eos_ids: int | Sequence[int],
               pad_id: int) -> Rollout:
    """state: `nnx.split(qwen25vl)[1]` (or a tuple of states); inputs: P left-padded prompts; rng: a key."""
    if isinstance(inputs.attention_mask, np.ndarray):
      sampler._check_left_padded(inputs.attention_mask)
    args = self.arguments(state, inputs, rng, eos_ids=eos_ids, pad_id=pad_id)
    return self.jitted(*args)

  def arguments(self, state, inputs: ModelInputs, rng, *, eos_ids, pad_id) -> tuple:
    """The jitted function's arguments: host values converted, and with a mesh placed on it."""
    cfg = self.sampling
    rng = sampler._typed_key(rng)
    eos = sampler._eos_ids(eos_ids)
    scalars = (np.float32(cfg.temperature or 1.0), np.float32(cfg.top_p))
    if self.mesh is not None:
      state = jax.device_put(state, state_shardings(state, self.mesh, self.rules))
      inputs = jax.device_put(inputs, input_shardings(inputs, self.mesh, self.rules))
      rng = jax.device_put(rng, NamedSharding(self.mesh, PartitionSpec()))
    return state, inputs, rng, *scalars, eos, np.int32(pad_id)

  def compile(self, state, inputs: ModelInputs, rng: jax.Array, *, eos_ids: int | Sequence[int], pad_id: int):
    """Compiles the rollout for these arguments now, as `__call__` places them, so that a call with arguments
    of the same shapes finds the executable in jit's cache (for timing the compile apart from the decode)."""
    return self.jitted.lower(*self.arguments(state, inputs, rng, eos_ids=eos_ids, pad_id=pad_id)).compile()

  def lower(self, state, inputs: ModelInputs, *, eos_ids: int | Sequence[int] = (), pad_id: int = 0):
    """`jax.jit(...).lower` for ahead-of-time compiles: state and inputs may be abstract (`nnx.eval_shape`,
    `jax.ShapeDtypeStruct`s); with a mesh they are laid out as `__call__` places them."""
    cfg = self.sampling
    rng = jax.eval_shape(lambda: jax.random.key(0))
    args = (state, inputs, rng, np.float32(cfg.temperature or 1.0), np.float32(cfg.top_p), sampler._eos_ids(eos_ids),
            np.int32(pad_id))
    if self.mesh is None:
      return self.jitted.lower(*args)
    replicated = NamedSharding(self.mesh, PartitionSpec())
    shardings = (state_shardings(state, self.mesh, self.rules), input_shardings(inputs, self.mesh, self.rules),
                 *(replicated,) * 5)
    return jax.jit(self._fn, in_shardings=shardings).lower(*args)

  def compiled_variants(self) -> int:
    """How many versions jit has compiled (one per prompt count, prompt length and patch budget)."""
    return self.jitted._cache_size()


def make_rollout_fn(graphdef: nnx.GraphDef, mesh: Mesh | None = None, rules=DEFAULT_RULES, *, group_size: int,
                    max_completion_length: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                    layer_loop: str | None = None) -> RolloutFn:
  """A rollout for the `Qwen25VL` of `graphdef`, with its rows sharded over the mesh's data axes.

  mesh: None for one device; otherwise prompts and completion rows are split over (`data`, `fsdp`)
  (logical axis `act_batch`), the KV cache like the activations, the vision slots over `act_vision`,
  and the weights by `rules` (the state is placed there if it is not yet).
  temperature 0 means greedy (log-probs then under temperature 1); top_k 0 and top_p 1 are off.
  layer_loop: the decode steps' "scan" or "unrolled" layers (`generate.sampler`); None picks by the
  mesh's device platform (the default backend without a mesh), so an AOT compile for a TPU slice on a
  CPU host gets the accelerator's loop.
  """
  return RolloutFn(graphdef, mesh, rules, group_size=group_size, max_completion_length=max_completion_length,
                   temperature=temperature, top_k=top_k, top_p=top_p, layer_loop=layer_loop)


@functools.lru_cache(maxsize=16)
def _unsharded_rollout_fn(graphdef, group_size, max_completion_length, temperature, top_k, top_p) -> RolloutFn:
  return make_rollout_fn(graphdef, None, group_size=group_size, max_completion_length=max_completion_length,
                         temperature=temperature, top_k=top_k, top_p=top_p)


def rollout(model: Qwen25VL | tuple[nnx.GraphDef, nnx.State], inputs: ModelInputs, *, group_size: int,
            max_completion_length: int, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
            rng: jax.Array, eos_ids: int | Sequence[int], pad_id: int) -> Rollout:
  """G = `group_size` completions for each prompt of `inputs`, on one device (see the module docstring).

  model: a `Qwen25VL`, or its `(graphdef, state)`. Repeated calls with the same model structure, shapes
  and static settings (group_size, max_completion_length, temperature == 0, top_k, top_p < 1) reuse one
  compiled function.
  """
  graphdef, state = nnx.split(model) if isinstance(model, nnx.Module) else model
  fn = _unsharded_rollout_fn(graphdef, group_size, max_completion_length, float(temperature), int(top_k),
                             float(top_p))
  return fn(state, inputs, rng, eos_ids=eos_ids, pad_id=pad_id)


class _Constrain:
  """`(array, logical axes) -> array` with a sharding constraint from the mesh and rules (hashable)."""

  def __init__(self, mesh: Mesh, rules: tuple):
    self.mesh, self.rules = mesh, rules

  def __call__(self, x: jax.Array, axes: tuple) -> jax.Array:
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec_for(axes, x.shape, self.mesh,
                                                                                 self.rules)))


_INPUT_AXES = {
    "input_ids": ("act_batch", "act_seq"),
    "attention_mask": ("act_batch", "act_seq"),
    "position_ids": (None, "act_batch", "act_seq"),
    "rope_deltas": ("act_batch", None),
}


def input_shardings(inputs: ModelInputs, mesh: Mesh, rules=DEFAULT_RULES) -> ModelInputs:
  """NamedShardings for prompts: rows over (`data`, `fsdp`), vision slots and groups over `act_vision`."""
  def place(axes, x):
    return NamedSharding(mesh, spec_for(axes, np.shape(x), mesh, rules))

  fields = {name: place(axes, getattr(inputs, name)) for name, axes in _INPUT_AXES.items()}
  vision = None
  if inputs.vision is not None:
    vision = jax.tree.map(lambda a: place(("act_vision",) + (None,) * (np.ndim(a) - 1), a), inputs.vision)
  return ModelInputs(**fields, vision=vision)
