#!/usr/bin/env bash
# Refresh constraints.txt from .venv: the exact versions the test suite passed with. Run it after changing
# pyproject.toml's dependencies and a green ./scripts/test; commit both files together.
set -euo pipefail
cd "$(dirname "$0")/.."
{
  echo "# The versions ./scripts/test passed with; scripts/venv.sh installs with them (pip -c). Refresh: scripts/lock.sh"
  .venv/bin/python -m pip freeze --exclude-editable | grep -vE '^(-e |ruff==|py-spy==)'
} > constraints.txt
echo "constraints.txt: $(grep -vc '^#' constraints.txt) pinned packages"
