"""A stand-in for `python -m pmc_clip.train` that keeps only its launch contract.

The launch scripts start it through PMC_CLIP_ENTRY, so the SLURM tests check the launch
mechanics (ranks, world size, nodes, rendezvous, signal -> checkpoint -> requeue -> resume)
in seconds and independently of the model. The contract, as pmc_clip.train keeps it:
- rank and world from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
- SIGUSR1/SIGTERM: every rank stops at the same step boundary, rank 0 saves
  `<logs>/<name>/checkpoints/step_N` and the `latest.json` pointer, all ranks pass a barrier
  after the save and exit with EXIT_CODE_PREEMPTED (3);
- `--resume latest` continues from that checkpoint, or starts fresh when there is none;
- exit 0 when all steps are done.
Steps: STUB_STEPS (default 20) of STUB_STEP_SECONDS (default 0.2) each. Every other
argument of the trainer's command line is accepted and ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from types import FrameType

import torch
import torch.distributed as dist

EXIT_CODE_PREEMPTED = 3


def say(line: str) -> None:
    """One line in one write: the ranks share stdout, and print() under PYTHONUNBUFFERED
    writes the text and its newline separately, so lines of two ranks could interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--logs", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--resume")
    parser.add_argument("--dist-backend", default="gloo")
    parser.add_argument("--device", default="cpu")
    args, _ = parser.parse_known_args()
    stop = {"requested": 0}

    def request_stop(signum: int, frame: FrameType | None) -> None:
        stop["requested"] = signum

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, request_stop)

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group(args.dist_backend, init_method="env://")
    total = torch.tensor([float(rank + 1)])
    dist.all_reduce(total)
    node = os.environ.get("SLURMD_NODENAME", socket.gethostname())
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, node)
    expected = world * (world + 1) / 2
    say(
        f"stub rank={rank} local_rank={os.environ.get('LOCAL_RANK')} world_size={world} "
        f"node={node} allreduce={total.item()} expected={expected}"
    )
    if total.item() != expected:
        return 1
    if rank == 0:
        say(f"stub nodes={','.join(nodes)}")

    checkpoints = Path(args.logs) / args.name / "checkpoints"
    start = 0
    if args.resume == "latest" and (checkpoints / "latest.json").exists():
        name = json.loads((checkpoints / "latest.json").read_text())["name"]
        start = json.loads((checkpoints / name).read_text())["step"]
        if rank == 0:
            say(f"stub resumed from step {start}")

    def save(step: int) -> None:
        if rank == 0:
            checkpoints.mkdir(parents=True, exist_ok=True)
            (checkpoints / f"step_{step}").write_text(json.dumps({"step": step}))
            (checkpoints / "latest.tmp").write_text(json.dumps({"name": f"step_{step}"}))
            (checkpoints / "latest.tmp").replace(checkpoints / "latest.json")
        dist.barrier()  # no rank exits before the save is done (srun --wait ends the rest)

    steps = int(os.environ.get("STUB_STEPS", "20"))
    seconds = float(os.environ.get("STUB_STEP_SECONDS", "0.2"))
    for step in range(start + 1, steps + 1):
        time.sleep(seconds)
        flag = torch.tensor([float(stop["requested"])])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # all ranks stop at the same step
        if rank == 0:
            say(f"stub step {step}")
        if flag.item():
            save(step)
            if rank == 0:
                say(f"stub stopped by signal {int(flag.item())} at step {step}")
            dist.destroy_process_group()
            return EXIT_CODE_PREEMPTED
    save(steps)
    if rank == 0:
        say(f"stub done step={steps}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
