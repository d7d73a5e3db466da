"""DDP over the sealed transport, and the rule that decides when a plaintext path is allowed.

:func:`open_job_comm` runs the authenticated rendezvous (:func:`trainer.sealed_comm.open_channel`)
on every distributed job, whatever the backend, as soon as the DEK is in memory and before
the model exists. :meth:`JobComm.wrap` then builds DDP:

* sealed (the default): rank 0's parameters and buffers are broadcast through the channel,
  DDP is built with ``init_sync=False`` (so its own plaintext broadcast never runs) and
  ``forward_sync_buffers=False`` (a forward pre-hook broadcasts buffers through the channel
  instead, as DDP would before every training forward), and the comm hook
  :func:`sealed_allreduce_hook` reduces every gradient bucket: multiply by ``1/world``
  (what DDP's reducer does without a hook), then :meth:`SealedChannel.all_reduce_`. Buckets
  of any dtype (fp32, bf16, fp16) are reduced in their own dtype, as gloo does.
  ``no_sync`` gradient accumulation is DDP's own: the hook runs on the last micro-step only.
  Buckets on a GPU are staged through pinned host memory. The hook hands each bucket to one
  worker thread (in order), so reduction overlaps the rest of the backward pass.
* plaintext, only inside one node on NCCL: when every rank runs on one machine (torchrun's
  ``LOCAL_WORLD_SIZE == WORLD_SIZE`` *and* every hello carries the same node digest) and the
  backend is NCCL, gradients move GPU to GPU over NVLink / PCIe peer-to-peer or shared host
  memory, which never leave the machine (with GPU confidential computing on, the driver
  encrypts the bounce buffers). Gloo on CPU is always sealed, even inside one node: its
  loopback TCP is cheap to seal and visible to any local packet capture.
* plaintext for tests: ``plaintext_for_tests=True`` (a parameter of ``run_job`` that no job
  file, command-line flag or environment variable reaches; only test entry points under
  ``tests/`` set it) keeps DDP's own collectives, for the wire test's positive control and
  the benchmark's baseline. With an attested key source (``trainer --attest``) it is refused
  with :class:`PlaintextRefused`; there is no silent fallback anywhere: if the sealed path
  cannot be set up, the job fails.

What DDP still sends in the clear over the process group: its bucket order (a list of
parameter indices) once, on the first iteration. No parameter, gradient or sample value.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from sealed.secrets import SecretBuffer
from trainer.sealed_comm import (
    EXIT_CHANNEL_AUTH,
    ChannelAuthError,
    FailureCallback,
    SealedChannel,
    open_channel,
)
from trainer.shred import Shredder

__all__ = [
    "ChannelAuthError",
    "JobComm",
    "PlaintextRefused",
    "SealedAllReduce",
    "choose_mode",
    "launcher_spans_nodes",
    "open_job_comm",
    "sealed_allreduce_hook",
]

Mode = Literal["sealed", "node-local", "plaintext-test"]


class PlaintextRefused(Exception):
    """A plaintext collective path was asked for where the job may not use one."""


def launcher_spans_nodes(world_size: int) -> bool:
    """torchrun's view: fewer local workers than the world means several agents (nodes)."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        groups = int(os.environ.get("GROUP_WORLD_SIZE", 1))
    except ValueError:
        return True  # unreadable: assume the worst
    return local != world_size or groups > 1


def choose_mode(*, backend: str, multi_node: bool, attested: bool,
                plaintext_for_tests: bool) -> Mode:
    """The comm rule (module docstring)."""
    if plaintext_for_tests:
        if attested:
            raise PlaintextRefused(
                "refusing plaintext collectives: the job runs with attested keys (--attest), "
                "where gradients and model state only travel sealed"
            )
        return "plaintext-test"
    if backend == "nccl" and not multi_node:
        return "node-local"
    return "sealed"


_STOP_WAIT_S = 30.0


class SealedAllReduce:
    """State of the comm hook: the channel and one worker thread reducing buckets in order."""

    def __init__(self, channel: SealedChannel, world_size: int) -> None:
        self.channel = channel
        self.world_size = world_size
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="sealed-allreduce", daemon=True)
        self._thread.start()
        self._staging: dict[tuple[int, torch.dtype], torch.Tensor] = {}

    def submit(self, tensor: torch.Tensor) -> torch.futures.Future:
        fut: torch.futures.Future = torch.futures.Future()
        self._queue.put((tensor, fut))
        return fut

    def staging(self) -> list[torch.Tensor]:
        return list(self._staging.values())

    def stop(self) -> None:
        """End the worker thread and wait for it (bounded), so no bucket is in flight when
        the process group is torn down."""
        self._queue.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=_STOP_WAIT_S)

    def _host(self, tensor: torch.Tensor) -> torch.Tensor:
        key = (tensor.numel(), tensor.dtype)
        host = self._staging.get(key)
        if host is None:
            host = torch.empty(tensor.numel(), dtype=tensor.dtype, pin_memory=True)
            self._staging[key] = host
        host.copy_(tensor.view(-1))
        return host

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            tensor, fut = item
            try:
                tensor.mul_(1.0 / self.world_size)
                if tensor.device.type == "cpu":
                    self.channel.all_reduce_(tensor)
                else:
                    host = self._host(tensor)
                    self.channel.all_reduce_(host)
                    tensor.view(-1).copy_(host)
                    host.zero_()
                fut.set_result(tensor)
            except BaseException as exc:  # handed to the backward pass through the future
                fut.set_exception(exc)


def sealed_allreduce_hook(state, bucket):  # annotated below: DDP checks real objects
    """DDP comm hook: the bucket averaged over the world, through the sealed channel."""
    return state.submit(bucket.buffer())


sealed_allreduce_hook.__annotations__ = {
    "state": SealedAllReduce, "bucket": dist.GradBucket,
    "return": torch.futures.Future[torch.Tensor],
}


@dataclass(slots=True)
class JobComm:
    """The job's collectives: the sealed channel (always), and how DDP uses it."""

    channel: SealedChannel
    mode: Mode
    nodes: int
    hook_state: SealedAllReduce | None = None
    _hooks: list = field(default_factory=list)

    def wrap(self, raw_model: nn.Module, device: torch.device) -> DDP:
        """Build DDP over ``raw_model`` according to :attr:`mode` (module docstring)."""
        device_ids = [device.index] if device.type == "cuda" else None
        if self.mode != "sealed":
            return DDP(raw_model, device_ids=device_ids, gradient_as_bucket_view=True)
        with torch.no_grad():
            self.channel.broadcast_([*raw_model.parameters(), *raw_model.buffers()], src=0)
        model = DDP(raw_model, device_ids=device_ids, gradient_as_bucket_view=True,
                    init_sync=False, forward_sync_buffers=False)
        if self.hook_state is not None:  # one hook thread at a time
            self.hook_state.stop()
        self.hook_state = SealedAllReduce(self.channel, self.channel.world_size)
        model.register_comm_hook(self.hook_state, sealed_allreduce_hook)
        buffers = list(raw_model.buffers())
        if buffers:
            channel = self.channel

            def sync_buffers(module: nn.Module, args: object) -> None:
                if module.training:
                    with torch.no_grad():
                        channel.broadcast_(buffers, src=0)

            self._hooks.append(raw_model.register_forward_pre_hook(sync_buffers))
        return model

    def barrier(self) -> None:
        self.channel.barrier()

    def plaintext_tensors(self) -> list[torch.Tensor]:
        staged = self.hook_state.staging() if self.hook_state is not None else []
        return self.channel.plaintext_tensors() + staged

    def close(self) -> None:
        if self.hook_state is not None:
            self.hook_state.stop()
        self.channel.close()


def open_job_comm(
    *,
    rank: int,
    world_size: int,
    backend: str,
    dek: SecretBuffer,
    job_id: str,
    attested: bool,
    shredder: Shredder | None = None,
    on_auth_failure: FailureCallback | None = None,
    plaintext_for_tests: bool = False,
) -> JobComm:
    """Authenticated rendezvous, then the comm mode for this job (module docstring).

    With a ``shredder`` (the trainer), the link keys and plaintext scratch are registered
    with it, and an authentication failure shreds and exits with :data:`EXIT_CHANNEL_AUTH`
    (unless ``on_auth_failure`` says otherwise)."""
    if on_auth_failure is None and shredder is not None:
        def on_auth_failure(exc: ChannelAuthError) -> None:
            shredder.shred_and_exit(f"channel authentication failed: {exc}", EXIT_CHANNEL_AUTH)
    group = dist.new_group(backend="gloo") if backend != "gloo" else None
    rendezvous = open_channel(rank=rank, world_size=world_size, dek=dek, job_id=job_id,
                              group=group, on_auth_failure=on_auth_failure)
    comm_holder: list[JobComm] = []
    if shredder is not None:
        for i, key in enumerate(rendezvous.channel.secrets()):
            shredder.add_secret(f"link key {i}", key)
        shredder.add_tensors("sealed channel scratch",
                             lambda: comm_holder[0].plaintext_tensors() if comm_holder else [])
        shredder.add_stop_hook(lambda: comm_holder[0].close() if comm_holder else None)
    multi_node = launcher_spans_nodes(world_size) or rendezvous.nodes > 1
    try:
        mode = choose_mode(backend=backend, multi_node=multi_node, attested=attested,
                           plaintext_for_tests=plaintext_for_tests)
    except PlaintextRefused:
        rendezvous.channel.close()
        raise
    comm = JobComm(channel=rendezvous.channel, mode=mode, nodes=rendezvous.nodes)
    comm_holder.append(comm)
    return comm

