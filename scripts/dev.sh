#!/usr/bin/env bash
# The README's two set-up commands, on a fresh machine:
#   bash scripts/dev.sh bench [args]   the main job: benchmark table of every available backend
#   bash scripts/dev.sh test  [args]   the whole test suite
# Both create .venv (once), install the pinned development torch and this package with its
# test and model extras, then run. PYTHON picks the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-}
shift || true
case "$cmd" in bench|test) ;; *) echo "usage: bash scripts/dev.sh bench|test [args]" >&2; exit 2 ;; esac

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
# Pinned: a CUDA build that also runs (and compiles extensions) on CPU-only machines; an
# unpinned torch could pull several GB of a newer release.
"${pip[@]}" torch==2.14.1 torchvision==0.29.1
"${pip[@]}" "setuptools>=64" wheel
# The C++ backend's build tools (setup.py drives CMake + Ninja; VTOME_NO_EXT=1 skips it).
"${pip[@]}" cmake ninja pybind11
"${pip[@]}" --no-build-isolation -e ".[dev]"

case "$cmd" in
  bench) exec .venv/bin/python -m benchmarks "$@" ;;
  test) exec .venv/bin/python -m pytest "$@" ;;
esac
