"""Evaluate a checkpoint: `python -m pmc_clip.evaluate --resume CHECKPOINT ...`.

    python -m pmc_clip.evaluate --resume logs/run/checkpoints/latest.json \
        --val-data 'shards/pmc-oa-test-{000000..000016}.tar' --model RN50_fusion4 --test-2000

The training flags, --resume naming the weights (a checkpoint, `latest`, or PMC_CLIP:beta
with --pmc-clip-beta). Image<->text retrieval recall@K (+ MLM accuracy) on --val-data and
zero-shot classification on --zeroshot-data (evaluator.py), printed as JSON on rank 0. An
evaluation-only run is a Session (session.py): no optimizer, no DDP wrapper. Exit codes
as for training (entry.py).
"""

from __future__ import annotations

import json
import sys

from pmc_clip.config import parse_run_config
from pmc_clip.entry import cli
from pmc_clip.session import Session


def start_evaluation(argv: list[str]) -> Session:
    """The training flags, --resume naming the weights."""
    config = parse_run_config(argv, "Evaluate a PMC-CLIP checkpoint.")
    if config.checkpoint.resume is None:
        raise ValueError("--resume CHECKPOINT (or PMC_CLIP:beta) is required")
    return Session(config)


def evaluate_and_print(session: Session) -> int:
    """Evaluate, print the results (rank 0) as JSON."""
    try:
        results = session.evaluate()
    finally:
        session.records.close()  # ends a --report-to wandb run
    if session.rank == 0:
        print(json.dumps(results, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    return cli(start_evaluation, evaluate_and_print, arguments, "pmc_clip.evaluate")


if __name__ == "__main__":
    sys.exit(main())
