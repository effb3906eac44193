#!/usr/bin/env bash
# Creates MLServer's own virtualenv (examples/fraud-mlserver/.venv-mlserver) from PyPI.
#
# MLServer pins its own versions of fastapi, pydantic, numpy, ...; they clash with the sidecar's,
# so it never shares the sidecar's virtualenv. Idempotent: when the virtualenv already holds these
# exact requirements (a stamp file records them) pip is not run again.
#
#   examples/fraud-mlserver/setup.sh            # PYTHON=python3.11 by default
#   PYTHON=/usr/bin/python3.11 examples/fraud-mlserver/setup.sh
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
venv="${MLSERVER_VENV:-$here/.venv-mlserver}"
python="${PYTHON:-python3.11}"

# Ranges known to work together on Python 3.11.
requirements=(
  "mlserver>=1.6,<1.8"
  "mlserver-sklearn>=1.6,<1.8"
  "scikit-learn>=1.4,<1.7"
  "joblib>=1.3,<2"
)
stamp="$venv/.installed"
wanted="$(printf '%s\n' "${requirements[@]}")"

# Two runs at once (two test sessions, say) must not build the same virtualenv together.
mkdir -p "$venv"
if command -v flock >/dev/null 2>&1; then
  exec 9>"$venv/.setup.lock"
  flock -w 900 9 || { echo "another setup.sh holds $venv/.setup.lock" >&2; exit 1; }
fi

installed() {  # cheap: finds the packages without importing them
  "$venv/bin/python" -c 'import importlib.util as u, sys
sys.exit(any(u.find_spec(m) is None for m in ("mlserver", "mlserver_sklearn", "sklearn", "joblib")))'
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$wanted" ] && installed 2>/dev/null; then
  echo "MLServer virtualenv ready: $venv"
  exit 0
fi

command -v "$python" >/dev/null 2>&1 || { echo "need $python (Python 3.11), or set PYTHON" >&2; exit 1; }
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
# --no-compile: byte-compiling all of pandas, scipy and scikit-learn up front is a large share of
# the install time; Python compiles what MLServer actually imports on first use.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-compile \
  "${requirements[@]}"
"$venv/bin/python" -c 'import mlserver, mlserver_sklearn, sklearn, joblib'
printf '%s\n' "${requirements[@]}" > "$stamp"
echo "MLServer virtualenv ready: $venv ($("$venv/bin/mlserver" --version 2>/dev/null || echo mlserver))"
