#!/usr/bin/env bash
# Creates (or reuses) .venv under the repo: the package with EXTRAS, every version pinned by constraints.txt (the
# environment the tests and benchmarks ran in; pyproject.toml only states compatible ranges). Safe to run twice:
# it installs again only when pyproject.toml or constraints.txt is newer than the last install of these extras.
# Usage: scripts/setup_venv.sh [EXTRAS]   e.g. scripts/setup_venv.sh data,test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null || py=python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=".venv/.installed-${extras:-base}"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  spec="."
  [ -n "$extras" ] && spec=".[${extras}]"
  # compat mode puts the repo on sys.path, so packages added later (data_pipeline, ...) import too.
  .venv/bin/python -m pip install -q -c constraints.txt -e "$spec" --config-settings editable_mode=compat
  touch "$stamp"
fi
