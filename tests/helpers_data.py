"""Shared pieces of the data-pipeline tests: real shards from make_shards, a local
tokenizer, a deadline for every loop that could hang."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import tarfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from helpers_text import build_tokenizer

from pmc_clip import process_owner
from pmc_clip.config import DataConfig
from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.plan import make_key
from pmc_clip.sharding.run import make_shards
from pmc_clip.synthetic import SyntheticOptions, generate
from pmc_clip.tokenize import CaptionTokenizer

CONTEXT_LENGTH = 16
IMAGE_SIZE = 32


@contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """Fail (TimeoutError) instead of hanging: SIGALRM interrupts a blocked DataLoader."""

    def expire(signum: int, frame: Any) -> None:
        raise TimeoutError(f"the test did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def make_figures(
    root: Path, num_articles: int, min_side: int = 32, max_side: int = 48
) -> tuple[str, str]:
    """A synthetic PMC-OA stand-in (4 figures per article); (jsonl, images)."""
    jsonl = generate(
        SyntheticOptions(
            output=str(root / "raw"),
            num_articles=num_articles,
            figures_per_article=2,
            subfigures_per_figure=2,
            min_side=min_side,
            max_side=max_side,
        )
    )
    return jsonl, str(root / "raw" / "images")


def write_shards(jsonl: str, images: str, output: str, shard_size: int) -> dict[str, Any]:
    """All rows in one `train` split, `shard_size` samples per shard; returns the manifest."""
    return make_shards(
        ShardOptions(
            input=jsonl,
            images=images,
            output=output,
            shard_size=shard_size,
            split_fractions=(("train", 1.0),),
        )
    )


def sample_metadata(folder: Path) -> list[tuple[str, dict[str, Any]]]:
    """(shard name, the sample's `.json`) for every sample of every shard in `folder`, in
    shard order: where each input row was written (its `row`, `split`, `article_id`)."""
    samples = []
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    file = tar.extractfile(member)
                    assert file is not None
                    samples.append((shard.name, json.loads(file.read())))
    return samples


def all_keys(manifest: dict[str, Any], jsonl: str) -> set[str]:
    """The key of every row of `jsonl` (all of which make_shards wrote)."""
    rows = Path(jsonl).read_text().splitlines()
    assert manifest["rows"]["written"] == len(rows)
    return {make_key(json.loads(row)["image"]) for row in rows}


def data_config(train_data: str | None, **overrides: Any) -> DataConfig:
    """A DataConfig for tests: tiny images and buffers, 2 workers, batch 8."""
    settings: dict[str, Any] = {
        "train_data": train_data,
        "batch_size": 8,
        "num_workers": 2,
        "prefetch_factor": 2,
        "pin_memory": False,
        "image_size": IMAGE_SIZE,
        "span_samples": 4,
        "read_backoff_seconds": 0.01,
        "read_backoff_max_seconds": 0.05,
    }
    return DataConfig(**(settings | overrides))


def caption_tokenizer(directory: Path, mlm_probability: float = 0.15) -> CaptionTokenizer:
    return CaptionTokenizer(
        build_tokenizer(directory), context_length=CONTEXT_LENGTH, mlm_probability=mlm_probability
    )


def collect(loader: Iterable[dict[str, Any]], seconds: int = 60) -> list[dict[str, Any]]:
    with deadline(seconds):
        return list(loader)


def keys_of(batches: list[dict[str, Any]]) -> list[str]:
    return [key for batch in batches for key in batch["keys"]]


def same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=True):
        if x.keys() != y.keys() or x["keys"] != y["keys"]:
            return False
        for name, value in x.items():
            if isinstance(value, torch.Tensor) and not torch.equal(value, y[name]):
                return False
    return True


def killed_process_owner() -> process_owner.ProcessOwner:
    """The identity of a process of this host killed with -9 (and reaped)."""
    proc = subprocess.Popen(["sleep", "60"])
    owner = process_owner.ProcessOwner(
        socket.gethostname(), proc.pid, process_owner.process_start(proc.pid)
    )
    proc.kill()
    proc.wait()
    assert owner.start is not None and owner.is_gone()
    return owner
