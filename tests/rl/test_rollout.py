"""Prefix-shared GRPO rollouts (`rl.rollout`) against the plain batch that repeats every prompt G times.

The reference for the shared prefix is the same decode loop run on a batch in which each prompt, its
images and its positions are repeated G times (TRL's way: `_expand_inputs_for_generation`), with the
same per-row keys: the tokens must be the same and the log-probs equal to float rounding. The sampling
log-probs are checked against a full forward of prompt + completion (no cache), and the completion
mask against a NumPy transcription of TRL's `_generate_single_turn` masking (spec §7.2).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import make_batch

from eemo_jax.generate import generate
from eemo_jax.model.attention import causal_mask
from eemo_jax.model.config import preset
from eemo_jax.model.lora import LoraConfig, apply_lora, linear_layers, reseed_lora_dropout
from eemo_jax.model.qwen25vl import Qwen25VL, prepare_inputs
from eemo_jax.model.rope import mrope_cos_sin
from eemo_jax.parallel.sharding import make_mesh
from eemo_jax.rl.rollout import Rollout, completion_mask, make_rollout_fn, rollout

G, T = 3, 10
PAD = 127
EOS_IDS = (3, 17, 40, 41, 42, 77, 90, 101)  # 1/16 of the vocabulary: some rows end, others run to T
SAMPLING = dict(temperature=1.3, top_k=0, top_p=0.95)
PROMPT_IMAGES = [[(1, 4, 6)], [(1, 8, 4), (1, 2, 2)], []]  # two images of other sizes, then text only


@pytest.fixture(scope="module")
def model():
  """The tiny preset with random weights; the LM head scaled so that the logits are far from uniform."""
  m = Qwen25VL(preset("tiny"), rngs=nnx.Rngs(0))
  m.lm_head.kernel[...] = m.lm_head.kernel[...] * 10.0
  return m


@pytest.fixture(scope="module")
def prompts():
  return make_batch(PROMPT_IMAGES, pad="left", seed=3)


def inputs_of(model, batch, **kwargs):
  return prepare_inputs(model.config, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                        batch["image_grid_thw"], mm_token_type_ids=batch["mm_token_type_ids"], **kwargs)


def repeat_everything(batch, group_size):
  """Each prompt row and its images repeated `group_size` times on consecutive rows (no shared prefix)."""
  sizes = [int(np.prod(g)) for g in batch["image_grid_thw"]]
  starts = np.cumsum([0] + sizes)
  first_image = np.cumsum([0] + [len(images) for images in PROMPT_IMAGES])
  pixels, grids = [], []
  for p in range(len(PROMPT_IMAGES)):
    for _ in range(group_size):
      for i in range(first_image[p], first_image[p + 1]):
        pixels.append(batch["pixel_values"][starts[i]:starts[i + 1]])
        grids.append(batch["image_grid_thw"][i])
  out = {k: np.repeat(batch[k], group_size, axis=0) for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
  return dict(out, pixel_values=np.concatenate(pixels), image_grid_thw=np.asarray(grids))


def sampled(model, prompts, key=1, **kwargs):
  kw = dict(group_size=G, max_completion_length=T, rng=jax.random.key(key), eos_ids=EOS_IDS, pad_id=PAD,
            **SAMPLING)
  kw.update(kwargs)
  return rollout(model, inputs_of(model, prompts), **kw)


@pytest.fixture(scope="module")
def shared(model, prompts) -> Rollout:
  return sampled(model, prompts)


def test_prefix_shared_rollout_equals_repeating_everything(model, prompts, shared):
  plain = rollout(model, inputs_of(model, repeat_everything(prompts, G)), group_size=1, max_completion_length=T,
                  rng=jax.random.key(1), eos_ids=EOS_IDS, pad_id=PAD, **SAMPLING)
  np.testing.assert_array_equal(shared.tokens, plain.tokens)
  np.testing.assert_array_equal(shared.mask, plain.mask)
  np.testing.assert_array_equal(shared.truncated, plain.truncated)
  np.testing.assert_allclose(shared.logprobs, plain.logprobs, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(shared.completion_positions(), plain.completion_positions())
  # The fixture is informative: rows end at different steps, some never, and a group's samples differ.
  lengths = np.asarray(shared.mask).sum(1)
  assert len(set(lengths.tolist())) > 2 and np.any(shared.truncated) and not np.all(shared.truncated)
  assert all(len({tuple(r) for r in np.asarray(shared.tokens)[p * G:(p + 1) * G]}) == G for p in range(3))


def reference_mask(tokens, eos_ids):
  """TRL 1.16 `_generate_single_turn`: mask up to and including the first EOS; truncated = no EOS."""
  is_eos = np.isin(tokens, eos_ids)
  eos_idx = np.full(is_eos.shape[0], is_eos.shape[1])
  eos_idx[is_eos.any(axis=1)] = is_eos.argmax(axis=1)[is_eos.any(axis=1)]
  mask = (np.arange(is_eos.shape[1])[None] <= eos_idx[:, None]).astype(np.int32)
  return mask, ~is_eos.any(axis=1)


def test_rollout_masks_padding_and_logprobs_follow_trl(shared):
  tokens, mask = np.asarray(shared.tokens), np.asarray(shared.mask)
  expected_mask, expected_truncated = reference_mask(tokens, EOS_IDS)
  np.testing.assert_array_equal(mask, expected_mask)
  np.testing.assert_array_equal(shared.truncated, expected_truncated)
  assert np.all(tokens[mask == 0] == PAD), "tokens after the EOS are padding"
  logp = np.asarray(shared.logprobs)
  assert np.all(logp[mask == 0] == 0) and np.all(logp[mask == 1] < 0)
  assert shared.tokens.dtype == np.int32 and shared.logprobs.dtype == np.float32
  assert shared.tokens.shape == (3 * G, T) and shared.next_positions.shape == (3, 3)


def test_completion_mask_matches_trl_on_edge_cases():
  tokens = np.array([[5, 3, 3, 9], [5, 6, 7, 8], [3, 1, 1, 1], [6, 6, 6, 17]], np.int32)
  mask, truncated = completion_mask(tokens, np.asarray(EOS_IDS, np.int32))
  expected_mask, expected_truncated = reference_mask(tokens, EOS_IDS)
  np.testing.assert_array_equal(mask, expected_mask)
  np.testing.assert_array_equal(truncated, expected_truncated)


def teacher_forced_logprobs(model, prompts, out: Rollout) -> np.ndarray:
  """log_softmax(logits / T)[token] (R, T) from one full forward of prompt + completion per row, no cache.

  The completions are embedded as text (a sampled image-pad id is a token, not an image): the model's
  own composition (image features at the prompt's image pads, M-RoPE, decoder, LM head) written out.
  """
  repeated = repeat_everything(prompts, G)
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  full = dict(input_ids=np.concatenate([repeated["input_ids"], tokens], axis=1),
              attention_mask=np.concatenate([repeated["attention_mask"], mask], axis=1),
              mm_token_type_ids=np.concatenate([repeated["mm_token_type_ids"], np.zeros_like(tokens)], axis=1),
              pixel_values=repeated["pixel_values"], image_grid_thw=repeated["image_grid_thw"])
  inputs = inputs_of(model, full)
  length = prompts["input_ids"].shape[1]
  # The training forward's completion positions are the rollout's (get_rope_index over the whole row).
  np.testing.assert_array_equal(inputs.position_ids[:, :, length:][:, mask == 1],
                                np.asarray(out.completion_positions())[:, mask == 1])
  logits = _logits(*nnx.split(model), inputs, length)
  logits = np.asarray(logits, np.float64)[:, length - 1:-1] / SAMPLING["temperature"]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  return np.take_along_axis(logits, tokens[..., None].astype(np.int64), -1)[..., 0] - logz


@partial(jax.jit, static_argnums=(0, 3))
def _logits(graphdef, state, inputs, prompt_len):
  model = nnx.merge(graphdef, state)
  ids = inputs.input_ids
  embeds = jnp.concatenate([model.embed(ids[:, :prompt_len], inputs.vision),
                            model.language_model.embed_tokens(ids[:, prompt_len:], model.dtype)], axis=1)
  cfg = model.config.text
  cos, sin = mrope_cos_sin(inputs.position_ids, cfg.head_dim, cfg.rope_theta, cfg.mrope_section, model.dtype)
  mask = causal_mask(inputs.attention_mask, jnp.arange(ids.shape[1]), ids.shape[1])
  hidden, _, _ = model.language_model(embeds, cos, sin, mask)
  return model.logits(hidden)


def test_sampling_logprobs_equal_a_teacher_forced_forward(model, prompts, shared):
  """The rollout and a training forward (prompt + completion, no cache) see the same model."""
  mask = np.asarray(shared.mask) == 1
  expected = teacher_forced_logprobs(model, prompts, shared)
  np.testing.assert_allclose(np.asarray(shared.logprobs)[mask], expected[mask], rtol=0, atol=1e-5)


def test_lora_rollouts_sample_without_dropout(prompts):
  """A LoRA policy (dropout 0.5) rolls out with its adapters on and their dropout off."""
  policy = Qwen25VL(preset("tiny"), rngs=nnx.Rngs(1))
  policy.lm_head.kernel[...] = policy.lm_head.kernel[...] * 10.0
  apply_lora(policy, LoraConfig(rank=4, alpha=8.0, dropout=0.5), nnx.Rngs(2))
  rs = np.random.RandomState(4)
  for _, linear, _ in linear_layers(policy):
    if linear.lora is not None:  # B starts at zero: make the adapters change the model
      linear.lora.lora_b[...] = rs.randn(*linear.lora.lora_b.shape).astype(np.float32) * 0.2
  first = sampled(policy, prompts)
  reseed_lora_dropout(policy, jax.random.key(9))  # other dropout masks, if dropout were on
  again = sampled(policy, prompts)
  np.testing.assert_array_equal(first.tokens, again.tokens)
  np.testing.assert_array_equal(first.logprobs, again.logprobs)
  mask = np.asarray(first.mask) == 1
  expected = teacher_forced_logprobs(nnx.view(policy, deterministic=True), prompts, first)
  np.testing.assert_allclose(np.asarray(first.logprobs)[mask], expected[mask], rtol=0, atol=1e-5)
  base = teacher_forced_logprobs(nnx.view(policy, deterministic=True, lora_enabled=False), prompts, first)
  assert np.abs(base - expected)[mask].max() > 1e-2, "the adapters change the log-probs"


def test_greedy_rollout_equals_generate(model, prompts):
  expected = generate(model, prompts["input_ids"], prompts["attention_mask"], prompts["pixel_values"],
                      prompts["image_grid_thw"], max_new_tokens=T, eos_token_id=list(EOS_IDS), pad_token_id=PAD)
  greedy = sampled(model, prompts, group_size=2, temperature=0.0, top_p=1.0)
  np.testing.assert_array_equal(greedy.tokens, np.repeat(expected, 2, axis=0))
  assert len({tuple(r) for r in expected}) == 3, "the prompts' greedy completions differ"


def test_rows_draw_from_their_own_keys(model, prompts):
  """Prompt 0's completions do not change when other prompts join the batch (row r's key is split(key, R)[r])."""
  alone = {k: v[:1] for k, v in prompts.items() if k not in ("pixel_values", "image_grid_thw")}
  first = int(np.prod(prompts["image_grid_thw"][0]))
  alone.update(pixel_values=prompts["pixel_values"][:first], image_grid_thw=prompts["image_grid_thw"][:1])
  one = sampled(model, alone)
  both = sampled(model, prompts)
  np.testing.assert_array_equal(one.tokens, np.asarray(both.tokens)[:G])
  np.testing.assert_allclose(one.logprobs, np.asarray(both.logprobs)[:G], rtol=0, atol=1e-6)


@pytest.mark.parametrize("mesh_shape", [dict(data=2, fsdp=4), dict(fsdp=8)])
def test_sharded_rollout_equals_unsharded(model, mesh_shape):
  """Two prompts (images of two sizes), 4 completions each: 8 rows, one per device."""
  two = make_batch(PROMPT_IMAGES[:2], pad="left", seed=3)
  kw = dict(group_size=4, max_completion_length=T, **SAMPLING)
  expected = rollout(model, inputs_of(model, two), rng=jax.random.key(2), eos_ids=EOS_IDS, pad_id=PAD, **kw)
  graphdef, state = nnx.split(model)
  fn = make_rollout_fn(graphdef, make_mesh(mesh_shape), **kw)
  out = fn(state, inputs_of(model, two), jax.random.key(2), eos_ids=EOS_IDS, pad_id=PAD)
  np.testing.assert_array_equal(out.tokens, expected.tokens)
  np.testing.assert_array_equal(out.mask, expected.mask)
  # FSDP splits the matmuls' contraction over devices: the fp32 sums add in another order (a few ulps).
  np.testing.assert_allclose(out.logprobs, expected.logprobs, rtol=1e-6, atol=1e-6)
  for rows in (out.tokens, out.mask, out.logprobs, out.truncated):
    assert rows.sharding.shard_shape(rows.shape)[0] == 1, rows.sharding  # one row per device


def test_rollout_lowers_ahead_of_time_on_a_mesh(model, prompts):
  """What `eemo-jax aot` needs: the sharded rollout compiled from abstract weights and inputs."""
  graphdef, state = nnx.split(model)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), inputs_of(model, prompts))
  fn = make_rollout_fn(graphdef, make_mesh(dict(data=2, fsdp=4)), group_size=G, max_completion_length=T, **SAMPLING)
  compiled = fn.lower(abstract, inputs, eos_ids=EOS_IDS, pad_id=PAD).compile()
  assert compiled.memory_analysis().temp_size_in_bytes > 0


def test_repeated_calls_compile_once(model, prompts):
  graphdef, state = nnx.split(model)
  fn = make_rollout_fn(graphdef, group_size=G, max_completion_length=T, **SAMPLING)
  inputs = inputs_of(model, prompts)
  first = fn(state, inputs, jax.random.key(5), eos_ids=EOS_IDS, pad_id=PAD)
  again = fn(state, inputs, jax.random.key(6), eos_ids=[7, 8, 9, 10, 11], pad_id=3)  # traced: key, EOS, pad
  assert fn.compiled_variants() == 1
  assert np.any(np.asarray(first.tokens) != np.asarray(again.tokens))


def test_rollout_validates_its_settings(model, prompts):
  with pytest.raises(ValueError, match="group_size"):
    sampled(model, prompts, group_size=0)
  with pytest.raises(ValueError, match="left-pad"):
    sampled(model, make_batch([[], []], pad="right"))
