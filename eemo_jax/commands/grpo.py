"""`eemo-jax grpo --config configs/X.py [--config.key=value ...]`: run or resume a GRPO run.

The same command runs on every host of a job (see launch/), like `eemo-jax train`, with the same run
directory conventions (resume on the same run dir, export at the end). Exit status as `train`'s: 0 done;
2 something to fix first (config, paths, data, a reward function, no readable checkpoint), one line on
stderr; 3 the loss became NaN/inf; 1 a checkpoint could not be written.
"""

from __future__ import annotations

from eemo_jax.config import add_config_argument, config_from_args


def add_arguments(parser, name):
  del name
  add_config_argument(parser)


def run(args) -> int:
  from eemo_jax.commands.train import run_reporting_errors
  from eemo_jax.parallel.distributed import initialize_from_environment

  config = config_from_args(args, "grpo")
  if config is None:
    return 2
  initialize_from_environment()
  from eemo_jax.rl.run import RewardFunctionError, grpo
  code, summary = run_reporting_errors("grpo", lambda: grpo(config), extra_user_errors=(RewardFunctionError,))
  if summary is None:
    return code
  rewards = summary.reward_history
  print(f"done: {summary.steps} steps in {summary.seconds:.0f} s; run directory {summary.run_dir}")
  if rewards:
    print(f"mean reward: first rollout {rewards[0]:.4g}, last {rewards[-1]:.4g}")
  if summary.export_dir:
    print(f"exported to {summary.export_dir}")
  return 0
