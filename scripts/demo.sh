#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv (pinned, idempotent), then runs `eemo-jax demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh data,test
exec .venv/bin/eemo-jax demo "$@"
