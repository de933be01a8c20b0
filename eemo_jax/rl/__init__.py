"""GRPO for the vision-language model: group rollouts, advantages and losses, emotion rewards, the loop.

    from eemo_jax import rl
    out = rl.rollout(model, prompts, group_size=G, max_completion_length=T, rng=key, eos_ids=..., pad_id=...)
    adv = rl.group_advantages(rewards, group_size=G, scale_rewards="group")
    loss, metrics = rl.policy_loss(logp, old_logp, ref_logp, adv, mask, loss_type="dapo", beta=0.04)
    from eemo_jax.rl import rewards
    summary = rl.grpo(config)   # the whole run (`eemo-jax grpo`)

Modules: rollout (prefix-shared group sampling), logprobs (the teacher-forced training forward), advantages
and losses (TRL 1.16's semantics), parsing and rewards (host parsing, jitted rewards), step (the update),
run (the loop).
"""

from eemo_jax.rl.advantages import group_advantages
from eemo_jax.rl.losses import mask_truncated_completions, policy_loss
from eemo_jax.rl.rollout import Rollout, make_rollout_fn, rollout
from eemo_jax.rl import parsing, rewards  # noqa: F401
from eemo_jax.rl.run import grpo
