"""V/A/D scores from level-word probabilities: one forward pass per question, no generation.

EEmo-Bench's README scores assessment from the model's next-token distribution over three level words: the
model is asked "How would you rate the valence this image evokes in the viewer? The level of valence this
image evokes in the viewer is", the probabilities of the level words (valence: Positive / Neutral / Negative)
are renormalised over the three and weighted 1, 0.5 and 0. The result is a score in [0, 1] whose SRCC/PLCC
with the human means are `assessment.level.*`.

Here the question is the user's turn (with the image) and the answer stem is begun as the assistant's, so a
chat model continues its own answer; the words follow "is", so they are read with their leading space. A
word's probability is the product of its tokens' probabilities (the three continuations are rows of one
forward pass): with single-token words, as Qwen's vocabulary has them, that is exactly the README's softmax
over the three next-token logits, and a small vocabulary that splits the words still gives the same quantity.
Arousal and dominance use High / Medium / Low (the README defers their words to the paper, which is not
public in full: inferred).

    scorer = LevelScorer(model, tokenizer, min_pixels=..., max_pixels=...)
    scores = scorer(images_per_question, dimensions)          # (N,) float32 in [0, 1]
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipeline.prompts import encode_chat
from data_pipeline.tasks import VAD_DIMENSIONS
from eemo_jax.eval import prompting
from eemo_jax.model.qwen25vl import Qwen25VL

LEVEL_WORDS = {"valence": ("Positive", "Neutral", "Negative"), "arousal": ("High", "Medium", "Low"),
               "dominance": ("High", "Medium", "Low")}
LEVEL_WEIGHTS = (1.0, 0.5, 0.0)
LEVEL_QUESTION = "Assume you are an expert in emotional psychology. How would you rate the {dimension} {this} evokes in " \
                 "the viewer?"
LEVEL_ANSWER_STEM = "The level of {dimension} {this} evokes in the viewer is"


def level_prompt(tokenizer, dimension: str, image_grid_thw: Sequence[Sequence[int]], *,
                 merge_size: int = 2) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
  """(prompt ids (seq,) int32, the three level words' ids) for `dimension` about one image or a pair."""
  if dimension not in VAD_DIMENSIONS:
    raise ValueError(f"dimension must be one of {VAD_DIMENSIONS}, got {dimension!r}")
  this = "this image" if len(image_grid_thw) == 1 else "this pair of images"
  content = [{"type": "image"} for _ in image_grid_thw] + [
      {"type": "text", "text": LEVEL_QUESTION.format(dimension=dimension, this=this)}]
  chat = encode_chat([{"role": "user", "content": content}], tokenizer, image_grid_thw,
                               merge_size=merge_size, add_generation_prompt=True)
  stem = tokenizer.encode(LEVEL_ANSWER_STEM.format(dimension=dimension, this=this))
  words = tuple(np.asarray(tokenizer.encode(" " + w), np.int32) for w in LEVEL_WORDS[dimension])
  return np.concatenate([chat.input_ids, np.asarray(stem, np.int32)]).astype(np.int32), words


def scores_from_word_logprobs(logprobs) -> jax.Array:
  """(N, 3) log-probabilities of the three level words -> (N,) Σ softmax × (1, 0.5, 0)."""
  return jax.nn.softmax(jnp.asarray(logprobs, jnp.float32), axis=-1) @ jnp.asarray(LEVEL_WEIGHTS, jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _word_logprobs(graphdef, state, inputs, targets, target_mask):
  """(rows,) Σ log p(token) over each row's marked tokens (the level word ending the row)."""
  model = nnx.merge(graphdef, state)
  out = model(inputs.input_ids, inputs.attention_mask, position_ids=inputs.position_ids, vision=inputs.vision)
  logp = jax.nn.log_softmax(out.logits[:, :-1].astype(jnp.float32), axis=-1)  # (rows, seq-1, vocab)
  picked = jnp.take_along_axis(logp, targets[:, 1:, None], axis=-1)[..., 0]  # (rows, seq-1)
  return jnp.sum(jnp.where(target_mask[:, 1:], picked, 0.0), axis=-1)


class LevelScorer:
  """Scores questions in fixed-size micro-batches (three rows each: one per level word), left-padded, with a
  fixed patch budget, so a whole benchmark compiles a handful of shapes."""

  def __init__(self, model: Qwen25VL, tokenizer, *, batch_size: int = 4, min_pixels: int = 56 * 56,
               max_pixels: int = 448 * 448):
    self.graphdef, self.state = nnx.split(model)
    self.config = model.config
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.min_pixels, self.max_pixels = min_pixels, max_pixels
    pad = model.config.pad_token_id
    self.pad_id = int(pad if pad is not None else tokenizer.special.pad)

  def __call__(self, images: Sequence[Sequence], dimensions: Sequence[str]) -> np.ndarray:
    """images[i]: the question's image(s) (paths, bytes, PIL or arrays); dimensions[i]: valence/arousal/dominance."""
    if len(images) != len(dimensions):
      raise ValueError(f"{len(images)} image lists for {len(dimensions)} dimensions")
    out = np.empty((len(images),), np.float32)
    for start in range(0, len(images), self.batch_size):
      stop = min(start + self.batch_size, len(images))
      out[start:stop] = self._batch(images[start:stop], dimensions[start:stop])
    return out

  def _batch(self, images, dimensions) -> np.ndarray:
    v = self.config.vision
    rows, word_lengths = [], []
    for row_images, dimension in zip(images, dimensions):
      processed = prompting.preprocess(row_images, v, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
      grids = [tuple(int(x) for x in p["image_grid_thw"][0]) for p in processed]
      prompt, words = level_prompt(self.tokenizer, dimension, grids, merge_size=v.spatial_merge_size)
      pixels = np.concatenate([p["pixel_values"] for p in processed])
      for word in words:
        rows.append(prompting.PromptRow(input_ids=np.concatenate([prompt, word]), pixel_values=pixels,
                                        image_grid_thw=np.asarray(grids, np.int64), resized_hw=()))
        word_lengths.append(len(word))
    inputs, real = prompting.collate(rows, self.config, batch_size=3 * self.batch_size, pad_id=self.pad_id,
                                     max_pixels=self.max_pixels)
    word_lengths += [word_lengths[-1]] * (3 * self.batch_size - real)
    mask = np.zeros(inputs.input_ids.shape, bool)  # (rows, seq): the level word's tokens, at the row's end
    for r, n in enumerate(word_lengths):
      mask[r, mask.shape[1] - n:] = True
    logprobs = _word_logprobs(self.graphdef, self.state, jax.tree.map(jnp.asarray, inputs),
                              jnp.asarray(inputs.input_ids), jnp.asarray(mask))
    per_word = np.asarray(logprobs)[:real].reshape(-1, 3)  # (questions, 3)
    return np.asarray(scores_from_word_logprobs(per_word))
