"""Shared pieces of the training tests: a small generated dataset and a fast run config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from pmc_clip.sharding.options import ShardOptions
from pmc_clip.sharding.run import make_shards
from pmc_clip.synthetic import SyntheticOptions, generate, write_tokenizer

REPO = Path(__file__).resolve().parent.parent
DEADLINE_SECONDS = 240


def build_train_data(root: Path) -> dict[str, str]:
    """Generated figures, their tokenizer, and shards: 64 train pairs in 8 shards, 16 val."""
    jsonl = generate(
        SyntheticOptions(
            output=str(root / "raw"),
            num_articles=20,
            figures_per_article=2,
            subfigures_per_figure=2,
        )
    )
    captions = [json.loads(line)["caption"] for line in Path(jsonl).read_text().splitlines()]
    write_tokenizer(captions, str(root / "tokenizer"))
    rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines()]
    split_jsonl = root / "split.jsonl"
    # A fixed split (every 5th article to valid) keeps shard counts known to the tests.
    for row in rows:
        row["split"] = "valid" if int(row["pmcid"][3:]) % 5 == 0 else "train"
    split_jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    make_shards(
        ShardOptions(
            input=str(split_jsonl),
            images=str(root / "raw" / "images"),
            output=str(root / "shards"),
            shard_size=8,
        )
    )
    manifest = json.loads((root / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 64
    shards = root / "shards"
    return {
        "train": str(shards / manifest["splits"]["train"]["pattern"]),
        "val": str(shards / manifest["splits"]["valid"]["pattern"]),
        "tokenizer": str(root / "tokenizer"),
    }


def train_args(data: dict[str, str], logs: Path, name: str, *extra: str) -> list[str]:
    """Tiny model, fp32 on CPU, 4 per batch, 2 epochs, a log line (metrics.jsonl) a step."""
    return [
        "--train-data",
        data["train"],
        "--val-data",
        data["val"],
        "--model",
        "tiny",
        "--tokenizer",
        data["tokenizer"],
        "--mlm",
        "--batch-size",
        "4",
        "--workers",
        "1",
        "--epochs",
        "2",
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--lr",
        "2e-3",
        "--warmup",
        "2",
        "--logs",
        str(logs),
        "--name",
        name,
        "--log-every-n-steps",
        "1",
        "--seed",
        "3",
        *extra,
    ]


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=DEADLINE_SECONDS, **kwargs
    )


def train_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pmc_clip.train", *args]


def metrics_by_step(run_dir: Path) -> dict[int, dict[str, float]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {record["step"]: record for record in map(json.loads, lines)}
