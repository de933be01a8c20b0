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

from eemo_jax.kernels import row_matmul

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
    y = matmul(x, self.kernel[...].astype(x.dtype))
    if self.bias is not None:
      y = y + self.bias[...].astype(x.dtype)
    if self.lora is not None and self.lora.enabled:
      y = y + self.lora(x)
    return y


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` for x (..., in) and w (in, out): every weight matmul of the model.

  In CPU decode steps (traced inside `row_matmul.in_decode_steps`) a few fp32 rows go to the row kernel,
  which streams the weight faster than XLA's dot does; everywhere else `_dense_matmul`.
  """
  if row_matmul.applies(x, w):
    return row_matmul.row_matmul(x, w)
  return _dense_matmul(x, w)


def matmul_transposed(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w.T` for w (out, in): a tied embedding as the output head, read as it is stored."""
  if row_matmul.applies(x, w):
    return row_matmul.row_matmul(x, w, layout="out_in")
  return _dense_matmul(x, w.T)


@jax.custom_vjp
def _dense_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """`x @ w` for x (..., in), whose weight gradient contracts the leading axes as one rows axis.

  Autodiff of `jnp.dot` gives the weight gradient as one matmul contracting (batch, seq). XLA:CPU
  canonicalises that by writing the output gradient out a second time, transposed (17 strided
  copies per tiny-model train step); merged rows need none, and the `small` benchmark's train step
  ran 10% faster. Only the backward pass reshapes: reshaping the forward's activations instead cost
  0.24 GiB more temporaries per device in the 3B step on a TPU v5e (AOT), and this form none.
  Remat policies still see the forward matmul (`dots_saveable` keeps its output).
  """
  return jnp.dot(x, w)


def _matmul_forward(x, w):
  return jnp.dot(x, w), (x, w)


def _matmul_backward(residuals, dy):
  x, w = residuals
  dx = jnp.dot(dy, w.T)
  # A frozen kernel's gradient is unused, and XLA drops its matmul as dead code.
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, dy.reshape(-1, dy.shape[-1]))
  return dx, dw


_dense_matmul.defvjp(_matmul_forward, _matmul_backward)


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
    return matmul_transposed(x, self.embedding[...].astype(x.dtype))


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


def _checked_policy(remat: str):
  if remat not in REMAT_POLICIES:
    raise ValueError(f"Unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
  return REMAT_POLICIES[remat]


def scan_layers(layers: nnx.Module, body: Callable, carry, xs=None, *, remat: str = "none"):
  """Runs `body(layer, carry, x) -> (carry, y)` over stacked `layers` with one `lax.scan`.

  The layer parameters are sliced by the scan and merged back into a module inside the body, so
  the body reads like an ordinary per-layer forward.
  """
  policy = _checked_policy(remat)
  graphdef, state = nnx.split(layers)

  def step(c, inputs):
    layer_state, x = inputs
    return body(nnx.merge(graphdef, layer_state), c, x)

  if remat != "none":
    step = jax.checkpoint(step, policy=policy, prevent_cse=False)
  return jax.lax.scan(step, carry, (state, xs))


def layer_runs(kinds: Sequence[int]) -> tuple[int, list[tuple[int, int, int]]]:
  """(period, runs): the shortest period of a per-layer kind pattern and its runs of equal kinds.

  `runs` are (start, stop, kind) within one period. Qwen2.5-VL's vision towers repeat (window x 7, full)
  four times: period 8, runs [(0, 7, window), (7, 8, full)].
  """
  kinds = list(kinds)
  depth = len(kinds)
  period = next(p for p in range(1, depth + 1)
                if depth % p == 0 and all(kinds[i] == kinds[i % p] for i in range(depth)))
  runs, start = [], 0
  for i in range(1, period + 1):
    if i == period or kinds[i] != kinds[start]:
      runs.append((start, i, kinds[start]))
      start = i
  return period, runs


def scan_layer_pattern(layers: nnx.Module, kinds: Sequence[int], bodies: Sequence[Callable], carry, *,
                       remat: str = "none"):
  """Runs stacked `layers` where layer i is `bodies[kinds[i]](layer, carry) -> carry`, with no per-layer branch.

  A `lax.cond` per layer would cost a branch on every layer and, under autodiff, keep the residuals of
  both branches. Instead the pattern's period is scanned (the stacked axis reshaped to (repeats, period),
  free), and inside one period each run of equal kinds is its own scan (or a plain call for a run of
  one). Compile time grows with the runs of one period, not with depth.
  """
  policy = _checked_policy(remat)
  depth = len(kinds)
  period, runs = layer_runs(kinds)
  graphdef, state = nnx.split(layers)
  state = jax.tree.map(lambda v: v.reshape((depth // period, period) + v.shape[1:]), state)

  def layer_step(kind):
    def step(c, layer_state):
      return bodies[kind](nnx.merge(graphdef, layer_state), c), None
    return jax.checkpoint(step, policy=policy, prevent_cse=False) if remat != "none" else step

  def period_step(c, period_state):
    for start, stop, kind in runs:
      run = jax.tree.map(lambda v: v[start:stop], period_state)
      if stop - start == 1:
        c, _ = layer_step(kind)(c, jax.tree.map(lambda v: v[0], run))
      else:
        c, _ = jax.lax.scan(layer_step(kind), c, run)
    return c, None

  if depth == period:
    return period_step(carry, jax.tree.map(lambda v: v[0], state))[0]
  return jax.lax.scan(period_step, carry, state)[0]
