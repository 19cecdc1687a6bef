"""Loader throughput: our pipeline against the practical limit and OpenCLIP, local and S3.

    .venv/bin/python bench/bench_loader.py --openclip-python .venv-bench/bin/python

Prints samples/s of --epochs training epochs (3) over the same shards, each contender with
one loader (worker pool) for the run, as training uses one for all its epochs; all with the
same number of worker processes, batch size and image size:

  limit    a pure decode + RandomResizedCrop loop over the same tar bytes: worker
           processes each read whole shards with `tarfile` and run exactly our per-image
           decode + crop to uint8 pixels (no normalisation, shuffle, tokenizer, batching
           or IPC of pixels): the practical limit of this machine;
  ours     pmc_clip.data.build_train_loader, local shards, MLM masking on (15%, the
           production setting), uint8 batches (what the loader ships; the trainer
           normalises them on its device);
  ours-nomlm  the same, tokenizer without MLM masking (what OpenCLIP does);
  ours-s3  the same shards on a moto S3 server on 127.0.0.1, in a process of its own
           (streamed range reads);
  openclip OpenCLIP's `get_wds_dataset` (open_clip_train.data, from open_clip_torch in a
           separate venv: --openclip-python), same shards, workers, batch size and
           tokenizer, its own torchvision transforms (RandomResizedCrop scale set equal).

`--breakdown` prints the milliseconds per sample of each of our stages in one process.

Each figure is the best of --repeats runs (contenders interleaved), wall time from
creating the iterator to the last batch of the last epoch (worker start-up included once
per run for every contender: the limit's pool, our persistent workers, OpenCLIP's).
CPU ms per delivered sample (this process plus its reaped workers) is printed too; the
ratios by CPU are given as a ratio of minima and as the median of the ratios within each
repeat.
Targets (issue 4): ours >= 0.9 x limit, ours > openclip, ours-s3 >= 0.9 x ours.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tiny local tokenizer (no downloads)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------- data


def prepare(out: Path, num_articles: int, shard_size: int) -> tuple[str, Path, int]:
    """Synthetic figures (256-640 px) -> shards and a tokenizer; cached in `out`."""
    from helpers_text import build_tokenizer

    from pmc_clip import storage
    from pmc_clip.sharding.format import Manifest
    from pmc_clip.sharding.options import ShardOptions
    from pmc_clip.sharding.run import make_shards
    from pmc_clip.synthetic import SyntheticOptions, generate

    shards = out / "shards"
    tokenizer_dir = out / "tokenizer"
    if not (shards / "manifest.json").exists():
        jsonl = generate(
            SyntheticOptions(
                output=str(out / "raw"), num_articles=num_articles, min_side=256, max_side=640
            )
        )
        make_shards(
            ShardOptions(
                input=jsonl,
                images=str(out / "raw" / "images"),
                output=str(shards),
                shard_size=shard_size,
                split_fractions=(("train", 1.0),),
                workers=2,
            )
        )
    if not (tokenizer_dir / "vocab.txt").exists():
        build_tokenizer(tokenizer_dir)
    split = Manifest.load(*storage.url_to_fs(str(shards))).splits["train"]
    return str(shards / split.pattern), tokenizer_dir, split.samples


# --------------------------------------------------------------------------- limit


def _decode_shard(args: tuple[str, int, tuple[float, float]]) -> int:
    import torch
    from PIL import Image

    from pmc_clip import transforms

    torch.set_num_threads(1)  # as in DataLoader workers
    path, image_size, crop_scale = args
    rng = np.random.default_rng(0)
    count = 0
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.name.endswith(IMAGE_EXTENSIONS):
                continue
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            with Image.open(io.BytesIO(data)) as image:
                transforms.train_transform(image, image_size, crop_scale, rng)
            count += 1
    return count


def run_limit(
    pattern: str, workers: int, image_size: int, crop_scale: tuple[float, float], epochs: int
) -> tuple[int, float]:
    import braceexpand

    paths = list(braceexpand.braceexpand(pattern))
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        tasks = [(p, image_size, crop_scale) for p in paths]
        count = sum(sum(pool.map(_decode_shard, tasks, 1)) for _ in range(epochs))
    return count, time.perf_counter() - start


# --------------------------------------------------------------------------- ours


@functools.cache
def caption_tokenizer(tokenizer_dir: Path, mlm_probability: float) -> Any:
    """Loaded once, as the trainer does at start-up (not part of any run's CPU figure)."""
    from pmc_clip.tokenize import CaptionTokenizer, load_tokenizer

    return CaptionTokenizer(load_tokenizer(str(tokenizer_dir)), 77, mlm_probability)


def run_ours(
    train_data: str,
    tokenizer_dir: Path,
    args: argparse.Namespace,
    mlm_probability: float,
) -> tuple[int, float]:
    from pmc_clip.config import DataConfig
    from pmc_clip.data.loaders import build_train_loader

    tokenizer = caption_tokenizer(tokenizer_dir, mlm_probability)
    config = DataConfig(
        train_data=train_data,
        batch_size=args.batch_size,
        num_workers=args.workers,
        image_size=args.image_size,
        crop_scale=tuple(args.crop_scale),
        pin_memory=False,
    )
    loader = build_train_loader(config, tokenizer, rank=0, world_size=1, seed=0)
    start = time.perf_counter()
    count = 0
    for epoch in range(args.epochs):  # as the trainer does: one loader, set_epoch
        loader.set_epoch(epoch)
        # Whole global batches (EpochPlan): 2,944 of 3,000 samples an epoch.
        count += sum(len(batch["keys"]) for batch in loader)
    seconds = time.perf_counter() - start
    del loader  # shuts its persistent workers down and reaps them: their CPU is counted
    assert not multiprocessing.active_children(), "workers left running"
    return count, seconds


@contextlib.contextmanager
def s3_server(pattern: str) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 holding the shards and manifests; yields the pattern.

    The server runs in a process of its own, reaped only after every run: a real S3
    endpoint's CPU is not the loader's, so it is in no contender's CPU figure (on this
    2-core machine it still competes for the cores, and so for wall-clock time)."""
    import boto3
    import fsspec

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            with socket.socket() as client:
                if client.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the moto server did not start: {command}")
            time.sleep(0.1)
        os.environ |= {
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}",
        }
        boto3.client("s3").create_bucket(Bucket="bench-shards")
        fs = fsspec.filesystem("s3")
        for path in Path(pattern).parent.iterdir():
            if path.suffix in (".tar", ".idx", ".json"):
                fs.put_file(str(path), f"bench-shards/shards/{path.name}")
        yield f"s3://bench-shards/shards/{Path(pattern).name}"
    finally:
        server.terminate()
        server.wait(timeout=30)


# --------------------------------------------------------------------------- OpenCLIP

_OPENCLIP_SCRIPT = """
import sys, time, types
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import AugmentationCfg, image_transform
from open_clip_train.data import get_wds_dataset
pattern, tokenizer_dir, workers, batch, size, scale_min, scale_max, num, epochs = sys.argv[1:]
args = types.SimpleNamespace(
    train_data=pattern, train_data_upsampling_factors=None, dataset_resampled=False,
    train_num_samples=int(num), val_num_samples=None, seed=0, batch_size=int(batch),
    workers=int(workers), world_size=1, distributed=False,
)
preprocess = image_transform(int(size), is_train=True,
                             aug_cfg=AugmentationCfg(scale=(float(scale_min), float(scale_max))))
tokenizer = HFTokenizer(tokenizer_dir, context_length=77)
data = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=tokenizer)
start = time.perf_counter()
count = 0
for epoch in range(int(epochs)):  # as open_clip_train does: one loader, set_epoch
    data.set_epoch(epoch)
    count += sum(images.shape[0] for images, texts in data.dataloader)
print(count, time.perf_counter() - start)
"""


def run_openclip(
    python: str, pattern: str, tokenizer_dir: Path, num_samples: int, args: argparse.Namespace
) -> tuple[int, float]:
    command = [
        python, "-c", _OPENCLIP_SCRIPT, pattern, str(tokenizer_dir), str(args.workers),
        str(args.batch_size), str(args.image_size), str(args.crop_scale[0]),
        str(args.crop_scale[1]), str(num_samples), str(args.epochs),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"OpenCLIP run failed:\n{result.stderr[-3000:]}")
    count, seconds = result.stdout.strip().splitlines()[-1].split()
    return int(count), float(seconds)


# --------------------------------------------------------------------------- breakdown


def run_breakdown(pattern: str, tokenizer_dir: Path, num_shards: int = 10) -> dict[str, float]:
    """Milliseconds per sample of each stage of ours, in this process, one thread."""
    import braceexpand
    import torch
    from PIL import Image

    from pmc_clip import shard_index, transforms
    from pmc_clip.config import DataConfig
    from pmc_clip.data import shard_reader
    from pmc_clip.data.batches import BatchBuilder
    from pmc_clip.data.decode import KEPT_EXTENSIONS, sample_rng
    from pmc_clip.data.sample_order import Run
    from pmc_clip.data.shard_runs import RunReader
    from pmc_clip.tokenize import CaptionTokenizer, load_tokenizer

    torch.set_num_threads(1)
    urls = tuple(braceexpand.braceexpand(pattern))[:num_shards]
    counts = []
    for url in urls:
        with open(shard_index.index_url(url), "rb") as file:
            counts.append(shard_index.ShardIndex.from_bytes(file.read(), url).num_samples)
    # One-sample runs, as training reads local shards (span 1).
    runs = [
        Run(shard=s, first=i, stop=i + 1, stream=0, position=0)
        for s, n in enumerate(counts)
        for i in range(n)
    ]
    tokenizer = CaptionTokenizer(load_tokenizer(str(tokenizer_dir)), 77, mlm_probability=0.15)
    best: dict[str, float] = {}

    def timed(name: str, start: float, count: int) -> None:
        best[name] = min(best.get(name, float("inf")), (time.perf_counter() - start) / count)

    for _ in range(4):
        reader = RunReader(
            urls,
            tuple(counts),
            shard_reader.ShardFilesystems(shard_reader.ShardReadOptions()),
            shard_reader.ShardReadCounters(),
            KEPT_EXTENSIONS,
            DataConfig.max_member_bytes,
        )
        start = time.perf_counter()
        samples = [sample for result in reader.read_all(runs) for sample in result.samples]
        timed("run reads", start, len(samples))
        reader.close()
        start = time.perf_counter()
        images = []
        for sample in samples:
            rng = sample_rng(seed=0, epoch=0, key=sample["__key__"])
            data = sample["jpg"] if "jpg" in sample else sample["png"]
            with Image.open(io.BytesIO(data)) as image:
                images.append(transforms.train_transform(image, 224, (0.5, 1.0), rng))
        timed("decode + crop", start, len(samples))
        num_full = len(samples) // 64 * 64
        start = time.perf_counter()
        for first in range(0, num_full, 64):
            chunk = samples[first : first + 64]
            tokenizer.batch(
                [s["txt"].decode() for s in chunk],
                [sample_rng(seed=0, epoch=0, key=s["__key__"]) for s in chunk],
            )
        timed("tokenizer + MLM", start, num_full)
        rows = [
            {"key": s["__key__"], "image": i, "caption": "", "rng": None}
            for s, i in zip(samples, images, strict=True)
        ]
        # One buffer for every batch, as a worker's pooled shared buffers are reused.
        buffer = transforms.empty_batch(64, 224)
        start = time.perf_counter()
        for first in range(0, num_full, 64):
            builder = BatchBuilder(tokenizer, buffer)
            for row in rows[first : first + 64]:
                builder.add(row)
        timed("images to batch", start, num_full)
    return {name: seconds * 1000 for name, seconds in best.items()}


# --------------------------------------------------------------------------- main


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data and loader set-up this bench and bench_resume.py share."""
    parser.add_argument("--out", default=str(REPO / "bench_out" / "loader"))
    parser.add_argument("--num-articles", type=int, default=500)  # x 6 figures
    parser.add_argument("--shard-size", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--crop-scale", type=float, nargs=2, default=(0.5, 1.0))
    parser.add_argument(
        "--epochs", type=int, default=3, help="epochs per run, one loader (worker pool) each"
    )
    parser.add_argument("--mlm-probability", type=float, default=0.15, help="ours only")
    parser.add_argument("--openclip-python", default=None, help="python of the bench venv")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["limit", "ours", "s3", "openclip"]
    )
    parser.add_argument("--breakdown", action="store_true", help="per-stage ms/sample, then exit")
    args = parser.parse_args(argv)

    out = Path(args.out)
    pattern, tokenizer_dir, num_samples = prepare(out, args.num_articles, args.shard_size)
    if args.breakdown:
        for name, ms in run_breakdown(pattern, tokenizer_dir).items():
            print(f"{name:16s} {ms:6.3f} ms/sample (one thread, min of 4)")
        return 0
    num_shards = len(list(Path(pattern).parent.glob("*.tar")))
    print(
        f"{num_samples} samples in {num_shards} shards, {args.workers} workers, "
        f"batch {args.batch_size}, {args.image_size} px, crop scale {tuple(args.crop_scale)}, "
        f"MLM {args.mlm_probability} (ours), epochs a run: {args.epochs}, best of {args.repeats}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    contenders: dict[str, Callable[[], tuple[int, float]]] = {}  # -> (samples, seconds)
    crop_scale = (args.crop_scale[0], args.crop_scale[1])
    if "limit" not in args.skip:
        contenders["limit"] = lambda: run_limit(
            pattern, args.workers, args.image_size, crop_scale, args.epochs
        )
    mlm = args.mlm_probability
    if "ours" not in args.skip:
        contenders["ours"] = lambda: run_ours(pattern, tokenizer_dir, args, mlm)
        contenders["ours-nomlm"] = lambda: run_ours(pattern, tokenizer_dir, args, 0.0)
    if "s3" not in args.skip:
        contenders["ours-s3"] = lambda: run_ours(s3_pattern, tokenizer_dir, args, mlm)
    if "openclip" not in args.skip and args.openclip_python:
        contenders["openclip"] = lambda: run_openclip(
            args.openclip_python, pattern, tokenizer_dir, num_samples, args
        )
    # Interleaved repeats, best of each: the machine's load drifts (shared CI boxes), and
    # interleaving exposes every contender to the same drift.
    results: dict[str, float] = {}
    cpu_by_repeat: dict[str, list[float]] = {}
    with s3_server(pattern) if "ours-s3" in contenders else contextlib.nullcontext("") as s3:
        s3_pattern = s3
        for repeat in range(args.repeats):
            for name, run in contenders.items():
                cpu_before = _cpu_seconds()
                count, seconds = run()
                value = count / seconds
                # CPU per delivered sample of this process and its (reaped) workers: less
                # sensitive to other jobs than wall time. Not for openclip: its subprocess
                # pays imports.
                cpu = (_cpu_seconds() - cpu_before) / count * 1000
                if name != "openclip":
                    cpu_by_repeat.setdefault(name, []).append(cpu)
                print(
                    f"  repeat {repeat}: {name:10s} {value:7.1f} samples/s  "
                    f"{cpu:5.2f} cpu-ms/sample  load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
                results[name] = max(results.get(name, 0.0), value)
    cpu_ms = {name: min(values) for name, values in cpu_by_repeat.items()}
    for name, value in results.items():
        cpu_text = f"{cpu_ms[name]:5.2f} cpu-ms/sample" if name in cpu_ms else ""
        print(f"{name:10s} {value:7.1f} samples/s  {cpu_text}")
    ratios = {
        "ours / limit (target >= 0.9)": ("ours", "limit"),
        "ours-nomlm / limit": ("ours-nomlm", "limit"),
        "ours / openclip (target > 1)": ("ours", "openclip"),
        "ours-nomlm / openclip": ("ours-nomlm", "openclip"),
        "ours-s3 / ours (target >= 0.9)": ("ours-s3", "ours"),
    }
    for label, (a, b) in ratios.items():
        if a in results and b in results:
            by_cpu = ""
            if b in cpu_ms:
                # Also the median of the ratio within each repeat: neighbouring runs share
                # the machine's state, so it is steadier than a ratio of two minima.
                paired = [y / x for x, y in zip(cpu_by_repeat[a], cpu_by_repeat[b], strict=True)]
                by_cpu = (
                    f"  (by cpu-ms: {cpu_ms[b] / cpu_ms[a]:.3f}, "
                    f"median per repeat {statistics.median(paired):.3f})"
                )
            print(f"{label:32s} {results[a] / results[b]:.3f}{by_cpu}")
    return 0


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    raise SystemExit(main())
