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
  """The README's computation on transformers' logits, one question and one level word at a time, unpadded."""
  import torch
  from transformers import Qwen2_5_VLForConditionalGeneration
  ref = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, attn_implementation="eager").eval()
  out = []
  for row_images, dimension in zip(images, dimensions):
    processed = [preprocess_image(p, **PIXELS) for p in row_images]
    grids = [tuple(int(x) for x in p["image_grid_thw"][0]) for p in processed]
    prompt, words = level_scores.level_prompt(tokenizer, dimension, grids)
    word_logprobs = []
    for word in words:
      ids = np.concatenate([prompt, word])[None].astype(np.int64)
      with torch.no_grad():
        logits = ref(input_ids=torch.tensor(ids), attention_mask=torch.ones_like(torch.tensor(ids)),
                     pixel_values=torch.tensor(np.concatenate([p["pixel_values"] for p in processed])),
                     image_grid_thw=torch.tensor(np.concatenate([p["image_grid_thw"] for p in processed])),
                     mm_token_type_ids=torch.tensor((ids == ref.config.image_token_id).astype(np.int64))).logits
      logp = torch.log_softmax(logits[0].double(), dim=-1).numpy()  # (seq, vocab)
      n = len(prompt)
      word_logprobs.append(sum(logp[n - 1 + k, int(t)] for k, t in enumerate(word)))
    probs = np.exp(word_logprobs - np.max(word_logprobs))
    out.append(float(probs / probs.sum() @ np.asarray(level_scores.LEVEL_WEIGHTS)))
  return np.asarray(out)


def test_level_scores_equal_transformers_on_the_level_words(exported):
  import eemo_jax
  folder, tokenizer = exported
  photos = sorted(os.path.join(PHOTOS, f) for f in os.listdir(PHOTOS) if f.endswith(".jpg"))[:3]
  images = [[photos[0]], [photos[1]], [photos[2]], [photos[0], photos[1]], [photos[2]]]
  dimensions = ["valence", "arousal", "dominance", "valence", "arousal"]
  with jax.default_matmul_precision("highest"):
    scorer = level_scores.LevelScorer(eemo_jax.load_hf(folder), tokenizer, batch_size=2, **PIXELS)
    ours = scorer(images, dimensions)  # micro-batches of 2 questions (6 rows), left-padded, the last one short
  theirs = _transformers_scores(folder, tokenizer, images, dimensions)
  assert ours.shape == (5,) and np.all((ours >= 0) & (ours <= 1))
  np.testing.assert_allclose(ours, theirs, atol=2e-5)
  assert np.ptp(theirs) > 1e-4  # the questions are told apart: the check is not of a constant


def test_the_prompt_is_the_readmes_question_and_stem(exported):
  _, tokenizer = exported
  prompt, words = level_scores.level_prompt(tokenizer, "valence", [(1, 4, 4)])
  text = tokenizer.decode(prompt.tolist())
  assert "How would you rate the valence this image evokes in the viewer?" in text
  assert text.endswith("The level of valence this image evokes in the viewer is")
  assert [tokenizer.decode(w.tolist()) for w in words] == [" Positive", " Neutral", " Negative"]
  _, words = level_scores.level_prompt(tokenizer, "dominance", [(1, 4, 4), (1, 4, 4)])
  assert [tokenizer.decode(w.tolist()) for w in words] == [" High", " Medium", " Low"]


def test_single_token_words_give_the_softmax_over_their_logits():
  """With one token per word, the score is the README's: softmax over the three next-token logits."""
  logp = np.log(np.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.2]]))  # unnormalised over the vocabulary is fine
  np.testing.assert_allclose(np.asarray(level_scores.scores_from_word_logprobs(logp)), [0.6 + 0.15, 0.5], rtol=1e-6)


def test_an_unknown_dimension_is_refused(exported):
  _, tokenizer = exported
  with pytest.raises(ValueError, match="valence"):
    level_scores.level_prompt(tokenizer, "happiness", [(1, 4, 4)])
