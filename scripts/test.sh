#!/usr/bin/env bash
# Installs what the tests need into .venv (pinned, idempotent) and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup_venv.sh data,test,tpu,gcs
# Two pytest-xdist workers, whole files each (module fixtures build their models and data sets once): most of the
# suite's time is XLA compiling on one core, so two workers keep both cores of a 2-core CI machine busy.
# Arguments go to pytest and win over these (e.g. `-n 0` runs in this process, `-m slow` the slow tests).
exec .venv/bin/python -m pytest -q -n 2 --dist loadfile "$@"
