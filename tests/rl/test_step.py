"""One GRPO update of the tiny model against transformers + torch + TRL's loss on the same weights, completions
and advantages: the policy gradient through the images and the M-RoPE positions, not just the formula."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from test_logprobs import IMAGE, G, T, group_batch, models  # noqa: F401  (the module-scoped fixture)
from test_policy_loss import trl_loss

torch = pytest.importorskip("torch")

from eemo_jax.hf.keys import canonical_key  # noqa: E402
from eemo_jax.hf.save import hf_tensors  # noqa: E402
from eemo_jax.rl.step import GRPOLossConfig, UpdateBatch, make_grpo_step, make_reference_logprobs  # noqa: E402
from eemo_jax.train.state import create_train_state  # noqa: E402

LOSS = GRPOLossConfig(loss_type="dapo", beta=0.04, epsilon_high=0.28, temperature=0.7, chunk_size=4)


def _torch_logprobs(ref, prompts, batch, temperature):
  """Per-token log-probs (R, T) of the completions, on the repeat-everything batch, with autograd."""
  ids = np.concatenate([np.repeat(prompts["input_ids"], G, 0), batch.completion_ids], axis=1)
  mask = np.concatenate([np.repeat(prompts["attention_mask"], G, 0), batch.completion_mask], axis=1)
  grids = prompts["image_grid_thw"]
  starts = np.cumsum([0] + [int(np.prod(g)) for g in grids])
  pixels, row_grids = [], []
  for images in ([0], [1, 2]):
    for _ in range(G):
      for i in images:
        pixels.append(prompts["pixel_values"][starts[i]:starts[i + 1]])
        row_grids.append(grids[i])
  logits = ref(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
               mm_token_type_ids=torch.tensor((ids == IMAGE) * mask), pixel_values=torch.tensor(np.concatenate(pixels)),
               image_grid_thw=torch.tensor(np.asarray(row_grids))).logits
  length = prompts["input_ids"].shape[1]
  logp = torch.log_softmax(logits[:, length - 1:length - 1 + T].float() / temperature, dim=-1)
  return torch.gather(logp, -1, torch.tensor(batch.completion_ids, dtype=torch.long)[..., None])[..., 0]


def _stacked(update: UpdateBatch) -> UpdateBatch:
  """The update as one micro-batch (a leading axis of 1)."""
  return jax.tree.map(lambda x: np.asarray(x)[None], update)


def test_one_update_equals_transformers_torch_and_trl(models):  # noqa: F811
  ref, model = models
  prompts, group = group_batch(model, seed=1)
  rs = np.random.RandomState(3)
  rows = group.completion_ids.shape[0]
  with torch.no_grad():
    base = _torch_logprobs(ref, prompts, group, LOSS.temperature).numpy()
  # The sampling policy drifted (num_iterations > 1: ratios well off 1, so the clip binds) and a reference.
  old_logp = (base + rs.normal(0, 0.3, base.shape)).astype(np.float32)
  ref_logp = (base + rs.normal(0, 0.2, base.shape)).astype(np.float32)
  advantages = rs.normal(0, 1, rows).astype(np.float32)
  update = UpdateBatch(group=group, advantages=advantages, loss_mask=group.completion_mask.astype(np.float32),
                       old_logp=old_logp, ref_logp=ref_logp)

  # torch: transformers' forward, TRL's loss, one SGD step of size 1 (the update is minus the gradient).
  logp = _torch_logprobs(ref, prompts, group, LOSS.temperature)
  loss, trl_metrics = trl_loss(logp, old_logp, ref_logp, advantages, group.completion_mask,
                               **LOSS.policy_loss_kwargs())
  ref.zero_grad()
  loss.backward()
  expected = {canonical_key(k): (p.detach() - p.grad).numpy() for k, p in ref.named_parameters()}

  optimizer = optax.sgd(1.0)
  graphdef, state = create_train_state(nnx.clone(model), optimizer)
  step = jax.jit(make_grpo_step(graphdef, optimizer, loss=LOSS))
  new_state, metrics = step(state, _stacked(update))
  np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=0, atol=1e-6)
  for name in ("kl", "clip_ratio/region_mean", "clip_ratio/low_mean", "clip_ratio/high_mean"):
    np.testing.assert_allclose(float(metrics[name]), trl_metrics[name], rtol=0, atol=1e-6, err_msg=name)
  assert float(metrics["clip_ratio/region_mean"]) > 0.1  # the comparison covers clipped tokens

  updated = nnx.merge(graphdef, new_state.params, new_state.frozen)
  flat = dict(nnx.to_flat_state(nnx.state(updated, nnx.Param)))
  compared = 0
  for key, value in hf_tensors(updated.config, flat, jnp.float32):
    want = expected[canonical_key(key)]
    np.testing.assert_allclose(np.asarray(value), want, rtol=0, atol=1e-6, err_msg=key)  # measured 1.5e-7; updates up to 0.26
    compared += 1
  assert compared == len(expected)


def test_reference_policy_with_lora_is_the_base_model(models):  # noqa: F811
  """With LoRA, the reference log-probs are the base model's (adapters off), though the adapters are non-zero."""
  from eemo_jax.model.lora import LoraConfig, apply_lora
  _, model = models
  _, group = group_batch(model, seed=2)
  base = nnx.clone(model)
  adapted = nnx.clone(model)
  apply_lora(adapted, LoraConfig(rank=4, alpha=8.0, dropout=0.0, targets=("all-linear",)), nnx.Rngs(0))
  for path, var in nnx.to_flat_state(nnx.state(adapted, nnx.Param)):  # B starts at zero: make the adapters count
    if path[-1] == "lora_b":
      var.set_value(jnp.full(var.get_value().shape, 0.05, jnp.float32))
  graphdef, params, frozen = nnx.split(adapted, nnx.Param, ...)
  with_adapters = make_reference_logprobs(graphdef, loss=LOSS, lora=False, policy=lambda m: m)
  without = make_reference_logprobs(graphdef, loss=LOSS, lora=True, policy=lambda m: m)
  base_graphdef, base_params, base_frozen = nnx.split(base, nnx.Param, ...)
  expected = make_reference_logprobs(base_graphdef, loss=LOSS, lora=False, policy=lambda m: m)(base_params,
                                                                                               base_frozen, group)
  valid = group.completion_mask.astype(bool)
  np.testing.assert_allclose(np.asarray(without(params, frozen, group))[valid], np.asarray(expected)[valid],
                             rtol=0, atol=1e-6)
  assert np.abs(np.asarray(with_adapters(params, frozen, group)) - np.asarray(expected))[valid].max() > 1e-3
