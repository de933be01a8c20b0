"""EmoVerse emotion heads on Qwen2.5-VL hidden states: the DES vector and the 8-way CES logits.

Two variants of the authors' code (papers.md §2.2), both built here from the same parts:

* `pooled`, EmoVerse's `ClassifyModelImprove` (training/qwenvl/model/qwen_classify.py), the likely
  source of the released DES: the mean of HF's last 4 `hidden_states` -> Linear(H, H)-ReLU-Dropout-
  Linear(H, H/2)-ReLU-Dropout -> 8-head self-attention over the tokens -> mean over the tokens = DES
  (H/2 = 1024 for the 3B) -> Linear(DES, H/4)-ReLU-Dropout(0.2)-Linear(H/4, 8) = CES logits.
* `token`, `EmotionHead` of src/emoverse_model/LoRA_new.py: the last hidden state at the dedicated
  `[EMO]` token -> Linear(H, 2048)-GELU-LayerNorm-Linear(2048, 1024) -> L2-normalised DES ->
  Linear(1024, 8). A row without the token reads position 0, as the authors' `argmax` does.

Padding in the pooled head. The authors drop each row's padded tokens, left-align the real ones and
zero-pad the batch to its longest row; those zero rows then pass through the projection, are
attended to (no key mask) and are counted in the mean, so a row's DES depends on the other rows of
its batch. The default here (`mask_padding=True`) masks padded keys and averages real tokens only:
a row's DES is what the authors compute for that row alone. `mask_padding=False` reproduces the
authors' batch computation exactly.

Dropout follows the authors' placement, except in the self-attention: `nn.MultiheadAttention` drops
attention probabilities, which the project's one `attention` function does not expose, so the
attended values are dropped instead (before the output projection). Evaluation is unaffected.

Axes: K hidden states averaged, B batch, S sequence, H LLM hidden size, D DES size, C classes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx, struct

from eemo_jax.model.attention import attention
from eemo_jax.model.layers import Linear
from eemo_jax.model.qwen25vl import Qwen25VL

KINDS = ("pooled", "token")


@dataclasses.dataclass(frozen=True)
class HeadConfig:
  """Shape and behaviour of an emotion head; the defaults are the authors' pooled head for the 3B."""
  kind: str = "pooled"  # "pooled" (ClassifyModelImprove) or "token" (the [EMO]-token EmotionHead)
  hidden_size: int = 2048  # H, the LLM's hidden size
  des_dim: int = 1024  # D: pooled H/2; token 1024
  projection_hidden: int = 2048  # width of the first Linear: pooled H; token 2048
  num_attention_heads: int = 8  # pooled self-attention heads
  classifier_hidden: int = 512  # pooled H/4; 0 = one Linear(D, C) (the token variant's `Classifier`)
  num_classes: int = 8  # the Mikels CES categories
  projection_dropout: float = 0.1
  attention_dropout: float = 0.1
  classifier_dropout: float = 0.2
  num_hidden_layers_mean: int = 4  # pooled: how many of HF's last hidden states are averaged
  emo_token_id: int | None = None  # token: id of the dedicated `[EMO]` token
  mask_padding: bool = True  # pooled: False = the authors' zero-padded batch (see the module docstring)
  layer_norm_eps: float = 1e-5  # token: torch.nn.LayerNorm's default

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"HeadConfig.kind is {self.kind!r}; use one of {KINDS}")
    if self.kind == "pooled" and self.des_dim % self.num_attention_heads:
      raise ValueError(f"des_dim {self.des_dim} is not divisible by num_attention_heads {self.num_attention_heads}")
    if self.kind == "pooled" and self.num_hidden_layers_mean < 1:
      raise ValueError(f"num_hidden_layers_mean must be >= 1; got {self.num_hidden_layers_mean}")
    if self.kind == "token" and self.emo_token_id is None:
      raise ValueError("the token head needs emo_token_id, the id of the [EMO] token it reads")
    for name in ("projection_dropout", "attention_dropout", "classifier_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"HeadConfig.{name} must be in [0, 1); got {getattr(self, name)}")

  @classmethod
  def pooled(cls, hidden_size: int, **overrides) -> HeadConfig:
    """The authors' `ClassifyModelImprove` widths for an LLM of `hidden_size`: H, H/2, H/4."""
    widths = dict(hidden_size=hidden_size, projection_hidden=hidden_size, des_dim=hidden_size // 2,
                  classifier_hidden=hidden_size // 4)
    return cls(kind="pooled", **{**widths, **overrides})

  @classmethod
  def token(cls, hidden_size: int, emo_token_id: int, **overrides) -> HeadConfig:
    """The authors' `EmotionHead` + `Classifier`: 2048 wide, 1024-d DES, no dropout, one Linear to the classes."""
    fields = dict(kind="token", hidden_size=hidden_size, emo_token_id=emo_token_id, projection_hidden=2048,
                  des_dim=1024, classifier_hidden=0, projection_dropout=0.0, attention_dropout=0.0,
                  classifier_dropout=0.0)
    return cls(**{**fields, **overrides})

  @property
  def hidden_states_needed(self) -> int:
    """How many of HF's last hidden states the head reads (`Qwen25VL(..., hf_hidden_states=k)`)."""
    return self.num_hidden_layers_mean if self.kind == "pooled" else 1

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> HeadConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"Unknown emotion head config field(s) {unknown}; known fields are {sorted(known)}")
    return cls(**d)


@struct.dataclass
class HeadOutput:
  des: jax.Array  # (B, D) the continuous emotion representation
  ces_logits: jax.Array  # (B, C)


# ---------------------------------------------------------------------------- parts
def _linear(d_in: int, d_out: int, axes, *, rngs: nnx.Rngs | None, param_dtype, init: str = "torch") -> Linear:
  """A `Linear` initialised as the authors' torch modules are, since the head trains from scratch.

  "torch": nn.Linear's U(±1/sqrt(in)) for weight and bias; "xavier": MultiheadAttention's in_proj
  (xavier-uniform weight, zero bias); "torch_zero_bias": its out_proj.
  """
  layer = Linear(d_in, d_out, axes=axes, param_dtype=param_dtype, rngs=None)  # zeros
  if rngs is None:
    return layer
  bound = (6.0 / (d_in + d_out)) ** 0.5 if init == "xavier" else d_in ** -0.5
  layer.kernel[...] = jax.random.uniform(rngs.params(), (d_in, d_out), param_dtype, -bound, bound)
  if init == "torch":
    layer.bias[...] = jax.random.uniform(rngs.params(), (d_out,), param_dtype, -bound, bound)
  return layer


def _dropout(rate: float, rngs: nnx.Rngs | None) -> nnx.Dropout:
  """Active by default (as nnx.Dropout), except in a shell built without rngs."""
  return nnx.Dropout(rate, deterministic=rngs is None, rngs=rngs if rate > 0 else None)


class LayerNorm(nnx.Module):
  """torch.nn.LayerNorm over the last axis, normalised in fp32."""

  def __init__(self, dim: int, *, eps: float, param_dtype):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(None,))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), axes=(None,))
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    h = x.astype(jnp.float32)
    h = (h - h.mean(-1, keepdims=True)) * jax.lax.rsqrt(h.var(-1, keepdims=True) + self.eps)
    return (h * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class PooledProjection(nnx.Module):
  """Linear(H, P)-ReLU-Dropout-Linear(P, D)-ReLU-Dropout, per token (the authors' `feature_projection`)."""

  def __init__(self, cfg: HeadConfig, *, rngs, param_dtype):
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.fc1 = _linear(cfg.hidden_size, cfg.projection_hidden, ("embed", "mlp"), **kw)
    self.fc2 = _linear(cfg.projection_hidden, cfg.des_dim, ("mlp", None), **kw)
    self.dropout1 = _dropout(cfg.projection_dropout, rngs)
    self.dropout2 = _dropout(cfg.projection_dropout, rngs)

  def __call__(self, x, deterministic):
    x = self.dropout1(jax.nn.relu(self.fc1(x)), deterministic=deterministic)
    return self.dropout2(jax.nn.relu(self.fc2(x)), deterministic=deterministic)


class SelfAttention(nnx.Module):
  """`nn.MultiheadAttention(D, heads, batch_first=True)` self-attention, with a key padding mask."""

  def __init__(self, cfg: HeadConfig, *, rngs, param_dtype):
    d = cfg.des_dim
    # in_proj columns are [q | k | v], heads contiguous in each, as torch's in_proj_weight rows.
    self.in_proj = _linear(d, 3 * d, (None, "qkv"), rngs=rngs, param_dtype=param_dtype, init="xavier")
    self.out_proj = _linear(d, d, ("heads", None), rngs=rngs, param_dtype=param_dtype, init="torch_zero_bias")
    self.dropout = _dropout(cfg.attention_dropout, rngs)
    self.num_heads = cfg.num_attention_heads

  def __call__(self, x, keys_visible, deterministic):
    """x: (B, S, D); keys_visible: (B, S) bool. Returns (B, S, D)."""
    b, s, d = x.shape
    qkv = self.in_proj(x).reshape(b, s, 3, self.num_heads, d // self.num_heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, S, heads, head_dim)
    out = attention(q, k, v, keys_visible[:, None, None, :])  # (B, S, heads, head_dim)
    return self.out_proj(self.dropout(out.reshape(b, s, d), deterministic=deterministic))


class TokenProjection(nnx.Module):
  """Linear(H, P)-GELU-LayerNorm(P)-Linear(P, D), then L2 normalisation (the authors' `EmotionHead`)."""

  def __init__(self, cfg: HeadConfig, *, rngs, param_dtype):
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.fc1 = _linear(cfg.hidden_size, cfg.projection_hidden, ("embed", "mlp"), **kw)
    self.norm = LayerNorm(cfg.projection_hidden, eps=cfg.layer_norm_eps, param_dtype=param_dtype)
    self.fc2 = _linear(cfg.projection_hidden, cfg.des_dim, ("mlp", None), **kw)

  def __call__(self, h):
    z = self.fc2(self.norm(jax.nn.gelu(self.fc1(h), approximate=False)))  # exact erf GELU, as nn.GELU()
    zf = z.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(zf * zf, axis=-1, keepdims=True))
    return (zf / jnp.maximum(norm, 1e-12)).astype(z.dtype)  # F.normalize(z, dim=-1)


class Classifier(nnx.Module):
  """DES -> CES logits: Linear-ReLU-Dropout-Linear, or one Linear when `classifier_hidden` is 0."""

  def __init__(self, cfg: HeadConfig, *, rngs, param_dtype):
    kw = dict(rngs=rngs, param_dtype=param_dtype)
    self.hidden = cfg.classifier_hidden
    if self.hidden:
      self.fc1 = _linear(cfg.des_dim, self.hidden, (None, "mlp"), **kw)
      self.dropout = _dropout(cfg.classifier_dropout, rngs)
      self.fc2 = _linear(self.hidden, cfg.num_classes, ("mlp", None), **kw)
    else:
      self.fc = _linear(cfg.des_dim, cfg.num_classes, (None, None), **kw)

  def __call__(self, des, deterministic):
    if not self.hidden:
      return self.fc(des)
    return self.fc2(self.dropout(jax.nn.relu(self.fc1(des)), deterministic=deterministic))


# ---------------------------------------------------------------------------- the head
class EmotionHead(nnx.Module):
  """DES and CES logits from HF-style hidden states; parameters fp32, compute in the hidden states' dtype.

  Dropout is active unless `deterministic=True` is passed or set (`nnx.view(head, deterministic=True)`);
  it draws from the `dropout` (or `default`) stream of the `rngs` given here. `rngs=None` builds a
  zero-initialised shell with dropout off (for loading).
  """

  def __init__(self, config: HeadConfig, *, rngs: nnx.Rngs | None, param_dtype=jnp.float32):
    self.config = config
    kw = dict(rngs=rngs, param_dtype=jnp.dtype(param_dtype))
    if config.kind == "pooled":
      self.projection = PooledProjection(config, **kw)
      self.attention = SelfAttention(config, **kw)
    else:
      self.projection = TokenProjection(config, **kw)
    self.classifier = Classifier(config, **kw)

  def __call__(self, hidden_states: jax.Array, attention_mask: jax.Array, input_ids: jax.Array | None = None, *,
               deterministic: bool | None = None) -> HeadOutput:
    """hidden_states: (K, B, S, H), HF's `hidden_states[-K:]` (`Qwen25VL(..., hf_hidden_states=K)`);
    attention_mask: (B, S), 1 for real tokens; input_ids: (B, S), needed by the token head."""
    cfg = self.config
    if hidden_states.ndim != 4 or hidden_states.shape[-1] != cfg.hidden_size:
      raise ValueError(f"hidden_states must be (K, batch, seq, {cfg.hidden_size}); got {hidden_states.shape}")
    if cfg.kind == "pooled":
      des = self._pooled(hidden_states, attention_mask.astype(bool), deterministic)
    else:
      if input_ids is None:
        raise ValueError("the token head needs input_ids to find the [EMO] token")
      des = self._token(hidden_states[-1], input_ids)
    return HeadOutput(des=des, ces_logits=self.classifier(des, deterministic))

  def _pooled(self, hidden_states, valid, deterministic):
    k = self.config.num_hidden_layers_mean
    if hidden_states.shape[0] != k:
      raise ValueError(f"the pooled head averages HF's last {k} hidden states; got {hidden_states.shape[0]}")
    fused = jnp.mean(hidden_states.astype(jnp.float32), axis=0).astype(hidden_states.dtype)  # (B, S, H)
    if not self.config.mask_padding:
      fused, valid = pack_like_authors(fused, valid)
    x = self.projection(fused, deterministic)  # (B, S, D)
    x = self.attention(x, valid, deterministic)
    count = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1).astype(x.dtype)  # (B, 1)
    return jnp.sum(jnp.where(valid[..., None], x, 0), axis=1) / count  # (B, D)

  def _token(self, last_hidden, input_ids):
    position = jnp.argmax(input_ids == self.config.emo_token_id, axis=1)  # (B,) first [EMO]; 0 if none
    h = jnp.take_along_axis(last_hidden, position[:, None, None], axis=1)[:, 0]  # (B, H)
    return self.projection(h)


def pack_like_authors(fused: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """The authors' `_extract_masked_hidden` + zero padding, with static shapes.

  Each row's real tokens move to the front in order, zeros follow, and every row then spans the
  batch's longest row. fused: (B, S, H); valid: (B, S) bool. Returns (packed (B, S, H), span (B, S)).
  """
  seq = fused.shape[1]
  order = jnp.argsort((~valid).astype(jnp.int32), axis=1, stable=True)  # real tokens first
  packed = jnp.take_along_axis(fused, order[..., None], axis=1)
  lengths = jnp.sum(valid, axis=1)  # (B,)
  position = jnp.arange(seq)
  packed = jnp.where((position[None] < lengths[:, None])[..., None], packed, 0)
  span = jnp.broadcast_to(position[None] < jnp.max(lengths), valid.shape)
  return packed, span


# ---------------------------------------------------------------------------- backbone + head
@struct.dataclass
class EmotionOutput:
  logits: jax.Array  # (B, S, vocab) LM logits, or (B, 1, vocab) with logits_for="last"
  des: jax.Array  # (B, D)
  ces_logits: jax.Array  # (B, C)


class EmotionModel(nnx.Module):
  """Qwen2.5-VL and an emotion head in one module: one call gives LM logits, DES and CES logits.

  The backbone keeps only the hidden states the head reads (`hf_hidden_states`), never every
  layer's. Export the parts separately: `save_hf(model.backbone, ...)`, `save_head(model.head, ...)`.
  """

  def __init__(self, backbone: Qwen25VL, head: EmotionHead):
    hidden, layers = backbone.config.text.hidden_size, backbone.config.text.num_hidden_layers
    needed = head.config.hidden_states_needed
    if head.config.hidden_size != hidden:
      raise ValueError(f"the head expects hidden size {head.config.hidden_size}, the backbone has {hidden}; "
                       f"build it with HeadConfig.{head.config.kind}({hidden}, ...)")
    if needed > layers + 1:
      raise ValueError(f"the head averages {needed} hidden states, but a backbone of {layers} decoder layers "
                       f"has only {layers + 1}")
    self.backbone = backbone
    self.head = head

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
               logits_for: str = "all", deterministic: bool | None = None, **backbone_kwargs) -> EmotionOutput:
    """HF processor outputs in, as `Qwen25VL.__call__` (`position_ids`, `vision`, ... pass through).

    `logits_for="last"` skips the (B, S, vocab) LM logits when only the head is trained.
    """
    input_ids = jnp.asarray(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    out = self.backbone(input_ids, attention_mask, pixel_values, image_grid_thw, logits_for=logits_for,
                        hf_hidden_states=self.head.config.hidden_states_needed, **backbone_kwargs)
    head = self.head(out.hidden_states, jnp.asarray(attention_mask), input_ids, deterministic=deterministic)
    return EmotionOutput(logits=out.logits, des=head.des, ces_logits=head.ces_logits)
