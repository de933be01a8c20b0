"""V/A/D scores from level-word probabilities: one forward pass per question, no generation.

EEmo-Bench's README scores assessment two ways: from the number a model writes, and, for models whose
numbers are unreliable, from its next-token distribution over level words (as Q-Bench does for quality):
the model is asked to rate the dimension, its answer is begun for it ("The valence of the emotion this image
evokes is"), and the probabilities of the first token of " high", " medium" and " low" are renormalised
over those three and weighted 1, 0.5 and 0. The result is a score in [0, 1] that correlates with the
human mean without any parsing; SRCC/PLCC of it are `assessment.level.*` in the metrics.

    scorer = LevelScorer(model, tokenizer, min_pixels=..., max_pixels=...)
    scores = scorer(images_per_question, dimensions)          # (N,) float32 in [0, 1]

`level_prompt_ids` gives the exact token ids (the test feeds the same ids to transformers and compares).
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

LEVEL_WORDS = ("high", "medium", "low")
LEVEL_WEIGHTS = (1.0, 0.5, 0.0)
LEVEL_QUESTION = ("How would you rate the {dimension} of the emotion this image evokes? "
                  "Answer with one word: high, medium or low.")
LEVEL_QUESTION_PAIR = ("How would you rate the {dimension} of the emotion these two images evoke together? "
                       "Answer with one word: high, medium or low.")
LEVEL_ANSWER_PREFIX = "The {dimension} of the emotion this image evokes is"


def level_tokens(tokenizer) -> tuple[np.ndarray, np.ndarray]:
  """The level words' shared leading tokens and (3,) int32 the first token at which they differ.

  With Qwen's tokenizer " high", " medium" and " low" (they follow "is", so with the space) are single
  tokens and share nothing. A smaller vocabulary may split them ("Ġ", "h", ...): the shared part is then
  appended to the prompt, so that the next-token distribution still tells the three levels apart.
  """
  words = [tokenizer.encode(" " + word) for word in LEVEL_WORDS]
  shared = 0
  while all(len(w) > shared + 1 for w in words) and len({w[shared] for w in words}) == 1:
    shared += 1
  ids = [w[shared] for w in words]
  if len(set(ids)) != len(ids):
    raise ValueError(f"the level words {LEVEL_WORDS} are not told apart by one token in this tokenizer "
                     f"({words}); level scores need three distinct next tokens")
  return np.asarray(words[0][:shared], np.int32), np.asarray(ids, np.int32)


def level_token_ids(tokenizer) -> np.ndarray:
  """(3,) int32: the tokens whose probabilities are the levels' (see `level_tokens`)."""
  return level_tokens(tokenizer)[1]


def level_prompt_ids(tokenizer, dimension: str, image_grid_thw: Sequence[Sequence[int]], *,
                     merge_size: int = 2) -> np.ndarray:
  """(seq,) int32: the chat asking for the level of `dimension`, with the answer begun for the model."""
  if dimension not in VAD_DIMENSIONS:
    raise ValueError(f"dimension must be one of {VAD_DIMENSIONS}, got {dimension!r}")
  question = (LEVEL_QUESTION if len(image_grid_thw) == 1 else LEVEL_QUESTION_PAIR).format(dimension=dimension)
  content = [{"type": "image"} for _ in image_grid_thw] + [{"type": "text", "text": question}]
  chat = encode_chat([{"role": "user", "content": content}], tokenizer, image_grid_thw, merge_size=merge_size,
                     add_generation_prompt=True)
  prefix = tokenizer.encode(LEVEL_ANSWER_PREFIX.format(dimension=dimension))
  shared, _ = level_tokens(tokenizer)
  return np.concatenate([chat.input_ids, np.asarray(prefix, np.int32), shared]).astype(np.int32)


def scores_from_logits(logits: jax.Array, level_ids) -> jax.Array:
  """(N, vocab) next-token logits -> (N,) Σ_level softmax over the three level tokens × its weight."""
  picked = jnp.take(logits.astype(jnp.float32), jnp.asarray(level_ids), axis=-1)  # (N, 3)
  return jax.nn.softmax(picked, axis=-1) @ jnp.asarray(LEVEL_WEIGHTS, jnp.float32)


@functools.partial(jax.jit, static_argnums=0)
def _forward_scores(graphdef, state, inputs, level_ids):
  model = nnx.merge(graphdef, state)
  out = model(inputs.input_ids, inputs.attention_mask, position_ids=inputs.position_ids, vision=inputs.vision,
              logits_for="last")
  return scores_from_logits(out.logits[:, -1], level_ids)


class LevelScorer:
  """Scores questions in fixed-size micro-batches, left-padded, with a fixed patch budget per micro-batch,
  so a whole benchmark compiles a handful of shapes."""

  def __init__(self, model: Qwen25VL, tokenizer, *, batch_size: int = 8, min_pixels: int = 56 * 56,
               max_pixels: int = 448 * 448):
    self.graphdef, self.state = nnx.split(model)
    self.config = model.config
    self.tokenizer = tokenizer
    self.batch_size = batch_size
    self.min_pixels, self.max_pixels = min_pixels, max_pixels
    self.level_ids = level_token_ids(tokenizer)
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
    rows = []
    for row_images, dimension in zip(images, dimensions):
      processed = prompting.preprocess(row_images, v, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
      grids = [tuple(int(x) for x in p["image_grid_thw"][0]) for p in processed]
      rows.append(prompting.PromptRow(
          input_ids=level_prompt_ids(self.tokenizer, dimension, grids, merge_size=v.spatial_merge_size),
          pixel_values=np.concatenate([p["pixel_values"] for p in processed]),
          image_grid_thw=np.asarray(grids, np.int64), resized_hw=()))
    inputs, real = prompting.collate(rows, self.config, batch_size=self.batch_size, pad_id=self.pad_id,
                                     max_pixels=self.max_pixels)
    scores = _forward_scores(self.graphdef, self.state, jax.tree.map(jnp.asarray, inputs), self.level_ids)
    return np.asarray(scores)[:real]
