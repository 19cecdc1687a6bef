#!/usr/bin/env bash
# The project's whole test command (README, .ci/run): set up the venv, lint, type-check, test.
#   bash tests/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="$(bash tools/bootstrap_env.sh)"
export PATH="$venv/bin:$PATH"
echo "== ruff check"; ruff check .
echo "== ruff format --check"; ruff format --check .
echo "== mypy"; mypy
echo "== pytest"; python -m pytest "$@"
