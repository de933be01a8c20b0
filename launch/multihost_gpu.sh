#!/usr/bin/env bash
# Several GPU hosts: run this same command on every host (e.g. `srun launch/multihost_gpu.sh CONFIG ...`).
# One JAX process per host drives all the host's GPUs. Under SLURM the coordinator, process count and
# index come from SLURM's variables; elsewhere set them yourself:
#   JAX_COORDINATOR_ADDRESS=host0:12345 JAX_NUM_PROCESSES=4 JAX_PROCESS_ID=<0..3> launch/multihost_gpu.sh CONFIG ...
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:?usage: launch/multihost_gpu.sh CONFIG [--config.key=value ...]}"; shift
if [[ -z "${JAX_COORDINATOR_ADDRESS:-}" && -n "${SLURM_JOB_NODELIST:-}" ]]; then
  first_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  export JAX_COORDINATOR_ADDRESS="${first_host}:${JAX_COORDINATOR_PORT:-12345}"
  export JAX_NUM_PROCESSES="$SLURM_NTASKS"
  export JAX_PROCESS_ID="$SLURM_PROCID"
fi
scripts/setup_venv.sh cuda,data
: "${JAX_COORDINATOR_ADDRESS:?set JAX_COORDINATOR_ADDRESS=host:port (or run under SLURM)}"
: "${JAX_NUM_PROCESSES:?set JAX_NUM_PROCESSES}"
: "${JAX_PROCESS_ID:?set JAX_PROCESS_ID}"
exec .venv/bin/eemo-jax train --config "$config" --config.model.attention=cudnn "$@"
