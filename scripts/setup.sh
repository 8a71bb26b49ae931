#!/usr/bin/env bash
# Set up LoRA Studio in the active Python environment (use a virtual environment: the
# README's commands make one in .venv); safe to run again.
#   scripts/setup.sh          torch (CPU build where no GPU), then the project
#   scripts/setup.sh --tests  the same plus test tools (pytest, LyCORIS, Playwright + Debian's Chromium)
# Every other package comes at the version in constraints.txt, the set CI tests;
# LORA_STUDIO_UNPINNED=1 takes the newest releases instead (scripts/upgrade-pins.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --disable-pip-version-check -q "$@"; }
pins=(-c constraints.txt)
[ "${LORA_STUDIO_UNPINNED:-}" = 1 ] && pins=()

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install "${TORCH_SPEC:-torch}"
  else
    # Pinned so pip takes the CPU build instead of pulling several GB of CUDA packages.
    pip_install "${TORCH_SPEC:-torch==2.13.0}"
  fi
fi

if [ "${1:-}" = "--tests" ]; then
  pip_install "${pins[@]}" -e ".[test]"
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install Chromium; browser tests will be skipped" >&2
  fi
else
  pip_install "${pins[@]}" -e .
fi
# pip compiles the packages it installs, but an editable install leaves the project's own
# modules as source: where Python does not write bytecode (PYTHONDONTWRITEBYTECODE, a
# read-only checkout) they were compiled again at every start of the studio.
"$PY" -m compileall -q studio ui trainers toyworld >/dev/null
