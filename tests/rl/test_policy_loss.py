"""The GRPO loss against TRL 1.16 itself: `GRPOTrainer._compute_loss` run on a stand-in trainer.

The stand-in holds only the attributes `_compute_loss` reads (one process, one micro-batch, no
accumulation, no vLLM, no entropy terms) and returns our log-probs from its log-prob method, so the
loss, its gradient with respect to the log-probs and the logged metrics are TRL's own code.
"""

import collections
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")

from eemo_jax import rl  # noqa: E402
from eemo_jax.rl import advantages, losses  # noqa: E402

RTOL = 1e-6
ATOL = 1e-7  # for the gradients of masked tokens (exactly 0 both sides) and sums that cancel


def trl_loss(logp, old_logp, ref_logp, adv, mask, *, loss_type="dapo", epsilon_low=0.2, epsilon_high=None,
             delta=None, beta=0.0, use_bias_correction_kl=True, importance_sampling_level="token",
             max_completion_length=None, num_items_in_batch=None):
  """(loss tensor, metrics) of TRL's `GRPOTrainer._compute_loss` on a stand-in trainer; `logp` is a torch
  tensor (e.g. computed by a transformers model, so the loss backpropagates into it)."""
  mask = torch.tensor(mask, dtype=torch.long)
  logged = {"train": collections.defaultdict(list)}
  trainer = types.SimpleNamespace(
      args=types.SimpleNamespace(use_bias_correction_kl=use_bias_correction_kl, delta=delta, steps_per_generation=1),
      model=types.SimpleNamespace(training=True),
      accelerator=types.SimpleNamespace(num_processes=1, reduce=lambda x, reduction: x, gather=lambda x: x),
      _get_per_token_logps_and_entropies=lambda model, *args, **kwargs: (logp, torch.zeros_like(logp), None),
      loss_type=loss_type, importance_sampling_level=importance_sampling_level, beta=beta,
      epsilon_low=epsilon_low, epsilon_high=epsilon_low if epsilon_high is None else epsilon_high,  # trainer L945-946
      max_completion_length=mask.shape[1] if max_completion_length is None else max_completion_length,
      current_gradient_accumulation_steps=1, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
      use_vllm=False, vllm_importance_sampling_correction=False, _entropy_bonus_enabled=False,
      aux_loss_enabled=False, _metrics=logged)
  inputs = {
      "prompt_ids": torch.zeros((mask.shape[0], 1), dtype=torch.long),
      "prompt_mask": torch.ones((mask.shape[0], 1), dtype=torch.long),
      "completion_ids": torch.zeros(mask.shape, dtype=torch.long), "completion_mask": mask,
      "advantages": torch.tensor(adv),
      # L2498: the generation batch's token count; one process and one micro-batch: this mask's
      "num_items_in_batch": mask.sum() if num_items_in_batch is None else torch.tensor(num_items_in_batch),
  }
  if old_logp is not None:
    inputs["old_per_token_logps"] = torch.tensor(old_logp)
  if ref_logp is not None:
    inputs["ref_per_token_logps"] = torch.tensor(ref_logp)
  loss = trl_grpo.GRPOTrainer._compute_loss(trainer, None, inputs)
  return loss, {k: v[-1] for k, v in logged["train"].items() if k != "entropy"}


def trl_compute_loss(logp, old_logp, ref_logp, adv, mask, **kwargs):
  """(loss, d loss / d logp, metrics) from TRL's `GRPOTrainer._compute_loss` on a stand-in trainer."""
  logp = torch.tensor(logp, requires_grad=True)
  loss, metrics = trl_loss(logp, old_logp, ref_logp, adv, mask, **kwargs)
  loss.backward()
  return loss.item(), logp.grad.numpy(), metrics


def rollout_like(rows=8, length=7, seed=0):
  """Log-probs, a drifted old policy (ratios well outside [0.8, 1.28]), a reference, advantages and a mask.

  Rows: an empty completion (row 1), a full one (row 2), the rest of random lengths; advantages with a
  group of zeros (equal rewards) and both signs.
  """
  rs = np.random.RandomState(seed)
  logp = np.log(rs.uniform(0.05, 0.99, size=(rows, length))).astype(np.float32)
  old_logp = (logp + rs.normal(0, 0.4, size=logp.shape)).astype(np.float32)
  ref_logp = (logp + rs.normal(0, 0.3, size=logp.shape)).astype(np.float32)
  adv = np.array([1.2, -0.7, -0.4, 0.0, 0.0, -1.5, 0.9, -0.2], np.float32)[:rows]
  lengths = np.array([3, 0, length, 1, 5, 2, 6, 4])[:rows]
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  return logp, old_logp, ref_logp, adv, mask


SCENARIOS = {
    # num_iterations == 1, beta 0: TRL's defaults; the ratio is 1 but has a gradient.
    "on_policy": dict(old=False, ref=False, kwargs={}),
    # on-policy with the KL: the bias correction changes the gradient although the ratio is 1.
    "on_policy_kl": dict(old=False, ref=True, kwargs={"beta": 0.04}),
    # num_iterations > 1 with TRL's default clip.
    "off_policy": dict(old=True, ref=False, kwargs={}),
    # DAPO's asymmetric clip, two-sided clipping, KL weighted by the (unbounded) ratio, a longer dr_grpo
    # constant and a generation batch of three such micro-batches for dapo.
    "off_policy_kl": dict(old=True, ref=True, kwargs={"beta": 0.04, "epsilon_high": 0.28, "delta": 1.4,
                                                       "max_completion_length": 16, "num_items_in_batch": 3 * 28}),
    # two-sided clipping with delta under 1 + epsilon_high (so even the clip metrics see the bound), plain k3.
    "off_policy_delta": dict(old=True, ref=True, kwargs={"beta": 0.1, "delta": 1.1, "use_bias_correction_kl": False}),
}

STATIC = ("loss_type", "epsilon_low", "epsilon_high", "delta", "beta", "use_bias_correction_kl",
          "importance_sampling_level", "max_completion_length")
jit_loss = jax.jit(rl.policy_loss, static_argnames=STATIC)
jit_loss_and_grad = jax.jit(jax.value_and_grad(rl.policy_loss, has_aux=True), static_argnames=STATIC)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("importance_sampling_level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_gradient_and_metrics_match_trl(loss_type, importance_sampling_level, scenario):
  logp, old_logp, ref_logp, adv, mask = rollout_like()
  assert mask.sum() == 28  # the count "off_policy_kl"'s num_items_in_batch is three times of
  spec = SCENARIOS[scenario]
  old_logp = old_logp if spec["old"] else None
  ref_logp = ref_logp if spec["ref"] else None
  kwargs = dict(spec["kwargs"], loss_type=loss_type, importance_sampling_level=importance_sampling_level)
  expected_loss, expected_grad, expected_metrics = trl_compute_loss(logp, old_logp, ref_logp, adv, mask, **kwargs)

  (loss, metrics), grad = jit_loss_and_grad(jnp.asarray(logp), None if old_logp is None else jnp.asarray(old_logp),
                                            None if ref_logp is None else jnp.asarray(ref_logp), jnp.asarray(adv),
                                            jnp.asarray(mask), **kwargs)
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad, expected_grad, rtol=RTOL, atol=ATOL)
  assert set(metrics) == set(expected_metrics)
  for name, value in expected_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=RTOL, atol=ATOL, err_msg=name)
  assert np.abs(expected_grad).max() > 1e-3  # the comparison is not of zeros
  if spec["old"] and importance_sampling_level == "token":
    assert 0 < expected_metrics["clip_ratio/region_mean"] < 1  # some tokens clipped, some not


def test_on_policy_loss_by_hand():
  """Ratio 1: each token's loss is -A, its gradient -A / normaliser.

  Tokens: row 0 has 2 with A = 1, row 1 one with A = -0.5; Σ loss = -1.5 over 3 tokens.
  """
  logp = jnp.log(jnp.array([[0.5, 0.2, 0.9, 0.9], [0.3, 0.9, 0.9, 0.9]]))
  mask = jnp.array([[1, 1, 0, 0], [1, 0, 0, 0]])
  adv = jnp.array([1.0, -0.5])
  expected = {  # (loss, gradient of a row-0 token, gradient of the row-1 token)
      "grpo": (-0.25, -1 / 4, 0.5 / 2),  # mean(-2/2, 0.5/1)
      "bnpo": (-0.5, -1 / 3, 0.5 / 3),  # -1.5 / 3
      "dr_grpo": (-1.5 / 8, -1 / 8, 0.5 / 8),  # / (2 rows * 4)
      "dapo": (-0.25, -1 / 6, 0.5 / 6),  # / num_items_in_batch = 6
  }
  for loss_type, (value, grad_0, grad_1) in expected.items():
    num_items = 6 if loss_type == "dapo" else None
    (loss, metrics), grad = jit_loss_and_grad(
        logp, None, None, adv, mask, loss_type=loss_type, num_items_in_batch=num_items)
    np.testing.assert_allclose(loss, value, rtol=RTOL, err_msg=loss_type)
    np.testing.assert_allclose(grad, [[grad_0, grad_0, 0, 0], [grad_1, 0, 0, 0]], rtol=RTOL, err_msg=loss_type)
    assert metrics["clip_ratio/region_mean"] == 0 and "kl" not in metrics


def test_kl_term_and_its_bias_correction_by_hand():
  """p = 1/2, ref = 1/4: k3 = 1/2 + ln 2 - 1 and d k3 / d logp = 1 - 1/2; the ratio's gradient adds k3 itself."""
  logp, ref_logp = jnp.full((1, 2), np.log(0.5)), jnp.full((1, 2), np.log(0.25))
  mask, adv = jnp.array([[1, 0]]), jnp.zeros(1)
  k3 = 0.5 + np.log(2) - 1
  for bias_correction, grad in ((False, 0.5), (True, 0.5 + k3)):
    (loss, metrics), g = jit_loss_and_grad(
        logp, None, ref_logp, adv, mask, loss_type="bnpo", beta=0.1, use_bias_correction_kl=bias_correction)
    np.testing.assert_allclose(loss, 0.1 * k3, rtol=RTOL)
    np.testing.assert_allclose(metrics["kl"], k3, rtol=RTOL)
    np.testing.assert_allclose(g, [[0.1 * grad, 0.0]], rtol=RTOL)


def test_clipping_and_delta_by_hand():
  """Ratios 1.5 (A > 0: held at 1.2, no gradient), 0.5 (A < 0: held at 0.8), 1.1 (inside: gradient -A·r),
  and 1.5 with A < 0 (unclipped side wins: 1.5, or delta's 1.3 with no gradient)."""
  ratios = jnp.array([[1.5], [0.5], [1.1], [1.5]])
  old_logp = jnp.log(jnp.full((4, 1), 0.4))
  logp = old_logp + jnp.log(ratios)
  adv, mask = jnp.array([1.0, -1.0, 1.0, -1.0]), jnp.ones((4, 1))
  (loss, metrics), grad = jit_loss_and_grad(logp, old_logp, None, adv, mask, loss_type="grpo")
  np.testing.assert_allclose(loss, (-1.2 + 0.8 - 1.1 + 1.5) / 4, rtol=RTOL)
  np.testing.assert_allclose(grad, np.array([[0.0], [0.0], [-1.1], [1.5]]) / 4, rtol=RTOL)
  assert metrics["clip_ratio/low_mean"] == 0.25 and metrics["clip_ratio/high_mean"] == 0.25
  assert metrics["clip_ratio/region_mean"] == 0.5
  assert metrics["clip_ratio/low_min"] == 0 and metrics["clip_ratio/high_max"] == 1
  (loss, _), grad = jit_loss_and_grad(logp, old_logp, None, adv, mask, loss_type="grpo", delta=1.3)
  np.testing.assert_allclose(loss, (-1.2 + 0.8 - 1.1 + 1.3) / 4, rtol=RTOL)
  np.testing.assert_allclose(grad, np.array([[0.0], [0.0], [-1.1], [0.0]]) / 4, rtol=RTOL)


def test_empty_completions_are_left_out_of_the_per_completion_extremes():
  """An empty row's clip fraction is 0/0, which TRL's nanmin ignores: every scored row here is clipped."""
  old_logp = jnp.log(jnp.full((3, 2), 0.4))
  logp = old_logp + jnp.log(0.5)
  mask, adv = jnp.array([[1, 1], [0, 0], [1, 0]]), jnp.array([-1.0, 2.0, -1.0])
  (loss, metrics), grad = jit_loss_and_grad(logp, old_logp, None, adv, mask, loss_type="bnpo")
  np.testing.assert_allclose(loss, 0.8, rtol=RTOL)
  assert metrics["clip_ratio/low_min"] == 1 and metrics["clip_ratio/low_mean"] == 1
  assert not grad.any()
  (loss, metrics), grad = jit_loss_and_grad(logp, old_logp, None, adv, jnp.zeros_like(mask), loss_type="bnpo")
  assert loss == 0 and not grad.any()
  assert np.isnan(metrics["clip_ratio/low_min"]) and np.isnan(metrics["clip_ratio/high_max"])
  assert metrics["clip_ratio/region_mean"] == 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_ratio_on_the_clip_bounds_passes_its_gradient_as_torch_clamp(loss_type):
  """epsilon 0 on-policy puts the ratio exactly on both bounds: torch.clamp's gradient is 1 there, jnp.clip's 1/2."""
  logp, _, _, adv, mask = rollout_like()
  expected_loss, expected_grad, _ = trl_compute_loss(logp, None, None, adv, mask, loss_type=loss_type, epsilon_low=0.0)
  (loss, _), grad = jit_loss_and_grad(jnp.asarray(logp), None, None, jnp.asarray(adv), jnp.asarray(mask),
                                      loss_type=loss_type, epsilon_low=0.0)
  np.testing.assert_allclose(loss, expected_loss, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad, expected_grad, rtol=RTOL, atol=ATOL)


def test_sequence_level_ratio_by_hand():
  """GSPO: one ratio per completion, exp(mean log-ratio) = exp(0.3) over tokens with log-ratios 0.2 and 0.4."""
  old_logp = jnp.log(jnp.array([[0.3, 0.3, 0.3]]))
  logp = old_logp + jnp.array([[0.2, 0.4, 5.0]])  # the third token is masked out
  mask, adv = jnp.array([[1, 1, 0]]), jnp.array([-1.0])
  (loss, metrics), grad = jit_loss_and_grad(
      logp, old_logp, None, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
  r = np.exp(0.3)
  np.testing.assert_allclose(loss, r, rtol=RTOL)  # -min(-r, -1.2) for each token
  np.testing.assert_allclose(grad, [[r / 2, r / 2, 0.0]], rtol=RTOL)
  assert metrics["clip_ratio/region_mean"] == 0  # A < 0 and r > 1: the unclipped side, not clipped


def test_micro_batches_add_up_to_the_generation_batch():
  """What the module docstring tells the loop: dapo with the generation batch's token count, and the other
  losses divided by the number of micro-batches, sum to the whole batch's loss (TRL's accumulation)."""
  logp, old_logp, ref_logp, adv, mask = (jnp.asarray(x) for x in rollout_like())
  kwargs = {"beta": 0.04, "epsilon_high": 0.28}
  whole_bnpo, _ = jit_loss(logp, old_logp, ref_logp, adv, mask, loss_type="bnpo", **kwargs)
  for loss_type, whole in (("dapo", whole_bnpo), ("grpo", None), ("dr_grpo", None)):
    if whole is None:
      whole, _ = jit_loss(logp, old_logp, ref_logp, adv, mask, loss_type=loss_type, **kwargs)
    parts = [jit_loss(logp[i:i + 2], old_logp[i:i + 2], ref_logp[i:i + 2], adv[i:i + 2], mask[i:i + 2],
                            loss_type=loss_type, num_items_in_batch=mask.sum(), max_completion_length=7, **kwargs)[0]
             for i in range(0, 8, 2)]
    total = sum(parts) if loss_type == "dapo" else sum(parts) / 4
    np.testing.assert_allclose(total, whole, rtol=RTOL, err_msg=loss_type)


def eemo_logic_released_loss(rewards_per_func, logp, ref_logp, mask, beta, num_generations):
  """EEmo-Logic's stage-2 loss as papers.md §3.5 describes it (grpo_trainer_video_qa.py ~L655-680, the
  trl 0.15 form): summed rewards, (r - mean) / (std + 1e-4), -(exp(logp - logp.detach()) * A - beta * k3),
  per-completion token mean, then the mean over completions."""
  rewards = rewards_per_func.sum(dim=1)
  mean_grouped_rewards = rewards.view(-1, num_generations).mean(dim=1).repeat_interleave(num_generations, dim=0)
  std_grouped_rewards = rewards.view(-1, num_generations).std(dim=1).repeat_interleave(num_generations, dim=0)
  advantages = (rewards - mean_grouped_rewards) / (std_grouped_rewards + 1e-4)
  per_token_kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
  per_token_loss = torch.exp(logp - logp.detach()) * advantages.unsqueeze(1)
  per_token_loss = -(per_token_loss - beta * per_token_kl)
  return ((per_token_loss * mask).sum(dim=1) / mask.sum(dim=1)).mean()


def test_released_eemo_logic_loss_is_a_configuration():
  rs = np.random.RandomState(5)
  rewards = rs.rand(8, 2).astype(np.float32)
  logp, _, ref_logp, _, mask = rollout_like(seed=5)
  mask[1, 0] = 1  # the released loss divides by each completion's length: no empty completions there
  t_logp = torch.tensor(logp, requires_grad=True)
  expected = eemo_logic_released_loss(torch.tensor(rewards), t_logp, torch.tensor(ref_logp),
                                      torch.tensor(mask, dtype=torch.float32), 0.04, 4)
  expected.backward()

  def ours(logp):
    adv = rl.group_advantages(rewards, group_size=4, **advantages.EEMO_LOGIC_ADVANTAGE)
    return rl.policy_loss(logp, None, jnp.asarray(ref_logp), adv, jnp.asarray(mask), beta=0.04,
                          **losses.EEMO_LOGIC_LOSS)[0]

  loss, grad = jax.jit(jax.value_and_grad(ours))(jnp.asarray(logp))
  np.testing.assert_allclose(loss, expected.item(), rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(grad, t_logp.grad.numpy(), rtol=RTOL, atol=ATOL)


def test_bf16_inputs_are_computed_in_fp32_under_jit():
  logp, old_logp, ref_logp, adv, mask = rollout_like()
  half = [jnp.asarray(x, jnp.bfloat16) for x in (logp, old_logp, ref_logp, adv)]
  upcast = [x.astype(jnp.float32) for x in half]
  (loss, metrics), grad = jit_loss_and_grad(*half, jnp.asarray(mask), beta=0.04, num_items_in_batch=jnp.float32(40))
  (loss_32, metrics_32), grad_32 = jit_loss_and_grad(*upcast, jnp.asarray(mask), beta=0.04,
                                                     num_items_in_batch=jnp.float32(40))
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
  np.testing.assert_array_equal(loss, loss_32)
  np.testing.assert_array_equal(grad.astype(jnp.float32), grad_32.astype(jnp.bfloat16).astype(jnp.float32))


def test_mask_truncated_completions():
  """TRL L2487-2495: `completion_mask * (~is_truncated).unsqueeze(1).int()`."""
  mask = jnp.array([[1, 1, 1], [1, 1, 0], [1, 1, 1]], jnp.int32)
  truncated = jnp.array([True, False, False])
  masked = rl.mask_truncated_completions(mask, truncated)
  assert masked.dtype == mask.dtype
  np.testing.assert_array_equal(masked, [[0, 0, 0], [1, 1, 0], [1, 1, 1]])


@pytest.mark.parametrize("kwargs,message", [
    ({"loss_type": "cispo"}, "loss_type"),
    ({"importance_sampling_level": "row"}, "importance_sampling_level"),
    ({"beta": 0.04}, "pass ref_logp"),
])
def test_bad_arguments_say_what_to_do(kwargs, message):
  logp, _, _, adv, mask = (jnp.asarray(x) for x in rollout_like())
  with pytest.raises(ValueError, match=message):
    rl.policy_loss(logp, None, None, adv, mask, **kwargs)


def test_shape_mismatches_name_the_argument():
  logp, old_logp, _, adv, mask = (jnp.asarray(x) for x in rollout_like())
  with pytest.raises(ValueError, match="old_logp"):
    rl.policy_loss(logp, old_logp[:, :3], None, adv, mask)
  with pytest.raises(ValueError, match="adv must be"):
    rl.policy_loss(logp, None, None, adv[:4], mask)
