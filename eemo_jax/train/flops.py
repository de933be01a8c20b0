"""Analytic FLOPs of a forward pass and of a training step, for MFU.

XLA's cost analysis counts the body of a `lax.scan` once, not once per layer, so on a scanned model it
under-reports by about the depth; these counts are what MFU divides by. Conventions:

* a multiply-add is 2 FLOPs; only matmuls (and the patch "convolution") are counted;
* text attention counts the full (seq x seq) score matrices, as computed (causal masking is not
  subtracted), over every position of the padded batch;
* vision attention counts each window and each frame's full attention over its real patches
  (what transformers' eager attention computes per `cu_seqlens` segment), not the padded slots;
* the backward pass costs 2 forwards for a part whose weights train (input and weight gradients),
  1 for a frozen part that a trainable part below it needs gradients through (LoRA's base weights),
  0 for a frozen part with nothing trainable before it (the vision tower in EmoVerse stage 1).
  The patch embedding never needs its input's gradient (the pixels), so it costs at most 1.
  Rematerialised layers (`remat != "none"`) add one forward of the layers; the chunked LM loss
  recomputes the LM head once in the backward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from eemo_jax.model.config import Qwen25VLConfig

PARTS = ("patch_embed", "vision_blocks", "merger", "text", "lm_head", "head")


@dataclasses.dataclass(frozen=True)
class Flops:
  """Forward FLOPs per part of the model, for one (global) batch."""
  patch_embed: float = 0.0
  vision_blocks: float = 0.0  # window and full-attention blocks
  merger: float = 0.0  # patch merger
  text: float = 0.0  # decoder layers
  lm_head: float = 0.0  # vocabulary projection at every position
  head: float = 0.0  # emotion head

  @property
  def total(self) -> float:
    return sum(getattr(self, p) for p in PARTS)


def _window_sizes(t: int, h: int, w: int, config: Qwen25VLConfig) -> list[int]:
  """Patches of each attention window of one image: merged-grid tiles of merged_window² tokens."""
  v = config.vision
  m, vw = v.spatial_merge_size, v.merged_window
  hm, wm = h // m, w // m
  rows = [min(vw, hm - i) for i in range(0, hm, vw)]
  cols = [min(vw, wm - j) for j in range(0, wm, vw)]
  return [r * c * v.merge_unit for r in rows for c in cols] * t


def vision_flops(config: Qwen25VLConfig, image_grid_thw) -> tuple[float, float, float]:
  """(patch embedding, blocks, merger) forward FLOPs for the images `image_grid_thw` (n, 3) of a batch."""
  v = config.vision
  grids = np.asarray(image_grid_thw, np.int64).reshape(-1, 3)
  patches = float(np.prod(grids, axis=1).sum())
  d, inter = v.hidden_size, v.intermediate_size
  per_patch = v.depth * 2 * (4 * d * d + 3 * d * inter)  # qkv, proj, gate/up/down
  windows = sum(n * n for t, h, w in grids for n in _window_sizes(int(t), int(h), int(w), config))
  frames = sum(int(t) * (int(h) * int(w)) ** 2 for t, h, w in grids)
  full_blocks = len(v.fullatt_block_indexes)
  attention = 4 * d * ((v.depth - full_blocks) * windows + full_blocks * frames)  # scores and values
  wide = d * v.merge_unit
  merger = (patches / v.merge_unit) * 2 * (wide * wide + wide * v.out_hidden_size)
  return patches * 2 * v.patch_dim * d, patches * per_patch + attention, merger


def text_flops(config: Qwen25VLConfig, batch: int, seq_len: int) -> tuple[float, float]:
  """(decoder layers, LM head) forward FLOPs for `batch` rows of `seq_len` positions."""
  t = config.text
  d, q = t.hidden_size, t.num_attention_heads * t.head_dim
  kv = t.num_key_value_heads * t.head_dim
  per_token = t.num_hidden_layers * (2 * (d * (q + 2 * kv) + q * d + 3 * d * t.intermediate_size)
                                     + 4 * seq_len * q)
  tokens = batch * seq_len
  return tokens * per_token, tokens * 2 * d * t.vocab_size


def head_flops(head_config, batch: int, seq_len: int) -> float:
  """Forward FLOPs of an `eemo_jax.model.heads.HeadConfig` emotion head."""
  c = head_config
  classifier = 2 * (c.des_dim * c.classifier_hidden + c.classifier_hidden * c.num_classes) if c.classifier_hidden \
      else 2 * c.des_dim * c.num_classes
  if c.kind == "token":  # one position per row
    return batch * (2 * (c.hidden_size * c.projection_hidden + c.projection_hidden * c.des_dim) + classifier)
  d = c.des_dim
  per_token = 2 * (c.hidden_size * c.projection_hidden + c.projection_hidden * d) + 2 * 4 * d * d + 4 * seq_len * d
  return batch * (seq_len * per_token + classifier)


def forward_flops(config: Qwen25VLConfig, *, batch: int, seq_len: int, image_grid_thw=(),
                  head_config=None) -> Flops:
  """Forward FLOPs of the model (and emotion head) on one batch with these images."""
  embed, blocks, merger = vision_flops(config, image_grid_thw) if len(image_grid_thw) else (0.0, 0.0, 0.0)
  text, lm_head = text_flops(config, batch, seq_len)
  head = head_flops(head_config, batch, seq_len) if head_config is not None else 0.0
  return Flops(patch_embed=embed, vision_blocks=blocks, merger=merger, text=text, lm_head=lm_head, head=head)


def train_step_flops(config: Qwen25VLConfig, *, batch: int, seq_len: int, image_grid_thw=(), head_config=None,
                     backward: Mapping[str, float] | None = None, remat: str = "none", lm_loss: bool = True) -> float:
  """FLOPs of one optimizer step over `batch` rows (all microbatches together).

  `backward` maps parts (`PARTS`) to backward-pass cost in forwards (default 2 for every part;
  see the module docstring for 1 and 0). `lm_loss=False` when the LM loss weight is 0 (no LM head).
  """
  factors = {p: 2.0 for p in PARTS}
  unknown = set(backward or {}) - set(PARTS)
  if unknown:
    raise ValueError(f"unknown model part(s) {sorted(unknown)} in `backward`; the parts are {PARTS}")
  factors.update(backward or {})
  factors["patch_embed"] = min(factors["patch_embed"], 1.0)
  fwd = forward_flops(config, batch=batch, seq_len=seq_len, image_grid_thw=image_grid_thw, head_config=head_config)
  total = 0.0
  for part in PARTS:
    if part == "lm_head" and not lm_loss:
      continue
    total += getattr(fwd, part) * (1 + factors[part])
  if remat != "none":
    total += fwd.vision_blocks + fwd.text
  if lm_loss:
    total += fwd.lm_head  # the chunked loss recomputes each chunk's logits in the backward pass
  return total


def mfu(flops_per_step: float, seconds_per_step: float, peak_flops_per_device: float, num_devices: int) -> float:
  """Model FLOPs utilisation: achieved FLOP/s over the devices' peak."""
  return flops_per_step / seconds_per_step / (peak_flops_per_device * num_devices)
