"""Sealed collectives vs plaintext gloo, side by side in the same processes.

* **all-reduce bandwidth** at 2 and 4 ranks (one process per rank, a real gloo group over
  loopback): the encrypted DDP hook's work on a gradient bucket (``SealedAllReduce``: scale
  by 1/world, reduce-scatter + all-gather of AES-GCM frames, through its worker thread)
  against what DDP does without it (scale, ``dist.all_reduce``) on the same bucket.
  Buckets of DDP's default cap (25 MiB, in quick mode too). Bandwidth = bucket bytes /
  seconds per all-reduce.
* **DDP training** at 2 ranks: tiny-gpt (bf16 autocast, AdamW) on synthetic tokens, DDP with
  the sealed hook (and sealed broadcast) against plain DDP, built side by side in the same
  two processes; samples per second.

Both sides alternate in adjacent pairs (which goes first alternates too); the result is the
median of the per-pair ratios, so load from elsewhere on a shared machine hits both sides
alike. Goals: encrypted all-reduce >= 0.70x plain (the lower of 2 and 4 ranks), encrypted
DDP training >= 0.95x plain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

REPO = Path(__file__).resolve().parents[1]


# worker side --------------------------------------------------------------------------------
def _comm(rank: int, world: int):
    from sealed.secrets import SecretBuffer
    from trainer.sealed_comm_ddp import open_job_comm

    dek = SecretBuffer.from_bytes(b"\x42" * 32)
    return open_job_comm(rank=rank, world_size=world, backend="gloo", dek=dek,
                         job_id="bench", attested=False)


def _timed(fn, reps: int) -> float:
    dist.barrier()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    dist.barrier()
    return (time.perf_counter() - start) / reps


def _allreduce(comm, rank: int, world: int, mib: int, pairs: int, reps: int) -> dict:
    from trainer.sealed_comm_ddp import SealedAllReduce

    hook = SealedAllReduce(comm.channel, world)
    bucket = torch.randn(mib * (1 << 20) // 4)
    plain_bucket = bucket.clone()

    def sealed() -> None:
        hook.submit(bucket).wait()

    def plain() -> None:
        plain_bucket.mul_(1.0 / world)
        dist.all_reduce(plain_bucket)

    sealed()
    plain()
    ratios, s_bw, p_bw = [], [], []
    for i in range(pairs):
        order = (sealed, plain) if i % 2 == 0 else (plain, sealed)
        t = {f: _timed(f, reps) for f in order}
        s_bw.append(bucket.numel() * 4 / t[sealed] / 1e9)
        p_bw.append(bucket.numel() * 4 / t[plain] / 1e9)
        ratios.append(t[plain] / t[sealed])
    hook.stop()
    return {"ratio": statistics.median(ratios), "sealed_gbps": statistics.median(s_bw),
            "plain_gbps": statistics.median(p_bw)}


def _training(comm, rank: int, world: int, pairs: int, steps: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from trainer.models import build_model

    params = {"layers": 4, "d_model": 128, "heads": 4}
    seq, batch = 128, 8
    runs = {}
    for name in ("sealed", "plain"):
        torch.manual_seed(0)
        model = build_model("tiny-gpt", params, seq_len=seq)
        ddp = (comm.wrap(model, torch.device("cpu")) if name == "sealed"
               else DDP(model, gradient_as_bucket_view=True))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(rank)
        runs[name] = (ddp, opt, gen)

    def block(name: str) -> float:
        ddp, opt, gen = runs[name]
        dist.barrier()
        start = time.perf_counter()
        for _ in range(steps):
            x = torch.randint(0, 256, (batch, seq), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = ddp(x)
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, 256), x.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)
        dist.barrier()
        return steps * batch * world / (time.perf_counter() - start)

    block("sealed")
    block("plain")
    ratios, s_rate, p_rate = [], [], []
    for i in range(pairs):
        order = ("sealed", "plain") if i % 2 == 0 else ("plain", "sealed")
        rate = {n: block(n) for n in order}
        ratios.append(rate["sealed"] / rate["plain"])
        s_rate.append(rate["sealed"])
        p_rate.append(rate["plain"])
    return {"ratio": statistics.median(ratios), "sealed_sps": statistics.median(s_rate),
            "plain_sps": statistics.median(p_rate)}


def _worker(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("allreduce", "allreduce+training"))
    p.add_argument("--rank", type=int)
    p.add_argument("--world", type=int)
    p.add_argument("--store-port", type=int)
    p.add_argument("--mib", type=int, default=25)
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", a.store_port, a.world, is_master=False,
                          timeout=timedelta(seconds=600))
    dist.init_process_group("gloo", store=store, rank=a.rank, world_size=a.world,
                            timeout=timedelta(seconds=600))
    comm = _comm(a.rank, a.world)
    out = {"allreduce": _allreduce(comm, a.rank, a.world, a.mib, a.pairs, a.reps)}
    if a.what == "allreduce+training":
        out["training"] = _training(comm, a.rank, a.world, a.pairs, a.steps)
    comm.close()
    if a.rank == 0:
        print("RESULT " + json.dumps(out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


# driver side --------------------------------------------------------------------------------
def _run(what: str, world: int, *args: str) -> dict:
    store = dist.TCPStore("127.0.0.1", 0, world + 1, is_master=True,
                          timeout=timedelta(seconds=600), wait_for_workers=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_collectives", "--worker", what, "--rank",
         str(r), "--world", str(world), "--store-port", str(store.port), *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(world)]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"benchmark worker failed:\n{err.decode()[-3000:]}")
    for line in outs[0][0].decode().splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError("benchmark worker printed no result")


def main(quick: bool) -> None:
    # quick: fewer pairs and steps, but DDP's default 25 MiB bucket (the size the goals are
    # about) and 3 repetitions per all-reduce side: 8 MiB quick buckets printed 0.63-0.65 for
    # a 2-rank all-reduce that reached 0.73-0.80 at 25 MiB in the same hour (per-frame costs
    # weigh more), and one repetition swung the ratio from 0.61 to 1.08 between runs
    mib, pairs, reps, steps = (25, 5, 3, 5) if quick else (25, 7, 3, 10)
    print(f"cores: {os.cpu_count()} (shared with whatever else runs here); one process per "
          f"rank, OMP_NUM_THREADS=1; bucket {mib} MiB; {pairs} alternating pairs")
    ar, tr = {}, {}
    for world in (2, 4):  # the 2-rank processes also run the training comparison
        res = _run("allreduce+training" if world == 2 else "allreduce", world, "--mib",
                   str(mib), "--pairs", str(pairs), "--reps", str(reps), "--steps", str(steps))
        r = ar[world] = res["allreduce"]
        tr = res.get("training", tr)
        print(f"all-reduce {world} ranks: sealed {r['sealed_gbps']:.2f} GB/s, plain gloo "
              f"{r['plain_gbps']:.2f} GB/s, ratio {r['ratio']:.3f}")
    print(f"DDP training 2 ranks (tiny-gpt 4x128, bf16 autocast): sealed "
          f"{tr['sealed_sps']:.1f} samples/s, plain {tr['plain_sps']:.1f} samples/s, "
          f"ratio {tr['ratio']:.3f}")
    worst = min(r["ratio"] for r in ar.values())
    print(f"goal encrypted_allreduce_vs_plain: {worst:.3f} (target >= 0.70) "
          f"{'met' if worst >= 0.70 else 'missed'}")
    print(f"goal encrypted_ddp_training_vs_plain: {tr['ratio']:.3f} (target >= 0.95) "
          f"{'met' if tr['ratio'] >= 0.95 else 'missed'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        main(quick="--quick" in sys.argv)
