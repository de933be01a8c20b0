"""The Qwen2 text decoder: GQA with q/k/v biases, M-RoPE, SwiGLU, RMSNorm; layers scanned.

The KV cache holds keys after RoPE (as HF does), so decoding needs only the new token's rotary
position. Cache slots are separate from rotary positions: a slot is where K/V is written and what
the causal mask compares; the rotary position comes from M-RoPE (spec §6.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx, struct

from eemo_jax.model.attention import Implementation, attention
from eemo_jax.model.config import TextConfig
from eemo_jax.model.layers import Embed, Linear, RMSNorm, SwiGLU, scan_layers, stacked
from eemo_jax.model.rope import apply_rotary


@struct.dataclass
class KVCache:
  """Keys (after RoPE) and values of every layer, heads-major so that attention reads them as stored.

  The prefill writes the stacked form (the layers are scanned); one-token decode steps on a CPU use
  `StepCache`, the same per-layer arrays as separate buffers.
  """
  k: jax.Array  # (layers, batch, kv_heads, max_len, head_dim)
  v: jax.Array  # (layers, batch, kv_heads, max_len, head_dim)

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, max_len: int, dtype) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[3]

  def grow(self, extra: int, *, repeats: int = 1) -> KVCache:
    """A prefilled prompt's cache made ready for decoding: each row repeated `repeats` times on
    consecutive rows (a GRPO group shares its prompt's keys and values), then `extra` empty slots."""
    def one(x):  # (layers, batch, kv, len, hd) -> (layers, batch * repeats, kv, len + extra, hd)
      x = x if repeats == 1 else jnp.repeat(x, repeats, axis=1)
      return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, extra), (0, 0)))
    return KVCache(k=one(self.k), v=one(self.v))


@struct.dataclass
class StepCache:
  """The KV cache of one-token decode steps run layer by layer (`TextModel.step`): one buffer per
  layer, so that each step updates its slot in place and reads nothing else; a stacked cache carried
  through the layer scan was sliced, copied, transposed and restacked every step on XLA:CPU."""
  k: tuple[jax.Array, ...]  # per layer (batch, kv_heads, max_len, head_dim)
  v: tuple[jax.Array, ...]

  @classmethod
  def from_stacked(cls, cache: KVCache) -> StepCache:
    layers = cache.k.shape[0]
    return cls(k=tuple(cache.k[i] for i in range(layers)), v=tuple(cache.v[i] for i in range(layers)))


class TextAttention(nnx.Module):
  def __init__(self, cfg: TextConfig, *, param_dtype, rngs):
    d, hd = cfg.hidden_size, cfg.head_dim
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Linear(d, cfg.num_attention_heads * hd, axes=("embed", "q_heads"), **kw)
    self.k_proj = Linear(d, cfg.num_key_value_heads * hd, axes=("embed", "kv_heads"), **kw)
    self.v_proj = Linear(d, cfg.num_key_value_heads * hd, axes=("embed", "kv_heads"), **kw)
    self.o_proj = Linear(cfg.num_attention_heads * hd, d, axes=("q_heads", "embed"), use_bias=False, **kw)
    self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, hd

  def __call__(self, x, cos, sin, mask, kv, cache_index, implementation):
    """kv: None, or this layer's (k, v) cache (batch, kv_heads, max_len, head_dim) with the queries at
    slots cache_index + arange(seq); returns (output, updated cache or None)."""
    b, l, _ = x.shape
    q = apply_rotary(self.q_proj(x).reshape(b, l, self.heads, self.head_dim), cos, sin)
    k = apply_rotary(self.k_proj(x).reshape(b, l, self.kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, l, self.kv_heads, self.head_dim)  # (batch, seq, kv_heads, head_dim)
    if kv is not None:
      k_cache, v_cache = (_write(c, new, cache_index) for c, new in zip(kv, (k, v)))
      kv = (k_cache, v_cache)
      # Back to (batch, max_len, kv_heads, head_dim): attention's own heads-major transpose undoes this
      # one, so XLA reads the cache as it is stored.
      k, v = (c.astype(x.dtype).transpose(0, 2, 1, 3) for c in kv)
    # Slots from 0 and as many keys as queries (no cache, or a prefill filling its whole cache): query i
    # is key i and `causal_mask` hides every later key.
    causal = isinstance(cache_index, int) and cache_index == 0 and k.shape[1] == l
    out = attention(q, k, v, mask, implementation=implementation, causal=causal)
    return self.o_proj(out.reshape(b, l, -1)), kv


def _write(cache: jax.Array, new: jax.Array, slot) -> jax.Array:
  """cache (batch, kv_heads, max_len, head_dim) with new (batch, seq, kv_heads, head_dim) at slots slot.."""
  return jax.lax.dynamic_update_slice_in_dim(cache, new.transpose(0, 2, 1, 3).astype(cache.dtype), slot, axis=2)


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: TextConfig, *, param_dtype, rngs):
    kw = dict(param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.self_attn = TextAttention(cfg, **kw)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=False, **kw)

  def __call__(self, x, cos, sin, mask, kv, cache_index, implementation):
    h, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, cache_index, implementation)
    x = x + h
    return x + self.mlp(self.post_attention_layernorm(x)), kv


class TextModel(nnx.Module):
  """Embedding, scanned decoder layers and the final norm (HF's `model.language_model`)."""

  def __init__(self, cfg: TextConfig, *, param_dtype=jnp.float32, remat: str = "none",
               attention_impl: Implementation = "xla", rngs: nnx.Rngs | None):
    self.config = cfg
    self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, param_dtype=param_dtype, rngs=rngs)
    self.layers = stacked(lambda r: DecoderLayer(cfg, param_dtype=param_dtype, rngs=r), cfg.num_hidden_layers,
                          rngs)
    self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat
    self.attention_impl = attention_impl

  def __call__(self, x, cos, sin, mask, *, cache: KVCache | None = None, cache_index=0,
               output_hidden_states: bool = False, hf_hidden_states: int = 0):
    """x: (batch, seq, hidden) input embeddings; cos, sin: (batch, seq, head_dim); mask: (batch, 1, seq, kv_len).

    Returns (normed final hidden, hidden states or None, new cache). The hidden states are every
    layer's output (layers, batch, seq, hidden) with `output_hidden_states`, or with
    `hf_hidden_states=k` the last k entries of HF's `hidden_states` (k, batch, seq, hidden): the
    outputs of layers N-k+1 .. N-1 (the embeddings count as layer 0) and then the normed final
    state. The emotion head needs only those; a (k-1)-slot scan carry keeps them, instead of one
    activation per layer.
    """
    impl = self.attention_impl
    n, k = self.config.num_hidden_layers, hf_hidden_states
    if not 0 <= k <= n + 1:
      raise ValueError(f"hf_hidden_states={k} must be between 0 and {n + 1} (HF lists the embeddings, "
                       f"then the outputs of the {n} decoder layers, the last one normed)")
    if k and output_hidden_states:
      raise ValueError("pass either output_hidden_states (every layer) or hf_hidden_states (HF's last k), not both")
    first = n + 1 - k  # HF index of the first kept entry; HF entry j > 0 is the output of layer j - 1

    def body(layer, carry, xs):
      h, tail = carry
      kv, index = xs
      h, kv = layer(h, cos, sin, mask, kv, cache_index, impl)
      if k > 1:
        tail = _keep(tail, h, index + 1 - first)
      return (h, tail), (kv, h if output_hidden_states else None)

    tail = None
    if k > 1:
      tail = jnp.zeros((k - 1,) + x.shape, x.dtype)  # (k-1, batch, seq, hidden)
      tail = _keep(tail, x, jnp.asarray(-first))  # the embeddings, when HF's first entry is kept
    xs = (None if cache is None else (cache.k, cache.v), jnp.arange(n))
    (x, tail), (kv, hidden) = scan_layers(self.layers, body, (x, tail), xs, remat=self.remat)
    new_cache = None if cache is None else KVCache(k=kv[0], v=kv[1])
    x = self.norm(x)
    if k:
      hidden = x[None] if tail is None else jnp.concatenate([tail, x[None]], axis=0)
    return x, hidden, new_cache

  def unstacked_layers(self) -> list[DecoderLayer]:
    """The decoder layers as separate modules, each with its own copy of its slice of the stacked weights.

    For decode steps on a CPU (`step`): inside the layer scan XLA:CPU copies each layer's weights out
    of the stacked arrays before every matmul (a dynamic slice it does not fuse into the matmul), every
    step. Sliced once before the decode loop, they are copied once per generation and then only read.
    """
    graphdef, state = nnx.split(self.layers)
    return [nnx.merge(graphdef, jax.tree.map(lambda v: v[i], state)) for i in range(self.config.num_hidden_layers)]

  def step(self, x, cos, sin, mask, *, cache: StepCache, slot, layers) -> tuple[jax.Array, StepCache]:
    """One decode step layer by layer over `layers` (`unstacked_layers()`): the same computation as
    `__call__` with a cache, on per-layer weights and cache buffers. x: (batch, 1, hidden) -> normed hidden."""
    ks, vs = [], []
    for layer, k, v in zip(layers, cache.k, cache.v, strict=True):
      x, (k, v) = layer(x, cos, sin, mask, (k, v), slot, self.attention_impl)
      ks.append(k)
      vs.append(v)
    return self.norm(x), StepCache(k=tuple(ks), v=tuple(vs))


def _keep(tail: jax.Array, h: jax.Array, slot: jax.Array) -> jax.Array:
  """tail[slot] = h when 0 <= slot < len(tail); otherwise the tail is left as it is.

  One (batch, seq, hidden) slice is read and written per layer, in place in the scan carry.
  """
  i = jnp.clip(slot, 0, tail.shape[0] - 1)
  current = jax.lax.dynamic_index_in_dim(tail, i, keepdims=False)
  inside = (slot >= 0) & (slot < tail.shape[0])
  return jax.lax.dynamic_update_index_in_dim(tail, jnp.where(inside, h, current), i, 0)
