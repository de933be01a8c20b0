"""Tiny random transformers Qwen2.5-VL models and batches, built locally (never downloaded).

Shared by the model, HF and generation tests: each builds the PyTorch reference it compares against.
"""

from __future__ import annotations

import os

import numpy as np

# Token ids of the tiny vocabulary (128): the last ids are the Qwen special tokens.
IMAGE, VIDEO, VSTART, VEND = 120, 121, 122, 123
EOS = 124


def tiny_hf_config(*, tie: bool = False, fullatt=(1,), window_size: int = 112, depth: int = 3,
                   text_layers: int = 2, eos=None, **text_overrides):
  """The spec's tiny config (§1.5): 2-head vision tower, GQA text decoder with mrope [2, 3, 3]."""
  from transformers import Qwen2_5_VLConfig
  text = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=text_layers,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
              bos_token_id=None, eos_token_id=eos, pad_token_id=None)
  text.update(text_overrides)
  return Qwen2_5_VLConfig(
      text_config=text,
      vision_config=dict(depth=depth, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                         patch_size=14, temporal_patch_size=2, spatial_merge_size=2, window_size=window_size,
                         fullatt_block_indexes=list(fullatt)),
      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND,
      tie_word_embeddings=tie)


def build_hf_model(config, seed: int = 0):
  """A transformers model with random weights, norms and biases randomised too (they init to 1/0)."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  torch.manual_seed(seed)
  model = Qwen2_5_VLForConditionalGeneration(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model.eval()


def save_hf_model(folder: str, config=None, seed: int = 0, **save_kwargs):
  """Builds and saves a tiny model; returns (folder, torch model loaded back with eager attention)."""
  from transformers import Qwen2_5_VLForConditionalGeneration
  config = config if config is not None else tiny_hf_config()
  build_hf_model(config, seed).save_pretrained(folder, **save_kwargs)
  ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
  return folder, ref


def image_row(grids, text_before=(5, 6), text_between=(7,), text_after=(8, 9, 10), merge=2,
              vision_ids=(IMAGE, VSTART, VEND)):
  """Token ids of one sequence: text, then each image as VSTART, pads, VEND, separated by text."""
  image, vstart, vend = vision_ids
  row = list(text_before)
  for n, (t, h, w) in enumerate(grids):
    if n:
      row += list(text_between)
    row += [vstart] + [image] * (t * h * w // merge**2) + [vend]
  return row + list(text_after)


def make_batch(rows_grids, *, pad: str = "left", seed: int = 0, extra_text=None, vision_ids=(IMAGE, VSTART, VEND)):
  """A padded batch: rows_grids[i] lists the (t, h, w) grids of row i (may be empty); `vision_ids` are the
  model's (image pad, vision start, vision end) token ids (the tiny HF config's by default).

  Returns dict(input_ids, attention_mask, pixel_values, image_grid_thw, mm_token_type_ids) as numpy,
  with pixel_values None when no row has an image.
  """
  rs = np.random.RandomState(seed)
  rows = []
  for i, grids in enumerate(rows_grids):
    text = list(rs.randint(0, 100, size=3 + 2 * i)) if extra_text is None else extra_text[i]
    rows.append(image_row(grids, text_after=text, vision_ids=vision_ids) if grids
                else [int(x) for x in rs.randint(0, 100, 6 + i)] + text)
  length = max(len(r) for r in rows)
  ids = np.zeros((len(rows), length), np.int64)
  mask = np.zeros_like(ids)
  for i, r in enumerate(rows):
    sl = slice(length - len(r), length) if pad == "left" else slice(0, len(r))
    ids[i, sl] = r
    mask[i, sl] = 1
  grids = [g for gs in rows_grids for g in gs]
  out = dict(input_ids=ids, attention_mask=mask, pixel_values=None, image_grid_thw=None,
             mm_token_type_ids=(ids == vision_ids[0]).astype(np.int64) * mask)
  if grids:
    patches = sum(t * h * w for t, h, w in grids)
    out["pixel_values"] = rs.randn(patches, 3 * 2 * 14 * 14).astype(np.float32)
    out["image_grid_thw"] = np.array(grids, np.int64)
  return out


def torch_logits(ref, batch, **kwargs):
  import torch
  args = {k: torch.tensor(v) for k, v in batch.items() if v is not None}
  with torch.no_grad():
    return ref(**args, **kwargs).logits.float().numpy()


def tmp_model_dir(tmp_path_factory, name: str) -> str:
  return os.fspath(tmp_path_factory.mktemp(name))
