#!/usr/bin/env bash
# Regenerate requirements.lock from pyproject.toml: every runtime dependency plus the build backend
# (setuptools, wheel), each pinned to one version with the sha256 of every file PyPI serves for it.
# The Dockerfile installs only from this file, with pip in hash-checking mode.
#
# Run it after changing [project.dependencies] or [build-system].requires; tests/deploy checks
# that the lock still satisfies pyproject.toml. Extra arguments go to pip-compile, e.g.
#   scripts/lock.sh --upgrade                  # move every pin to the newest allowed version
#   scripts/lock.sh --upgrade-package aiohttp  # move one
# Needs pip-tools (in the `test` extra) in the Python that runs it, which must be the image's
# Python minor version (3.11) so environment markers resolve the way they will in the image.
set -euo pipefail

cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"

"$python" - <<'PY'
import sys
if sys.version_info[:2] != (3, 11):
    sys.exit(f"scripts/lock.sh: needs Python 3.11 (the image's), got {sys.version.split()[0]}; "
             "set PYTHON=/path/to/python3.11")
PY

CUSTOM_COMPILE_COMMAND="scripts/lock.sh" "$python" -m piptools compile \
    --quiet \
    --generate-hashes \
    --allow-unsafe \
    --strip-extras \
    --build-deps-for wheel \
    --no-emit-index-url \
    --no-emit-find-links \
    --no-emit-trusted-host \
    --output-file requirements.lock \
    "$@" \
    pyproject.toml
