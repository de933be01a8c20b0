"""The Qwen2.5-VL vision tower: patch embedding, windowed/full attention blocks, patch merger.

All images of a batch run as one sequence of static length (the patch budget), laid out in slots
(`positions.VisionLayout`): each attention window fills a fixed number of slots and frames are packed
into fixed-size bins, so window attention is batched over windows and full attention over bins.
Window and full attention blocks share one stacked parameter set; `scan_layer_pattern` runs each
with its own mask and no per-layer branch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from eemo_jax.model import positions
from eemo_jax.model.attention import Implementation, attention, segment_mask
from eemo_jax.model.config import VisionConfig
from eemo_jax.model.layers import Linear, RMSNorm, SwiGLU, scan_layer_pattern, stacked
from eemo_jax.model.rope import rotate_half, vision_cos_sin


@struct.dataclass
class VisionInputs:
  """Static-shape vision inputs in slot order; every index array is computed on the host (`prepare_vision`).

  S_pad is the slot budget, W the slots of one window, F the slots of one full-attention bin.

  `groups` > 1: the arrays are `groups` independent layouts concatenated along their first axis, one
  per block of `batch / groups` consecutive rows (in a multi-host job, one per JAX process, each laid
  out by its own data loader); indices inside each are local to it.
  """
  pixel_values: jax.Array  # (S_pad, patch_dim) float: pixel_values rows placed in their slots, padding zero;
  #                          or uint8 levels of the resized image, with `pixel_levels`
  raster_slot: jax.Array  # (S_pad,) int32: slot of raster patch i (pixel_values row i), then the padding slots
  window_segment_ids: jax.Array  # (S_pad / W, W) int32: window id per slot, -1 padding
  full_segment_ids: jax.Array  # (S_pad / F, F) int32: frame id per slot, -1 padding
  rope_positions: jax.Array  # (S_pad, 2) int32 (h, w) patch ids per slot
  groups: int = struct.field(pytree_node=False, default=1)
  # With uint8 pixel_values: the normalised value of each level per channel, (C, 256) floats (the image
  # processor's rescale + normalise, `data_pipeline.image_processor`). A quarter of float32's bytes cross
  # to the device, and the lookup there gives the float32 pixel_values exactly.
  pixel_levels: tuple[tuple[float, ...], ...] | None = struct.field(pytree_node=False, default=None)

  def float_pixels(self) -> jax.Array:
    """pixel_values as float32 (S_pad, patch_dim): uint8 levels looked up in `pixel_levels`, padding zero."""
    if self.pixel_values.dtype != jnp.uint8:
      return self.pixel_values
    if self.pixel_levels is None:
      raise ValueError("uint8 pixel_values need VisionInputs.pixel_levels, the table of each level's normalised "
                       "value (the data pipeline's pixel_dtype='uint8' fills it)")
    table = np.asarray(self.pixel_levels, np.float32)  # (C, 256)
    s_pad, patch_dim = self.pixel_values.shape
    channel = np.arange(patch_dim) // (patch_dim // len(table))  # (patch_dim,) rows are (C, T, P, P)
    index = self.pixel_values.astype(jnp.int32) + jnp.asarray(256 * channel, jnp.int32)  # (S_pad, patch_dim)
    pixels = jnp.take(jnp.asarray(table.reshape(-1)), index, mode="clip")
    real = (self.window_segment_ids.reshape(s_pad) >= 0)[:, None]  # padding slots stay zero
    return jnp.where(real, pixels, 0.0)


def prepare_vision(pixel_values, image_grid_thw, config: VisionConfig, patch_budget: int | None = None,
                   dtype=np.float32, *, frame_budget: int | None = None) -> VisionInputs:
  """Host side: places `pixel_values` rows into the slot layout (see `positions.vision_layout`)."""
  grid = np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3)
  pixels = np.asarray(pixel_values, dtype=dtype)
  layout = positions.vision_layout(grid, patch_size=config.patch_size,
                                   spatial_merge_size=config.spatial_merge_size,
                                   window_size=config.window_size, patch_budget=patch_budget,
                                   frame_budget=frame_budget)
  n = layout.num_patches
  if pixels.shape != (n, config.patch_dim):
    raise ValueError(f"pixel_values has shape {pixels.shape}, but image_grid_thw {grid.tolist()} needs "
                     f"({n}, {config.patch_dim}) for this model; were they made by this model's processor?")
  slots = np.zeros((layout.patch_budget, config.patch_dim), dtype)  # (S_pad, patch_dim)
  filled = layout.slot_patch >= 0
  slots[filled] = pixels[layout.slot_patch[filled]]
  return VisionInputs(pixel_values=slots, raster_slot=layout.raster_slot,
                      window_segment_ids=layout.window_segment_ids, full_segment_ids=layout.full_segment_ids,
                      rope_positions=layout.rope_positions)


class VisionAttention(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, param_dtype, rngs):
    d = cfg.hidden_size
    # qkv rows are [q (all heads); k; v] as in HF, so one (in, 3*d) kernel keeps the key table 1:1.
    self.qkv = Linear(d, 3 * d, axes=("embed", "qkv"), param_dtype=param_dtype, rngs=rngs)
    self.proj = Linear(d, d, axes=("heads", "embed"), param_dtype=param_dtype, rngs=rngs)
    self.num_heads = cfg.num_heads

  def __call__(self, x, cos, sin, mask, implementation):
    """x: (S_pad, hidden); mask: (groups, 1, G, G) for groups of G consecutive slots (windows or bins)."""
    s, d = x.shape
    groups, size = mask.shape[0], mask.shape[-1]
    # Columns are [q | k | v]. `split` (whose gradient is one concatenation) rather than indexing a
    # (slots, 3, heads, head_dim) view, whose three gradients XLA:CPU padded and summed (~0.4 ms per
    # tiny-model block).
    q, k, v = (a.reshape(s, self.num_heads, d // self.num_heads)  # (slots, heads, head_dim)
               for a in jnp.split(self.qkv(x), 3, axis=-1))
    # HF rotates the vision q/k in fp32 and casts back (spec §4.5).
    q = _rotate_fp32(q, cos, sin)
    k = _rotate_fp32(k, cos, sin)
    q, k, v = (a.reshape(groups, size, self.num_heads, -1) for a in (q, k, v))  # (groups, G, heads, head_dim)
    out = attention(q, k, v, mask, implementation=implementation)
    return self.proj(out.reshape(s, d))


def _rotate_fp32(x, cos, sin):
  xf = x.astype(jnp.float32)
  return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).astype(x.dtype)


class VisionBlock(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, param_dtype, rngs):
    self.norm1 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.attn = VisionAttention(cfg, param_dtype=param_dtype, rngs=rngs)
    self.norm2 = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size, use_bias=True, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x, cos, sin, mask, implementation):
    x = x + self.attn(self.norm1(x), cos, sin, mask, implementation)
    return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
  """RMSNorm, then each 2x2 block of patches (4 consecutive rows) -> one LLM token via an MLP."""

  def __init__(self, cfg: VisionConfig, out_dim: int, *, param_dtype, rngs):
    wide = cfg.hidden_size * cfg.merge_unit
    self.ln_q = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.mlp_0 = Linear(wide, wide, axes=("merge", "mlp"), param_dtype=param_dtype, rngs=rngs)
    self.mlp_2 = Linear(wide, out_dim, axes=("mlp", "embed"), param_dtype=param_dtype, rngs=rngs)
    self.wide = wide

  def __call__(self, x):
    x = self.ln_q(x).reshape(-1, self.wide)  # (merged, 4*hidden)
    return self.mlp_2(jax.nn.gelu(self.mlp_0(x), approximate=False))  # exact erf GELU, as nn.GELU()


class VisionTower(nnx.Module):
  def __init__(self, cfg: VisionConfig, *, param_dtype=jnp.float32, remat: str = "none",
               attention_impl: Implementation = "xla", rngs: nnx.Rngs | None):
    self.config = cfg
    # Conv3d with kernel == stride over flattened patches is a matmul; no bias.
    self.patch_embed = Linear(cfg.patch_dim, cfg.hidden_size, axes=("patch", "embed"), use_bias=False,
                              param_dtype=param_dtype, rngs=rngs)
    self.blocks = stacked(lambda r: VisionBlock(cfg, param_dtype=param_dtype, rngs=r), cfg.depth, rngs)
    self.merger = PatchMerger(cfg, cfg.out_hidden_size, param_dtype=param_dtype, rngs=rngs)
    self.remat = remat
    self.attention_impl = attention_impl

  def __call__(self, inputs: VisionInputs, dtype=jnp.float32, *, return_blocks: bool = False):
    """Returns merged image features (M_pad, out_hidden_size) in raster order; padded rows last.

    With `return_blocks`, also the last block's output (S_pad, hidden) in raster patch order, the
    merger's input (for per-component parity reports).
    """
    cfg = self.config
    unit = cfg.merge_unit
    x = self.patch_embed(inputs.float_pixels().astype(dtype))  # (S_pad, hidden), slot order
    s_pad, d = x.shape
    cos, sin = vision_cos_sin(inputs.rope_positions, cfg.head_dim, cfg.rope_theta)  # (S_pad, head_dim)
    kinds = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes).astype(int)  # 0 window, 1 full
    # Padding slots see only padding, so no softmax row is empty.
    windows = segment_mask(inputs.window_segment_ids)  # (S_pad / W, 1, W, W)
    full = segment_mask(inputs.full_segment_ids)  # (S_pad / F, 1, F, F)
    impl = self.attention_impl
    bodies = (lambda block, h: block(h, cos, sin, windows, impl),
              lambda block, h: block(h, cos, sin, full, impl))
    x = scan_layer_pattern(self.blocks, kinds, bodies, x, remat=self.remat)
    raster_slot = inputs.raster_slot  # (S_pad,)
    if inputs.groups > 1:  # local slot ids -> global: offset each group by its share of the slots
      local = s_pad // inputs.groups
      offsets = local * jnp.arange(inputs.groups)[:, None]
      raster_slot = (raster_slot.reshape(inputs.groups, local) + offsets).reshape(-1)
    merged_slot = raster_slot.reshape(-1, unit)[:, 0] // unit  # (M_pad,) raster merged token -> slot
    merged = self.merger(x)[merged_slot]  # (M_pad, out_hidden), raster order
    if not return_blocks:
      return merged
    return merged, x[raster_slot]
