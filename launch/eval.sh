#!/bin/bash
# Evaluate a PMC-CLIP checkpoint: image<->text retrieval recall@1/5/10 (and MLM accuracy
# with --mlm) on VAL_DATA with `python -m pmc_clip.evaluate`, on one machine: one process
# per GPU with torchrun, or one CPU process. Extra arguments go to pmc_clip.evaluate
# (e.g. --test-2000, --zeroshot-data DIR, --mlm, --model NAME as the checkpoint was trained).
#
#   CHECKPOINT=logs/pmc-clip-pretrain-1234/checkpoints \
#   VAL_DATA='s3://bucket/pmc-oa/pmc-oa-test-{000000..000016}.tar' bash launch/eval.sh --test-2000
#
# Inside a SLURM allocation: `sbatch --nodes=1 --gpus-per-node=1 launch/eval.sh` with the
# same variables. Results: the log and TensorBoard under $LOGS_DIR/$RUN_NAME.
# Variables (default):
#   CHECKPOINT (required)   a checkpoint file (local or URL), or a run's checkpoints/
#                           folder (then the one its latest.json names)
#   VAL_DATA (required)     shard pattern(s) to evaluate on
#   MODEL and WORKERS (unset: the evaluator's defaults, `python -m pmc_clip.evaluate --help`),
#   TEXT_ENCODER (PubMedBERT; empty: the model config's BERT), TOKENIZER, BATCH_SIZE
#   (256), PRECISION (amp_bf16 on GPU, fp32 on CPU),
#   LOGS_DIR (logs), RUN_NAME (eval-<checkpoint's run>-<date>), NPROC_PER_NODE (GPUs; 1),
#   PMC_CLIP_DEVICE (cuda with GPUs, else cpu), DIST_BACKEND, MASTER_PORT (29501),
#   PMC_CLIP_VENV (<repo>/.venv), PMC_CLIP_PYTHON, PMC_CLIP_ENV_SCRIPT
set -euo pipefail
repo="${PMC_CLIP_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
# shellcheck source=python_env.sh source-path=SCRIPTDIR
source "$repo/launch/python_env.sh"
checkpoint="${CHECKPOINT:?set CHECKPOINT to a checkpoint file or the checkpoints folder of a run}"
val_data="${VAL_DATA:?set VAL_DATA to the shards to evaluate on}"
# A run's checkpoints/ folder: the checkpoint its latest.json names.
if [[ -f $checkpoint/latest.json ]]; then
  checkpoint="$checkpoint/$("$python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["name"])' "$checkpoint/latest.json")"
fi
[[ $checkpoint == *://* || -f $checkpoint ]] || {
  echo "eval.sh: no checkpoint at $checkpoint" >&2
  exit 2
}

gpus="$("$python" -c 'import torch; print(torch.cuda.device_count())')"
if ((gpus > 0)); then device=cuda backend=nccl precision=amp_bf16; else device=cpu backend=gloo precision=fp32; fi
device="${PMC_CLIP_DEVICE:-$device}"
[[ $device == cpu ]] && backend=gloo precision=fp32
nproc="${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}"
run="$(basename "$(dirname "$(dirname "$checkpoint")")")"
args=(
  --val-data "$val_data"
  --resume "$checkpoint"
  --batch-size "${BATCH_SIZE:-256}"
  --precision "${PRECISION:-$precision}"
  --device "$device"
  --dist-backend "${DIST_BACKEND:-$backend}"
  --logs "${LOGS_DIR:-logs}"
  --name "${RUN_NAME:-eval-$run-$(date +%Y%m%d-%H%M%S)}"
)
# Unset: the evaluator's default (`python -m pmc_clip.evaluate --help`).
[[ -n ${MODEL:-} ]] && args+=(--model "$MODEL")
[[ -n ${WORKERS:-} ]] && args+=(--workers "$WORKERS")
text_encoder="${TEXT_ENCODER-microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext}"
[[ -n $text_encoder ]] && args+=(--text-encoder "$text_encoder")
[[ -n ${TOKENIZER:-} ]] && args+=(--tokenizer "$TOKENIZER")
args+=("$@")

echo "[eval] $checkpoint on $val_data: $nproc x $device" >&2
if ((nproc == 1)); then
  exec "$python" -m pmc_clip.evaluate "${args[@]}"
fi
exec "$python" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$nproc" \
  --master_port="${MASTER_PORT:-29501}" -m -- pmc_clip.evaluate "${args[@]}"
