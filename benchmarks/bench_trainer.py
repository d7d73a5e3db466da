"""Confidential training against a real plaintext PyTorch trainer, per CPU second.

The plaintext side is what a user would write without this project: the same tokens in a file
read through a ``numpy.memmap``, a ``torch.utils.data.DataLoader`` (``shuffle=True``,
``num_workers=0``) over fixed windows of ``seq_len + 1`` bytes, the same model, optimizer, lr
schedule and clipping in fp32 (bf16 autocast on a CPU without bf16 units would bury the data
path under emulated arithmetic), and ``torch.save`` checkpoints at the same interval. The
confidential side is ``trainer.train.run_job`` on the sealed dataset through the trainer's
store path (``open_sealed_reader``: ``MappedDirStore``, AES-GCM into pooled buffers, a
prefetch thread, encrypted checkpoints), key from a ``StaticKeySource`` (attestation is not
what this measures; ``bench_broker`` and the key-acquisition benchmark do).

The data path matters here: a small model (tiny-gpt, 1 layer, d_model 32) on large batches
(64 x 256 tokens), so a step costs about as much as producing its batch, and a dataset of 64 MiB
(256 MiB in full mode), beyond the 32 MiB L3.

Every comparison is a series of pairs of adjacent runs (the order alternates); the results are
the medians of the per-pair ratios with their ranges. Both sides run in this one process, so
the ratio is of samples per CPU second of the whole process (all threads: the prefetch thread's
decryption counts), which a second idle core cannot flatter:

* loader alone: batches per CPU second, ``goal loader_vs_plaintext_per_cpu_s`` (>= 0.95);
* training: samples per CPU second, ``goal trainer_vs_plaintext_per_cpu_s`` (>= 0.95).

Wall-clock ratios are printed beside them.
"""

from __future__ import annotations

import logging
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sealed import SecretBuffer
from sealed.store import LocalDirStore
from sealed.writer import write_dataset
from trainer.config import JobConfig
from trainer.data import EncryptedBatches, TokenWindows, make_loader
from trainer.keysource import StaticKeySource
from trainer.models import build_model, model_loss
from trainer.sealed_reader import open_sealed_reader
from trainer.shred import Shredder
from trainer.train import lr_at, run_job

SEQ, BATCH = 256, 64
MODEL = {"layers": 1, "d_model": 32, "heads": 2}
CKPT_EVERY = 20
_TEXT = ("the quick brown fox jumps over a lazy dog while the cat sat on the warm mat and a "
         "small bird sings in the old tree near the river bank")
WORDS = _TEXT.split(" ")


def _records(total: int) -> list[bytes]:
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(300_000)).encode()  # about 1.3 MB
    out, size = [], 0
    while size < total:
        start = rng.randrange(0, len(text) - 8192)
        rec = text[start : start + rng.randrange(2048, 8192)]
        out.append(rec)
        size += len(rec)
    return out


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _config(root: Path, manifest: str, steps: int, ckpt: str) -> JobConfig:
    return JobConfig.from_mapping({
        "job_id": "bench", "tenant_id": "acme",
        "dataset": {"id": "corpus", "key_version": 1, "manifest": manifest,
                    "store": str(root / "store")},
        "checkpoint": {"dir": str(root / ckpt), "interval": CKPT_EVERY, "keep_last": 2},
        "model": {"name": "tiny-gpt", "params": MODEL},
        "optimizer": {"lr": 3e-3}, "schedule": {"warmup_steps": 5},
        "steps": steps, "batch_size": BATCH, "seq_len": SEQ, "precision": "fp32",
        "device": "cpu", "log_interval": 10**6, "prefetch_depth": 2,
    })


class _Windows(Dataset):
    """Windows of ``SEQ + 1`` tokens from a memmap, as a plain PyTorch trainer reads them."""

    def __init__(self, tokens: np.memmap) -> None:
        self.tokens = tokens
        self.count = len(tokens) // (SEQ + 1)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        w = torch.from_numpy(np.array(self.tokens[i * (SEQ + 1) : (i + 1) * (SEQ + 1)],
                                      dtype=np.int64))
        return w[:-1], w[1:]


def _plain_batches(tokens: np.memmap):  # type: ignore[no-untyped-def]
    loader = DataLoader(_Windows(tokens), batch_size=BATCH, shuffle=True, num_workers=0,
                        drop_last=True)
    while True:
        yield from loader


def _plain_train(tokens: np.memmap, config: JobConfig, ckpt_dir: Path) -> int:
    """The plaintext trainer: the same loop a user writes; returns samples trained."""
    torch.manual_seed(config.seed)
    model = build_model("tiny-gpt", MODEL, seq_len=SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=config.optimizer.lr,
                            betas=config.optimizer.betas, eps=config.optimizer.eps,
                            weight_decay=config.optimizer.weight_decay)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    batches = _plain_batches(tokens)
    model.train()
    for step in range(config.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, config)
        x, y = next(batches)
        logits = model(x)
        loss = model_loss(model, logits, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        opt.step()
        opt.zero_grad(set_to_none=False)
        done = step + 1
        if done % CKPT_EVERY == 0 or done == config.steps:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "step": done}, ckpt_dir / f"ckpt-{done}.pt")
    return config.steps * BATCH


def _pairs(a: Callable[[], tuple[float, float]], b: Callable[[], tuple[float, float]],
           reps: int) -> list[tuple[tuple[float, float], tuple[float, float]]]:
    out = []
    for i in range(reps):
        if i % 2 == 0:
            ra = a()
            rb = b()
        else:
            rb = b()
            ra = a()
        out.append((ra, rb))
    return out


def _measure(fn: Callable[[], int]) -> tuple[float, float]:
    """(units per wall second, units per CPU second of this process)."""
    t, c = time.perf_counter(), _cpu()
    units = fn()
    return units / (time.perf_counter() - t), units / max(_cpu() - c, 1e-9)


def _report(label: str, unit: str, pairs) -> float:  # type: ignore[no-untyped-def]
    wall = [o[0] / p[0] for o, p in pairs]
    cpu = [o[1] / p[1] for o, p in pairs]
    ours = statistics.median(o[1] for o, _ in pairs)
    plain = statistics.median(p[1] for _, p in pairs)
    print(f"  {label}: confidential {ours:.0f} {unit}/CPU-s, plaintext {plain:.0f} {unit}/CPU-s;"
          f" per CPU second median {statistics.median(cpu):.3f} (range {min(cpu):.2f}-"
          f"{max(cpu):.2f}); wall clock median {statistics.median(wall):.3f} (range "
          f"{min(wall):.2f}-{max(wall):.2f}), {len(pairs)} pairs", flush=True)
    return statistics.median(cpu)


def main(quick: bool) -> None:
    logging.getLogger("trainer").setLevel(logging.ERROR)
    total = (64 if quick else 256) << 20
    steps = 40 if quick else 200
    loader_batches = 500 if quick else 4000
    reps = 5 if quick else 9
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp, \
            SecretBuffer.random(32) as dek:
        root = Path(tmp)
        records = _records(total)
        ref = write_dataset(LocalDirStore(root / "store"), records, dek=dek, tenant_id="acme",
                            dataset_id="corpus", key_version=1, share_holders=["a", "b"],
                            target_shard_size=16 << 20)
        # the plaintext trainer's file: the same tokens (every record's bytes, in order)
        with open(root / "tokens.bin", "wb") as f:
            for rec in records:
                f.write(rec)
        tokens = np.memmap(root / "tokens.bin", dtype=np.uint8, mode="r")
        del records
        cfg = _config(root, ref.manifest_name, steps, "ck")
        print(f"dataset: {ref.plaintext_bytes / 2**20:.0f} MiB of text in {ref.num_shards} "
              f"shards; tiny-gpt {MODEL}, batch {BATCH} x {SEQ} tokens, fp32, checkpoints "
              f"every {CKPT_EVERY} steps; {reps} pairs per comparison", flush=True)

        def ours_loader() -> tuple[float, float]:
            shredder = Shredder()
            reader = open_sealed_reader(cfg, dek)
            pipe = EncryptedBatches(reader, TokenWindows(SEQ), batch_size=BATCH, rank=0,
                                    world_size=1, seed=0, prefetch_depth=2, shredder=shredder)
            it = iter(make_loader(pipe))

            def run() -> int:
                for _ in range(loader_batches):
                    next(it)
                return loader_batches
            try:
                return _measure(run)
            finally:
                shredder.shred("benchmark")
                reader.close()

        def plain_loader() -> tuple[float, float]:
            it = _plain_batches(tokens)

            def run() -> int:
                for _ in range(loader_batches):
                    next(it)
                return loader_batches
            return _measure(run)

        count = iter(range(10**6))

        def ours_train() -> tuple[float, float]:
            c = _config(root, ref.manifest_name, steps, f"ck-enc-{next(count)}")
            return _measure(lambda: run_job(c, StaticKeySource(dek), harden=False,
                                            handle_signals=False).steps_done * BATCH)

        def plain_train() -> tuple[float, float]:
            return _measure(lambda: _plain_train(tokens, cfg, root / f"ck-plain-{next(count)}"))

        ours_loader()  # warm: page cache, torch kernels
        plain_loader()
        print(f"loader ({loader_batches} batches per run):", flush=True)
        loader = _report("loader", "batches", _pairs(ours_loader, plain_loader, reps))
        print(f"training ({steps} steps per run):", flush=True)
        train = _report("training", "samples", _pairs(ours_train, plain_train, reps))
    print(f"goal loader_vs_plaintext_per_cpu_s: {loader:.3f} (target >= 0.95) "
          f"{'met' if loader >= 0.95 else 'missed'}")
    print(f"goal trainer_vs_plaintext_per_cpu_s: {train:.3f} (target >= 0.95) "
          f"{'met' if train >= 0.95 else 'missed'}")


if __name__ == "__main__":
    main(quick=True)
