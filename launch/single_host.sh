#!/usr/bin/env bash
# One host, all its devices (CPU, or every GPU of the machine) in one JAX process.
#   launch/single_host.sh configs/tiny_demo.py --config.train.run_dir=runs/tiny
#   EEMO_EXTRAS=cuda launch/single_host.sh configs/emoverse_3b_sft.py --config.model.hf_dir=...   (GPU)
set -euo pipefail
cd "$(dirname "$0")/.."
config="${1:?usage: launch/single_host.sh CONFIG [--config.key=value ...]}"; shift
scripts/setup_venv.sh "data${EEMO_EXTRAS:+,$EEMO_EXTRAS}"
exec .venv/bin/eemo-jax train --config "$config" "$@"
