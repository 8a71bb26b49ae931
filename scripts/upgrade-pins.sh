#!/usr/bin/env bash
# Try the newest releases: a fresh virtual environment with every dependency at its newest
# version, the whole test suite in it, and constraints.txt rewritten from it only if the
# suite passes. Review the diff of constraints.txt and commit it with the fixes it needed.
#   bash scripts/upgrade-pins.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
venv=$(mktemp -d)/venv
python3 -m venv "$venv"
PYTHON="$venv/bin/python" LORA_STUDIO_UNPINNED=1 bash scripts/setup.sh --tests
"$venv/bin/python" -m pytest -q "$@"
{
  sed -n '/^#/p' constraints.txt
  "$venv/bin/python" -m pip freeze --disable-pip-version-check | grep -v -e '^-e ' -e '^torch==' -e '^lora-studio' -e '^#'
} > constraints.txt.new
mv constraints.txt.new constraints.txt
echo "constraints.txt now pins the releases the suite passed with (git diff constraints.txt)."
