"""GRPO's pure update step: micro-batches of prompt groups scanned in one jitted call, one optimizer update.

    step = make_grpo_step(graphdef, optimizer, loss=GRPOLossConfig(...), trainable=..., schedule=...)
    state, metrics = jit_grpo_step(step, state, batch, mesh)(state, batch)   # batch: stacked UpdateBatch

It reuses the SFT step's pieces (train state, freezing masks, dropout reseeding, optimizer) and replaces
the objective: the policy's per-token log-probs of the completions (`logprobs.completion_logprobs`, with
each prompt's images embedded once per group) go into `losses.policy_loss` with the rollout's advantages.

Over k micro-batches the loss is TRL's for one generation batch: `grpo`, `bnpo` and `dr_grpo` divide
each micro-batch's loss by k, `dapo` divides every micro-batch's token sum by the token count of the whole
generation batch (`num_items_in_batch`); the gradients of the micro-batches add up.

`reference_logprobs` gives the reference policy's log-probs for the KL term (beta > 0): with LoRA the
same weights with the adapters switched off (`nnx.view(..., lora_enabled=False)`), otherwise a frozen
copy of the initial weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from eemo_jax.parallel.sharding import DEFAULT_RULES, spec_for, state_shardings
from eemo_jax.rl.logprobs import GroupBatch, completion_logprobs
from eemo_jax.rl.losses import policy_loss
from eemo_jax.train.freeze import Trainable, apply_masked_updates, mask_tree, update_mask
from eemo_jax.train.state import TrainState, train_state_shardings
from eemo_jax.train.step import reseed_dropout

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


@dataclasses.dataclass(frozen=True)
class GRPOLossConfig:
  """`losses.policy_loss`'s settings, plus how the log-probs are computed. Defaults: TRL 1.16's."""
  loss_type: str = "dapo"
  epsilon_low: float = 0.2
  epsilon_high: float | None = None
  delta: float | None = None
  beta: float = 0.0
  use_bias_correction_kl: bool = True
  importance_sampling_level: str = "token"
  max_completion_length: int | None = None  # dr_grpo's constant; None: the padded completion length
  temperature: float = 1.0  # the sampling temperature: log-probs are of softmax(logits / temperature)
  chunk_size: int = 256  # completion positions per LM-head chunk

  def __post_init__(self):
    if self.loss_type not in LOSS_TYPES:
      raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
    if self.temperature <= 0:
      raise ValueError(f"temperature must be > 0 for GRPO's log-probs, got {self.temperature}")

  def policy_loss_kwargs(self) -> dict:
    return dict(loss_type=self.loss_type, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                delta=self.delta, beta=self.beta, use_bias_correction_kl=self.use_bias_correction_kl,
                importance_sampling_level=self.importance_sampling_level,
                max_completion_length=self.max_completion_length)


@struct.dataclass
class UpdateBatch:
  """One micro-batch of the update (a stacked batch adds a leading micro-batch axis to every field)."""
  group: GroupBatch
  advantages: jax.Array  # (R,) float32
  loss_mask: jax.Array  # (R, T) float32: the completion mask, truncated rows zeroed if so configured
  old_logp: jax.Array | None = None  # (R, T) the sampling policy's log-probs (num_iterations > 1), else None
  ref_logp: jax.Array | None = None  # (R, T) the reference policy's log-probs (beta > 0), else None


def policy_of(model: nnx.Module) -> nnx.Module:
  """The Qwen2.5-VL inside the trained module (`EmotionSFTModel.backbone`), or the module itself."""
  return getattr(model, "backbone", model)


def _constrainer(mesh: Mesh | None, rules):
  if mesh is None:
    return None

  def constrain(x):
    axes = ("act_batch", "act_seq", "act_embed")[:x.ndim]
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(axes, x.shape, mesh, rules)))

  return constrain


def make_grpo_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation, *, loss: GRPOLossConfig,
                   trainable: Trainable = Trainable(), schedule: optax.Schedule | None = None,
                   mesh: Mesh | None = None, rules=DEFAULT_RULES,
                   policy: Callable[[nnx.Module], nnx.Module] = policy_of):
  """`grpo_step(state, stacked UpdateBatch) -> (state, metrics)`, pure; the model graphdef closed over.

  Metrics: loss, grad_norm (before clipping), lr (with a schedule), entropy (mean over the completion
  tokens), and `policy_loss`'s (kl, clip_ratio/*), averaged over micro-batches (extremes: min / max).
  """
  constrain = _constrainer(mesh, rules)
  kwargs = loss.policy_loss_kwargs()

  def loss_fn(params, frozen, mb: UpdateBatch, num_items, num_micro, rng):
    model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, frozen))
    reseed_dropout(model, rng)
    logp, entropy = completion_logprobs(policy(model), mb.group, temperature=loss.temperature,
                                        chunk_size=loss.chunk_size, constrain=constrain)
    value, metrics = policy_loss(logp, mb.old_logp, mb.ref_logp, mb.advantages, mb.loss_mask,
                                 num_items_in_batch=num_items, **kwargs)
    if loss.loss_type != "dapo":  # TRL divides these by the gradient accumulation steps
      value = value / num_micro
    metrics["entropy_sum"] = jnp.sum(jax.lax.stop_gradient(entropy) * mb.loss_mask)
    return value, metrics

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def grpo_step(state: TrainState, batch: UpdateBatch):
    mask = update_mask(state.params, trainable)
    rng = jax.random.fold_in(state.rng, state.step)
    num_micro = batch.advantages.shape[0]
    num_items = batch.loss_mask.sum()  # dapo: the whole generation batch's completion tokens
    param_shardings = state_shardings(state.params, mesh, rules) if mesh is not None else None

    def microbatch(grads, xs):
      index, mb = xs
      (value, metrics), mb_grads = grad_fn(state.params, state.frozen, mb, num_items, num_micro,
                                           jax.random.fold_in(rng, index))
      grads = jax.tree.map(jnp.add, grads, mb_grads)
      if param_shardings is not None:
        grads = jax.lax.with_sharding_constraint(grads, param_shardings)
      return grads, (value, metrics)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (values, per_micro) = jax.lax.scan(microbatch, zeros, (jnp.arange(num_micro), batch))
    grads = mask_tree(grads, mask)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = apply_masked_updates(state.params, mask_tree(updates, mask), mask)
    metrics = _combine(per_micro)
    metrics["loss"] = values.sum()  # each micro-batch already carries its share of the batch loss
    metrics["entropy"] = per_micro["entropy_sum"].sum() / jnp.maximum(num_items, 1.0)
    del metrics["entropy_sum"]
    metrics["grad_norm"] = optax.global_norm(grads)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state.step), jnp.float32)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return grpo_step


def _combine(per_micro: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """Micro-batch metrics -> one value each: means, except the extremes TRL logs as min / max."""
  out = {}
  for name, values in per_micro.items():
    if name.endswith("_min"):
      out[name] = jnp.nanmin(values)
    elif name.endswith("_max"):
      out[name] = jnp.nanmax(values)
    elif name == "entropy_sum":
      out[name] = values
    else:
      out[name] = jnp.nanmean(values)
  return out


def make_reference_logprobs(graphdef: nnx.GraphDef, *, loss: GRPOLossConfig, lora: bool,
                            mesh: Mesh | None = None, rules=DEFAULT_RULES,
                            policy: Callable[[nnx.Module], nnx.Module] = policy_of):
  """`ref_logprobs(params, frozen, group) -> (R, T)`: the reference policy's log-probs, no dropout.

  With `lora`, `params`/`frozen` are the current state and the adapters are switched off (the base model,
  exactly, with no second copy of the weights); otherwise they are the frozen initial weights.
  """
  constrain = _constrainer(mesh, rules)

  def ref_logprobs(params, frozen, group: GroupBatch):
    model = policy(nnx.merge(graphdef, params, frozen))
    view = dict(deterministic=True) | (dict(lora_enabled=False) if lora else {})
    model = nnx.view(model, raise_if_not_found=False, **view)
    logp, _ = completion_logprobs(model, group, temperature=loss.temperature, chunk_size=loss.chunk_size,
                                  entropy=False, constrain=constrain)
    return logp

  return ref_logprobs


# --------------------------------------------------------------------------------------------------
# Shardings
# --------------------------------------------------------------------------------------------------

_GROUP_AXES = {
    "prompt_ids": ("act_batch", "act_seq"),
    "prompt_mask": ("act_batch", "act_seq"),
    "prompt_positions": (None, "act_batch", "act_seq"),
    "next_positions": (None, "act_batch"),
    "completion_ids": ("act_batch", None),
    "completion_mask": ("act_batch", None),
}
_UPDATE_AXES = {"advantages": ("act_batch",), "loss_mask": ("act_batch", None), "old_logp": ("act_batch", None),
                "ref_logp": ("act_batch", None)}


def group_shardings(group: GroupBatch, mesh: Mesh, rules=DEFAULT_RULES, *, stacked: bool = False) -> GroupBatch:
  """NamedShardings of a GroupBatch: prompt and completion rows over the data axes, vision slots likewise."""
  lead = (None,) if stacked else ()

  def named(axes, shape):
    return NamedSharding(mesh, spec_for(lead + axes, shape, mesh, rules))

  fields = {}
  for field in dataclasses.fields(GroupBatch):
    value = getattr(group, field.name)
    if value is None:
      fields[field.name] = None
    elif field.name == "vision":
      fields[field.name] = jax.tree.map(
          lambda a: named(("act_vision",) + (None,) * (a.ndim - 1 - len(lead)), a.shape), value)
    else:
      fields[field.name] = named(_GROUP_AXES[field.name], value.shape)
  return GroupBatch(**fields)


def update_shardings(batch: UpdateBatch, mesh: Mesh, rules=DEFAULT_RULES) -> UpdateBatch:
  """NamedShardings of a stacked UpdateBatch (leading micro-batch axis)."""
  fields = {"group": group_shardings(batch.group, mesh, rules, stacked=True)}
  for name, axes in _UPDATE_AXES.items():
    value = getattr(batch, name)
    fields[name] = None if value is None else NamedSharding(mesh, spec_for((None,) + axes, value.shape, mesh, rules))
  return UpdateBatch(**fields)


def jit_grpo_step(grpo_step, state: TrainState, batch: UpdateBatch, mesh: Mesh | None = None, rules=DEFAULT_RULES):
  """`jax.jit` of the update with the state donated and, with a mesh, explicit in/out shardings."""
  if mesh is None:
    return jax.jit(grpo_step, donate_argnums=(0,))
  state_sh = train_state_shardings(state, mesh, rules)
  return jax.jit(grpo_step, in_shardings=(state_sh, update_shardings(batch, mesh, rules)),
                 out_shardings=(state_sh, NamedSharding(mesh, PartitionSpec())), donate_argnums=(0,))
