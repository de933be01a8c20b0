"""Linear's hand-written backward against autodiff of the plain `jnp.dot` form."""

import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eemo_jax.model.layers import Embed, Linear

POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def _layer(seed=0):
  layer = Linear(6, 5, axes=("embed", "mlp"), rngs=nnx.Rngs(seed))
  layer.bias[...] = jnp.asarray(np.random.RandomState(seed).randn(5), jnp.float32)
  return nnx.split(layer)


def _loss(graphdef):
  """Sum of sin(layer(x)): a non-linear readout, so every gradient entry depends on the whole output."""
  return lambda params, x: jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)).astype(jnp.float32))


def _plain_loss(params, x):
  y = jnp.dot(x, params["kernel"][...].astype(x.dtype)) + params["bias"][...].astype(x.dtype)
  return jnp.sum(jnp.sin(y).astype(jnp.float32))


@pytest.mark.parametrize("dtype, rtol", [(jnp.float32, 1e-6), (jnp.bfloat16, 2**-7)])  # bf16: two ulps
def test_linear_gradients_match_autodiff_of_jnp_dot(dtype, rtol):
  graphdef, params = _layer()
  x = jnp.asarray(np.random.RandomState(1).randn(3, 7, 6), dtype)  # (batch, seq, in): two leading axes
  got = jax.grad(_loss(graphdef), argnums=(0, 1))(params, x)
  want = jax.grad(_plain_loss, argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32), rtol=rtol, atol=1e-6)


def test_weight_gradient_is_one_matmul_over_merged_rows():
  """The point of the custom backward: (rows, in)^T @ (rows, out), not a (batch, seq) contraction,
  which XLA:CPU canonicalised by writing the output gradient out again, transposed."""
  graphdef, params = _layer()
  x = jnp.ones((3, 7, 6), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.grad(_loss(graphdef)))(params, x)
  kernel_grads = [e for e in jaxpr.jaxpr.eqns
                  if e.primitive.name == "dot_general" and e.outvars[0].aval.shape == (6, 5)]
  assert len(kernel_grads) == 1
  (lhs_contracting, rhs_contracting), batch = kernel_grads[0].params["dimension_numbers"]
  assert [v.aval.shape for v in kernel_grads[0].invars] == [(6, 21), (21, 5)]  # (in, rows) @ (rows, out)
  assert (lhs_contracting, rhs_contracting, batch) == ((1,), (0,), ((), ()))


def test_remat_policy_keeps_the_matmul_output(capsys):
  """A `dots_*` policy must see the matmul inside the custom_vjp, as it sees a plain `jnp.dot`."""
  graphdef, params = _layer()
  x = jnp.ones((3, 7, 6), jnp.float32)
  saved = []
  for loss in (_loss(graphdef), _plain_loss):
    jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(loss, policy=POLICY), params, x)
    saved.append(sorted(re.sub(r" from .*", "", line) for line in capsys.readouterr().out.splitlines()))
  assert "f32[3,7,5] output of dot_general" in saved[0]
  assert saved[0] == saved[1]


def test_frozen_kernel_gradient_is_not_computed():
  """Gradients for the input only (a frozen layer): XLA drops the kernel-gradient matmul."""
  graphdef, params = _layer()
  x = jnp.ones((3, 7, 6), jnp.float32)
  loss = _loss(graphdef)
  dots = lambda f: len(re.findall(r"= \S+ dot\(", jax.jit(f).lower(params, x).compile().as_text()))  # noqa: E731
  assert dots(jax.grad(loss, argnums=(0, 1))) == 3  # forward, input gradient, kernel gradient
  assert dots(jax.grad(loss, argnums=1)) == 2


def test_tied_head_gradients_match_autodiff_of_jnp_dot():
  graphdef, params = nnx.split(Embed(11, 6, rngs=nnx.Rngs(0)))
  x = jnp.asarray(np.random.RandomState(2).randn(2, 4, 6), jnp.float32)
  got = jax.grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graphdef, p).attend(x))), argnums=(0, 1))(params, x)
  want = jax.grad(lambda p, x: jnp.sum(jnp.sin(jnp.dot(x, p["embedding"][...].T))), argnums=(0, 1))(params, x)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
