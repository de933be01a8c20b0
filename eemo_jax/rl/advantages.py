"""Group-relative advantages: each completion's reward against the other completions of its prompt.

The semantics are TRL 1.16's (`GRPOTrainer._generate_and_score_completions`, grpo_trainer.py L2750-2810;
spec §7.2), for the whole generation batch at once, so that a loop on one process sees what TRL's
processes see together before each keeps its slice:

* rewards come as (completions, reward functions), with NaN where a function could not score a
  completion; a completion that no function scored is *unscorable*: it is left out of its group's
  statistics and its advantage is 0, so it neither moves the baseline nor the policy;
* the statistics are NaN-aware, the standard deviation Bessel-corrected (TRL's `nanstd`), and the
  scale is `std + 1e-4`, so a group of equal rewards gets advantage 0, not a division by zero.

Completions are laid out as TRL's `RepeatSampler` lays them out: the G completions of a prompt are
consecutive rows.
"""

from __future__ import annotations

import types
from typing import Literal

import jax
import jax.numpy as jnp

ScaleRewards = Literal["group", "batch", "none"]
Aggregation = Literal["sum_then_normalize", "normalize_then_sum"]

STD_EPSILON = 1e-4  # TRL adds it to every standard deviation it divides by

# EEmo-Logic's released advantage (papers.md §3.5): `(r - mean_G) / (std_G + 1e-4)` over the *sum* of the
# reward functions, with torch's unbiased std. `policy_loss`'s counterpart is `losses.EEMO_LOGIC_LOSS`.
EEMO_LOGIC_ADVANTAGE = types.MappingProxyType(
    {"weights": None, "scale_rewards": "group", "aggregation": "sum_then_normalize"})


def nanmean(x: jax.Array, axis: int | None = None, keepdims: bool = False) -> jax.Array:
  """Mean over the non-NaN entries; NaN where there are none (as `torch.nanmean`)."""
  valid = ~jnp.isnan(x)
  total = jnp.where(valid, x, 0.0).sum(axis=axis, keepdims=keepdims)
  return total / valid.sum(axis=axis, keepdims=keepdims)


def nanstd(x: jax.Array, axis: int | None = None, keepdims: bool = False) -> jax.Array:
  """Bessel-corrected standard deviation over the non-NaN entries; NaN with fewer than two of them.

  TRL's `nanstd` (trl/trainer/utils.py L1021-1054): the NaN-aware mean of squared deviations times
  `count / (count - 1)`.
  """
  valid = ~jnp.isnan(x)
  mean = nanmean(x, axis=axis, keepdims=True)
  variance = nanmean(jnp.where(valid, x - mean, jnp.nan) ** 2, axis=axis, keepdims=keepdims)
  count = valid.sum(axis=axis, keepdims=keepdims).astype(x.dtype)
  correction = jnp.where(count > 1, count / jnp.maximum(count - 1, 1), jnp.nan)
  return jnp.sqrt(variance * correction)


def group_advantages(rewards: jax.Array, *, group_size: int, weights: jax.Array | None = None,
                     scale_rewards: ScaleRewards = "group",
                     aggregation: Aggregation = "sum_then_normalize") -> jax.Array:
  """Advantage of each completion, in fp32: (completions,).

  rewards: (completions, functions) or (completions,) for a single function, any float dtype, NaN
    where a function returned None; completions = prompts * group_size, each prompt's group consecutive.
  weights: (functions,) reward weights (TRL's `reward_weights`), ones when None.
  scale_rewards: divide by the group's std ("group", TRL's default), by the whole batch's std ("batch",
    Dr. GRPO's recommendation in TRL's docs), or not at all ("none").
  aggregation: "sum_then_normalize" weighs and sums the functions, then normalises the sum (TRL's
    default); "normalize_then_sum" normalises each function within its group first, sums, then
    normalises the sum over the batch (GDPO; `scale_rewards` does not apply to it).

  `group_size`, `scale_rewards` and `aggregation` select the computation: mark them static under `jax.jit`.
  """
  if scale_rewards not in ("group", "batch", "none"):
    raise ValueError(f"scale_rewards must be 'group', 'batch' or 'none', got {scale_rewards!r}")
  if aggregation not in ("sum_then_normalize", "normalize_then_sum"):
    raise ValueError(f"aggregation must be 'sum_then_normalize' or 'normalize_then_sum', got {aggregation!r}")
  rewards = jnp.asarray(rewards, jnp.float32)
  if rewards.ndim == 1:
    rewards = rewards[:, None]
  if rewards.ndim != 2:
    raise ValueError(f"rewards must be (completions, functions) or (completions,), got shape {rewards.shape}")
  n, num_funcs = rewards.shape
  if group_size < 1 or n % group_size:
    raise ValueError(f"{n} completions do not split into groups of {group_size}: pass the whole generation "
                     "batch (prompts * num_generations rows, each prompt's completions consecutive)")
  weights = jnp.ones((num_funcs,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
  if weights.shape != (num_funcs,):
    raise ValueError(f"weights must have one entry per reward function ({num_funcs}), got shape {weights.shape}")

  unscorable = jnp.isnan(rewards).all(axis=1)  # (completions,)
  groups = n // group_size
  if aggregation == "sum_then_normalize":
    total = jnp.where(unscorable, jnp.nan, jnp.nansum(rewards * weights, axis=1))  # (completions,)
    grouped = total.reshape(groups, group_size)
    mean = jnp.repeat(nanmean(grouped, axis=1), group_size)
    if scale_rewards == "batch":
      std = nanstd(total) if n > 1 else jnp.float32(0.0)
    else:  # "none" divides by nothing; TRL computes the group std only to log the share of zero-std groups
      std = jnp.repeat(nanstd(grouped, axis=1), group_size) if group_size > 1 else jnp.zeros((n,), jnp.float32)
    advantages = total - mean
    if scale_rewards != "none":
      advantages = advantages / (std + STD_EPSILON)
  else:
    grouped = rewards.reshape(groups, group_size, num_funcs)
    mean = nanmean(grouped, axis=1, keepdims=True)  # (groups, 1, functions)
    std = nanstd(grouped, axis=1, keepdims=True) if group_size > 1 else jnp.zeros_like(mean)
    normalized = ((grouped - mean) / (std + STD_EPSILON)).reshape(n, num_funcs)
    total = jnp.where(unscorable, jnp.nan, jnp.nansum(normalized * weights, axis=1))
    std = nanstd(total) if n > 1 else jnp.float32(0.0)
    advantages = (total - nanmean(total)) / (std + STD_EPSILON)
  return jnp.nan_to_num(advantages, nan=0.0)
