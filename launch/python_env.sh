#!/bin/bash
# Sourced by the launch scripts once `repo` (the checkout) is set. Sources
# PMC_CLIP_ENV_SCRIPT first (e.g. `module load` lines: they change this shell), then sets
# `python`: PMC_CLIP_PYTHON, else the venv's (PMC_CLIP_VENV, default <repo>/.venv), else
# python3 on PATH; and puts the checkout first on PYTHONPATH, so the repository's package
# wins over an older installed copy.
# shellcheck disable=SC2034  # venv and python are the sourcing script's
venv="${PMC_CLIP_VENV:-$repo/.venv}"
if [[ -n ${PMC_CLIP_ENV_SCRIPT:-} ]]; then
  # shellcheck source=/dev/null
  source "$PMC_CLIP_ENV_SCRIPT"
fi
python="${PMC_CLIP_PYTHON:-$venv/bin/python}"
[[ -x $python ]] || python="$(command -v python3)"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
