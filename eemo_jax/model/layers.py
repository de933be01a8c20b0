"""Building blocks shared by the vision tower and the text decoder.

Every parameter carries logical axis names in its `axes` metadata (e.g. `("embed", "mlp")`);
`eemo_jax.parallel` maps them to mesh axes with the rules table of the config, so the modules
never mention a mesh. Parameters are stored in `param_dtype` and cast to the activation dtype at
use, which gives fp32 master weights with bf16 compute when the inputs are bf16.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[..., jax.Array]
_default_init = nnx.initializers.normal(stddev=0.02)


def param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int], dtype, axes: tuple[str | None, ...]):
  """A parameter with logical axis names. `rngs=None` makes zeros (cheap shells for loading)."""
  assert len(axes) == len(shape), (axes, shape)
  value = jnp.zeros(shape, dtype) if rngs is None else init(rngs.params(), tuple(shape), dtype)
  return nnx.Param(value, axes=axes)


class Linear(nnx.Module):
  """`y = x @ kernel + bias` with kernel stored `(in, out)` (the transpose of PyTorch's weight).

  `lora` is None unless `eemo_jax.model.lora.apply_lora` attaches an adapter, whose low-rank
  update is then added to the output.
  """

  def __init__(self, in_features: int, out_features: int, *, axes: tuple[str | None, str | None],
               use_bias: bool = True, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
    self.kernel = param(rngs, _default_init, (in_features, out_features), param_dtype, axes)
    self.bias = param(rngs, nnx.initializers.zeros, (out_features,), param_dtype, axes[1:]) if use_bias else None
    self.lora = nnx.data(None)

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x, self.kernel[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    if self.lora is not None:
      y = y + self.lora(x)
    return y


class RMSNorm(nnx.Module):
  """HF Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then scale (spec §3.5)."""

  def __init__(self, dim: int, *, eps: float, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
    del rngs  # initialised to ones, as in HF
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return self.weight[...].astype(x.dtype) * h.astype(x.dtype)


class Embed(nnx.Module):
  def __init__(self, vocab_size: int, dim: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
    self.embedding = param(rngs, _default_init, (vocab_size, dim), param_dtype, ("vocab", "embed"))

  def __call__(self, ids: jax.Array, dtype) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Tied output head: `x @ embedding.T`."""
    return jnp.dot(x, self.embedding[...].astype(x.dtype).T)


class SwiGLU(nnx.Module):
  """`down(silu(gate(x)) * up(x))`; the vision MLP has biases, the text MLP does not."""

  def __init__(self, dim: int, hidden: int, *, use_bias: bool, param_dtype=jnp.float32, rngs: nnx.Rngs | None):
    kw = dict(use_bias=use_bias, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.up_proj = Linear(dim, hidden, axes=("embed", "mlp"), **kw)
    self.down_proj = Linear(hidden, dim, axes=("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def stacked(make: Callable[[nnx.Rngs | None], nnx.Module], n: int, rngs: nnx.Rngs | None) -> nnx.Module:
  """Builds `n` copies of a module with every parameter stacked on a leading `layers` axis.

  Stacked layers are run with `jax.lax.scan` (see `scan_layers`), so compile time does not grow
  with depth and one rules table shards every layer the same way.
  """
  if rngs is None:
    module = nnx.vmap(lambda _: make(None), in_axes=0, out_axes=0)(jnp.zeros((n,)))
  else:
    module = nnx.split_rngs(splits=n)(nnx.vmap(make, in_axes=(0,), out_axes=0))(rngs)
  for _, var in nnx.iter_graph(module):
    if isinstance(var, nnx.Variable) and "axes" in var.get_metadata():
      var.set_metadata("axes", ("layers",) + tuple(var.get_metadata()["axes"]))
  return module


REMAT_POLICIES = {
    "none": None,  # keep every activation (fastest, most memory)
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, remat: str = "none"):
  """Runs `body(layer, carry, x) -> (carry, y)` over stacked `layers` with one `lax.scan`.

  The layer parameters are sliced by the scan and merged back into a module inside the body, so
  the body reads like an ordinary per-layer forward.
  """
  if remat not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
  graphdef, state = nnx.split(layers)

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x)

  if remat != "none":
    step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=False)
  return jax.lax.scan(step, carry, (state, xs))
