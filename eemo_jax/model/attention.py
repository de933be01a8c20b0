"""The one attention function, with an XLA implementation and cuDNN flash attention for GPU.

Both the vision tower (block-diagonal masks from segment ids) and the text decoder (causal plus
padding masks, with or without a KV cache) call `attention`; only the boolean mask differs.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Implementation = Literal["xla", "cudnn"]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              implementation: Implementation = "xla") -> jax.Array:
  """Scaled dot-product attention with grouped KV heads.

  q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim);
  mask: bool, broadcastable to (batch, 1, q_len, kv_len), True where the key is visible.
  Returns (batch, q_len, heads, head_dim) in q's dtype.
  """
  scale = q.shape[-1] ** -0.5
  if implementation == "cudnn":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, implementation="cudnn")
  if implementation != "xla":
    raise ValueError(f"Unknown attention implementation {implementation!r}; use 'xla' or 'cudnn'")
  b, lq, h, d = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  # Heads-major before the matmuls: query head j*groups + g reads kv head j (HF's repeat_kv, with
  # no copy of K/V), and XLA needs no transposes of the (q_len, kv_len) score matrix.
  qh = q.reshape(b, lq, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)  # (batch, kv_heads, groups, q_len, hd)
  kh = k.transpose(0, 2, 1, 3)  # (batch, kv_heads, kv_len, head_dim)
  vh = v.transpose(0, 2, 1, 3)
  scores = jnp.einsum("bkgqd,bksd->bkgqs", qh, kh, preferred_element_type=jnp.float32) * scale
  # (batch, kv_heads, groups, q_len, kv_len); fully masked rows (padding queries) become uniform, not NaN.
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  # Softmax over (rows, kv_len): the same values, but XLA:CPU turned the 5-D form's backward row sums into
  # one YNNPACK reduction that took ~3.5 ms of the tiny model's 15 ms train step (the 2-D form: ~0.3 ms).
  probs = jax.nn.softmax(scores.reshape(-1, scores.shape[-1]), axis=-1).reshape(scores.shape).astype(v.dtype)
  out = jnp.einsum("bkgqs,bksd->bkgqd", probs, vh)  # (batch, kv_heads, groups, q_len, head_dim)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)


def causal_mask(attention_mask: jax.Array, q_slots: jax.Array, kv_len: int) -> jax.Array:
  """Key j is visible to query i iff j <= slot(i), key j is not padding, and both are in one segment.

  attention_mask: (batch, kv_len) 0 for padding, else the token's segment id: 1 everywhere for plain
  rows, 1, 2, 3, ... for the examples packed into a row (the data pipeline's packing). A padding
  query (segment 0) sees every earlier real key, so with 0/1 masks this is the plain causal-padding
  mask. q_slots: (q_len,) or (batch, q_len) cache slot of each query. Returns (batch, 1, q_len, kv_len) bool.
  """
  kv = jnp.arange(kv_len)
  q_slots = jnp.broadcast_to(q_slots, (attention_mask.shape[0],) + q_slots.shape[-1:])
  visible = kv[None, None, :] <= q_slots[:, :, None]  # (batch, q_len, kv_len)
  kv_segment = attention_mask[:, None, :]  # (batch, 1, kv_len)
  q_segment = jnp.take_along_axis(attention_mask, jnp.clip(q_slots, 0, kv_len - 1), axis=1)[:, :, None]
  same_segment = (kv_segment == q_segment) | (q_segment == 0)  # (batch, q_len, kv_len)
  return (visible & (kv_segment != 0) & same_segment)[:, None]


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """Block-diagonal mask: tokens attend within their own segment. (groups, seq) -> (groups, 1, seq, seq)."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
