"""Benchmark the PMC-CLIP model step and the contrastive loss's memory (CPU).

    .venv/bin/python bench/bench_model.py                 # everything (a few minutes on 2 cores)
    .venv/bin/python bench/bench_model.py --skip-rn50     # tiny model and loss only

1. Forward+backward step (contrastive + MLM loss) at batch 8 for `tiny` and `RN50_fusion4`
   (random weights, PubMedBERT-sized text tower, 15% of positions masked): median step
   time and peak RSS. Baseline beside it: the original's `contrastive_text="masked"` (one
   BERT pass instead of our two), printed as a ratio.
2. Contrastive loss at a simulated world size (one rank's computation, the other ranks'
   features random): peak RSS above the process's baseline for local vs global logits.

Each measurement runs in a fresh subprocess, so ru_maxrss is the peak of that run alone.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

BATCH_SIZE = 8
MLM_FRACTION = 0.15
LOSS_FEATURE_DIM = 768


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure_step(model_name: str, contrastive_text: str, num_steps: int) -> dict[str, Any]:
    import torch

    from pmc_clip.losses import PMCClipLoss
    from pmc_clip.model import create_model

    torch.manual_seed(0)
    model = create_model(model_name, contrastive_text=contrastive_text).train()
    config = model.config
    vocab_size = int(config.text_config["vocab_size"])
    images = torch.randn(BATCH_SIZE, 3, config.image_size, config.image_size)
    input_ids = torch.randint(5, vocab_size, (BATCH_SIZE, config.context_length))
    attention_mask = torch.ones_like(input_ids)
    is_masked = torch.rand(input_ids.shape) < MLM_FRACTION
    mlm_input_ids = torch.where(is_masked, 4, input_ids)
    mlm_labels = torch.where(is_masked, input_ids, -100)
    loss_fn = PMCClipLoss()
    rss_before_mib = _peak_rss_mib()

    def step() -> float:
        start = time.perf_counter()
        model.zero_grad(set_to_none=True)
        outputs = model(images, input_ids, attention_mask, mlm_input_ids)
        loss_fn(outputs, mlm_labels)["loss"].backward()
        return time.perf_counter() - start

    step()  # warm-up: allocator and kernel selection
    times = [step() for _ in range(num_steps)]
    return {
        "model": model_name,
        "contrastive_text": contrastive_text,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "step_s": statistics.median(times),
        "peak_rss_mib": _peak_rss_mib(),
        "peak_rss_above_model_mib": _peak_rss_mib() - rss_before_mib,
    }


def measure_loss(local_loss: bool, world_size: int, per_rank_batch: int) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from pmc_clip import losses

    generator = torch.Generator().manual_seed(0)

    def features() -> torch.Tensor:
        values = torch.randn(per_rank_batch, LOSS_FEATURE_DIM, generator=generator)
        return F.normalize(values, dim=-1).requires_grad_()

    image_features, text_features = features(), features()
    others = torch.randn(per_rank_batch * (world_size - 1), LOSS_FEATURE_DIM, generator=generator)

    def simulated_gather(local: torch.Tensor, group: object = None) -> torch.Tensor:
        # Rank 0's slice is the live (differentiable) tensor; the other ranks' are constants.
        return torch.cat([local, F.normalize(others, dim=-1)])

    # Simulate rank 0 of `world_size` without processes: the real ClipLoss code path with
    # the all-gather swapped for a local concatenation (the constructor would otherwise
    # check the world size against an initialised process group).
    losses.gather_features = simulated_gather  # type: ignore[assignment]
    clip_loss = losses.ClipLoss(rank=0, world_size=1, local_loss=local_loss)
    clip_loss.world_size = world_size
    rss_before_mib = _peak_rss_mib()
    start = time.perf_counter()
    clip_loss(image_features, text_features, torch.tensor(1 / 0.07)).backward()
    return {
        "local_loss": local_loss,
        "world_size": world_size,
        "per_rank_batch": per_rank_batch,
        "loss_s": time.perf_counter() - start,
        "peak_rss_above_baseline_mib": _peak_rss_mib() - rss_before_mib,
    }


def _in_subprocess(kind: str, **kwargs: Any) -> dict[str, Any]:
    command = [sys.executable, __file__, "--measure", kind, json.dumps(kwargs)]
    completed = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-rn50", action="store_true", help="only the tiny model")
    parser.add_argument("--world-size", type=int, default=64, help="simulated ranks for the loss")
    parser.add_argument("--per-rank-batch", type=int, default=128)
    parser.add_argument("--measure", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        kind, kwargs = args.measure[0], json.loads(args.measure[1])
        print(json.dumps({"step": measure_step, "loss": measure_loss}[kind](**kwargs)))
        return

    import torch

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, batch {BATCH_SIZE}")
    models = [("tiny", 10)] + ([] if args.skip_rn50 else [("RN50_fusion4", 3)])
    print("\n| model | contrastive text | params | step (s) | peak RSS (MiB) | vs masked |")
    print("|---|---|---|---|---|---|")
    for model_name, num_steps in models:
        results = {
            text: _in_subprocess("step", model_name=model_name, contrastive_text=text,
                                 num_steps=num_steps)
            for text in ("masked", "unmasked")
        }  # fmt: skip
        for text, result in results.items():
            ratio = result["step_s"] / results["masked"]["step_s"]
            print(
                f"| {model_name} | {text} | {result['num_parameters'] / 1e6:.1f}M "
                f"| {result['step_s']:.3f} | {result['peak_rss_mib']:.0f} | {ratio:.2f}x |"
            )

    print(
        f"\nContrastive loss, rank 0 of {args.world_size} simulated ranks, "
        f"{args.per_rank_batch} per rank, dim {LOSS_FEATURE_DIM}, fp32:"
    )
    print("\n| mode | logits per rank | loss fwd+bwd (s) | peak RSS above baseline (MiB) |")
    print("|---|---|---|---|")
    global_batch = args.world_size * args.per_rank_batch
    for local_loss in (True, False):
        result = _in_subprocess(
            "loss", local_loss=local_loss, world_size=args.world_size,
            per_rank_batch=args.per_rank_batch,
        )  # fmt: skip
        rows = args.per_rank_batch if local_loss else global_batch
        print(
            f"| {'local' if local_loss else 'global'} | 2 x {rows} x {global_batch} "
            f"| {result['loss_s']:.3f} | {result['peak_rss_above_baseline_mib']:.0f} |"
        )


if __name__ == "__main__":
    main()
