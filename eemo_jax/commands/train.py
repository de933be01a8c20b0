"""`eemo-jax train --config configs/X.py [--config.key=value ...]`: run or resume an SFT run.

The same command runs on every host of a job (see launch/): with JAX's distributed environment
variables set (or on a TPU VM slice) it first joins the other processes.
"""

from __future__ import annotations

import sys

from eemo_jax.config import ConfigError, add_config_argument, config_from_args


def add_arguments(parser, name):
  del name
  add_config_argument(parser)


def run(args) -> int:
  from eemo_jax.parallel.distributed import initialize_from_environment

  config = config_from_args(args, "train")
  if config is None:
    return 2
  initialize_from_environment()
  from eemo_jax.train.run import NonFiniteLossError, train
  try:
    summary = train(config)
  except NonFiniteLossError as error:
    print(f"eemo-jax train: {error}", file=sys.stderr)
    return 3
  except ConfigError as error:
    print(f"eemo-jax train: {error}", file=sys.stderr)
    return 2
  print(f"done: {summary.steps} steps in {summary.seconds:.0f} s; run directory {summary.run_dir}")
  if summary.eval_metrics:
    print("eval: " + "  ".join(f"{k} {v:.4g}" for k, v in summary.eval_metrics.items()))
  if summary.export_dir:
    print(f"exported to {summary.export_dir}")
  return 0
