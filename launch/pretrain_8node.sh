#!/bin/bash
# Pretrain PMC-CLIP (RN50_fusion4 + PubMedBERT, MLM) on 8 nodes x 8 GPUs under SLURM,
# streaming webdataset shards from object storage (or any path/URL the loader reads).
#
#   cd pmc_clip && sbatch launch/pretrain_8node.sh [extra pmc_clip.train arguments]
#
#   TRAIN_DATA='s3://my-bucket/pmc-oa/pmc-oa-train-{000000..000164}.tar' \
#   VAL_DATA='s3://my-bucket/pmc-oa/pmc-oa-valid-{000000..000016}.tar' \
#   AWS_ENDPOINT_URL_S3=https://s3.example.org NCCL_SOCKET_IFNAME=ib0 \
#   sbatch --partition=gpu --account=proj42 launch/pretrain_8node.sh --epochs 50
#
# Submit from the repository root: the job runs in the submit directory, and SLURM writes
# its own logs to logs/<job name>-<job id>.out (stdout, one `N:` prefix per rank) and .err
# (stderr: the trainer's log lines, tracebacks) there. SLURM does not create directories,
# so logs/ is part of the repository. The run itself (checkpoints/, tensorboard/, out.log)
# goes to $LOGS_DIR/$RUN_NAME, i.e. logs/pmc-clip-pretrain-<job id>/ by default.
# #SBATCH lines cannot read variables: change them on the sbatch command line
# (`sbatch --nodes=4 --time=4:00:00 ...`) or with SBATCH_* variables (SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...); those win over the lines below.
# `--cpus-per-task` is the least a node must have per GPU; the ranks then share all of the
# node's CPUs (--exclusive) for their data-loader workers.
#
# Launcher: srun starts one task per GPU, each task IS a trainer rank (no torchrun).
# Why not one torchrun per node: (1) torchrun reports any failed rank as exit code 1, so
# the script could not tell "stopped for preemption, checkpoint saved" (EXIT_CODE_PREEMPTED)
# from a crash; srun returns the ranks' own highest exit code. (2) SLURM's
# --signal=USR1@300 and `scancel --signal=USR1` reach every rank directly; a torchrun agent
# in between dies on USR1 (default action) unless taught to ignore it. (3) SLURM tracks
# every rank: when the first one exits, the others get EXIT_GRACE_SECONDS to follow, then
# SLURM ends them, so a crashed rank never leaves the others waiting in a collective.
# (Not --kill-on-bad-exit: it would kill the other ranks the moment the first one exits
# with EXIT_CODE_PREEMPTED, and srun would report their 143 instead of the ranks' 3.)
# Each task gets torchrun's variables (RANK, LOCAL_RANK,
# WORLD_SIZE, MASTER_ADDR = first node of `scontrol show hostnames`, MASTER_PORT), so the
# trainer starts exactly as under torchrun.
#
# Preemption and the time limit: SLURM sends SIGUSR1 to every rank 300 s before the time
# limit. Each rank stops at the next step boundary, rank 0 saves checkpoints/ + `latest.json`,
# and all ranks exit with EXIT_CODE_PREEMPTED. This script then runs `scontrol requeue`:
# the job (same job id, hence same RUN_NAME) starts again - after the cluster's credential
# lifetime, 2 min by default, plus queue time - and `--resume latest` continues from that
# checkpoint. Exit 0: training done. Any other exit code: not requeued (see the log).
# Checkpoint by hand and requeue: `scancel --signal=USR1 <job id>`.
#
# Variables (default):
#   TRAIN_DATA   s3://bucket/pmc-oa/pmc-oa-train-{000000..000164}.tar  shard pattern(s), `::`
#                between sources; sizes.json beside the shards gives the sample count, the
#                .idx beside each shard its samples' byte ranges (tools/index_shards.py)
#   VAL_DATA     (none)                validation shards; evaluated every epoch when set
#   DATASET_RESAMPLED 0                0: every sample once per epoch; 1: draw runs of
#                samples with replacement (seeded), TRAIN_NUM_SAMPLES per epoch
#   TRAIN_NUM_SAMPLES (from sizes.json)  samples per resampled epoch
#   CACHE_DIR    (none)                node-local folder: each node keeps the shards it reads
#                (the same every epoch), so epoch 2 onward reads nothing from object storage
#   CACHE_LIMIT_BYTES (none)           bound on CACHE_DIR; no re-downloads if it holds a
#                node's share of the shards (dataset bytes / nodes, plus one shard)
#   TEXT_ENCODER microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext
#                (hub id or local directory; set empty for a randomly initialised BERT);
#   TOKENIZER (the text encoder's); MLM 1 (0: contrastive only); SAVE_EVERY_N_STEPS 1000
#   MODEL, BATCH_SIZE (per GPU), LR, WD, WARMUP, EPOCHS, WORKERS (per GPU), PRECISION, SEED:
#                unset, the trainer's defaults (`python -m pmc_clip.train --help`)
#   LOGS_DIR logs (relative to the submit directory); RUN_NAME <job name>-<job id>
#   PMC_CLIP_DEVICE cuda; DIST_BACKEND nccl; NPROC_PER_NODE (ranks per node) = GPUs per node
#   MASTER_PORT 15000 + job id % 20000
#   PMC_CLIP_REPO <submit dir>; PMC_CLIP_VENV <repo>/.venv; PMC_CLIP_PYTHON <venv>/bin/python
#   PMC_CLIP_ENV_SCRIPT (none)  a file sourced first on the batch node and on every node,
#                e.g. `module load cuda/12.4` lines
#   PMC_CLIP_ENTRY pmc_clip.train  the module (or a .py file) each rank runs
#   MAX_REQUEUES 20   stop requeueing after this many restarts (SLURM_RESTART_COUNT)
#   EXIT_GRACE_SECONDS 120  how long the other ranks may take to exit after the first one
#                (the trainer's final save happens before its last barrier, so this only
#                bounds interpreter shutdown and the wait after a crash)
# Passed to every rank unchanged when set (srun exports the submit environment): object
# store endpoint and credentials (AWS_ENDPOINT_URL_S3, AWS_PROFILE, AWS_* - never printed
# here), NCCL_SOCKET_IFNAME, NCCL_IB_HCA, NCCL_IB_DISABLE, NCCL_DEBUG, GLOO_SOCKET_IFNAME,
# OMP_NUM_THREADS (default here: 4), HF_HOME.
#
#SBATCH --job-name=pmc-clip-pretrain
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=4
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --error=logs/%x-%j.err
#SBATCH --open-mode=append
#SBATCH --signal=USR1@300
#SBATCH --requeue
set -euo pipefail

# pmc_clip.train's exit code after saving a checkpoint on SIGUSR1/SIGTERM
# (pmc_clip/trainer.py: EXIT_CODE_PREEMPTED).
EXIT_CODE_PREEMPTED=3

: "${SLURM_JOB_ID:?run this with sbatch (or inside an salloc allocation)}"
repo="${PMC_CLIP_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}"
# shellcheck source=python_env.sh source-path=SCRIPTDIR
source "$repo/launch/python_env.sh"

# (A brace pattern cannot sit inside ${VAR:-...}: its `}` would end the expansion.)
default_train_data='s3://bucket/pmc-oa/pmc-oa-train-{000000..000164}.tar'
train_data="${TRAIN_DATA:-$default_train_data}"
logs_dir="${LOGS_DIR:-logs}"
[[ $logs_dir == /* || $logs_dir == *://* ]] || logs_dir="$PWD/$logs_dir"
run_name="${RUN_NAME:-${SLURM_JOB_NAME}-${SLURM_JOB_ID}}"
# Ranks per node: the GPUs of the node (SLURM_GPUS_ON_NODE; "gpu:a100:8" style counts
# keep the number after the last colon).
gpus="${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}"
nproc="${NPROC_PER_NODE:-${gpus##*:}}"
nnodes="$SLURM_JOB_NUM_NODES"
cpus_on_node="${SLURM_CPUS_ON_NODE:-$((nproc * ${SLURM_CPUS_PER_TASK:-1}))}"
cpus_per_rank=$((cpus_on_node / nproc > 0 ? cpus_on_node / nproc : 1))
head_node="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)"
export MASTER_ADDR="$head_node"
export MASTER_PORT="${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

entry="${PMC_CLIP_ENTRY:-pmc_clip.train}"
if [[ $entry == *.py ]]; then entry_args=("$entry"); else entry_args=(-m "$entry"); fi
args=(
  --train-data "$train_data"
  --device "${PMC_CLIP_DEVICE:-cuda}"
  --dist-backend "${DIST_BACKEND:-nccl}"
  --logs "$logs_dir"
  --name "$run_name"
  --save-every-n-steps "${SAVE_EVERY_N_STEPS:-1000}"
  --resume latest
)
# Unset: the trainer's default (`python -m pmc_clip.train --help`), restated nowhere here.
for var_flag in MODEL:--model BATCH_SIZE:--batch-size LR:--lr WD:--wd WARMUP:--warmup \
  EPOCHS:--epochs WORKERS:--workers SEED:--seed; do
  var="${var_flag%%:*}"
  [[ -n ${!var:-} ]] && args+=("${var_flag#*:}" "${!var}")
done
[[ -n ${PRECISION:-} ]] && args+=(--precision "$PRECISION")
# TEXT_ENCODER set but empty: a randomly initialised BERT of the model's config.
text_encoder="${TEXT_ENCODER-microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext}"
[[ -n $text_encoder ]] && args+=(--text-encoder "$text_encoder")
[[ -n ${TOKENIZER:-} ]] && args+=(--tokenizer "$TOKENIZER")
[[ ${MLM:-1} == 1 ]] && args+=(--mlm)
[[ ${DATASET_RESAMPLED:-0} == 1 ]] && args+=(--dataset-resampled)
[[ -n ${TRAIN_NUM_SAMPLES:-} ]] && args+=(--train-num-samples "$TRAIN_NUM_SAMPLES")
[[ -n ${CACHE_DIR:-} ]] && args+=(--cache-dir "$CACHE_DIR")
[[ -n ${CACHE_LIMIT_BYTES:-} ]] && args+=(--cache-limit-bytes "$CACHE_LIMIT_BYTES")
[[ -n ${VAL_DATA:-} ]] && args+=(--val-data "$VAL_DATA" --val-frequency 1)
args+=("$@") # last wins: extra arguments override the defaults above

echo "[launch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $nnodes nodes ($SLURM_JOB_NODELIST) x $nproc ranks, head $head_node:$MASTER_PORT, $cpus_per_rank CPUs per rank"
echo "[launch] run dir $logs_dir/$run_name; data $train_data"
echo "[launch] $python ${entry_args[*]} ${args[*]}"

# Every task: torchrun's variables from SLURM's, then the trainer replaces the shell (exec),
# so signals from SLURM land on the trainer itself.
set +e
# shellcheck disable=SC2016 # expanded by each task's shell, not here
srun --nodes="$nnodes" --ntasks-per-node="$nproc" --ntasks=$((nnodes * nproc)) \
  --cpus-per-task="$cpus_per_rank" --kill-on-bad-exit=0 --wait="${EXIT_GRACE_SECONDS:-120}" --label \
  bash -c '
    if [[ -n ${PMC_CLIP_ENV_SCRIPT:-} ]]; then source "$PMC_CLIP_ENV_SCRIPT"; fi
    export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS
    export LOCAL_WORLD_SIZE=$SLURM_NTASKS_PER_NODE GROUP_RANK=$SLURM_NODEID
    echo "[launch] rank $RANK/$WORLD_SIZE on ${SLURMD_NODENAME:-$(hostname)} (local rank $LOCAL_RANK)"
    exec "$@"' pmc-clip-rank "$python" "${entry_args[@]}" "${args[@]}"
rc=$?
set -e

if ((rc == 0)); then
  echo "[launch] training finished"
  exit 0
fi
if ((rc == EXIT_CODE_PREEMPTED)); then
  if ((${SLURM_RESTART_COUNT:-0} >= ${MAX_REQUEUES:-20})); then
    echo "[launch] stopped with a checkpoint, but already restarted ${SLURM_RESTART_COUNT} times (MAX_REQUEUES): not requeueing" >&2
    exit "$rc"
  fi
  echo "[launch] checkpoint saved on a stop signal: requeueing job $SLURM_JOB_ID (restart $((${SLURM_RESTART_COUNT:-0} + 1))); it resumes from $logs_dir/$run_name/checkpoints/latest.json"
  # Ends this run at once; SLURM starts the job again when the nodes are free.
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[launch] trainer failed with exit code $rc: not requeued" >&2
exit "$rc"
