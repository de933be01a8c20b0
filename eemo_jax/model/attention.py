"""The one attention function, with an XLA implementation and cuDNN flash attention for GPU.

Both the vision tower (block-diagonal masks from segment ids) and the text decoder (causal plus
padding masks, with or without a KV cache) call `attention`; only the boolean mask differs.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from eemo_jax.kernels import row_matmul

Implementation = Literal["xla", "cudnn"]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
              implementation: Implementation = "xla", causal: bool = False) -> jax.Array:
  """Scaled dot-product attention with grouped KV heads.

  q: (batch, q_len, heads, head_dim); k, v: (batch, kv_len, kv_heads, head_dim);
  mask: bool, broadcastable to (batch, 1, q_len, kv_len), True where the key is visible.
  causal: the caller promises that `mask` hides every key after its query, query i sitting at key
  position i (q_len == kv_len: training, or a forward pass without a KV cache). The mask still
  decides what is visible; the implementations only use the promise to skip the score blocks above
  the diagonal, which the mask would hide anyway (XLA: `causal_chunk_bounds`; cuDNN: `is_causal`).
  Returns (batch, q_len, heads, head_dim) in q's dtype.
  """
  if implementation == "cudnn":  # with is_causal, cuDNN skips the blocks above the diagonal itself
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5, is_causal=causal,
                                        implementation="cudnn")
  if implementation != "xla":
    raise ValueError(f"Unknown attention implementation {implementation!r}; use 'xla' or 'cudnn'")
  if not causal:
    return _xla_attention(q, k, v, mask)
  lq = q.shape[1]
  if k.shape[1] != lq:
    raise ValueError(f"causal=True needs as many queries as keys (query i at key position i), got "
                     f"{lq} queries and {k.shape[1]} keys; with a KV cache, pass causal=False")
  mask = jnp.broadcast_to(mask, (mask.shape[0], 1, lq, lq))
  bounds = causal_chunk_bounds(lq)
  # Queries [start, end) see keys [0, end) at most: each chunk's scores are a (chunk, end) block.
  chunks = [_xla_attention(q[:, start:end], k[:, :end], v[:, :end], mask[..., start:end, :end])
            for start, end in zip(bounds[:-1], bounds[1:])]
  return chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks, axis=1)


def causal_chunk_bounds(length: int, *, min_chunk: int = 40, max_chunks: int = 4, align: int = 8) -> list[int]:
  """Query chunk boundaries [0, ..., length] for causal attention: the chunks' blocks below the diagonal.

  n equal chunks compute (n + 1) / 2n of the full (length, length) score matrix: 3/4 for two,
  5/8 for four. Each chunk is one more set of kernels, so chunks stay at least `min_chunk` queries
  long; boundaries fall on multiples of `align` for vectorised rows. On the tiny model's 130-token
  train step (3 chunks: 67% of the scores) the CPU step's ratio to torch rose from 2.03x to 2.21x
  (README, Performance).
  """
  n = max(1, min(max_chunks, length // min_chunk))
  size = -(-length // n)
  size = -(-size // align) * align
  return list(range(0, length, size)) + [length]


def _xla_attention(q, k, v, mask):
  b, lq, h, d = q.shape
  kv_heads = k.shape[2]
  # Heads-major before the matmuls: query head j*groups + g reads kv head j (HF's repeat_kv, with
  # no copy of K/V), and XLA needs no transposes of the (q_len, kv_len) score matrix.
  qh = q.reshape(b, lq, kv_heads, h // kv_heads, d).transpose(0, 2, 3, 1, 4)  # (batch, kv_heads, groups, q_len, hd)
  kh = k.transpose(0, 2, 1, 3)  # (batch, kv_heads, kv_len, head_dim)
  vh = v.transpose(0, 2, 1, 3)
  out = _attend(qh, kh, vh, jnp.broadcast_to(mask, (b, 1, lq, kh.shape[2])))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, lq, h, d)


def _probabilities(qh: jax.Array, kh: jax.Array, mask: jax.Array) -> jax.Array:
  """fp32 softmax of the masked, scaled scores: (batch, kv_heads, groups, q_len, kv_len)."""
  scale = qh.shape[-1] ** -0.5
  scores = _scores(qh, kh) * scale
  # Fully masked rows (padding queries) become uniform, not NaN.
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  # Softmax over (rows, kv_len): the same values, but XLA:CPU turned the 5-D form's row sums into one
  # slow YNNPACK reduction (~3.5 ms of the tiny model's 15 ms train step; the 2-D form: ~0.3 ms).
  return jax.nn.softmax(scores.reshape(-1, scores.shape[-1]), axis=-1).reshape(scores.shape)


@jax.custom_vjp
def _attend(qh: jax.Array, kh: jax.Array, vh: jax.Array, mask: jax.Array) -> jax.Array:
  """softmax(q k^T * scale, masked) v on heads-major operands; mask (batch, 1, q_len, kv_len) bool.

  The backward pass is written out (it is the standard one) so that every matmul reads its large
  operand, the (q_len, kv_len) matrix, in the layout it is stored in: dK and dV are computed
  transposed, (head_dim, kv_len), so only the small (q_len, head_dim) operands are transposed.
  Left to autodiff, XLA:CPU transposed the score gradient instead, a strided copy that took ~0.5 ms
  per full-attention block of the tiny model (a third of that block's attention time).
  """
  return _attend_forward(qh, kh, vh, mask)[0]


def _attend_forward(qh, kh, vh, mask):
  probs = _probabilities(qh, kh, mask)
  out = _weighted_values(probs.astype(vh.dtype), vh)  # (batch, kv_heads, groups, q_len, hd)
  return out, (qh, kh, vh, mask, probs)


# A CPU decode step (traced inside `row_matmul.in_decode_steps`: one query per row, no gradient) computes
# both products with the row kernel, one (groups, head_dim) x (kv_len, head_dim) product per batch row and
# KV head, reading the cache as stored. XLA:CPU's batched dots read it at ~10 GB/s there: ~130 us of each
# `small` layer's step, most of the step's time outside the weight matmuls (benchmarks/README.md).
def _scores(qh: jax.Array, kh: jax.Array) -> jax.Array:
  """q k^T, unscaled, fp32: (batch, kv_heads, groups, q_len, kv_len)."""
  if row_matmul.applies(qh, kh):
    return row_matmul.row_matmul(qh, kh, layout="out_in")
  return jnp.einsum("bkgqd,bksd->bkgqs", qh, kh, preferred_element_type=jnp.float32)


def _weighted_values(probs: jax.Array, vh: jax.Array) -> jax.Array:
  """probs v: (batch, kv_heads, groups, q_len, head_dim)."""
  if row_matmul.applies(probs, vh):
    return row_matmul.row_matmul(probs, vh)
  return jnp.einsum("bkgqs,bksd->bkgqd", probs, vh)


def _attend_backward(residuals, d_out):
  qh, kh, vh, mask, probs = residuals
  scale = qh.shape[-1] ** -0.5
  d_probs = jnp.einsum("bkgqd,bksd->bkgqs", d_out, vh, preferred_element_type=jnp.float32)
  rows = probs.reshape(-1, probs.shape[-1])  # (rows, kv_len), as in the forward softmax
  d_rows = d_probs.reshape(rows.shape)
  d_scores = rows * (d_rows - jnp.sum(rows * d_rows, axis=-1, keepdims=True))  # softmax backward
  # Masked scores were constants: no gradient (this matters only for fully masked rows, where probs
  # are uniform rather than 0). The scale comes last, as the forward applied it to the scores.
  d_scores = jnp.where(mask[:, :, None], d_scores.reshape(probs.shape), 0.0) * scale
  d_q = jnp.einsum("bkgqs,bksd->bkgqd", d_scores.astype(kh.dtype), kh)
  d_k = jnp.einsum("bkgqd,bkgqs->bkds", qh, d_scores.astype(qh.dtype))  # (batch, kv_heads, hd, kv_len)
  d_v = jnp.einsum("bkgqd,bkgqs->bkds", d_out, probs.astype(d_out.dtype))
  return (d_q.astype(qh.dtype), d_k.swapaxes(-1, -2).astype(kh.dtype), d_v.swapaxes(-1, -2).astype(vh.dtype),
          None)


_attend.defvjp(_attend_forward, _attend_backward)


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
