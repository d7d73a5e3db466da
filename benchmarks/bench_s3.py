"""The S3 read path against raw ranged GETs from the same server: ``goal s3_read_vs_raw_get``.

A real S3-compatible server runs locally (moto's server mode, a subprocess on loopback, as in
the tests). A sealed dataset (64 MiB shards, the writer's default; 256 MiB with ``--quick``,
1 GiB without) is written into it through ``S3Store`` (multipart uploads), then, alternating,
several times each:

- **ours**: the trainer's read path, ``trainer.sealed_reader.open_sealed_reader`` on
  ``store: s3://...`` (configured only by the standard AWS profile files), decrypting every
  shard with ``decrypt_shard_into`` into one buffer, naming the next shard as the trainer's
  pipeline does (``next_shard``): parallel ranged GETs, prefetch of the ranges after the one
  being decrypted and, near a shard's end, of the next shard's first ranges (so the GETs run
  on across shard boundaries), AES-GCM into the caller's buffer;
- **raw**: the same ciphertext objects fetched with plain botocore ranged GETs of 8 MiB, the
  same number in flight (4), each read straight into a preallocated buffer, nothing else:
  the most this server and client deliver, the ceiling of any read path.

Throughput is ciphertext bytes per second of wall time. The runs come in pairs of adjacent
runs (the order alternating from pair to pair), and the goal is the median of the per-pair
ratios ours / raw, printed with their range (target >= 0.90: decryption must hide behind the
transfers): on a shared machine load from elsewhere then hits both sides of a pair alike.
Beside it: our CPU seconds and the server's (from /proc), per run: both sides issue about the
same requests (ours adds one HeadObject per shard and the manifest), so the server's CPU
should match. The server is a
Python process on the same machine whose cost per ranged GET grows with the object's size
(moto reads the whole object to serve a range), so absolute numbers say little about a real
S3 endpoint; the ratio is what is measured.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from benchmarks._proc import cpu_seconds
from benchmarks.bench_sealed import _generated
from sealed import SecretBuffer
from sealed.writer import write_dataset
from tests.s3server import S3Server
from trainer.sealed_reader import open_sealed_reader

TENANT, DATASET = "acme", "bench-s3"
SHARD = 64 << 20  # the writer's default target shard size
RANGE = 8 << 20
IN_FLIGHT = 4
GOAL = 0.90


def _raw(server: S3Server, keys: list[tuple[str, int]], bufs: dict[str, bytearray]) -> None:
    client = server.client()

    def get(key: str, offset: int, length: int) -> None:
        resp = client.get_object(Bucket=server.bucket, Key=key,
                                 Range=f"bytes={offset}-{offset + length - 1}")
        view = memoryview(bufs[key])[offset : offset + length]
        body = resp["Body"]
        done = 0
        while done < length:
            n = body.readinto(view[done:])
            if not n:
                raise RuntimeError("short read")
            done += n
        body.close()

    with ThreadPoolExecutor(IN_FLIGHT) as pool:
        futures = [pool.submit(get, key, off, min(RANGE, size - off))
                   for key, size in keys for off in range(0, size, RANGE)]
        for f in futures:
            f.result()
    client.close()


def main(quick: bool = False) -> None:
    total = (256 << 20) if quick else (1 << 30)
    reps = 5 if quick else 7
    with tempfile.TemporaryDirectory(prefix="bench-s3-") as tmp, \
            SecretBuffer.random(32) as dek:
        server = S3Server(Path(tmp) / "s3")
        saved = {k: os.environ.get(k) for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE",
                                                "AWS_PROFILE", "AWS_CA_BUNDLE")}
        try:
            os.environ.update(server.env)
            writer_store = server.store("bench")
            t0 = time.perf_counter()
            ref = write_dataset(writer_store, _generated(total), dek=dek, tenant_id=TENANT,
                                dataset_id=DATASET, key_version=1, share_holders=["broker"],
                                target_shard_size=SHARD)
            upload_s = time.perf_counter() - t0
            writer_store.close()
            config = SimpleNamespace(tenant_id=TENANT, dataset=SimpleNamespace(
                id=DATASET, key_version=1, manifest=ref.manifest_name,
                store=server.url("bench"), store_is_s3=True))
            probe = open_sealed_reader(config, dek)  # type: ignore[arg-type]
            entries = probe.reader.manifest.shards
            probe.close()
            keys = [(f"bench/{e.object_name}", e.ciphertext_size) for e in entries]
            ct_bytes = sum(size for _, size in keys)
            print(f"dataset: {ref.plaintext_bytes / 2**20:.0f} MiB in {ref.num_shards} shards of "
                  f"{SHARD >> 20} MiB on a local moto server (loopback HTTP); uploaded in "
                  f"{upload_s:.2f} s ({ref.plaintext_bytes / upload_s / 1e9:.2f} GB/s); "
                  f"{reps} pairs of runs, the order alternating", flush=True)
            bufs = {key: bytearray(size) for key, size in keys}
            out = bytearray(max(e.plaintext_size for e in entries))
            def raw_run() -> tuple[float, float, float]:
                cpu0, srv0, t0 = time.process_time(), cpu_seconds(server.proc.pid), \
                    time.perf_counter()
                _raw(server, keys, bufs)
                wall = time.perf_counter() - t0
                return wall, time.process_time() - cpu0, cpu_seconds(server.proc.pid) - srv0

            def ours_run() -> tuple[float, float, float]:
                cpu0, srv0, t0 = time.process_time(), cpu_seconds(server.proc.pid), \
                    time.perf_counter()
                shards = open_sealed_reader(config, dek)  # type: ignore[arg-type]
                n = shards.num_shards
                for j in range(n):  # naming the next shard, as trainer/data.py does
                    shards.decrypt_shard_into(j, out, j + 1 if j + 1 < n else None)
                shards.close()
                wall = time.perf_counter() - t0
                return wall, time.process_time() - cpu0, cpu_seconds(server.proc.pid) - srv0

            ours, raw, ratios = [], [], []
            for rep in range(reps):  # pairs of adjacent runs, the order alternating
                if rep % 2 == 0:
                    r_run = raw_run()
                    o_run = ours_run()
                else:
                    o_run = ours_run()
                    r_run = raw_run()
                for label, (wall, cpu, srv) in (("raw ranged GET", r_run),
                                                ("ours (open + decrypt)", o_run)):
                    print(f"  pair {rep}: {label:22s} {ct_bytes / wall / 1e9:.3f} GB/s (client "
                          f"CPU {cpu:.2f} s, server CPU {srv:.2f} s)", flush=True)
                ours.append(ct_bytes / o_run[0])
                raw.append(ct_bytes / r_run[0])
                ratios.append(r_run[0] / o_run[0])
            o, r = statistics.median(ours), statistics.median(raw)
            ratio = statistics.median(ratios)
            print(f"median: ours {o / 1e9:.3f} GB/s, raw ranged GET {r / 1e9:.3f} GB/s; ours/raw "
                  f"per pair: median {ratio:.2f} (range {min(ratios):.2f}-{max(ratios):.2f}, "
                  f"{len(ratios)} pairs)", flush=True)
            print(f"goal s3_read_vs_raw_get: {ratio:.2f} (target >= {GOAL:.2f}) "
                  f"{'met' if ratio >= GOAL else 'missed'}", flush=True)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            server.stop()


if __name__ == "__main__":
    main(quick=True)
