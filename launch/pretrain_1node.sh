#!/bin/bash
# Pretrain PMC-CLIP on one machine: torchrun starts one trainer process per GPU (NCCL);
# on a machine without a GPU, NPROC_PER_NODE (default 1) CPU processes with gloo.
#
#   bash launch/pretrain_1node.sh [extra pmc_clip.train arguments]
#   TRAIN_DATA='shards/pmc-oa-train-{000000..000131}.tar' BATCH_SIZE=64 \
#     bash launch/pretrain_1node.sh --epochs 1
#
# Run it again with the same RUN_NAME to continue: it always passes `--resume latest`
# (a fresh start when the run has no checkpoint yet). To stop with a checkpoint, send
# SIGUSR1 to the process group (`kill -USR1 -- -<pgid>`): torchrun is started with USR1
# ignored, so only the trainer ranks act on it; they save and exit with code 3, which
# torchrun reports as 1 (the multi-node script, launch/pretrain_8node.sh, uses srun for
# that reason).
#
# Variables (default): the same as launch/pretrain_8node.sh - TRAIN_DATA
# (shards/pmc-oa-train-{000000..000131}.tar), VAL_DATA, TRAIN_NUM_SAMPLES,
# DATASET_RESAMPLED (0), CACHE_DIR, CACHE_LIMIT_BYTES, TEXT_ENCODER (PubMedBERT; empty:
# random init), TOKENIZER, MLM (1), MODEL, BATCH_SIZE, LR, WD, WARMUP, EPOCHS, WORKERS, SEED
# (unset: the trainer's defaults, `python -m pmc_clip.train --help`), PRECISION (amp_bf16
# on GPU, fp32 on CPU), SAVE_EVERY_N_STEPS (1000), LOGS_DIR (logs), RUN_NAME
# (pmc-clip-1node), PMC_CLIP_VENV
# (<repo>/.venv), PMC_CLIP_PYTHON, PMC_CLIP_ENV_SCRIPT, PMC_CLIP_ENTRY (pmc_clip.train),
# MASTER_PORT (29500), OMP_NUM_THREADS (4); and
#   NPROC_PER_NODE  (GPUs torch sees; 1 without a GPU)
#   PMC_CLIP_DEVICE (cuda with GPUs, else cpu); DIST_BACKEND (nccl with GPUs, else gloo)
set -euo pipefail
repo="${PMC_CLIP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=python_env.sh source-path=SCRIPTDIR
source "$repo/launch/python_env.sh"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"

if [[ -z ${NPROC_PER_NODE:-} || -z ${PMC_CLIP_DEVICE:-} ]]; then
  gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())')"
else
  gpus=0 # not needed: both given
fi
if ((gpus > 0)); then
  device="${PMC_CLIP_DEVICE:-cuda}" backend="${DIST_BACKEND:-nccl}" precision_default=amp_bf16
else
  device="${PMC_CLIP_DEVICE:-cpu}" backend="${DIST_BACKEND:-gloo}" precision_default=fp32
fi
[[ $device == cpu ]] && backend="${DIST_BACKEND:-gloo}" precision_default=fp32
nproc="${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}"

default_train_data='shards/pmc-oa-train-{000000..000131}.tar'
logs_dir="${LOGS_DIR:-logs}"
entry="${PMC_CLIP_ENTRY:-pmc_clip.train}"
# `--`: torchrun's parser must not read the trainer's options (`--logs` is "ambiguous" to it).
if [[ $entry == *.py ]]; then entry_args=(-- "$entry"); else entry_args=(-m -- "$entry"); fi
args=(
  --train-data "${TRAIN_DATA:-$default_train_data}"
  --precision "${PRECISION:-$precision_default}"
  --device "$device"
  --dist-backend "$backend"
  --logs "$logs_dir"
  --name "${RUN_NAME:-pmc-clip-1node}"
  --save-every-n-steps "${SAVE_EVERY_N_STEPS:-1000}"
  --resume latest
)
# Unset: the trainer's default (`python -m pmc_clip.train --help`), restated nowhere here.
for var_flag in MODEL:--model BATCH_SIZE:--batch-size LR:--lr WD:--wd WARMUP:--warmup \
  EPOCHS:--epochs WORKERS:--workers SEED:--seed; do
  var="${var_flag%%:*}"
  [[ -n ${!var:-} ]] && args+=("${var_flag#*:}" "${!var}")
done
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

echo "[launch] 1 node x $nproc ranks on $device ($backend); run dir $logs_dir/${RUN_NAME:-pmc-clip-1node}"
# USR1 ignored by torchrun (inherited across exec); the trainer installs its own handler.
trap '' USR1
exec "$python" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$nproc" \
  --master_port="${MASTER_PORT:-29500}" "${entry_args[@]}" "${args[@]}"
