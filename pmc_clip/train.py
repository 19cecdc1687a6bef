"""Pretrain PMC-CLIP: `python -m pmc_clip.train --train-data ... --model RN50_fusion4 --mlm`.

    torchrun --nproc_per_node 8 -m pmc_clip.train \
        --train-data 's3://bucket/pmc-oa/pmc-oa-train-{000000..000131}.tar' \
        --val-data 's3://bucket/pmc-oa/pmc-oa-valid-{000000..000016}.tar' \
        --model RN50_fusion4 --mlm \
        --text-encoder microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract-fulltext \
        --batch-size 128 --lr 1e-4 --wd 0.1 --warmup 500 --epochs 100 --crop-scale 0.5 1.0 \
        --workers 8 --precision amp_bf16 --logs logs --name pmc-clip-rn50 --resume latest

All flags: `python -m pmc_clip.train --help`. Exit codes: 0 done, 1 stopped by an error
(message in the log), 2 bad command line, 3 stopped on SIGUSR1/SIGTERM after saving a
checkpoint (requeue and pass `--resume latest` to continue), 130 Ctrl-C.
"""

from __future__ import annotations

import sys

from pmc_clip.config import parse_run_config
from pmc_clip.entry import cli
from pmc_clip.trainer import Trainer


def start_training(argv: list[str]) -> Trainer:
    return Trainer(parse_run_config(argv, "Pretrain PMC-CLIP."))


def main(argv: list[str] | None = None) -> int:
    return cli(
        start_training, Trainer.fit, sys.argv[1:] if argv is None else argv, "pmc_clip.train"
    )


if __name__ == "__main__":
    sys.exit(main())
