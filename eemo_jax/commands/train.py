"""`eemo-jax train --config configs/X.py [--config.key=value ...]`: run or resume an SFT run.

The same command runs on every host of a job (see launch/): on a TPU VM slice, under SLURM, Open MPI or
in an indexed Kubernetes Job (or with `--coordinator-address`, `--num-processes`, `--process-id`) it first
joins the other processes (`eemo_jax.parallel.distributed`). Only process 0 prints progress.

Exit status: 0 done; 2 something to fix before the run can go on (config, paths, data, a resume that would
change the run, no readable checkpoint), one line on stderr and nothing written into the run directory;
3 the loss became NaN/inf; 1 a checkpoint could not be written (the run stopped at once).
"""

from __future__ import annotations

import sys

from eemo_jax.config import ConfigError, add_config_argument, config_from_args


def add_arguments(parser, name):
  from eemo_jax.parallel.distributed import add_process_arguments
  del name
  add_config_argument(parser)
  add_process_arguments(parser)


def join_processes(command: str, args) -> bool:
  """Joins the job's other processes, if any (before JAX's backend starts); False after printing why the
  settings cannot work (the command exits 2)."""
  from eemo_jax.parallel.distributed import ProcessSetupError, explicit_settings, initialize_from_environment
  try:
    initialize_from_environment(explicit_settings(args))
  except ProcessSetupError as error:
    print(f"eemo-jax {command}: {error}", file=sys.stderr)
    return False
  return True


def user_errors() -> tuple[type[BaseException], ...]:
  """What a user fixes (config, paths, data, an unreadable checkpoint): one line on stderr, exit 2."""
  from data_pipeline.errors import DatasetError, RecordError
  from eemo_jax.hf.safetensors_io import CheckpointError as HFFolderError
  from eemo_jax.hf.staging import ExportError
  from eemo_jax.train.checkpointing import RunCheckpointError
  return (RunCheckpointError, ConfigError, DatasetError, RecordError, HFFolderError, ExportError)



def run_reporting_errors(command: str, job, *, extra_user_errors=()):
  """(exit code, job's result or None): a run's failures as one line on stderr each, with the exit codes of
  the module docstring."""
  import jax

  from eemo_jax import status
  from eemo_jax.train.checkpointing import CheckpointSaveError
  from eemo_jax.train.run import NonFiniteLossError
  try:
    with status.printed(enabled=jax.process_index() == 0):  # weights read, steps compiled: one line each
      return 0, job()
  except NonFiniteLossError as error:
    print(f"eemo-jax {command}: {error}", file=sys.stderr)
    return 3, None
  except CheckpointSaveError as error:
    print(f"eemo-jax {command}: {error}", file=sys.stderr)
    return 1, None
  except (*user_errors(), *extra_user_errors) as error:
    print(f"eemo-jax {command}: {error}", file=sys.stderr)
    return 2, None


def run(args) -> int:
  config = config_from_args(args, "train")
  if config is None or not join_processes("train", args):
    return 2
  import jax

  from eemo_jax.train.run import train
  code, summary = run_reporting_errors("train", lambda: train(config))
  if summary is None or jax.process_index() != 0:
    return code
  print(f"done: {summary.steps} steps in {summary.seconds:.0f} s; run directory {summary.run_dir}")
  if summary.eval_metrics:
    print("eval: " + "  ".join(f"{k} {v:.4g}" for k, v in summary.eval_metrics.items()))
  if summary.export_dir:
    print(f"exported to {summary.export_dir}")
  return 0
