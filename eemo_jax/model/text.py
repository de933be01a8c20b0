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
  k: jax.Array  # (layers, batch, max_len, kv_heads, head_dim), after RoPE
  v: jax.Array  # (layers, batch, max_len, kv_heads, head_dim)

  @classmethod
  def zeros(cls, cfg: TextConfig, batch: int, max_len: int, dtype) -> KVCache:
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


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
    b, l, _ = x.shape
    q = apply_rotary(self.q_proj(x).reshape(b, l, self.heads, self.head_dim), cos, sin)
    k = apply_rotary(self.k_proj(x).reshape(b, l, self.kv_heads, self.head_dim), cos, sin)
    v = self.v_proj(x).reshape(b, l, self.kv_heads, self.head_dim)  # (batch, seq, kv_heads, head_dim)
    if kv is not None:
      k_cache, v_cache = kv
      k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), cache_index, axis=1)
      v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), cache_index, axis=1)
      k, v, kv = k_cache.astype(x.dtype), v_cache.astype(x.dtype), (k_cache, v_cache)
    out = attention(q, k, v, mask, implementation=implementation)
    return self.o_proj(out.reshape(b, l, -1)), kv


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
               output_hidden_states: bool = False):
    """x: (batch, seq, hidden) input embeddings; cos, sin: (batch, seq, head_dim); mask: (batch, 1, seq, kv_len).

    Returns (normed final hidden, per-layer outputs (layers, batch, seq, hidden) or None, new cache).
    """
    impl = self.attention_impl

    def body(layer, h, kv):
      h, kv = layer(h, cos, sin, mask, kv, cache_index, impl)
      return h, (kv, h if output_hidden_states else None)

    xs = None if cache is None else (cache.k, cache.v)
    x, (kv, hidden) = scan_layers(self.layers, body, x, xs, remat=self.remat)
    new_cache = None if cache is None else KVCache(k=kv[0], v=kv[1])
    return self.norm(x), hidden, new_cache
