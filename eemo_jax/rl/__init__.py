"""GRPO for the vision-language model: group rollouts, advantages and losses, emotion rewards, the loop.

    from eemo_jax import rl
    adv = rl.group_advantages(rewards, group_size=G, scale_rewards="group")
    loss, metrics = rl.policy_loss(logp, old_logp, ref_logp, adv, mask, loss_type="dapo", beta=0.04)
    from eemo_jax.rl import rewards
"""

from eemo_jax.rl.advantages import group_advantages
from eemo_jax.rl.losses import mask_truncated_completions, policy_loss
from eemo_jax.rl import parsing, rewards  # noqa: F401
