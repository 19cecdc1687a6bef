#!/bin/bash
# make_shards on many machines: a SLURM array job, one task per part (`--num-parts K
# --part I`, rows dealt to parts by article), then one merge job that checks every part
# and writes the output's sizes.json, manifest.json and skipped.jsonl.
#
# One command (outside SLURM: submits the array, then the merge after it):
#   NUM_PARTS=64 INPUT=s3://my-bucket/raw/pmc_oa.jsonl IMAGES=s3://my-bucket/raw/images.zip \
#   OUTPUT=s3://my-bucket/pmc-oa MAKE_SHARDS_ARGS="--resize-max-side 512 --shard-size 10000" \
#   bash launch/make_shards_array.sh [extra make_shards arguments]
# It prints both job ids. The same, as two sbatch commands:
#   jid=$(NUM_PARTS=64 INPUT=... IMAGES=... OUTPUT=... sbatch --parsable --array=0-63 \
#     launch/make_shards_array.sh)
#   OUTPUT=... MAKE_SHARDS_STEP=merge sbatch --dependency=afterok:$jid --kill-on-invalid-dep=yes \
#     --output='logs/%x-merge-%j.out' launch/make_shards_array.sh
# A part that failed (node lost, --time reached, cancelled): the merge is cancelled
# (afterok cannot be met). Resubmit that part with the same variables and arguments: it
# resumes after its last recorded shard (`--array=3,17` for several), then merge again:
#   jid=$(NUM_PARTS=64 INPUT=... IMAGES=... OUTPUT=... sbatch --parsable --array=3 \
#     launch/make_shards_array.sh)
#   OUTPUT=... MAKE_SHARDS_STEP=merge sbatch --dependency=afterok:$jid --kill-on-invalid-dep=yes \
#     --output='logs/%x-merge-%j.out' launch/make_shards_array.sh
# A merge while a part is missing changes nothing and exits 2, naming the missing parts.
#
# Submit from the repository root: SLURM writes each task's stdout and stderr to
# logs/make_shards-<array job id>_<part>.out (the merge: logs/make_shards-merge-<job id>.out)
# in the submit directory; SLURM does not create directories, so logs/ is part of the
# repository. The parts write straight to OUTPUT (an s3:// URL or a folder every node sees);
# endpoint and credentials come from the submit environment (AWS_ENDPOINT_URL_S3,
# AWS_PROFILE, AWS_*: sbatch passes it to the job). #SBATCH lines cannot read variables:
# change them on the sbatch command line or with SBATCH_* variables (SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...). No --array line below: the merge job uses this
# script too; the array comes from the command line (or from NUM_PARTS, one command).
#
# Variables (default):
#   INPUT        (required for the parts) pmc_oa.jsonl or a CSV, local or a URL
#   IMAGES       (required for the parts) image root: folder, URL, images.zip
#   OUTPUT       (required) output folder or URL, the same for every part and the merge
#   NUM_PARTS    (required for the parts) K: each task must know it, also when only one
#                part is resubmitted (`--array=3`); the array must be 0..K-1
#   MAKE_SHARDS_ARGS (none)  further make_shards flags, the same for every part (e.g.
#                "--resize-max-side 512 --shard-size 10000 --shuffle --seed 0"); split
#                at spaces. --workers: the task's CPUs (SLURM_CPUS_PER_TASK, 16 above)
#   MAKE_SHARDS_STEP (part in an array task)  merge: run the merge (a job without --array,
#                or here, outside SLURM)
#   PMC_CLIP_REPO <submit dir> (one command: this checkout); PMC_CLIP_VENV <repo>/.venv;
#   PMC_CLIP_PYTHON <venv>/bin/python; PMC_CLIP_ENV_SCRIPT (none) a file sourced first
#                on the node, e.g. `module load python` lines
# Exit code: make_shards' (0 done; 2 command line or start-up check, e.g. the merge with
# a part missing; 1 failure while running, rerun to resume; 130 interrupted).
#
#SBATCH --job-name=make_shards
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out
#SBATCH --open-mode=append
set -euo pipefail

step="${MAKE_SHARDS_STEP:-part}"
# Under sbatch this file is a copy in SLURM's spool: the checkout is the submit directory
# (or PMC_CLIP_REPO, which the one-command submission sets to this checkout).
script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
if [[ -n ${SLURM_JOB_ID:-} ]]; then
  repo="${PMC_CLIP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
else
  repo="${PMC_CLIP_REPO:-$(dirname "$(dirname "$script")")}"
fi
if [[ $step != part && $step != merge ]]; then
  echo "make_shards_array: MAKE_SHARDS_STEP must be part or merge, got '$step'" >&2
  exit 2
fi
need() { # name...: each variable set and not empty, else exit 2 naming them
  local missing=() name
  for name in "$@"; do [[ -n ${!name:-} ]] || missing+=("$name"); done
  if ((${#missing[@]})); then
    echo "make_shards_array: set ${missing[*]} (see the header of $0)" >&2
    exit 2
  fi
}

# ------------------------------------------------ outside SLURM: submit the parts and the merge
if [[ -z ${SLURM_JOB_ID:-} && $step == part ]]; then
  need INPUT IMAGES OUTPUT NUM_PARTS
  if ! [[ $NUM_PARTS =~ ^[0-9]+$ ]] || ((10#$NUM_PARTS < 1)); then
    echo "make_shards_array: NUM_PARTS must be a positive number, got '$NUM_PARTS'" >&2
    exit 2
  fi
  export PMC_CLIP_REPO="$repo"
  mkdir -p logs # the jobs' logs, relative to this (the submit) directory
  NUM_PARTS=$((10#$NUM_PARTS))
  parts="$(sbatch --parsable --array="0-$((NUM_PARTS - 1))" --export=ALL,MAKE_SHARDS_STEP=part \
    "$script" "$@")"
  parts="${parts%%;*}" # "jobid;cluster" on a multi-cluster setup
  merge="$(sbatch --parsable --dependency="afterok:$parts" --kill-on-invalid-dep=yes \
    --export=ALL,MAKE_SHARDS_STEP=merge --output='logs/%x-merge-%j.out' "$script" "$@")"
  merge="${merge%%;*}"
  echo "make_shards_array: parts: array job $parts (tasks 0-$((NUM_PARTS - 1)), logs/make_shards-${parts}_<part>.out)"
  echo "make_shards_array: merge: job $merge, after every part succeeded (logs/make_shards-merge-$merge.out)"
  echo "make_shards_array: if a part fails the merge is cancelled; resubmit it (it resumes) and merge:"
  echo "  jid=\$(sbatch --parsable --array=<part>[,<part>...] $script)"
  echo "  MAKE_SHARDS_STEP=merge sbatch --dependency=afterok:\$jid --kill-on-invalid-dep=yes --output='logs/%x-merge-%j.out' $script"
  echo "  (with the same INPUT, IMAGES, OUTPUT, NUM_PARTS and MAKE_SHARDS_ARGS set)"
  exit 0
fi

# ------------------------------------------------ a part (array task) or the merge
# shellcheck source=python_env.sh source-path=SCRIPTDIR
source "$repo/launch/python_env.sh"
read -r -a extra <<<"${MAKE_SHARDS_ARGS:-}"

if [[ $step == merge ]]; then
  need OUTPUT
  args=(--merge --output "$OUTPUT")
else
  need INPUT IMAGES OUTPUT NUM_PARTS
  if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]]; then
    echo "make_shards_array: not an array task: submit with sbatch --array=0-<NUM_PARTS - 1> (or MAKE_SHARDS_STEP=merge for the merge)" >&2
    exit 2
  fi
  args=(--input "$INPUT" --images "$IMAGES" --output "$OUTPUT"
    --num-parts "$NUM_PARTS" --part "$SLURM_ARRAY_TASK_ID")
  # The task's CPUs, also where SLURM binds no CPUs (the process would see the whole
  # node); a --workers in MAKE_SHARDS_ARGS or the arguments comes later and wins.
  [[ -n ${SLURM_CPUS_PER_TASK:-} ]] && args+=(--workers "$SLURM_CPUS_PER_TASK")
fi
args+=("${extra[@]}" "$@")

echo "[make_shards_array] ${SLURM_JOB_ID:+job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID} on ${SLURMD_NODENAME:-$(hostname)}: }$step${SLURM_ARRAY_TASK_ID:+ $SLURM_ARRAY_TASK_ID of ${NUM_PARTS:-?}}"
echo "[make_shards_array] $python $repo/tools/make_shards.py ${args[*]}"
exec "$python" "$repo/tools/make_shards.py" "${args[@]}"
