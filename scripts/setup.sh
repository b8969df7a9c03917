#!/usr/bin/env bash
# Create (once) the Python environment for moe-lab and link it as .venv.
#
# The environment lives outside the clone, keyed by the hash of requirements/ci.lock, so that
# repeated CI runs and fresh clones on one machine reuse it instead of downloading torch
# (~3 GB, CUDA build from PyPI) again. Override the location with MOE_LAB_CACHE.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for candidate in "${MOE_LAB_PYTHON:-}" /root/.pyenv/versions/3.12.1/bin/python3.12 \
                   "$(PYENV_VERSION=3.12.1 command -v python3.12 2>/dev/null || true)" \
                   python3.12 python3; do
    [ -n "$candidate" ] || continue
    if PYENV_VERSION=3.12.1 "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"; return 0
    fi
  done
  echo "setup: no Python >= 3.12 found (set MOE_LAB_PYTHON=/path/to/python3.12)" >&2
  return 1
}

lock=requirements/ci.lock
key=$(sha256sum "$lock" | cut -c1-16)
cache=${MOE_LAB_CACHE:-$HOME/.cache/moe-lab}
venv="$cache/venv-$key"

if [ ! -f "$venv/.complete" ]; then
  mkdir -p "$cache"
  free_gb=$(df -Pk "$cache" | awk 'NR==2 {print int($4 / 1048576)}')
  if [ "$free_gb" -lt 12 ]; then
    echo "setup: only ${free_gb} GiB free under $cache; the environment needs about 8 GiB" >&2
    exit 1
  fi
  python=$(find_python)
  echo "setup: creating $venv with $python (one-off; torch is a large download)"
  rm -rf "$venv"
  PYENV_VERSION=3.12.1 "$python" -m venv "$venv"
  # pip warns once per package about this machine's local mirrors; keep the real errors.
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
  "$venv/bin/python" -m pip install -q --no-cache-dir -r "$lock" 2>&1 | grep -v "is ignored" || true
  check="import torch, megatron.core, yaml, psutil, pytest, mlflow, tokenizers, transformers"
  "$venv/bin/python" -W ignore -c "$check" 2>/dev/null || "$venv/bin/python" -c "$check"
  touch "$venv/.complete"
fi

# Point the editable install (the `moe-lab` command) at this clone (seconds; no downloads).
# MOE_LAB_EDITABLE=0 leaves it where it points: tests that run a second clone of the repository
# with the cached environment use it, with PYTHONPATH naming that clone.
if [ "${MOE_LAB_EDITABLE:-1}" != 0 ]; then
  "$venv/bin/python" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 ||
    "$venv/bin/python" -m pip install --no-deps --no-build-isolation -e .
fi
ln -sfn "$venv" .venv
