#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and print its path.
#
# Sourced by launch/demo.sh and tests/run.sh so that both README commands work on a
# fresh machine. The venv is rebuilt only when setup.cfg/pyproject.toml change (a stamp
# file holds their hash). Everything is installed in ONE pip command: installing
# moto[server] after s3fs upgrades botocore past what aiobotocore accepts, and pip
# still exits 0, so we also run `pip check`.
#
# Variables: PMC_CLIP_VENV (default: <repo>/.venv), PYTHON (default: python3).
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${PMC_CLIP_VENV:-$repo_root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.pmc_clip_env_stamp"
want="$(cat "$repo_root/setup.cfg" "$repo_root/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[bootstrap] installing the environment into $venv (a few minutes the first time)" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  "$venv/bin/python" -m pip install --quiet -e "$repo_root[dev]" >&2
  "$venv/bin/python" -m pip check >&2
  echo "$want" >"$stamp"
fi
echo "$venv"
