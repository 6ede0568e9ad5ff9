#!/usr/bin/env bash
# SPDX-License-Identifier: Apache-2.0
# Creates the Python environment of the interop tests and of tools/cache_activations.py
# (tests/interop/requirements.txt: torch, safetensors, SAELens, sparsify, transformers,
# datasets, pytest) in a virtual environment, by default
# ${XDG_CACHE_HOME:-$HOME/.cache}/hsae/interop-venv, or the directory given as $1 or in
# HSAE_INTEROP_VENV. Idempotent: does nothing when that environment was made from the
# same requirements file and its packages are importable. From scratch: about 5 minutes
# and 6.3 GB (torch's CUDA wheels are most of it), with PyPI reachable.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
req="$here/requirements.txt"
venv=${1:-${HSAE_INTEROP_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/hsae/interop-venv}}
stamp="$venv/.hsae-requirements.txt"
python=${HSAE_PYTHON:-python3}

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"
flock 9  # one installer at a time

ready() {
  [[ -x "$venv/bin/python" ]] && cmp -s "$stamp" "$req" &&
    "$venv/bin/python" - <<'PY' 2>/dev/null
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in
                  ("torch", "safetensors", "sae_lens", "sparsify", "pytest", "numpy",
                  "transformers", "tokenizers", "datasets", "tqdm")) else 1)
PY
}

if ready; then
  echo "interop/setup.sh: $venv is up to date"
  exit 0
fi

start=$(date +%s)
echo "interop/setup.sh: installing $req into $venv"
rm -f "$stamp"
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check --no-input -q -r "$req"
cp "$req" "$stamp"
ready || { echo "interop/setup.sh: packages still not importable in $venv" >&2; exit 1; }
echo "interop/setup.sh: done in $(( $(date +%s) - start )) s ($(du -sh "$venv" | cut -f1))"
