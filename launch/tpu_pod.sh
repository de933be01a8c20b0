#!/usr/bin/env bash
# A TPU VM slice: the same command on every worker. From your machine:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#     "cd eemo-jax && launch/tpu_pod.sh configs/emoverse_3b_sft.py --config.train.run_dir=gs://BUCKET/runs/x \
#      --config.model.hf_dir=/path/on/every/worker/Qwen2.5-VL-3B-Instruct --config.data.data_dir=gs://BUCKET/tfds"
# JAX finds the other workers in the TPU VM's metadata; each joins them when the slice has several
# (eemo_jax.parallel.distributed), prints "process I of N: ..." once, and only worker 0 prints progress.
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:?usage: launch/tpu_pod.sh CONFIG [--config.key=value ...]}"; shift
scripts/setup_venv.sh data,tpu
exec .venv/bin/eemo-jax train --config "$config" "$@"
