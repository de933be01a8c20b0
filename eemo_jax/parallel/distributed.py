"""Joining a multi-process JAX job: the same command on every host (launch/ has the recipes).

* TPU VM slices: `jax.distributed.initialize()` finds the coordinator and every worker by itself; we
  call it when the TPU environment says this host is one worker of several.
* GPU clusters (and anything else): set `JAX_COORDINATOR_ADDRESS=host:port`, `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID` (launch/multihost_gpu.sh derives them from SLURM or your scheduler).
* Nothing set: a single process; nothing to do.
"""

from __future__ import annotations

import os

import jax


def initialize_from_environment() -> bool:
  """Calls `jax.distributed.initialize` when the environment describes a multi-process job; returns whether."""
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
    if missing:
      raise RuntimeError(f"JAX_COORDINATOR_ADDRESS is set but {', '.join(missing)} is not; set all three "
                         "(see launch/multihost_gpu.sh)")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
    return True
  worker_hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in worker_hosts:  # a multi-host TPU slice: JAX discovers everything from the TPU metadata
    jax.distributed.initialize()
    return True
  return False
