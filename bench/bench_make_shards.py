"""make_shards throughput against a naive single-process webdataset.ShardWriter loop.

    .venv/bin/python bench/bench_make_shards.py --num-images 400 --workers 2 --repeats 3

Generates realistic figures once (JPEG and PNG, sides 300-2000 px, textured so JPEG
sizes look like real figures), then times, in the same run and on the same files:
  naive-copy    one process, ShardWriter, image bytes copied unchecked (no decode);
  naive-check   one process, ShardWriter, every image fully decoded (and resized when
                asked), i.e. the same work make_shards does, done the obvious way;
  make_shards   make_shards() with --workers N, called in-process like the loops above
                (its start-up counts: reading rows, planning, spawning workers).
each without and with --resize-max-side 512. Ratios are against naive-check (same
work) and naive-copy (less work: corrupt images would reach training).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pmc_clip.figures import FigureOptions  # noqa: E402
from pmc_clip.sharding import ShardOptions, make_shards  # noqa: E402
from pmc_clip.synthetic import draw_figure  # noqa: E402


def generate(folder: Path, num_images: int, seed: int) -> Path:
    jsonl = folder / "pmc_oa.jsonl"
    if jsonl.exists() and len(jsonl.read_text().splitlines()) == num_images:
        return jsonl
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(jsonl, "w") as out:
        for i in range(num_images):
            width, height = (int(v) for v in rng.integers(300, 2001, size=2))
            image, facts = draw_figure(rng, width, height)
            name = f"PMC{2000000 + i // 4}_F1_{i % 4}.{'png' if i % 3 == 0 else 'jpg'}"
            image.save(folder / "images" / name, quality=90)
            caption = f"A {facts['colour']} {facts['shape']} at the {facts['position']}."
            out.write(json.dumps({"image": name, "caption": caption}) + "\n")
    return jsonl


def naive(jsonl: Path, images: Path, out: Path, check: bool, resize: int | None) -> None:
    # Imported here: webdataset imports torch, and make_shards' spawned workers re-import
    # this main module; they must not pay ~3 s each for a torch they never use.
    import webdataset as wds

    out.mkdir(parents=True)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    with wds.ShardWriter(str(out / "naive-%06d.tar"), maxcount=1000, verbose=0) as sink:
        for row in rows:
            data = (images / row["image"]).read_bytes()
            ext = row["image"].rsplit(".", 1)[1]
            if check:
                image = Image.open(io.BytesIO(data))
                image.load()
                if resize and max(image.size) > resize:
                    scale = resize / max(image.size)
                    size = (round(image.width * scale), round(image.height * scale))
                    buffer = io.BytesIO()
                    image.resize(size, Image.Resampling.BICUBIC).save(
                        buffer, "JPEG" if ext == "jpg" else "PNG", quality=90
                    )
                    data = buffer.getvalue()
            key = row["image"].rsplit(".", 1)[0]
            sink.write({"__key__": key, ext: data, "txt": row["caption"]})


def ours(jsonl: Path, images: Path, out: Path, workers: int, resize: int | None) -> None:
    """In this process, like the naive loops (so no interpreter start-up is timed), but
    including make_shards' own start-up: reading rows, planning, spawning workers."""
    options = ShardOptions(
        input=str(jsonl),
        images=str(images),
        output=str(out),
        split="train",
        shard_size=1000,
        workers=workers,
        figure=FigureOptions(resize_max_side=resize),
    )
    with contextlib.redirect_stderr(io.StringIO()):
        make_shards(options)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--dir", default=str(REPO / "bench_out" / "make_shards"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(args.dir)
    jsonl = generate(root / "data", args.num_images, args.seed)
    images = root / "data" / "images"
    total_mb = sum(p.stat().st_size for p in images.iterdir()) / 1e6
    print(
        f"{args.num_images} figures, {total_mb:.1f} MB, {args.workers} workers, "
        f"{os.cpu_count()} cores"
    )
    for resize in (None, 512):
        rates: dict[str, float] = {}
        runs = {
            "naive-copy": lambda o, r=resize: naive(jsonl, images, o, check=False, resize=r),
            "naive-check": lambda o, r=resize: naive(jsonl, images, o, check=True, resize=r),
            "make_shards": lambda o, r=resize: ours(jsonl, images, o, args.workers, r),
        }
        # Interleaved repeats, best of each: the machine is shared and noisy, and the best
        # run is the one least disturbed by others.
        for _ in range(args.repeats):
            for name, run in runs.items():
                out = root / f"out-{name}"
                shutil.rmtree(out, ignore_errors=True)
                started = time.perf_counter()
                run(out)
                rate = args.num_images / (time.perf_counter() - started)
                rates[name] = max(rates.get(name, 0.0), rate)
        label = f"resize {resize}" if resize else "no resize"
        for name, rate in rates.items():
            print(
                f"[{label:>10}] {name:<12} {rate:8.1f} images/s   "
                f"x{rate / rates['naive-check']:.2f} vs naive-check   "
                f"x{rate / rates['naive-copy']:.2f} vs naive-copy"
            )


if __name__ == "__main__":
    main()
