#!/usr/bin/env bash
# Several GPU hosts, one JAX process per host driving all of its GPUs: the same command on every host.
#   srun --nodes=4 --ntasks-per-node=1 launch/multihost_gpu.sh CONFIG [--config.key=value ...]
#   mpirun -np 4 --npernode 1 launch/multihost_gpu.sh CONFIG [...]                     (Open MPI)
# Under SLURM and Open MPI, JAX finds the coordinator, the process count and this host's index itself.
# Elsewhere name them (the same address and count on every host, and this host's index):
#   launch/multihost_gpu.sh CONFIG --coordinator-address host0:12345 --num-processes 4 --process-id <0..3>
# (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID; the flags win). Not yet tested on GPU hosts.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:?usage: launch/multihost_gpu.sh CONFIG [--config.key=value ...] [--coordinator-address H:P ...]}"; shift
# JAX gives a process started by SLURM or Open MPI only the GPU of its local rank (one process per GPU);
# this recipe's process drives every GPU it can see, unless JAX_LOCAL_DEVICE_IDS says otherwise.
if [[ -z "${JAX_LOCAL_DEVICE_IDS:-}" ]]; then
  if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
    gpus=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
  elif command -v nvidia-smi >/dev/null; then
    gpus=$(nvidia-smi --list-gpus | wc -l)
  else
    echo "launch/multihost_gpu.sh: no GPU found (no CUDA_VISIBLE_DEVICES, no nvidia-smi); set JAX_LOCAL_DEVICE_IDS" >&2
    exit 2
  fi
  JAX_LOCAL_DEVICE_IDS=$(seq -s, 0 $((gpus - 1)))
  export JAX_LOCAL_DEVICE_IDS
fi
scripts/setup_venv.sh cuda,data
exec .venv/bin/eemo-jax train --config "$config" --config.model.attention=cudnn "$@"
