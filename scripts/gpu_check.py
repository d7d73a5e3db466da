"""Pieces of ``make gpu-check`` (scripts/gpu_check.sh runs them in order on an NVIDIA GPU
machine and collects the goal lines). Each subcommand prints what it measured and ends with
``goal NAME: VALUE (target TARGET) met|missed``:

- ``facts``: NVML facts per GPU (attest.nvidia.nvml), as JSON; goal: every GPU in CC mode.
- ``ddp-worker``: run under ``torchrun --nproc-per-node N``: NCCL process group, DDP over a
  small model for a few steps, then the ranks' parameters compared bit for bit.
- ``train``: the trainer on CUDA, confidential (encrypted shards decrypted in memory) against
  plaintext (the same records in memory), bf16, paired alternating runs.
- ``scan``: GPU memory scan after shredding: a tensor full of a 64-bit marker is shredded
  (trainer.shred.Shredder: zeroed, synchronised, cache emptied); the same amount of GPU memory
  is then allocated uninitialised and searched for the marker. The control does the same
  without shredding and must find it, or the scan proves nothing.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
from pathlib import Path

MARKER = 0x5EC12E7D_A7A5C0DE


def _goal(name: str, value: float | int, op: str, target: float | int, unit: str = "") -> bool:
    met = value >= target if op == ">=" else value <= target if op == "<=" else value == target
    shown = f"{value}" if isinstance(value, int) else f"{value:.3f}"
    print(f"goal {name}: {shown}{unit} (target {op} {target}{unit}) "
          f"{'met' if met else 'missed'}", flush=True)
    return met


def facts() -> int:
    from attest.nvidia.nvml import gpu_facts

    gpus = gpu_facts()
    print(json.dumps(gpus, indent=2, sort_keys=True))
    on = sum(1 for g in gpus if g["cc_mode"] == "on")
    _goal("gpu_cc_mode_on", on, "==", len(gpus), f" of {len(gpus)}")
    return 0


def ddp_worker() -> int:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1024, 4096), torch.nn.GELU(),
                                torch.nn.Linear(4096, 1024)).cuda()
    ddp = DistributedDataParallel(model, device_ids=[local])
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-3)
    gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    steps = 50
    start.record()
    for _ in range(steps):
        x = torch.randn(64, 1024, device="cuda", generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = ddp(x).float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    end.record()
    torch.cuda.synchronize()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    same = all(torch.equal(gathered[0], g) for g in gathered)
    if rank == 0:
        print(f"NCCL DDP: {world} rank(s), {steps} steps in {start.elapsed_time(end):.0f} ms, "
              f"parameters identical on every rank: {same}")
        _goal("nccl_ddp_ranks_in_sync", world if same else 0, "==", world)
    dist.destroy_process_group()
    return 0 if same else 1


def _records(total: int) -> list[bytes]:
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
             "the", "cat", "sat", "on", "the", "warm", "mat", "and", "a", "small", "bird"]
    rng = random.Random(0)  # noqa: S311 - sample text, not a secret
    out, size = [], 0
    while size < total:
        rec = (" ".join(rng.choice(words) for _ in range(400)) + ".\n").encode()
        out.append(rec)
        size += len(rec)
    return out


def train() -> int:
    import logging

    from sealed import SecretBuffer, derive_dek
    from sealed.store import LocalDirStore
    from sealed.writer import write_dataset
    from trainer.config import JobConfig
    from trainer.data import PlaintextShards
    from trainer.keysource import StaticKeySource
    from trainer.sealed_reader import open_sealed_reader
    from trainer.train import run_job

    logging.getLogger("trainer").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        root = Path(tmp)
        shares = [SecretBuffer.random(32) for _ in range(2)]
        dek = derive_dek(shares, tenant_id="acme", dataset_id="corpus", key_version=1)
        records = _records(32 << 20)
        ref = write_dataset(LocalDirStore(root / "store"), records, dek=dek, tenant_id="acme",
                            dataset_id="corpus", key_version=1, share_holders=["a", "b"],
                            target_shard_size=4 << 20)

        def config(ckpt: str) -> JobConfig:
            return JobConfig.from_mapping({
                "job_id": "gpu-check", "tenant_id": "acme", "device": "cuda",
                "dataset": {"id": "corpus", "key_version": 1, "manifest": ref.manifest_name,
                            "store": str(root / "store")},
                "checkpoint": {"dir": str(root / ckpt), "interval": 10**6},
                "model": {"name": "tiny-gpt", "params": {"layers": 6, "d_model": 512,
                                                         "heads": 8}},
                "optimizer": {"lr": 3e-4}, "schedule": {"warmup_steps": 5},
                "steps": 100, "batch_size": 32, "seq_len": 256, "precision": "bf16",
                "log_interval": 10**6, "prefetch_depth": 2,
            })

        reader = open_sealed_reader(config("ck-probe"), dek)
        grouped, start = [], 0
        for entry in reader.reader.manifest.shards:
            grouped.append(records[start:start + entry.record_count])
            start += entry.record_count
        reader.close()
        plain = PlaintextShards(grouped)
        ratios, enc_sps, plain_sps = [], [], []
        for i in range(3):
            sps = {}
            for mode in (("enc", "plain") if i % 2 == 0 else ("plain", "enc")):
                result = run_job(config(f"ck-{mode}{i}"), StaticKeySource(dek), harden=False,
                                 handle_signals=False,
                                 open_reader=(None if mode == "enc"
                                              else lambda _config, _dek: plain))
                sps[mode] = result.samples_per_s
            enc_sps.append(sps["enc"])
            plain_sps.append(sps["plain"])
            ratios.append(sps["enc"] / sps["plain"])
        dek.zeroize()
        for share in shares:
            share.zeroize()
    ratio = statistics.median(ratios)
    print(f"CUDA training (tiny-gpt 6x512, bf16, batch 32 x 256, 100 steps, median of 3 "
          f"pairs): confidential {statistics.median(enc_sps):.1f} samples/s | plaintext "
          f"{statistics.median(plain_sps):.1f} samples/s | paired ratio {ratio:.3f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f})")
    _goal("cuda_trainer_vs_plaintext", ratio, ">=", 0.97)
    return 0


def scan() -> int:
    import torch

    from trainer.shred import Shredder

    count = 64 << 20  # 512 MiB of int64
    marker = torch.tensor(MARKER, dtype=torch.int64)

    def found() -> int:
        buf = torch.empty(count, dtype=torch.int64, device="cuda")
        hits = int((buf == marker.cuda()).sum())
        del buf
        return hits

    secret = torch.full((count,), int(marker), dtype=torch.int64, device="cuda")
    torch.cuda.synchronize()
    del secret  # control: freed but not shredded; the caching allocator hands it back
    control = found()
    torch.cuda.empty_cache()
    held = [torch.full((count,), int(marker), dtype=torch.int64, device="cuda")]
    shredder = Shredder()
    shredder.add_tensors("gpu-check", lambda: held)
    report = shredder.shred("gpu-check")
    held.clear()  # the zeroed block goes back to the caching allocator, as the control's did
    after = found()
    print(f"GPU memory scan for a 64-bit marker over {count * 8 >> 20} MiB: control "
          f"(freed, not shredded) {control} hits; after shredding {after} hits; "
          f"shred report: {report}")
    _goal("gpu_scan_control_finds_marker", control, ">=", 1)
    _goal("gpu_scan_after_shred_hits", after, "==", 0)
    return 0 if after == 0 and control > 0 else 1


def main(argv: list[str]) -> int:
    commands = {"facts": facts, "ddp-worker": ddp_worker, "train": train, "scan": scan}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: gpu_check.py {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    return commands[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
