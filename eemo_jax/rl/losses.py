"""The GRPO policy loss of one micro-batch, with TRL 1.16's semantics (spec §7.2).

`policy_loss` is `GRPOTrainer._compute_loss` (grpo_trainer.py L3020-3290) from the per-token
log-probs on: importance ratios at token or sequence level (GSPO), PPO clipping with separate lower
and upper epsilons (DAPO), the optional upper bound `delta` on the unclipped ratio (INTELLECT-2), the
k3 KL to a reference policy weighted by the ratio (`use_bias_correction_kl`), and the four
normalisers `grpo`, `bnpo`, `dr_grpo`, `dapo`. It is a pure function of arrays, so the loop takes
its gradient with respect to the parameters through `logp`.

One process, one micro-batch. Over an accumulation window of k micro-batches TRL divides the
`grpo`, `bnpo` and `dr_grpo` losses by k, and for `dapo` (with TRL's default `steps_per_generation =
gradient_accumulation_steps`) divides every micro-batch by the token count of the whole generation
batch: so the caller divides by k for the first three, and passes `num_items_in_batch` = the masked
token count of the generation batch for `dapo`. Summing the micro-batches' gradients then gives TRL's.

On-policy (`num_iterations == 1`, `old_logp=None`) the ratio is `exp(logp - stop_gradient(logp))`:
its value is 1, so nothing is clipped, but its gradient is `∇logp`, which is how the policy gradient
arises. With `num_iterations > 1` the caller keeps the rollout's log-probs as `old_logp` for every
update on that batch.

Everything is computed in fp32 whatever the input dtype. Metrics are TRL's logged values of one
micro-batch (masked means, gradient-free).
"""

from __future__ import annotations

import types
from typing import Literal

import jax
import jax.numpy as jnp

LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSamplingLevel = Literal["token", "sequence"]

# EEmo-Logic's released stage-2 loss (papers.md §3.5): `-(exp(logp - logp.detach()) * A - beta * k3)`,
# averaged over each completion's tokens and then over completions, k3 not weighted by the ratio, one
# iteration (old_logp=None, so the clip range never binds). Use with `advantages.EEMO_LOGIC_ADVANTAGE`
# and beta = 0.04 (not passed by the release, so trl 0.15's default; papers.md marks that value inferred).
EEMO_LOGIC_LOSS = types.MappingProxyType({
    "loss_type": "grpo", "use_bias_correction_kl": False, "importance_sampling_level": "token", "delta": None})


def _clamp(x: jax.Array, low: float | None = None, high: float | None = None) -> jax.Array:
  """`torch.clamp`, gradient included: 1 on the closed interval, where `jnp.clip` would give 1/2 at its ends."""
  if low is not None:
    x = jnp.where(x < low, low, x)
  if high is not None:
    x = jnp.where(x > high, high, x)
  return x


def mask_truncated_completions(mask: jax.Array, truncated: jax.Array) -> jax.Array:
  """Zero the whole mask of each completion that hit the length limit without an EOS.

  TRL's `mask_truncated_completions` (grpo_trainer.py L2487-2495): a completion cut off mid-answer has no
  reward signal worth learning from, so it takes no part in the loss or the token counts.
  mask: (rows, completion_len); truncated: (rows,) bool.
  """
  return mask * (~truncated.astype(bool))[:, None].astype(mask.dtype)


def policy_loss(logp: jax.Array, old_logp: jax.Array | None, ref_logp: jax.Array | None, adv: jax.Array,
                mask: jax.Array, *, loss_type: LossType = "dapo", epsilon_low: float = 0.2,
                epsilon_high: float | None = None, delta: float | None = None, beta: float = 0.0,
                use_bias_correction_kl: bool = True, importance_sampling_level: ImportanceSamplingLevel = "token",
                max_completion_length: int | None = None,
                num_items_in_batch: jax.Array | int | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO loss of one micro-batch (fp32 scalar) and TRL's metrics for it.

  logp: (rows, completion_len) the policy's log-probs of the sampled tokens, the only input with a gradient;
  old_logp: same shape, the log-probs of the policy that sampled (kept from the rollout), or None on-policy;
  ref_logp: same shape, the reference policy's log-probs; needed when beta != 0, and used for the "kl"
    metric whenever given; adv: (rows,) advantages; mask: (rows, completion_len), 1 on completion tokens.
  epsilon_high: upper clip `1 + epsilon_high`, `epsilon_low` when None (TRL's `epsilon_high=None`).
  delta: upper bound on the unclipped ratio (two-sided clipping), or None.
  use_bias_correction_kl: multiply the k3 KL by the importance ratio (TRL's default); False is the plain k3
    term of EEmo-Logic's release.
  max_completion_length: `dr_grpo`'s constant length; None takes completion_len (rollouts pad to it).
  num_items_in_batch: `dapo`'s token count (the whole generation batch's); None takes `mask.sum()`.

  Metrics: "kl" (masked mean of the KL term as it enters the loss, when ref_logp is given),
  "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean" (masked means of the tokens the
  clip holds at 1 - epsilon_low with A < 0, at 1 + epsilon_high with A > 0, and either),
  "clip_ratio/low_min" and "clip_ratio/high_max" (extremes of the per-completion means; NaN when every
  row is empty). Python arguments other than the arrays select the computation: mark them static under
  `jax.jit` (num_items_in_batch may be traced).
  """
  if loss_type not in ("grpo", "bnpo", "dr_grpo", "dapo"):
    raise ValueError(f"loss_type must be 'grpo', 'bnpo', 'dr_grpo' or 'dapo', got {loss_type!r}")
  if importance_sampling_level not in ("token", "sequence"):
    raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got {importance_sampling_level!r}")
  if beta != 0.0 and ref_logp is None:
    raise ValueError(f"beta={beta} needs the reference policy's log-probs: pass ref_logp, or set beta=0")
  rows, length = logp.shape
  for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
    if x is not None and x.shape != logp.shape:
      raise ValueError(f"{name} must have logp's shape {logp.shape} (rows, completion_len), got {x.shape}")
  if adv.shape != (rows,):
    raise ValueError(f"adv must be (rows,) = ({rows},), got {adv.shape}")
  epsilon_high = epsilon_low if epsilon_high is None else epsilon_high

  logp = logp.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  old_logp = jax.lax.stop_gradient(logp if old_logp is None else old_logp.astype(jnp.float32))
  adv = jax.lax.stop_gradient(adv.astype(jnp.float32))
  adv = adv[:, None]  # (rows, 1)
  tokens_per_row = mask.sum(-1)  # (rows,)

  # From here ratios are (rows, completion_len) at token level, (rows, 1) at sequence level.
  log_ratio = logp - old_logp
  if importance_sampling_level == "token":
    log_weights = log_ratio
  else:
    log_weights = ((log_ratio * mask).sum(-1) / jnp.maximum(tokens_per_row, 1.0))[:, None]
  coef_1 = jnp.exp(log_weights)

  kl = None
  if ref_logp is not None:
    ref_logp = jax.lax.stop_gradient(ref_logp.astype(jnp.float32))
    kl = jnp.exp(ref_logp - logp) - (ref_logp - logp) - 1.0  # k3, unclamped
    if use_bias_correction_kl:
      kl = kl * coef_1  # the ratio *before* delta's bound, as TRL

  coef_2 = _clamp(coef_1, 1.0 - epsilon_low, 1.0 + epsilon_high)
  if delta is not None:
    coef_1 = _clamp(coef_1, high=delta)
  per_token_loss = -jnp.minimum(coef_1 * adv, coef_2 * adv)
  if beta != 0.0:
    per_token_loss = per_token_loss + beta * kl
  masked = jnp.broadcast_to(per_token_loss, mask.shape) * mask  # (rows, completion_len)

  if loss_type == "grpo":
    loss = (masked.sum(-1) / jnp.maximum(tokens_per_row, 1.0)).mean()
  elif loss_type == "bnpo":
    loss = masked.sum() / jnp.maximum(mask.sum(), 1.0)
  elif loss_type == "dr_grpo":
    loss = masked.sum() / (rows * (length if max_completion_length is None else max_completion_length))
  else:
    count = mask.sum() if num_items_in_batch is None else jnp.asarray(num_items_in_batch, jnp.float32)
    loss = masked.sum() / jnp.maximum(count, 1.0)

  metrics = _metrics(jax.lax.stop_gradient(coef_1), adv, mask, epsilon_low, epsilon_high,
                     None if kl is None else jax.lax.stop_gradient(kl),
                     per_row_ratios=importance_sampling_level == "sequence")
  return loss, metrics


def _metrics(coef_1: jax.Array, adv: jax.Array, mask: jax.Array, epsilon_low: float, epsilon_high: float,
             kl: jax.Array | None, *, per_row_ratios: bool) -> dict[str, jax.Array]:
  """TRL's logged loss metrics (grpo_trainer.py L3253-3284) for one process.

  Token-level quantities are averaged over the masked tokens; sequence-level ratios, one per row
  (shape (rows, 1)), over the rows, empty rows included, as TRL. TRL tells the two apart by the
  shape alone, which would also take token-level ratios of one-token completions for per-row ones;
  `per_row_ratios` says which they are.
  """
  def masked_mean(x, per_row):  # TRL's global_masked_mean
    if per_row:
      return x.sum() / jnp.maximum(jnp.float32(x.shape[0]), 1.0)
    return (x * mask).sum() / jnp.maximum(mask.sum(), 1.0)

  def per_row_mean(x):  # TRL's masked_seq_mean: NaN for an empty row at token level
    if per_row_ratios:
      return x[:, 0]
    return (x * mask).sum(-1) / mask.sum(-1)

  is_low = ((coef_1 < 1.0 - epsilon_low) & (adv < 0)).astype(jnp.float32)
  is_high = ((coef_1 > 1.0 + epsilon_high) & (adv > 0)).astype(jnp.float32)
  is_region = jnp.maximum(is_low, is_high)
  metrics = {
      "clip_ratio/low_mean": masked_mean(is_low, per_row_ratios),
      "clip_ratio/high_mean": masked_mean(is_high, per_row_ratios),
      "clip_ratio/region_mean": masked_mean(is_region, per_row_ratios),
      "clip_ratio/low_min": jnp.nanmin(per_row_mean(is_low)),
      "clip_ratio/high_max": jnp.nanmax(per_row_mean(is_high)),
  }
  if kl is not None:
    metrics["kl"] = masked_mean(kl, per_row=False)  # (rows, completion_len) at either level
  return metrics
