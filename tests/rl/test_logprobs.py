"""GRPO's training forward (`rl.logprobs`) against transformers: the same prompts with images, completions and
weights give the same per-token log-probs, with each prompt's images embedded once for its whole group."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import EOS, IMAGE, make_batch, save_hf_model, tiny_hf_config

torch = pytest.importorskip("torch")

from eemo_jax.hf.load import load_hf  # noqa: E402
from eemo_jax.generate.sampler import next_positions  # noqa: E402
from eemo_jax.model.qwen25vl import prepare_inputs  # noqa: E402
from eemo_jax.rl.logprobs import GroupBatch, completion_logprobs, token_logprobs  # noqa: E402

G, T = 3, 6


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  folder, ref = save_hf_model(str(tmp_path_factory.mktemp("rl_logprobs")), tiny_hf_config(eos=EOS))
  return ref, load_hf(folder)


def group_batch(model, *, seed=0):
  """Two left-padded prompts with images of different sizes, G completions each (one ends early, with EOS)."""
  prompts = make_batch([[(1, 4, 6)], [(1, 8, 4), (1, 2, 2)]], pad="left", seed=seed)
  inputs = prepare_inputs(model.config, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                          prompts["image_grid_thw"])
  rs = np.random.RandomState(seed)
  rows = 2 * G
  completion = rs.randint(0, 100, size=(rows, T)).astype(np.int32)
  mask = np.ones((rows, T), np.int32)
  completion[1, 2], mask[1, 3:] = EOS, 0  # row 1 ends with its EOS at step 2; padding after it
  completion[1, 3:] = 0
  batch = GroupBatch(prompt_ids=inputs.input_ids, prompt_mask=inputs.attention_mask,
                     prompt_positions=inputs.position_ids, next_positions=next_positions(inputs.position_ids),
                     completion_ids=completion, completion_mask=mask, vision=inputs.vision)
  return prompts, batch


def reference_logprobs(ref, prompts, batch: GroupBatch, temperature: float) -> np.ndarray:
  """transformers on the repeat-everything batch: prompt + completion per row, each row with its own images."""
  ids = np.concatenate([np.repeat(prompts["input_ids"], G, 0), batch.completion_ids], axis=1)
  mask = np.concatenate([np.repeat(prompts["attention_mask"], G, 0), batch.completion_mask], axis=1)
  grids = prompts["image_grid_thw"]
  per_prompt = [[0], [1, 2]]  # image rows of each prompt
  sizes = [int(np.prod(g)) for g in grids]
  starts = np.cumsum([0] + sizes)
  pixels, row_grids = [], []
  for images in per_prompt:
    for _ in range(G):
      for i in images:
        pixels.append(prompts["pixel_values"][starts[i]:starts[i + 1]])
        row_grids.append(grids[i])
  with torch.no_grad():
    logits = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 mm_token_type_ids=torch.tensor((ids == IMAGE) * mask),  # transformers 5 needs it for M-RoPE
                 pixel_values=torch.tensor(np.concatenate(pixels)),
                 image_grid_thw=torch.tensor(np.asarray(row_grids))).logits.double().numpy()
  length = prompts["input_ids"].shape[1]
  logits = logits[:, length - 1:length - 1 + T] / temperature
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  return np.take_along_axis(logp, batch.completion_ids[..., None].astype(np.int64), -1)[..., 0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_completion_logprobs_match_transformers(models, temperature):
  ref, model = models
  prompts, batch = group_batch(model)
  logp, entropy = jax.jit(lambda b: completion_logprobs(model, b, temperature=temperature, chunk_size=4))(batch)
  expected = reference_logprobs(ref, prompts, batch, temperature)
  valid = batch.completion_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logp)[valid], expected[valid], rtol=0, atol=3e-6)  # measured 5.5e-7
  assert np.all(np.isfinite(np.asarray(entropy))) and np.all(np.asarray(entropy) >= 0)


def test_token_logprobs_chunks_do_not_change_the_values():
  """Chunked (with a padded last chunk) equals one chunk, and the entropy equals -Σ p log p."""
  rs = np.random.RandomState(0)
  hidden = jnp.asarray(rs.randn(3, 7, 8), jnp.float32)
  head = jnp.asarray(rs.randn(8, 11), jnp.float32)
  tokens = jnp.asarray(rs.randint(0, 11, (3, 7)), jnp.int32)
  project = lambda h: h @ head  # noqa: E731
  one = token_logprobs(hidden, tokens, project, temperature=0.5, chunk_size=7)
  chunked = token_logprobs(hidden, tokens, project, temperature=0.5, chunk_size=3)
  np.testing.assert_allclose(np.asarray(chunked[0]), np.asarray(one[0]), rtol=0, atol=1e-6)
  logits = np.asarray(hidden @ head, np.float64) / 0.5
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(one[0]), np.take_along_axis(logp, np.asarray(tokens)[..., None], -1)[..., 0],
                             rtol=0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(chunked[1]), -(np.exp(logp) * logp).sum(-1), rtol=0, atol=1e-5)
