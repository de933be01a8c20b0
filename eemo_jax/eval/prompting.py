"""Ad-hoc prompts (images given at run time, not a built split) as left-padded model inputs in a few
compiled shapes: what `predict` and the level-probability scorer feed the model.

    rows = [encode_prompt(messages, [path], tokenizer, vision, pixels=(56 * 56, 448 * 448))]
    inputs, real = collate(rows, arch, batch_size=8, pad_id=pad, max_pixels=448 * 448)

Lengths are rounded up to a multiple of `LENGTH_BUCKET` and the patch budget is fixed by `max_pixels`
and the batch size, so a folder of images of any sizes compiles the forward a handful of times.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from data_pipeline.image_processor import preprocess_image
from data_pipeline.prompts import encode_chat
from eemo_jax.model.qwen25vl import ModelInputs, prepare_inputs

LENGTH_BUCKET = 32


@dataclasses.dataclass(frozen=True)
class PromptRow:
  input_ids: np.ndarray  # (seq,) int32, ending where the model continues
  pixel_values: np.ndarray | None  # (patches, C * t * p * p) float32, the row's images in order; None: text only
  image_grid_thw: np.ndarray  # (images, 3) int64
  resized_hw: tuple[tuple[int, int], ...]  # each image's (height, width) after the processor's resize


def preprocess(images: Sequence, vision, *, min_pixels: int, max_pixels: int) -> list[dict]:
  return [preprocess_image(image, min_pixels=min_pixels, max_pixels=max_pixels, patch_size=vision.patch_size,
                           merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size)
          for image in images]


def encode_prompt(messages: list[dict], images: Sequence, tokenizer, vision, *, min_pixels: int, max_pixels: int,
                  suffix: Sequence[int] = ()) -> PromptRow:
  """A chat ending in the assistant cue (plus `suffix` tokens: an answer begun for the model)."""
  processed = preprocess(images, vision, min_pixels=min_pixels, max_pixels=max_pixels)
  grids = [tuple(int(x) for x in p["image_grid_thw"][0]) for p in processed]
  chat = encode_chat(messages, tokenizer, grids, merge_size=vision.spatial_merge_size, add_generation_prompt=True)
  ids = np.concatenate([chat.input_ids, np.asarray(suffix, np.int32)]).astype(np.int32)
  patch = vision.patch_size
  pixels = np.concatenate([p["pixel_values"] for p in processed]) if processed else None
  return PromptRow(input_ids=ids, pixel_values=pixels, image_grid_thw=np.asarray(grids, np.int64).reshape(-1, 3),
                   resized_hw=tuple((g[1] * patch, g[2] * patch) for g in grids))


def collate(rows: Sequence[PromptRow], config, *, batch_size: int, pad_id: int, max_pixels: int) -> tuple[ModelInputs, int]:
  """`batch_size` left-padded rows (the last row repeated to fill a short batch) and how many are real."""
  if not 0 < len(rows) <= batch_size:
    raise ValueError(f"collate takes 1 to {batch_size} rows, got {len(rows)}")
  real = len(rows)
  rows = list(rows) + [rows[-1]] * (batch_size - real)
  length = -(-max(len(r.input_ids) for r in rows) // LENGTH_BUCKET) * LENGTH_BUCKET
  ids = np.full((batch_size, length), pad_id, np.int32)  # (batch, seq)
  mask = np.zeros((batch_size, length), np.int32)
  for i, r in enumerate(rows):
    ids[i, length - len(r.input_ids):], mask[i, length - len(r.input_ids):] = r.input_ids, 1
  v = config.vision
  unit = v.spatial_merge_size ** 2
  per_image = max_pixels // v.patch_size ** 2 + 4 * unit  # the most patches one resized image can have
  images = max(len(r.image_grid_thw) for r in rows)
  if not images:  # text only (the judge's prompts)
    return prepare_inputs(config, ids, mask), real
  budget = -(-batch_size * images * per_image // (unit * 64)) * unit * 64
  inputs = prepare_inputs(config, ids, mask, np.concatenate([r.pixel_values for r in rows if r.pixel_values is not None]),
                          np.concatenate([r.image_grid_thw for r in rows]), patch_budget=budget)
  return inputs, real
