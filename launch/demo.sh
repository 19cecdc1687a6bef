#!/usr/bin/env bash
# The whole product end to end on an embedded default: generated data, local disk, CPU.
#
#   bash launch/demo.sh            # outputs under ./demo_out (override: DEMO_DIR=...)
#
# Steps: set up the venv (first run only); generate a small PMC-OA-like dataset of
# figures whose captions name what is drawn (shape, colour, position), with a WordPiece
# tokenizer built from those captions; shard it with tools/make_shards.py and verify the
# shards; pretrain the tiny PMC-CLIP model (contrastive + MLM) with 2 processes (gloo) on
# CPU; evaluate retrieval on the held-out split and print where logs and checkpoints are.
# Variables: DEMO_DIR (default ./demo_out), DEMO_ARTICLES (default 150), DEMO_EPOCHS
# (default 12), DEMO_NPROC (default 2), PMC_CLIP_VENV.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="$(bash tools/bootstrap_env.sh)"
py="$venv/bin/python"
demo_dir="${DEMO_DIR:-demo_out}"
articles="${DEMO_ARTICLES:-150}"
epochs="${DEMO_EPOCHS:-12}"
nproc="${DEMO_NPROC:-2}"
rm -rf "$demo_dir"
started=$SECONDS

echo "== 1/4 generate $articles articles of synthetic figures into $demo_dir/data"
"$py" -m pmc_clip.synthetic --output "$demo_dir/data" --num-articles "$articles"

echo "== 2/4 make shards into $demo_dir/shards (train/valid/test by article)"
"$py" tools/make_shards.py --input "$demo_dir/data/pmc_oa.jsonl" \
  --images "$demo_dir/data/images" --output "$demo_dir/shards" \
  --shard-size 64 --shuffle --seed 0 --workers 2 >/dev/null
"$py" tools/inspect_shards.py "$demo_dir/shards" --samples 2
# A split's shards, as the manifest names them (pmc_clip/sharding/format.py reads it).
split_pattern() {
  "$py" -c "import sys; from pmc_clip import storage; from pmc_clip.sharding.format import Manifest
print(Manifest.load(*storage.url_to_fs(sys.argv[1])).splits[sys.argv[2]].pattern)" "$demo_dir/shards" "$1"
}
train_data="$demo_dir/shards/$(split_pattern train)"
val_data="$demo_dir/shards/$(split_pattern valid)"

echo "== 3/4 train the tiny model: $nproc processes, gloo, CPU, $epochs epochs"
# `--` ends torchrun's own options (it would read --logs as its --logs-specs).
"$venv/bin/torchrun" --standalone --nproc_per_node "$nproc" -m pmc_clip.train -- \
  --train-data "$train_data" --val-data "$val_data" \
  --model tiny --tokenizer "$demo_dir/data/tokenizer" --mlm \
  --batch-size 32 --workers 1 --epochs "$epochs" --lr 2e-3 --warmup 20 \
  --precision fp32 --device cpu --val-frequency 4 --save-frequency 4 \
  --logs "$demo_dir/logs" --name demo --log-every-n-steps 20

echo "== 4/4 evaluate the last checkpoint on the held-out split"
"$py" -m pmc_clip.evaluate --resume "$demo_dir/logs/demo/checkpoints/epoch_$epochs.pt" \
  --val-data "$val_data" --model tiny --tokenizer "$demo_dir/data/tokenizer" --mlm \
  --precision fp32 --device cpu --workers 1 --batch-size 64 \
  --logs "$demo_dir/logs" --name demo-eval --report-to | tee "$demo_dir/eval.json"
"$py" - "$demo_dir/eval.json" <<'PY'
import json, sys
results = json.load(open(sys.argv[1]))
n = results["num_pairs"]
for k in (1, 5, 10):
    print(f"recall@{k:<2}  image->text {results[f'image_to_text_R@{k}']:5.1f}%  "
          f"text->image {results[f'text_to_image_R@{k}']:5.1f}%   chance {100 * k / n:4.1f}%")
PY
echo "demo done in $((SECONDS - started)) s"
echo "  TensorBoard: $venv/bin/tensorboard --logdir $demo_dir/logs/demo/tensorboard"
echo "  checkpoints: $demo_dir/logs/demo/checkpoints (latest.json points at the newest)"
echo "  text log:    $demo_dir/logs/demo/out.log, metrics: $demo_dir/logs/demo/metrics.jsonl"
