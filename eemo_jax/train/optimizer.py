"""AdamW with a warmed-up schedule (constant, linear or cosine), global-norm clipping and no weight decay on
biases and norms.

The schedules are the HF Trainer's (`get_{constant,linear,cosine}_schedule_with_warmup`), because the
recipes reproduce the authors' Trainer runs and the lr of each step is part of what a run computes.

Gradient accumulation is not an optax wrapper here: the train step scans over its microbatches and
makes one optimizer update per call (see `step.py`). `optax.MultiSteps` would instead update every
k-th call, keep a gradient accumulator in the optimizer state between calls (one more params-sized
buffer in the checkpoint), and leave each microbatch to normalise its own loss, while the SFT loss
is a token mean over the whole window.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import optax
from flax import nnx

from eemo_jax.config import ConfigError
from eemo_jax.train.freeze import map_with_path

SCHEDULES = ("constant", "linear", "cosine")  # what follows the warmup


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Defaults follow the HF Trainer (AdamW β=(0.9, 0.999), ε=1e-8, max_grad_norm=1.0)."""
  learning_rate: float = 1e-5  # peak
  schedule: str = "cosine"  # after the warmup: constant | linear | cosine (decay to end_learning_rate)
  warmup_steps: int = 0
  total_steps: int = 1000  # warmup included; a linear or cosine decay reaches end_learning_rate here
  end_learning_rate: float = 0.0
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  max_grad_norm: float | None = 1.0  # None: no clipping
  accum_steps: int = 1  # microbatches per optimizer update (the step scans over them)

  def __post_init__(self):
    if self.schedule not in SCHEDULES:
      raise ConfigError(f"optimizer.schedule {self.schedule!r} is not one of {', '.join(SCHEDULES)} (each after a "
                        "linear warmup over optimizer.warmup_ratio of the steps)")
    if self.schedule == "constant" and self.end_learning_rate != 0.0:
      raise ConfigError(f"optimizer.end_learning_rate ({self.end_learning_rate}) is never reached by the constant "
                        "schedule; set it to 0, or use optimizer.schedule linear or cosine to decay to it")
    if self.total_steps < 1 or not 0 <= self.warmup_steps <= self.total_steps:
      raise ValueError(f"need 0 <= warmup_steps ({self.warmup_steps}) <= total_steps ({self.total_steps}), "
                       "total_steps >= 1")
    if self.accum_steps < 1:
      raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")


def optimizer_config(cfg) -> OptimizerConfig:
  """An OptimizerConfig from a dataclass, a dict or an ml_collections ConfigDict with those fields."""
  if isinstance(cfg, OptimizerConfig):
    return cfg
  items = dict(cfg.items()) if hasattr(cfg, "items") else vars(cfg)
  known = {f.name for f in dataclasses.fields(OptimizerConfig)}
  unknown = sorted(set(items) - known)
  if unknown:
    raise ValueError(f"Unknown optimizer setting(s) {unknown}; the known ones are {sorted(known)}")
  return OptimizerConfig(**items)


def learning_rate_schedule(cfg) -> optax.Schedule:
  """Linear warmup from 0 to the peak over `warmup_steps`, then constant, or a linear or cosine decay that
  reaches `end_learning_rate` at `total_steps` (and stays there).

  With `end_learning_rate` 0 these are the HF multipliers step for step, written out rather than composed
  from optax's schedules so that their edge cases are HF's too: the first update's lr is 0 when there is a
  warmup, and `max(1, ...)` guards a zero-length warmup or decay the way HF does.
  """
  cfg = optimizer_config(cfg)
  peak, end, kind = cfg.learning_rate, cfg.end_learning_rate, cfg.schedule
  warmup, total = cfg.warmup_steps, cfg.total_steps

  def schedule(count):
    step = jnp.minimum(jnp.asarray(count, jnp.float32), total)  # past total_steps: the value there
    warming = step / max(1, warmup)
    # after the warmup, the share of (peak - end) still applied: 1 as the warmup ends; a decay reaches 0 at total
    if kind == "constant":
      share = jnp.ones_like(step)
    elif kind == "linear":
      share = (total - step) / max(1, total - warmup)
    else:
      share = 0.5 * (1.0 + jnp.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return jnp.where(step < warmup, peak * warming, end + (peak - end) * share)

  return schedule


def decay_mask(params: nnx.State):
  """True where weight decay applies: not on biases, not on norm scales.

  A norm is a parameter whose axes include `norm` (the RMSNorms) or whose path has a segment
  naming a norm (`norm`, `*layernorm`, `ln_*`, e.g. a head's LayerNorm). The HF Trainer's name
  patterns miss the vision tower's `norm1`/`norm2`/`ln_q`; here every norm is excluded.
  """
  no_decay = set()
  for path, var in nnx.to_flat_state(params):
    axes = tuple(var.get_metadata().get("axes") or ())
    if path[-1] == "bias" or "norm" in axes or any(_names_a_norm(str(p)) for p in path):
      no_decay.add(tuple(path))
  return map_with_path(lambda path, _: path not in no_decay, params)


def _names_a_norm(segment: str) -> bool:
  return "norm" in segment or segment.startswith("ln_")


def make_optimizer(cfg) -> optax.GradientTransformation:
  """Global-norm clipping, then AdamW with the schedule; decay masked off biases and norms."""
  cfg = optimizer_config(cfg)
  adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  if cfg.max_grad_norm is None:
    return adamw
  return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw)
