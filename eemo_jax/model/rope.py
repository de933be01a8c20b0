"""Rotary embeddings: the vision tower's 2D rope and the text decoder's M-RoPE (spec §3.2, §4.4).

Both use the rotate-half convention of HF (`[-x2, x1]` on the two halves of the head dimension),
not the interleaved one.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def rotate_half(x: jax.Array) -> jax.Array:
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x: (batch, seq, heads, head_dim); cos, sin: (batch, seq, head_dim), already in the rotation dtype."""
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  return x * cos + rotate_half(x) * sin


def inverse_frequencies(dim: int, theta: float) -> jax.Array:
  return 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))  # (dim/2,)


def mrope_cos_sin(position_ids: jax.Array, head_dim: int, theta: float, mrope_section: Sequence[int],
                  dtype) -> tuple[jax.Array, jax.Array]:
  """M-RoPE tables from (3, batch, seq) t/h/w positions -> two (batch, seq, head_dim) arrays.

  Frequency chunk i of `mrope_section` takes its angle from axis i (t, h, w). The tables are
  computed in fp32 and cast to the activation dtype before the rotation, as HF does in bf16.
  """
  inv_freq = inverse_frequencies(head_dim, theta)  # (head_dim/2,)
  freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq  # (3, batch, seq, head_dim/2)
  bounds = [0]
  for s in mrope_section:
    bounds.append(bounds[-1] + s)
  f = jnp.concatenate([freqs[i, ..., bounds[i]:bounds[i + 1]] for i in range(len(mrope_section))], axis=-1)
  emb = jnp.concatenate([f, f], axis=-1)  # (batch, seq, head_dim)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def vision_cos_sin(rope_positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
  """2D rope tables from (patches, 2) (h, w) patch ids -> two (patches, head_dim) fp32 arrays.

  The first half of the frequencies rotates with the row id, the second with the column id.
  cos and sin are evaluated once per id (a row or column id is below the slot count) and gathered
  per patch. The values are the same fp32 numbers as evaluating them per patch (as HF does), but
  XLA:CPU duplicated per-patch `cos`/`sin` into every fusion that rotates q or k, forward and
  backward (~1 ms of the tiny model's 14 ms train step); a gather from a small table is cheap to
  duplicate.
  """
  inv_freq = inverse_frequencies(head_dim // 2, theta)  # (head_dim/4,)
  n = rope_positions.shape[0]
  angles = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq  # (ids, head_dim/4): every possible id

  def per_patch(table):  # (ids, head_dim/4) -> (patches, head_dim)
    half = table[rope_positions].reshape(n, -1)  # row frequencies, then column ones
    return jnp.concatenate([half, half], axis=-1)

  return per_patch(jnp.cos(angles)), per_patch(jnp.sin(angles))
