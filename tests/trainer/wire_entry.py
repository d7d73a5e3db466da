"""TEST ONLY entry point of the wire test: ``run_job`` on two torchrun agents ("nodes"), with
a key from a test key server, recording what must never cross the network in the clear.

    python -m torch.distributed.run --nnodes 2 --node-rank N --nproc-per-node 1 \\
        --master-addr 127.0.0.1 --master-port P tests/trainer/wire_entry.py \\
        --job JOB.yaml --key-socket PATH --record DIR [--plaintext-collectives]

``--record DIR`` writes, per rank, the model's parameters and buffers as they are just
before DDP is built (rank 0's are the initial state every rank receives) and every gradient
bucket as it enters and leaves the all-reduce, so the test knows which bytes to look for
on the wire. ``--plaintext-collectives`` is the positive control: it sets ``run_job``'s
test-only ``plaintext_collectives_for_tests_only`` (DDP's own gloo broadcast and
all-reduce, with a recording copy of DDP's default all-reduce hook). Neither exists outside
this file; the ``trainer`` command reaches neither.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.trainer.socket_entry import SocketKeySource
from trainer.cli import setup_logging
from trainer.config import JobConfig
from trainer.sealed_comm_ddp import JobComm
from trainer.shred import EXIT_OK
from trainer.train import run_job


def _append(path: Path, tensor: torch.Tensor) -> None:
    with open(path, "ab") as fh:
        fh.write(tensor.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())


def _install_recorder(record: Path) -> None:
    original_wrap = JobComm.wrap
    rank = int(os.environ["RANK"])
    grads = record / f"grads-rank{rank}.bin"

    def wrap(self: JobComm, raw_model: torch.nn.Module, device: torch.device):
        for t in [*raw_model.parameters(), *raw_model.buffers()]:
            _append(record / f"params-rank{rank}.bin", t)
        model = original_wrap(self, raw_model, device)
        if self.mode == "sealed":
            reduce = self.channel.all_reduce_

            def recording_all_reduce(tensor: torch.Tensor) -> torch.Tensor:
                _append(grads, tensor)
                out = reduce(tensor)
                _append(grads, out)
                return out

            self.channel.all_reduce_ = recording_all_reduce  # type: ignore[method-assign]
        else:
            world = dist.get_world_size()

            def recording_hook(state, bucket):
                tensor = bucket.buffer().div_(world)
                _append(grads, tensor)
                fut = dist.all_reduce(tensor, async_op=True).get_future()

                def done(f):
                    out = f.value()[0]
                    _append(grads, out)
                    return out

                return fut.then(done)

            recording_hook.__annotations__ = {
                "state": object, "bucket": dist.GradBucket,
                "return": torch.futures.Future[torch.Tensor]}
            model.register_comm_hook(None, recording_hook)
        return model

    JobComm.wrap = wrap  # type: ignore[method-assign]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--job", required=True)
    p.add_argument("--key-socket", required=True)
    p.add_argument("--record", required=True)
    p.add_argument("--plaintext-collectives", action="store_true")
    args = p.parse_args()
    setup_logging("INFO")
    _install_recorder(Path(args.record))
    config = JobConfig.from_yaml(args.job)
    result = run_job(config, SocketKeySource(args.key_socket), require_hardening=True,
                     plaintext_collectives_for_tests_only=args.plaintext_collectives)
    print(f"RESULT rank={result.rank} steps_done={result.steps_done}", flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
