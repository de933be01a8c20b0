"""Qwen2.5-VL composed: the vision tower's features scattered into the `<|image_pad|>` positions.

The module call is traceable (jit it, or call it from a jitted step) when the host-side inputs
are given: `vision=VisionInputs` and `position_ids`. Called HF-style with `pixel_values` and a
concrete `image_grid_thw` instead, it computes those on the host first (`prepare_inputs`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from eemo_jax.model import positions as host_positions
from eemo_jax.model.attention import Implementation, causal_mask
from eemo_jax.model.config import Qwen25VLConfig
from eemo_jax.model.layers import Linear
from eemo_jax.model.rope import mrope_cos_sin
from eemo_jax.model.text import KVCache, TextModel
from eemo_jax.model.vision import VisionInputs, VisionTower, prepare_vision


@struct.dataclass
class ModelOutput:
  logits: jax.Array  # (batch, seq, vocab), or (batch, 1, vocab) with logits_for="last"
  last_hidden_state: jax.Array  # (batch, seq, hidden), after the final norm
  # (layers, batch, seq, hidden), each decoder layer's output (before the final norm); or with
  # hf_hidden_states=k, HF's `hidden_states[-k:]` (k, batch, seq, hidden), the last one normed
  hidden_states: jax.Array | None = None
  cache: KVCache | None = None


@struct.dataclass
class ModelInputs:
  """Everything the jitted forward needs, with static shapes."""
  input_ids: jax.Array  # (batch, seq) int32
  attention_mask: jax.Array  # (batch, seq) int32
  position_ids: jax.Array  # (3, batch, seq) int32, t/h/w
  rope_deltas: jax.Array  # (batch, 1) int32: next text position = valid length + delta
  vision: VisionInputs | None = None


def prepare_inputs(config: Qwen25VLConfig, input_ids, attention_mask=None, pixel_values=None,
                   image_grid_thw=None, *, mm_token_type_ids=None, patch_budget: int | None = None,
                   frame_budget: int | None = None, dtype=np.float32) -> ModelInputs:
  """Host side of a forward pass: M-RoPE positions and the vision layout, from HF processor outputs.

  `patch_budget` / `frame_budget` fix the vision tower's static shapes (see `positions.vision_layout`).
  """
  ids = _host(input_ids, "input_ids").astype(np.int32)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be (batch, seq); got shape {ids.shape}")
  mask = np.ones_like(ids) if attention_mask is None else _host(attention_mask, "attention_mask").astype(np.int32)
  grid = None if image_grid_thw is None else _host(image_grid_thw, "image_grid_thw").astype(np.int64)
  if (pixel_values is None) != (grid is None):
    raise ValueError("pixel_values and image_grid_thw must be given together")
  pos, deltas = host_positions.get_rope_index(
      ids, mask, grid, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
      spatial_merge_size=config.vision.spatial_merge_size,
      mm_token_type_ids=None if mm_token_type_ids is None else _host(mm_token_type_ids, "mm_token_type_ids"),
      tokens_per_second=config.vision.tokens_per_second)
  vision = None
  if grid is not None:
    vision = prepare_vision(_host(pixel_values, "pixel_values"), grid, config.vision, patch_budget, dtype=dtype,
                            frame_budget=frame_budget)
  return ModelInputs(input_ids=ids, attention_mask=mask, position_ids=pos.astype(np.int32),
                     rope_deltas=deltas.astype(np.int32), vision=vision)


def _host(x, name):
  try:
    return np.asarray(x)
  except jax.errors.TracerArrayConversionError:
    raise ValueError(f"{name} is a traced value: inside jit, pass precomputed `position_ids` and "
                     "`vision=` (see eemo_jax.model.prepare_inputs) instead of image_grid_thw") from None


class Qwen25VL(nnx.Module):
  """Qwen2_5_VLForConditionalGeneration in Flax NNX; parameter names follow HF's modules."""

  def __init__(self, config: Qwen25VLConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: str = "none", attention_impl: Implementation = "xla", rngs: nnx.Rngs | None):
    self.config = config
    self.dtype = jnp.dtype(dtype)
    kw = dict(param_dtype=param_dtype, remat=remat, attention_impl=attention_impl, rngs=rngs)
    self.visual = VisionTower(config.vision, **kw)
    self.language_model = TextModel(config.text, **kw)
    self.lm_head = None if config.tie_word_embeddings else Linear(
        config.text.hidden_size, config.text.vocab_size, axes=("embed", "vocab"), use_bias=False,
        param_dtype=param_dtype, rngs=rngs)

  def __call__(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
               position_ids=None, vision: VisionInputs | None = None, mm_token_type_ids=None,
               patch_budget: int | None = None, frame_budget: int | None = None,
               cache: KVCache | None = None, cache_index=0,
               logits_for: str = "all", output_hidden_states: bool = False,
               hf_hidden_states: int = 0, inputs_embeds: jax.Array | None = None) -> ModelOutput:
    """Forward pass with HF argument names.

    With a `cache`, `attention_mask` covers the cache slots (batch, max_len) and the queries sit at
    slots `cache_index + arange(seq)`; without one it is the usual (batch, seq) padding mask.
    `hf_hidden_states=k` puts the last k entries of transformers' `output_hidden_states=True` tuple
    in `hidden_states`, without keeping every layer's output (the emotion head averages the last 4).
    `inputs_embeds` (batch, seq, hidden), as HF: embeddings made beforehand with `embed` (GRPO embeds each
    prompt's images once and repeats the embeddings for the prompt's completions); `input_ids` then only
    give the shape and `vision` must be None.
    """
    if pixel_values is not None and vision is None:
      prepared = prepare_inputs(self.config, input_ids, attention_mask, pixel_values, image_grid_thw,
                                mm_token_type_ids=mm_token_type_ids, patch_budget=patch_budget,
                                frame_budget=frame_budget)
      vision = prepared.vision
      if position_ids is None:
        position_ids = prepared.position_ids
    input_ids = jnp.asarray(input_ids)
    b, l = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, l), jnp.int32)
    attention_mask = jnp.asarray(attention_mask)
    if position_ids is None:
      if cache is not None:
        raise ValueError("position_ids are required with a KV cache (see eemo_jax.generate)")
      # Text only: positions count real tokens, so left padding does not shift them.
      text_pos = jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0)
      position_ids = jnp.broadcast_to(text_pos, (3, b, l))
    position_ids = jnp.asarray(position_ids)
    if position_ids.shape[0] == 4:  # HF's 4-row layout: [text positions; t; h; w]
      position_ids = position_ids[1:]

    if inputs_embeds is not None:
      if vision is not None:
        raise ValueError("pass the images either through vision= or already in inputs_embeds, not both")
      embeds = inputs_embeds.astype(self.dtype)
    else:
      embeds = self.embed(input_ids, vision)
    cfg = self.config.text
    cos, sin = mrope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, self.dtype)
    mask = causal_mask(attention_mask, cache_index + jnp.arange(l), attention_mask.shape[1])
    hidden, per_layer, cache = self.language_model(embeds, cos, sin, mask, cache=cache, cache_index=cache_index,
                                                   output_hidden_states=output_hidden_states,
                                                   hf_hidden_states=hf_hidden_states)
    head_in = hidden[:, -1:] if logits_for == "last" else hidden
    return ModelOutput(logits=self.logits(head_in), last_hidden_state=hidden, hidden_states=per_layer,
                       cache=cache)

  def embed(self, input_ids: jax.Array, vision: VisionInputs | None) -> jax.Array:
    """Token embeddings with image features placed at the image-pad tokens, in row-major order."""
    embeds = self.language_model.embed_tokens(input_ids, self.dtype)  # (batch, seq, hidden)
    if vision is None:
      return embeds
    features = self.visual(vision, self.dtype).astype(self.dtype)  # (M_pad, hidden), raster order
    is_image = input_ids == self.config.image_token_id
    # masked_scatter semantics: the k-th image-pad token (scanning b, then l) takes feature row k;
    # with several vision groups, counted within each group's rows and its share of the features.
    groups = vision.groups
    per_group = is_image.reshape(groups, -1)  # (groups, rows/groups * seq)
    offsets = (features.shape[0] // groups) * jnp.arange(groups)[:, None]
    index = (jnp.cumsum(per_group, axis=1) - 1 + offsets).reshape(is_image.shape)
    picked = jnp.take(features, jnp.clip(index, 0, features.shape[0] - 1), axis=0)
    return jnp.where(is_image[..., None], picked, embeds)

  def logits(self, hidden: jax.Array) -> jax.Array:
    if self.lm_head is None:
      return self.language_model.embed_tokens.attend(hidden)
    return self.lm_head(hidden)
