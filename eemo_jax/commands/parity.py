"""`eemo-jax parity HF_DIR [--image PATH]`: run EEmo-JAX and transformers on the same inputs and
report the difference of every component, so a researcher can see where (if anywhere) they part.

The reference side is transformers with eager attention in fp32 on CPU; pixel values come from
transformers' own image processor, so the comparison starts from identical model inputs.
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np


def add_arguments(parser, name):
  del name
  parser.add_argument("hf_dir", help="HF Qwen2.5-VL folder (config.json + safetensors)")
  parser.add_argument("--image", help="image file to use (default: a synthetic 224x168 picture)")
  parser.add_argument("--prompt", default="What emotion does this image evoke?",
                      help="text after the image (needs a tokenizer in HF_DIR; else random ids)")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                      help="EEmo-JAX compute/param dtype; the reference always runs fp32")
  parser.add_argument("--max-pixels", type=int, default=448 * 448, help="image processor pixel budget")


@dataclasses.dataclass
class Row:
  component: str
  max_abs: float
  ref_scale: float  # max |reference| of that component, to read max_abs against


def run(args) -> int:
  try:
    rows, kl = compare(args.hf_dir, image=args.image, prompt=args.prompt, dtype=args.dtype,
                       max_pixels=args.max_pixels)
  except (ValueError, FileNotFoundError, ImportError) as e:
    print(f"eemo-jax parity: {e}", file=sys.stderr)
    return 2
  print(f"{'component':<28}{'max |Δ|':>12}{'max |ref|':>12}")
  for r in rows:
    print(f"{r.component:<28}{r.max_abs:>12.3e}{r.ref_scale:>12.3e}")
  print(f"{'logits KL(ref || ours)':<28}{kl:>12.3e}   (mean over valid positions, nats)")
  return 0


def _inputs(hf_dir: str, config, image, prompt: str, max_pixels: int):
  """input_ids/pixel_values for one image + prompt, made by transformers' processor and tokenizer."""
  import os

  from PIL import Image
  from transformers import Qwen2VLImageProcessorPil
  v = config.vision
  if image is None:
    yy, xx = np.mgrid[0:168, 0:224]
    pic = np.stack([xx * 255 // 223, yy * 255 // 167, (xx + yy) * 255 // 390], -1).astype(np.uint8)
    picture = Image.fromarray(pic)
  else:
    picture = Image.open(image).convert("RGB")
  processor = Qwen2VLImageProcessorPil(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                       temporal_patch_size=v.temporal_patch_size,
                                       min_pixels=(v.patch_size * v.spatial_merge_size) ** 2,
                                       max_pixels=max_pixels)
  out = processor(images=[picture], return_tensors="np")
  grid = out["image_grid_thw"]
  n_pad = int(grid.prod() // v.merge_unit)
  if os.path.exists(os.path.join(hf_dir, "tokenizer.json")):
    from transformers import AutoTokenizer
    text = AutoTokenizer.from_pretrained(hf_dir)(prompt)["input_ids"]
  else:
    special = min(config.image_token_id, config.video_token_id, config.vision_start_token_id,
                  config.vision_end_token_id)
    text = list(np.random.RandomState(0).randint(0, min(special, 1000), 16))  # no special ids
  ids = np.array([[config.vision_start_token_id] + [config.image_token_id] * n_pad + [config.vision_end_token_id]
                  + list(text)], np.int64)
  return ids, out["pixel_values"].astype(np.float32), grid


def compare(hf_dir: str, *, image=None, prompt="What emotion does this image evoke?", dtype="float32",
            max_pixels=448 * 448):
  """Per-component max |Δ| of EEmo-JAX against transformers, and the logits' KL divergence."""
  import jax
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration

  from eemo_jax.hf.load import load_hf
  from eemo_jax.model.vision import prepare_vision

  jax.config.update("jax_default_matmul_precision", "highest")
  model = load_hf(hf_dir, dtype=dtype)
  ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_dir, attn_implementation="eager",
                                                           dtype=torch.float32).eval()
  ids, pixels, grid = _inputs(hf_dir, model.config, image, prompt, max_pixels)
  mask = np.ones_like(ids)

  captured = {}

  def keep_merger_input(module, inputs, output):  # returns None: the output is left as it is
    captured.setdefault("blocks", inputs[0])

  hook = ref.model.visual.merger.register_forward_hook(keep_merger_input)
  with torch.no_grad():
    out_ref = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                  pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grid),
                  mm_token_type_ids=torch.tensor((ids == model.config.image_token_id).astype(np.int64)),
                  output_hidden_states=True)
    merged_ref = ref.model.get_image_features(torch.tensor(pixels), torch.tensor(grid))
  hook.remove()
  merged_ref = torch.cat(list(getattr(merged_ref, "pooler_output", merged_ref))).numpy()

  vision = prepare_vision(pixels, grid, model.config.vision)
  merged, blocks = model.visual(vision, model.dtype, return_blocks=True)
  # HF's merger input is in window order, which is our slot order with the padding slots left out.
  window_order = captured["blocks"].numpy()  # (S, hidden)
  in_slot_order = np.argsort(np.asarray(vision.raster_slot)[: len(window_order)])  # raster patch ids, slot order
  blocks_ref = np.empty_like(window_order)
  blocks_ref[in_slot_order] = window_order
  out = model(ids, mask, pixels, grid, output_hidden_states=True)

  def row(name, ours, theirs):
    ours = np.asarray(ours, np.float32)
    return Row(name, float(np.abs(ours - theirs).max()), float(np.abs(theirs).max()))

  rows = [row("vision blocks", blocks[: len(blocks_ref)], blocks_ref),
          row("patch merger", merged[: len(merged_ref)], merged_ref)]
  n_layers = out.hidden_states.shape[0]
  for i in range(n_layers - 1):
    rows.append(row(f"decoder layer {i}", out.hidden_states[i][0], out_ref.hidden_states[i + 1][0].numpy()))
  rows.append(row(f"decoder layer {n_layers - 1} + norm", out.last_hidden_state[0],
                  out_ref.hidden_states[-1][0].numpy()))
  logits_ref = out_ref.logits[0].numpy()
  logits = np.asarray(out.logits[0], np.float32)
  rows.append(row("logits", logits, logits_ref))
  return rows, _kl(logits_ref, logits)


def _kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
  def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  lp, lq = log_softmax(ref_logits), log_softmax(logits)
  return float((np.exp(lp) * (lp - lq)).sum(-1).mean())
