#!/usr/bin/env bash
# Installs what the tests need into .venv (pinned, idempotent) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh data,test,tpu,gcs
exec .venv/bin/python -m pytest -q "$@"
