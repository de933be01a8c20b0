"""Level-probability V/A/D scores: the JAX scorer against the same computation on transformers' logits."""

from __future__ import annotations

import dataclasses
import os

import jax
import numpy as np
import pytest
from flax import nnx

from data_pipeline.image_processor import preprocess_image
from eemo_jax.eval import level_scores
from eemo_jax.model.config import preset

PHOTOS = os.path.join(os.path.dirname(os.path.dirname(__file__)), "data", "photos")
PIXELS = dict(min_pixels=56 * 56, max_pixels=112 * 112)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """A random tiny model whose vocabulary is the offline tokenizer's, saved as an HF folder."""
  import eemo_jax
  from data_pipeline.tokenizer import build_offline_tokenizer, load_tokenizer
  from eemo_jax.model.qwen25vl import Qwen25VL
  root = tmp_path_factory.mktemp("level")
  tokenizer = load_tokenizer(build_offline_tokenizer(str(root / "tokenizer")))
  arch = preset("tiny")
  special = tokenizer.special
  arch = dataclasses.replace(arch, text=dataclasses.replace(arch.text, vocab_size=tokenizer.vocab_size),
                             image_token_id=special.image_pad, video_token_id=special.video_pad,
                             vision_start_token_id=special.vision_start, vision_end_token_id=special.vision_end,
                             eos_token_id=special.im_end, pad_token_id=special.endoftext)
  model = Qwen25VL(arch, rngs=nnx.Rngs(3))
  folder = str(root / "hf")
  eemo_jax.save_hf(model, folder)
  return folder, tokenizer


def _transformers_scores(folder, tokenizer, images, dimensions):
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
  level_ids = level_scores.level_token_ids(tokenizer)
  out = []
  for row_images, dimension in zip(images, dimensions):  # one question at a time, no padding
    processed = [preprocess_image(p, **PIXELS) for p in row_images]
    grids = [tuple(int(x) for x in p["image_grid_thw"][0]) for p in processed]
    ids = level_scores.level_prompt_ids(tokenizer, dimension, grids)[None].astype(np.int64)
    with torch.no_grad():
      logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                   pixel_values=torch.tensor(np.concatenate([p["pixel_values"] for p in processed])),
                   image_grid_thw=torch.tensor(np.concatenate([p["image_grid_thw"] for p in processed])),
                   mm_token_type_ids=torch.tensor((ids == ref.config.image_token_id).astype(np.int64))).logits
    probs = torch.softmax(logits[0, -1, torch.tensor(level_ids)].double(), dim=-1).numpy()
    out.append(float(probs @ np.asarray(level_scores.LEVEL_WEIGHTS)))
  return np.asarray(out)


def test_level_scores_equal_transformers_softmax_over_the_level_tokens(exported):
  import eemo_jax
  folder, tokenizer = exported
  photos = sorted(os.path.join(PHOTOS, f) for f in os.listdir(PHOTOS) if f.endswith(".jpg"))[:3]
  images = [[photos[0]], [photos[1]], [photos[2]], [photos[0], photos[1]], [photos[2]]]
  dimensions = ["valence", "arousal", "dominance", "valence", "arousal"]
  with jax.default_matmul_precision("highest"):
    scorer = level_scores.LevelScorer(eemo_jax.load_hf(folder), tokenizer, batch_size=2, **PIXELS)
    ours = scorer(images, dimensions)  # micro-batches of 2, left-padded, the last one short
  theirs = _transformers_scores(folder, tokenizer, images, dimensions)
  assert ours.shape == (5,) and np.all((ours >= 0) & (ours <= 1))
  np.testing.assert_allclose(ours, theirs, atol=2e-5)
  assert np.ptp(theirs) > 1e-4  # the questions are told apart: the check is not of a constant


def test_level_tokens_are_three_distinct_first_tokens(exported):
  _, tokenizer = exported
  shared, ids = level_scores.level_tokens(tokenizer)
  assert len(set(ids.tolist())) == 3
  for token, word in zip(ids, level_scores.LEVEL_WORDS):
    assert (" " + word).startswith(tokenizer.decode(shared.tolist() + [int(token)]))


def test_scores_from_logits_weights_the_renormalised_levels():
  logits = np.full((2, 10), -5.0, np.float32)
  logits[0, [1, 2, 3]] = [np.log(0.6), np.log(0.3), np.log(0.1)]  # high, medium, low
  logits[1, 7] = 50.0  # a token that is no level word does not count
  scores = np.asarray(level_scores.scores_from_logits(logits, np.array([1, 2, 3])))
  np.testing.assert_allclose(scores, [0.6 + 0.5 * 0.3, 0.5], rtol=1e-6)


def test_an_unknown_dimension_is_refused(exported):
  _, tokenizer = exported
  with pytest.raises(ValueError, match="valence"):
    level_scores.level_prompt_ids(tokenizer, "happiness", [(1, 4, 4)])
