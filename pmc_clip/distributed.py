"""Who am I in the job: rank, local rank, world size and device, from torchrun or SLURM.

Launchers we support, in the order they are recognised:
- torchrun (or any launcher that sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT);
- srun starting one task per GPU directly (SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS; the
  master address is the first host of SLURM_JOB_NODELIST, the port MASTER_PORT or one
  derived from the job id so two jobs sharing a node do not collide);
- neither: a single process.
The model never imports this module; the trainer wraps the model from the outside.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

_SLURM_PORT_BASE = 15_000
_SLURM_PORT_RANGE = 20_000


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"
    # Ranks per node (numbered node by node); the data order's default node count.
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compact host list ("gpu[01-03,07],cpu-a5") -> ["gpu01", ..., "cpu-a5"]."""
    hosts: list[str] = []
    for match in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?(?:,|$)", nodelist):
        prefix, ranges = match.group(1), match.group(2)
        if not ranges:
            hosts.append(prefix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            for number in range(int(low), int(high or low) + 1):
                hosts.append(f"{prefix}{number:0{len(low)}d}")
    return hosts


def detect(env: Mapping[str, str] | None = None) -> DistInfo:
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistInfo(
            rank=int(env["RANK"]),
            local_rank=int(env.get("LOCAL_RANK", "0")),
            world_size=int(env["WORLD_SIZE"]),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", "29500")),
            launcher="torchrun",
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", "1")),
        )
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: not an srun task?")
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        num_tasks = int(env["SLURM_NTASKS"])
        num_nodes = int(env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES") or "1")
        return DistInfo(
            rank=int(env["SLURM_PROCID"]),
            local_rank=int(env.get("SLURM_LOCALID", "0")),
            world_size=num_tasks,
            master_addr=env.get("MASTER_ADDR") or expand_nodelist(nodelist)[0],
            master_port=int(
                env.get("MASTER_PORT") or _SLURM_PORT_BASE + job_id % _SLURM_PORT_RANGE
            ),
            launcher="slurm",
            # Uneven tasks per node: no node structure to rely on (one canonical node per rank).
            local_world_size=num_tasks // num_nodes if num_tasks % num_nodes == 0 else 1,
        )
    return DistInfo(0, 0, 1, "127.0.0.1", 29500, "single")


def select_device(info: DistInfo, device: str) -> torch.device:
    """device: "auto" (CUDA when present), "cuda" or "cpu"."""
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"--device must be auto, cuda or cpu, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if not use_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if info.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"local rank {info.local_rank} has no GPU: {torch.cuda.device_count()} visible "
            "(one process per GPU: check --nproc_per_node / --ntasks-per-node)"
        )
    torch.cuda.set_device(info.local_rank)
    return torch.device("cuda", info.local_rank)


def init_process_group(
    info: DistInfo,
    device: torch.device,
    *,
    backend: str | None = None,
    timeout_seconds: float,
) -> None:
    """NCCL on CUDA, gloo on CPU (unless `backend` says otherwise). No-op for one process."""
    if info.world_size == 1:
        return
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    # Failed collectives raise instead of hanging the process (NCCL watchdog).
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT (env:// joins it);
    # under plain srun, rank 0 serves the store itself.
    if info.launcher == "torchrun":
        init_method = "env://"
    else:
        init_method = f"tcp://{info.master_addr}:{info.master_port}"
    dist.init_process_group(
        backend=backend,
        init_method=init_method,
        rank=info.rank,
        world_size=info.world_size,
        timeout=datetime.timedelta(seconds=timeout_seconds),
    )


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """DDP without find_unused_parameters: every trainable parameter gets a gradient
    each step (the model keeps never-used checkpoint-compat parameters frozen)."""
    if info.world_size == 1:
        return model
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        find_unused_parameters=False,
        broadcast_buffers=False,  # BatchNorm statistics stay per rank, as in OpenCLIP
    )


def all_reduce_mean(values: torch.Tensor, world_size: int) -> torch.Tensor:
    """Mean over ranks of a small tensor (a collective: every rank must call it)."""
    if world_size == 1:
        return values
    reduced = values.detach().clone()
    dist.all_reduce(reduced)
    return reduced / world_size


def any_rank(flag: bool, device: torch.device, world_size: int) -> bool:
    """True on every rank if `flag` is True on any (a collective + one host sync)."""
    if world_size == 1:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()
