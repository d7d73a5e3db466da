"""Sealed format throughput and writer memory, side by side in one run.

Decryption of one shard (the same segments, the same key) by:
  ours (memory)  DatasetReader.decrypt_shard_into, ciphertext held by an in-memory store
                 (zero-copy view): our whole decrypt path minus storage I/O
  ours (local)   the same from a LocalDirStore whose file is in the page cache (one readinto
                 copy per 8 MiB: the storage read is included)
  ours (mapped)  the same from a MappedDirStore (zero-copy mmap of the page cache)
  ours (+sha256) memory path with verify_digest=True
  raw AES-GCM    AESGCM.decrypt_into over the same segments with precomputed nonces
  memcpy         copying the ciphertext bytes once
  tink-py        tink.streaming_aead decrypting the same ciphertext (same key, same AAD),
                 both with read() and with readinto() into a preallocated buffer; the goal
                 compares against the faster of the two
  pyrage (age)   decrypting the same plaintext encrypted to an x25519 identity

Encryption: our StreamEncryptor (segments discarded after each is produced) vs raw
encrypt_into vs memcpy vs tink-py vs pyrage, and the writer end to end (shard packing,
SHA-256 of the plaintext, store put into memory).

Writer memory: the writer runs in a subprocess over a generated dataset at a small and a
large size (128 MiB and 512 MiB in quick mode, 512 MiB and 2 GiB otherwise) into a
LocalDirStore; peak RSS (ru_maxrss) is compared.

Run: ``.venv/bin/python -m benchmarks sealed`` (``--quick`` for the short version).
"""

from __future__ import annotations

import io
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pyrage
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sealed import (
    DatasetReader,
    LocalDirStore,
    MappedDirStore,
    MemoryStore,
    SecretBuffer,
    streaming,
)
from sealed.shard import shard_aad
from sealed.writer import write_dataset

TENANT, DATASET = "bench-tenant", "bench-dataset"
REPO = Path(__file__).resolve().parents[1]


def _best(fn: Callable[[], object], reps: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def _tink(raw_key: bytes):
    from tests.sealed.tink_oracle import tink_streaming_aead  # the oracle the tests use

    return tink_streaming_aead(raw_key)


class _Sink(io.BytesIO):
    def close(self) -> None:  # tink closes its destination
        pass


class _Generated:
    """A re-iterable source of ``total`` bytes in 1 MiB records, generated on the fly."""

    def __init__(self, total: int, record: int = 1 << 20) -> None:
        self.count = total // record
        self.block = bytearray(os.urandom(record))

    def __iter__(self):
        for k in range(self.count):
            self.block[:8] = k.to_bytes(8, "big")
            yield self.block


def _peak_rss_kib() -> int:
    """This process's own peak RSS. (ru_maxrss would include the forking parent's RSS: Linux
    keeps it across execve; VmHWM belongs to the new address space.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _rss_child(total: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-sealed-") as tmp, SecretBuffer.random(32) as dek:
        ref = write_dataset(
            LocalDirStore(tmp),
            _Generated(total),
            dek=dek,
            tenant_id=TENANT,
            dataset_id=DATASET,
            key_version=1,
            share_holders=["broker"],
        )
        peak_kib = _peak_rss_kib()
        print(f"{ref.plaintext_bytes} {ref.num_shards} {peak_kib}")


def _run_rss(total: int) -> tuple[int, int, float, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_sealed", "--rss-child", str(total)],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    elapsed = time.perf_counter() - start
    plain, shards, peak_kib = (int(x) for x in proc.stdout.split())
    return plain, shards, peak_kib / 1024, elapsed


def _row(name: str, nbytes: int, seconds: float, ref: float | None = None) -> float:
    rate = nbytes / seconds / 1e9
    extra = f"  {rate / ref:6.2f}x raw" if ref else ""
    print(f"  {name:<34} {rate:8.2f} GB/s{extra}", flush=True)
    return rate


def main(quick: bool) -> None:
    shard_mib = 16 if quick else 64
    reps = 5 if quick else 9
    peer_reps = 3 if quick else 5
    raw_key = os.urandom(32)
    dek = SecretBuffer.from_bytes(raw_key)
    records = [os.urandom(1 << 20) for _ in range(shard_mib - 1)]
    mem = MemoryStore()
    ref = write_dataset(
        mem,
        records,
        dek=dek,
        tenant_id=TENANT,
        dataset_id=DATASET,
        key_version=1,
        share_holders=["broker"],
        target_shard_size=shard_mib << 20,
    )
    assert ref.num_shards == 1
    reader = DatasetReader.open(
        mem, ref.manifest_name, dek=dek, tenant_id=TENANT, dataset_id=DATASET, key_version=1
    )
    entry = reader.manifest.shards[0]
    size = entry.plaintext_size
    ct = mem.get_range(entry.object_name, 0, entry.ciphertext_size)
    ctv = memoryview(ct)
    out = bytearray(size)
    outv = memoryview(out)
    plaintext = bytes(reader.decrypt_shard_into(0, out))

    with tempfile.TemporaryDirectory(prefix="bench-sealed-") as tmp:
        local = LocalDirStore(tmp)
        local.put(entry.object_name, ct)
        local.put(
            ref.manifest_name, mem.get_range(ref.manifest_name, 0, mem.size(ref.manifest_name))
        )
        local_reader = DatasetReader.open(
            local, ref.manifest_name, dek=dek, tenant_id=TENANT, dataset_id=DATASET, key_version=1
        )
        mapped_reader = DatasetReader.open(
            MappedDirStore(tmp),
            ref.manifest_name,
            dek=dek,
            tenant_id=TENANT,
            dataset_id=DATASET,
            key_version=1,
        )

        cipher = reader._cipher(0)  # the same derived key and nonces the reader uses
        aead: AESGCM = cipher._aead
        n = streaming.segment_count(len(ct))
        plan = []
        for i in range(n):
            start, end = (
                streaming.ciphertext_start(i),
                min(len(ct), (i + 1) * streaming.SEGMENT_SIZE),
            )
            pt0 = streaming.plaintext_start(i)
            plan.append(
                (cipher._nonce(i, i == n - 1), ctv[start:end], outv[pt0 : pt0 + end - start - 16])
            )

        def raw_decrypt() -> None:
            for nonce, c, o in plan:
                aead.decrypt_into(nonce, c, None, o)

        def memcpy() -> None:
            outv[:] = ctv[streaming.HEADER_SIZE : streaming.HEADER_SIZE + size]

        aad = shard_aad(
            tenant_id=TENANT,
            dataset_id=DATASET,
            key_version=1,
            upload_id=reader.manifest.upload_id,
            shard_index=0,
            shard_count=1,
        )
        tink = _tink(raw_key)

        def tink_decrypt() -> None:
            with tink.new_decrypting_stream(io.BytesIO(ct), aad) as d:
                assert len(d.read()) == size

        def tink_decrypt_into() -> None:  # tink's best case: a preallocated buffer, like ours
            with tink.new_decrypting_stream(io.BytesIO(ct), aad) as d:
                pos = 0
                while pos < size:
                    got = d.readinto(outv[pos:])
                    if not got:
                        break
                    pos += got
                assert pos == size

        ident = pyrage.x25519.Identity.generate()
        age_ct = pyrage.encrypt(plaintext, [ident.to_public()])

        print(f"decrypt one {size / 2**20:.0f} MiB shard ({n} segments), best of {reps}:")
        t_raw = _best(raw_decrypt, reps)
        raw = _row("raw AESGCM.decrypt_into", size, t_raw)
        ours = _row(
            "ours (memory, zero-copy)",
            size,
            _best(lambda: reader.decrypt_shard_into(0, out), reps),
            raw,
        )
        ours_local = _row(
            "ours (LocalDirStore, page cache)",
            size,
            _best(lambda: local_reader.decrypt_shard_into(0, out), reps),
            raw,
        )
        ours_mapped = _row(
            "ours (MappedDirStore, page cache)",
            size,
            _best(lambda: mapped_reader.decrypt_shard_into(0, out), reps),
            raw,
        )
        _row(
            "ours (memory) + verify_digest",
            size,
            _best(lambda: reader.decrypt_shard_into(0, out, verify_digest=True), reps),
            raw,
        )
        _row("memcpy", size, _best(memcpy, reps), raw)
        tink_read = _row("tink-py read()", size, _best(tink_decrypt, peer_reps), raw)
        tink_into = _row(
            "tink-py readinto(preallocated)", size, _best(tink_decrypt_into, reps), raw
        )
        tink_rate = max(tink_read, tink_into)  # the goal is against tink's faster path
        age_rate = _row(
            "pyrage (age, x25519)",
            size,
            _best(lambda: pyrage.decrypt(age_ct, [ident]), peer_reps),
            raw,
        )
        assert bytes(reader.decrypt_shard_into(0, out)) == plaintext
        print(
            f"  ratios: ours/raw {ours / raw:.2f}, ours(local)/raw {ours_local / raw:.2f}, "
            f"ours(mapped)/raw {ours_mapped / raw:.2f}, ours/tink {ours / tink_rate:.1f}, "
            f"ours/age {ours / age_rate:.1f}"
        )
        local_reader.close()
        mapped_reader.close()

    # ------------------------------------------------------------------ encryption
    chunks = [plaintext[i : i + (1 << 20)] for i in range(0, size, 1 << 20)]

    def ours_encrypt() -> None:
        enc = streaming.StreamEncryptor(dek, aad)
        for _ in enc.encrypt(chunks):
            pass

    enc_out = bytearray(len(ct))
    enc_view = memoryview(enc_out)
    enc_plan = []
    for i in range(n):
        start, end = streaming.ciphertext_start(i), min(len(ct), (i + 1) * streaming.SEGMENT_SIZE)
        pt0 = streaming.plaintext_start(i)
        enc_plan.append(
            (
                cipher._nonce(i, i == n - 1),
                memoryview(plaintext)[pt0 : pt0 + end - start - 16],
                enc_view[start:end],
            )
        )

    def raw_encrypt() -> None:
        for nonce, p, o in enc_plan:
            aead.encrypt_into(nonce, p, None, o)

    def tink_encrypt() -> None:
        sink = _Sink()
        with tink.new_encrypting_stream(sink, aad) as e:
            e.write(plaintext)

    def tink_encrypt_chunked() -> None:  # faster for tink: 1 MiB writes
        sink = _Sink()
        with tink.new_encrypting_stream(sink, aad) as e:
            for c in chunks:
                e.write(c)

    def writer() -> None:
        write_dataset(
            MemoryStore(),
            records,
            dek=dek,
            tenant_id=TENANT,
            dataset_id=DATASET,
            key_version=1,
            share_holders=["broker"],
            target_shard_size=shard_mib << 20,
        )

    print(f"encrypt the same {size / 2**20:.0f} MiB:")
    raw_e = _row("raw AESGCM.encrypt_into", size, _best(raw_encrypt, reps))
    ours_e = _row("ours StreamEncryptor", size, _best(ours_encrypt, reps), raw_e)
    _row("ours write_dataset (+sha256, store)", size, _best(writer, peer_reps), raw_e)
    _row("memcpy", size, _best(memcpy, reps), raw_e)
    tink_e = max(
        _row("tink-py write(all)", size, _best(tink_encrypt, peer_reps), raw_e),
        _row("tink-py write(1 MiB chunks)", size, _best(tink_encrypt_chunked, peer_reps), raw_e),
    )
    age_e = _row(
        "pyrage (age, x25519)",
        size,
        _best(lambda: pyrage.encrypt(plaintext, [ident.to_public()]), peer_reps),
        raw_e,
    )
    print(
        f"  ratios: ours/raw {ours_e / raw_e:.2f}, ours/tink {ours_e / tink_e:.1f}, "
        f"ours/age {ours_e / age_e:.1f}"
    )
    reader.close()
    dek.zeroize()

    # ------------------------------------------------------------------ writer memory
    small, large = (128 << 20, 512 << 20) if quick else (512 << 20, 2 << 30)
    print("writer peak RSS (subprocess, LocalDirStore, 1 MiB records, 64 MiB shards):")
    peaks = []
    for total in (small, large):
        plain, shards, peak, secs = _run_rss(total)
        peaks.append(peak)
        print(
            f"  {plain / 2**20:6.0f} MiB dataset, {shards:3d} shards: peak RSS {peak:7.1f} MiB "
            f"({plain / secs / 1e9:.2f} GB/s end to end)",
            flush=True,
        )
    growth = peaks[1] / peaks[0]
    print(f"  dataset x{large / small:.0f} -> peak RSS x{growth:.2f}")

    def goal(name: str, value: float, target: str, met: bool, fmt: str = ".2f") -> None:
        print(f"goal {name}: {value:{fmt}} (target {target}) {'met' if met else 'missed'}")

    goal("sealed_decrypt_vs_raw_aesgcm", ours / raw, ">= 0.90", ours / raw >= 0.90)
    goal("sealed_decrypt_vs_tink", ours / tink_rate, ">= 10", ours / tink_rate >= 10, ".1f")
    goal("sealed_writer_peak_rss_growth", growth, "<= 1.2", growth <= 1.2)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        _rss_child(int(sys.argv[2]))
    else:
        main(quick="--quick" in sys.argv)
