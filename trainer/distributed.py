"""The one place that reads torchrun's environment and sets up the process group.

torchrun exports ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
without them the trainer runs as a single process with no process group. The backend is NCCL
when the job runs on CUDA and gloo on CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed"]

_REQUIRED = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, slots=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: Literal["gloo", "nccl"] | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _env_int(name: str, lo: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"torchrun variable {name} must be an integer, got {raw!r:.40}") from None
    if value < lo:
        raise ValueError(f"torchrun variable {name} must be >= {lo}, got {value}")
    return value


def init_distributed(
    device: Literal["auto", "cpu", "cuda"] = "auto", *, timeout_s: float = 300.0
) -> DistEnv:
    """Parse the torchrun environment, pick the device and start the process group."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no CUDA device")
    present = [name for name in _REQUIRED if name in os.environ]
    if not present:
        dev = torch.device("cuda", 0) if want_cuda else torch.device("cpu")
        if want_cuda:
            torch.cuda.set_device(dev)
        return DistEnv(rank=0, world_size=1, local_rank=0, device=dev, backend=None)
    missing = [name for name in _REQUIRED if name not in os.environ]
    if missing:
        raise ValueError(
            f"incomplete torchrun environment: {', '.join(missing)} unset (launch with torchrun)"
        )
    rank = _env_int("RANK", 0)
    world = _env_int("WORLD_SIZE", 1)
    local = _env_int("LOCAL_RANK", 0)
    if rank >= world:
        raise ValueError(f"RANK {rank} must be below WORLD_SIZE {world}")
    if want_cuda:
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        backend: Literal["gloo", "nccl"] = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if world == 1:
        return DistEnv(rank=0, world_size=1, local_rank=local, device=dev, backend=None)
    if not dist.is_initialized():
        kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(**kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=dev, backend=backend)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
