"""Group advantages against TRL 1.16: its own `nanstd`, and its advantage block transcribed line by line."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl_utils = pytest.importorskip("trl.trainer.utils")

from eemo_jax import rl  # noqa: E402
from eemo_jax.rl import advantages  # noqa: E402

RTOL = 1e-6


def trl_advantages(rewards_per_func, weights, num_generations, scale_rewards, aggregation):
  """trl/trainer/grpo_trainer.py L2759-2810 (TRL 1.16.0), one process, `self.` attributes made arguments."""
  nanstd = trl_utils.nanstd
  rewards_per_func = torch.tensor(rewards_per_func)
  reward_weights = torch.tensor(weights)
  unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)  # L2759
  if aggregation == "sum_then_normalize":
    rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)  # L2763
    rewards[unscorable_mask] = torch.nan
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:  # L2767
      if num_generations > 1:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
      else:
        std_rewards = torch.zeros_like(rewards)
    elif scale_rewards == "batch":  # L2774
      if rewards.numel() > 1:
        std_rewards = nanstd(rewards).expand_as(rewards)
      else:
        std_rewards = torch.zeros_like(rewards)
    advantages = rewards - mean_grouped_rewards  # L2785
    if scale_rewards != "none":
      advantages = advantages / (std_rewards + 1e-4)
  elif aggregation == "normalize_then_sum":  # L2790
    grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
    mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
    std_k = nanstd(grouped, dim=1, keepdim=True) if num_generations > 1 else torch.zeros_like(mean_k)
    reward_k = (grouped - mean_k) / (std_k + 1e-4)
    reward_k = reward_k.view(-1, rewards_per_func.shape[1])
    rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable_mask] = torch.nan
    std_rewards = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
    advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
  advantages = torch.nan_to_num(advantages, nan=0.0)  # L2810
  return advantages.numpy()


def awkward_rewards():
  """(16, 3) rewards in 4 groups of 4, covering what TRL's NaN handling is for.

  group 0: ordinary, some functions unscorable on some rows; group 1: equal totals (A = 0);
  group 2: one completion unscorable by every function, another scorable by one only;
  group 3: a single scorable completion (std undefined -> A = 0 after nan_to_num).
  """
  rs = np.random.RandomState(0)
  r = rs.rand(16, 3).astype(np.float32) * 2 - 0.5
  r[1, 0] = r[3, 2] = np.nan
  r[4:8] = [0.5, 1.0, 0.0]
  r[9] = np.nan
  r[10, 1:] = np.nan
  r[12:15] = np.nan
  return r


WEIGHTS = np.array([1.0, 0.5, 2.0], np.float32)


@pytest.mark.parametrize("aggregation,scale_rewards", [
    ("sum_then_normalize", "group"), ("sum_then_normalize", "batch"), ("sum_then_normalize", "none"),
    ("normalize_then_sum", "group")])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_trl(aggregation, scale_rewards, weighted):
  rewards = awkward_rewards()
  weights = WEIGHTS if weighted else np.ones(3, np.float32)
  expected = trl_advantages(rewards, weights, 4, scale_rewards, aggregation)
  got = rl.group_advantages(jnp.asarray(rewards), group_size=4, weights=jnp.asarray(weights) if weighted else None,
                            scale_rewards=scale_rewards, aggregation=aggregation)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-7)
  if aggregation == "sum_then_normalize":
    assert np.all(np.asarray(got)[4:8] == 0)  # equal rewards
    assert np.all(np.asarray(got)[12:16] == 0)  # one scorable completion: no baseline
  assert got[9] == 0  # unscorable
  assert np.count_nonzero(np.asarray(got)) >= 7


def test_single_generation_groups_match_trl():
  """G = 1 (TRL's eval with num_generations_eval=1): the group std is taken as 0."""
  rewards = awkward_rewards()[:5]
  for scale_rewards in ("group", "batch", "none"):
    expected = trl_advantages(rewards, np.ones(3, np.float32), 1, scale_rewards, "sum_then_normalize")
    got = rl.group_advantages(rewards, group_size=1, scale_rewards=scale_rewards)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-7)
  expected = trl_advantages(rewards, np.ones(3, np.float32), 1, "group", "normalize_then_sum")
  got = rl.group_advantages(rewards, group_size=1, aggregation="normalize_then_sum")
  np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-7)


def test_nanstd_matches_trl():
  x = awkward_rewards()
  for axis in (None, 0, 1):
    expected = trl_utils.nanstd(torch.tensor(x), dim=axis).numpy()
    np.testing.assert_allclose(np.asarray(advantages.nanstd(jnp.asarray(x), axis=axis)), expected, rtol=RTOL)
  np.testing.assert_allclose(advantages.nanstd(jnp.array([1.0, 2.0, 4.0, np.nan])), np.std([1, 2, 4], ddof=1),
                             rtol=RTOL)
  assert np.isnan(advantages.nanstd(jnp.array([3.0, np.nan])))  # one value: no Bessel-corrected std


def test_hand_computed_values():
  """[1, 0, 0, 1]: mean 1/2, Bessel std sqrt(1/3); [2, NaN, 4, 4]: mean 10/3, std sqrt(4/3)."""
  rewards = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, np.nan, 4.0, 4.0])
  got = np.asarray(rl.group_advantages(rewards, group_size=4))
  a = 0.5 / (np.sqrt(1 / 3) + 1e-4)
  b = 1 / (np.sqrt(4 / 3) + 1e-4)
  np.testing.assert_allclose(got, [a, -a, -a, a, -4 * b / 3, 0.0, 2 * b / 3, 2 * b / 3], rtol=RTOL)
  np.testing.assert_allclose(rl.group_advantages(rewards, group_size=4, scale_rewards="none"),
                             [0.5, -0.5, -0.5, 0.5, -4 / 3, 0.0, 2 / 3, 2 / 3], rtol=RTOL)


def test_summed_functions_and_weights_by_hand():
  """Two functions, weights (1, 3): totals [1, 3, 0, 4] in one group; an all-NaN row is left out."""
  rewards = jnp.array([[1.0, 0.0], [0.0, 1.0], [np.nan, 0.0], [1.0, 1.0], [np.nan, np.nan], [0.0, 0.0]])
  got = np.asarray(rl.group_advantages(rewards[:4], group_size=2, weights=jnp.array([1.0, 3.0]),
                                       scale_rewards="none"))
  np.testing.assert_allclose(got, [-1.0, 1.0, -2.0, 2.0], rtol=RTOL)
  got = np.asarray(rl.group_advantages(rewards[2:], group_size=2, scale_rewards="none"))
  np.testing.assert_allclose(got, [-1.0, 1.0, 0.0, 0.0], rtol=RTOL)  # [0, 2], then [NaN, 0]: no baseline


def test_jit_and_bf16_rewards():
  rewards = awkward_rewards()
  jitted = jax.jit(rl.group_advantages, static_argnames=("group_size", "scale_rewards", "aggregation"))
  for aggregation in ("sum_then_normalize", "normalize_then_sum"):
    eager = rl.group_advantages(rewards, group_size=4, aggregation=aggregation)
    np.testing.assert_allclose(jitted(rewards, group_size=4, aggregation=aggregation), eager, rtol=RTOL, atol=1e-7)
  as_bf16 = jnp.asarray(rewards, jnp.bfloat16)
  got = jitted(as_bf16, group_size=4)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, jitted(as_bf16.astype(jnp.float32), group_size=4))


def test_released_configuration_is_torch_std_over_summed_rewards():
  """EEmo-Logic: `(r - mean_G) / (std_G + 1e-4)` on the summed rewards, torch's default (unbiased) std."""
  rs = np.random.RandomState(3)
  rewards = rs.rand(16, 2).astype(np.float32)
  summed = torch.tensor(rewards).sum(1)
  mean = summed.view(-1, 8).mean(1).repeat_interleave(8)
  std = summed.view(-1, 8).std(1).repeat_interleave(8)
  expected = ((summed - mean) / (std + 1e-4)).numpy()
  got = rl.group_advantages(rewards, group_size=8, **advantages.EEMO_LOGIC_ADVANTAGE)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-7)


@pytest.mark.parametrize("kwargs,message", [
    ({"group_size": 3}, "groups of 3"),
    ({"group_size": 4, "scale_rewards": "std"}, "scale_rewards"),
    ({"group_size": 4, "aggregation": "mean"}, "aggregation"),
    ({"group_size": 4, "weights": jnp.ones(2)}, "one entry per reward function"),
])
def test_bad_arguments_say_what_to_do(kwargs, message):
  with pytest.raises(ValueError, match=message):
    rl.group_advantages(jnp.zeros((8, 3)), **kwargs)
