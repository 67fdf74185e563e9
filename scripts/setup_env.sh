#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment in $VENV (default .venv).
# Rules it keeps:
#  - a torch that is already there (a CUDA build on a GPU box) is never replaced: if the
#    interpreter that builds the venv has torch, the venv sees it (--system-site-packages);
#  - where no torch exists, it installs torch==2.13.0 (an unpinned torch would pull multi-GB
#    CUDA wheels onto a CPU machine);
#  - everything else is installed against a constraint that pins the torch found, so no
#    dependency can swap it out.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
DEFAULT_TORCH=${D2G_TORCH_VERSION:-2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "setup: reusing the torch already installed for $PY"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi

stamp="$VENV/.d2g-installed"
want=$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  echo "setup: no torch found, installing torch==$DEFAULT_TORCH"
  "$VENV/bin/python" -m pip install -q "torch==$DEFAULT_TORCH"
fi
torch_version=$("$VENV/bin/python" -c "import torch; print(torch.__version__)")
echo "torch==$torch_version" > .constraints.txt
echo "setup: installing d2g and its dependencies (torch pinned at $torch_version)"
"$VENV/bin/python" -m pip install -q -c .constraints.txt -e ".[dev]"
echo "$want" > "$stamp"
