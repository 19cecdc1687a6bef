#!/usr/bin/env bash
# The whole product end to end on an embedded default: generated data, local disk, CPU.
#
#   bash launch/demo.sh            # outputs under ./demo_out (override: DEMO_DIR=...)
#
# Steps: set up the venv (first run only), generate a small PMC-OA-like dataset of
# figures whose captions name what is drawn, shard it with tools/make_shards.py, verify
# the shards against their manifest, and print the manifest summary.
# Variables: DEMO_DIR (default ./demo_out), DEMO_ARTICLES (default 60), PMC_CLIP_VENV.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv="$(bash tools/bootstrap_env.sh)"
py="$venv/bin/python"
demo_dir="${DEMO_DIR:-demo_out}"
articles="${DEMO_ARTICLES:-60}"
rm -rf "$demo_dir"

echo "== 1/3 generate $articles articles of synthetic figures into $demo_dir/data"
"$py" -m pmc_clip.synthetic --output "$demo_dir/data" --num-articles "$articles"

echo "== 2/3 make shards into $demo_dir/shards"
"$py" tools/make_shards.py --input "$demo_dir/data/pmc_oa.jsonl" \
  --images "$demo_dir/data/images" --output "$demo_dir/shards" \
  --shard-size 64 --shuffle --seed 0 --workers 2

echo "== 3/3 verify shards against the manifest"
"$py" tools/inspect_shards.py "$demo_dir/shards" --samples 2

echo "demo done: shards, sizes.json and manifest.json are in $demo_dir/shards"
