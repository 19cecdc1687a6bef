"""make_shards throughput against the plain-loop limit and img2dataset, on the same figures.

    .venv/bin/python bench/bench_make_shards.py --num-images 2000 --workers 2 --repeats 3

Generates PMC-like figures once (80% JPEG, 20% PNG, sides 300-2000 px; the JPEGs are
photos with stain-like blotches and grain, median ~200 KB at q90, the PNGs line art),
then times, each as a whole process (interpreter start-up and imports included) with
`--resize-max-side 512 --jpeg-quality 90` and N = --workers processes, alternated over
--repeats rounds:
  plain-loop   N processes, each a plain PIL loop over its share of the rows: the same
               work per figure as make_shards (a DCT-scaled draft decode for JPEGs that
               will be shrunk, a full decode otherwise, bicubic resize, q90 JPEG / PNG
               encode, figures not resized kept byte for byte) into one plain tar each;
               what make_shards adds (row checks, splits, ordered packing, indexes,
               sha256, manifest, resume records) is the difference;
  make_shards  `python tools/make_shards.py ... --split train --workers N`;
  img2dataset  from --bench-venv when it has it (else skipped, said so), on file:// URLs
               of the same figures: keep_ratio_largest 512, only when bigger, q90,
               webdataset, --skip_reencode True, N processes x --i2d-threads threads,
               4 shards per process (its unit of parallelism; make_shards writes one). It
               does less validation (no EXIF orientation, no bomb limit) and re-encodes
               every PNG as JPEG; it decodes with OpenCV in full (no draft) and shrinks
               with INTER_AREA (its default: the antialiased choice, as bicubic from a
               draft is here).
The best and the median round of each are printed as images/s; the ratios use the best
(the machine is shared: the best round is the least disturbed). --no-resize adds the
plain loop and make_shards without resizing (every figure fully decoded, kept as is).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
PNG_EVERY = 5  # one figure in five is a PNG
TEXTURE_GRAIN = 4.0  # standard deviation of the JPEG photos' grain (sets their size)


def _draw(task: tuple[int, int, Path]) -> dict[str, str]:
    """Figure `index` of the set (its own seed: the same files whatever the pool does)."""
    import numpy as np

    from pmc_clip.synthetic import draw_figure

    index, seed, images = task
    rng = np.random.default_rng([seed, index])
    width, height = (int(v) for v in rng.integers(300, 2001, size=2))
    image, facts = draw_figure(rng, width, height)
    is_png = index % PNG_EVERY == 0
    if not is_png:
        # Photos (micrographs, gels, stained tissue): smooth blotches and grain, which
        # is what makes real figures' JPEGs ~200 KB rather than flat colour's ~30 KB.
        blotches = rng.integers(0, 60, (height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
        low = Image.fromarray(blotches).resize((width, height), Image.Resampling.BICUBIC)
        pixels = np.asarray(image, np.float32) - np.asarray(low, np.float32)
        pixels += rng.normal(0, TEXTURE_GRAIN, pixels.shape).astype(np.float32)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    name = f"PMC{2000000 + index // 4}_F1_{index % 4}.{'png' if is_png else 'jpg'}"
    image.save(images / name, quality=90)
    caption = f"A {facts['colour']} {facts['shape']} at the {facts['position']}."
    return {"image": name, "caption": caption}


def generate(folder: Path, num_images: int, seed: int, workers: int) -> Path:
    jsonl = folder / "pmc_oa.jsonl"
    if jsonl.exists() and len(jsonl.read_text().splitlines()) == num_images:
        return jsonl
    images = folder / "images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    with Pool(workers) as pool:
        rows = pool.map(_draw, [(i, seed, images) for i in range(num_images)], chunksize=8)
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return jsonl


# --------------------------------------------------------------------------- plain loop


def plain_loop(jsonl: Path, images: Path, out: Path, part: int, parts: int, max_side: int) -> None:
    """One process of the plain loop: rows part, part + parts, ... into one tar."""
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()][part::parts]
    with tarfile.open(out / f"plain-{part:06d}.tar", "w") as tar:
        for row in rows:
            data = (images / row["image"]).read_bytes()
            key, ext = row["image"].rsplit(".", 1)
            image: Image.Image = Image.open(io.BytesIO(data))
            fmt, (width, height) = image.format, image.size
            scale = max_side / max(width, height) if max_side else 1.0
            if scale < 1:
                size = (max(1, round(width * scale)), max(1, round(height * scale)))
                if fmt == "JPEG":
                    image.draft(image.mode, size)
                image = image.resize(size, Image.Resampling.BICUBIC)  # loads (decodes) first
                buffer = io.BytesIO()
                image.save(buffer, "JPEG" if fmt == "JPEG" else "PNG", quality=90)
                data = buffer.getvalue()
            else:
                image.load()  # a full decode: truncation is caught
            for member, payload in (
                (f"{key}.{ext}", data),
                (f"{key}.txt", row["caption"].encode()),
            ):
                info = tarfile.TarInfo(member)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


# --------------------------------------------------------------------------- contenders


def _timed(commands: list[list[str]], env: dict[str, str] | None = None) -> float:
    """Seconds until every command (started together) has ended; a failure stops the bench."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for command in commands
    ]
    outputs = [proc.communicate()[0] for proc in procs]
    elapsed = time.perf_counter() - started
    for command, proc, output in zip(commands, procs, outputs, strict=True):
        if proc.returncode != 0:
            tail = output.decode(errors="replace")[-4000:]
            sys.exit(f"{command[:3]} exited {proc.returncode}:\n{tail}")
    return elapsed


def _img2dataset_command(bench_venv: Path) -> Path | None:
    """Its console script, when img2dataset imports in the bench venv."""
    python = bench_venv / "bin" / "python"
    if not python.exists():
        return None
    found = subprocess.run([python, "-c", "import img2dataset"], capture_output=True)
    return bench_venv / "bin" / "img2dataset" if found.returncode == 0 else None


def contenders(
    args: argparse.Namespace,
    jsonl: Path,
    images: Path,
    root: Path,
    img2dataset_command: Path | None,
) -> dict[str, Callable[[Path], float]]:
    python = sys.executable
    this = str(Path(__file__).resolve())

    def plain(max_side: int) -> Callable[[Path], float]:
        def run(out: Path) -> float:
            out.mkdir(parents=True)
            return _timed(
                [
                    [python, this, "--plain-loop-part", str(part), "--plain-loop-max-side",
                     str(max_side), "--dir", str(root), "--out", str(out),
                     "--workers", str(args.workers)]
                    for part in range(args.workers)
                ]
            )  # fmt: skip

        return run

    def make_shards(resize: bool) -> Callable[[Path], float]:
        def run(out: Path) -> float:
            command = [
                python, "tools/make_shards.py", "--input", str(jsonl), "--images", str(images),
                "--output", str(out), "--split", "train", "--workers", str(args.workers),
            ]  # fmt: skip
            if resize:
                command += ["--resize-max-side", "512", "--jpeg-quality", "90"]
            return _timed([command])

        return run

    runs = {"plain-loop": plain(512), "make_shards": make_shards(True)}
    if img2dataset_command is not None:
        urls = root / "urls.csv"
        with open(urls, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["url", "caption"])
            for row in map(json.loads, jsonl.read_text().splitlines()):
                writer.writerow([(images / row["image"]).resolve().as_uri(), row["caption"]])

        # img2dataset spreads whole shards over its processes: with one shard, one of
        # them would do all the work. Four shards per process keep them all busy.
        per_shard = max(1, -(-args.num_images // (4 * args.workers)))

        def img2dataset(out: Path) -> float:
            command = [
                str(img2dataset_command), "--url_list", str(urls),
                "--input_format", "csv", "--url_col", "url", "--caption_col", "caption",
                "--output_folder", str(out), "--output_format", "webdataset",
                "--processes_count", str(args.workers), "--thread_count", str(args.i2d_threads),
                "--resize_mode", "keep_ratio_largest", "--image_size", "512",
                "--resize_only_if_bigger", "True", "--encode_quality", "90",
                "--skip_reencode", "True", "--number_sample_per_shard", str(per_shard),
                "--enable_wandb", "False",
            ]  # fmt: skip
            # Albumentations otherwise asks PyPI for a newer version at every import.
            return _timed([command], env=os.environ | {"NO_ALBUMENTATIONS_UPDATE": "1"})

        runs["img2dataset"] = img2dataset
    if args.no_resize:
        runs["plain-loop no-resize"] = plain(0)
        runs["make_shards no-resize"] = make_shards(False)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=str(REPO / "bench_out" / "make_shards"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bench-venv", default=str(REPO / ".venv-bench"))
    parser.add_argument("--i2d-threads", type=int, default=4)
    parser.add_argument("--no-resize", action="store_true", help="also time without resizing")
    # One process of the plain loop (started by the bench itself).
    parser.add_argument("--plain-loop-part", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--plain-loop-max-side", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = Path(args.dir)
    if args.plain_loop_part is not None:
        plain_loop(
            root / "data" / "pmc_oa.jsonl",
            root / "data" / "images",
            Path(args.out),
            args.plain_loop_part,
            args.workers,
            args.plain_loop_max_side,
        )
        return
    if args.num_images < 1 or args.workers < 1 or args.repeats < 1:
        raise ValueError("--num-images, --workers and --repeats must be >= 1")
    sys.path.insert(0, str(REPO))  # pmc_clip.synthetic, for the figures
    jsonl = generate(root / "data", args.num_images, args.seed, os.cpu_count() or 1)
    images = root / "data" / "images"
    sizes = sorted(p.stat().st_size for p in images.iterdir() if p.suffix == ".jpg")
    total_mb = sum(p.stat().st_size for p in images.iterdir()) / 1e6
    print(
        f"{args.num_images} figures ({len(sizes)} JPEG, median {sizes[len(sizes) // 2] / 1e3:.0f}"
        f" KB), {total_mb:.0f} MB; {args.workers} processes, {os.cpu_count()} cores, load "
        f"average {os.getloadavg()[0]:.2f}"
    )
    img2dataset_command = _img2dataset_command(Path(args.bench_venv))
    if img2dataset_command is None:
        print(f"img2dataset skipped: not importable in {args.bench_venv}")
    runs = contenders(args, jsonl, images, root, img2dataset_command)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(args.repeats):
        for name, run in runs.items():
            out = root / f"out-{name.replace(' ', '-')}"
            shutil.rmtree(out, ignore_errors=True)
            rates[name].append(args.num_images / run(out))
            print(f"round {round_ + 1}: {name:<22} {rates[name][-1]:7.1f} images/s", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    best = {name: max(values) for name, values in rates.items()}
    for name, values in rates.items():
        print(
            f"{name:<22} best {best[name]:7.1f}  median {statistics.median(values):7.1f} images/s"
        )
    for other in ("plain-loop", "img2dataset"):
        if other in best:
            print(f"make_shards / {other}: x{best['make_shards'] / best[other]:.2f}")


if __name__ == "__main__":
    main()
