"""`eemo-jax grpo --config configs/X.py [--config.key=value ...]`: run or resume a GRPO run.

The same command runs on every host of a job (see launch/), like `eemo-jax train`, with the same run
directory conventions (resume on the same run dir, export at the end). Exit status as `train`'s: 0 done;
2 something to fix first (config, paths, data, a reward function, no readable checkpoint), one line on
stderr; 3 the loss became NaN/inf; 1 a checkpoint could not be written.
"""

from __future__ import annotations

from eemo_jax.commands import train as train_command
from eemo_jax.config import config_from_args


def add_arguments(parser, name):
  train_command.add_arguments(parser, name)


def run(args) -> int:
  config = config_from_args(args, "grpo")
  if config is None or not train_command.join_processes("grpo", args):
    return 2
  import jax

  from eemo_jax.rl.run import RewardFunctionError, grpo
  code, summary = train_command.run_reporting_errors("grpo", lambda: grpo(config),
                                                     extra_user_errors=(RewardFunctionError,))
  if summary is None or jax.process_index() != 0:
    return code
  rewards = summary.reward_history
  print(f"done: {summary.steps} steps in {summary.seconds:.0f} s; run directory {summary.run_dir}")
  if rewards:
    print(f"mean reward: first rollout {rewards[0]:.4g}, last {rewards[-1]:.4g}")
  if summary.export_dir:
    print(f"exported to {summary.export_dir}")
  return 0
