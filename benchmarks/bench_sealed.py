"""Sealed data on the paths users run: the trainer's store path and ``kms-broker dataset upload``.

Every comparison is a series of *pairs* of adjacent runs (the order alternates inside each
pair); the result is the median of the per-pair ratios with their range, so load from
elsewhere on a shared machine hits both sides of a pair alike.

1. **Decrypt through the trainer's store path.** A multi-shard dataset (512 MiB in quick mode,
   2 GiB otherwise; 64 MiB shards, far beyond the 32 MiB L3) written to disk, opened with
   ``trainer.sealed_reader.open_sealed_reader`` (the function ``trainer --attest`` calls:
   ``MappedDirStore``, manifest authenticated) and decrypted shard by shard into one buffer by
   ``decrypt_shard_into``, one thread, naming the next shard as the trainer's prefetcher does
   (shards cached whole are decrypted in place from the mapping; the others are read whole, in
   order, by the store's I/O thread into reused buffers ahead of decryption).
   - warm (files in the page cache) against raw ``AESGCM.decrypt_into`` over the same
     ciphertext bytes held in memory: same segments (1 MiB), same keys and nonces, same output
     buffer, one thread: ``goal store_decrypt_warm_vs_raw`` (>= 0.90);
   - cold (``posix_fadvise(DONTNEED)`` on every file before each run) against a plain
     sequential ``readinto`` of the same files: ``goal store_decrypt_cold_vs_plain_read``
     (>= 0.90).
2. **Upload end to end.** ``kms-broker dataset upload`` (a subprocess: the CLI, one real broker
   with SoftHSM over mTLS, shares, encryption, every object durable before it returns: the
   shards fsynced in the background and once more before the manifest) of a folder of 8 MiB
   files (1 GiB in quick mode, 4 GiB otherwise) against ``cp -r`` + ``sync`` of the same
   folder on the same disk: ``goal upload_vs_plain_copy`` (>= 0.80). Beside them, in-process:
   tink-py streaming AEAD and pyrage (age, x25519) encrypting every file of a quarter of the
   folder to the same disk, then ``sync`` (their rates; age is slow enough that the whole
   folder would dominate the run). The upload's peak RSS (VmHWM of the CLI process) at two dataset
   sizes: ``goal upload_peak_rss_growth`` (<= 1.2, flat in dataset size).

Both the cold decrypt and the upload also print the CPU time of each side (all threads of
the process; for the upload the CLI process, for the copy ``cp`` and ``sync``): on a machine
shared with other work the wall-clock ratios swing with the load, the CPU seconds much less.
For the cold decrypt also the decrypting thread's share, the major page faults of each
side (chunks decrypted from the mapping must be in memory or under read-ahead: a major
fault there means a page read by touching it, the slow way), and the read requests and busy
time of the disk during each side's runs (from ``/sys/dev/block``; the device is shared, so
other work's reads count too): the store path should read the files in about as many
requests as the plain read (a broken read-ahead shows as more, smaller ones).

Run: ``.venv/bin/python -m benchmarks sealed`` (``--quick`` for the short version).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pyrage

from sealed import LocalDirStore, SecretBuffer, streaming
from sealed.writer import write_dataset
from trainer.sealed_reader import open_sealed_reader

TENANT, DATASET = "acme", "bench-dataset"
REPO = Path(__file__).resolve().parents[1]
SHARD = 64 << 20
FILE = 8 << 20


def _generated(total: int, record: int = 1 << 20) -> list[bytearray]:
    block = os.urandom(record)
    out = []
    for k in range(total // record):
        rec = bytearray(block)
        rec[:8] = k.to_bytes(8, "big")
        out.append(rec)
    return out


def _pairs(a: Callable[[], float], b: Callable[[], float], reps: int) -> list[tuple[float, float]]:
    """``reps`` pairs of (a's seconds, b's seconds), alternating which runs first."""
    out = []
    for i in range(reps):
        if i % 2 == 0:
            ta = a()
            tb = b()
        else:
            tb = b()
            ta = a()
        out.append((ta, tb))
    return out


def _summary(label: str, ratios: list[float]) -> float:
    med = statistics.median(ratios)
    print(f"  {label}: median {med:.2f} (range {min(ratios):.2f}-{max(ratios):.2f}, "
          f"{len(ratios)} pairs)", flush=True)
    return med


def _timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _cpu(who: int = 0) -> float:
    """CPU seconds (user + system) so far of this process (all threads) or its children."""
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN if who else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _major_faults() -> int:
    """Major page faults of this process so far (a page read from disk by touching it)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def _main_thread_cpu() -> float:
    """CPU seconds of this process's main thread (the one decrypting), from /proc."""
    fields = Path(f"/proc/self/task/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _disk_reads(path: Path) -> tuple[int, int] | None:
    """(read requests completed, ms the device was busy) so far on the block device holding
    ``path`` (/sys/dev/block/MAJ:MIN/stat), or None where there is none (tmpfs, overlay). The
    device is shared: other processes' reads count too."""
    st = os.stat(path)
    stat = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/stat")
    try:
        fields = stat.read_text().split()
    except OSError:
        return None
    return int(fields[0]), int(fields[9])


def _drop_cache(paths: list[Path]) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def goal(name: str, value: float, target: str, met: bool) -> None:
    print(f"goal {name}: {value:.2f} (target {target}) {'met' if met else 'missed'}", flush=True)


# --------------------------------------------------------------------------- 1. decrypt


def _decrypt(quick: bool) -> tuple[float, float]:
    total = (512 << 20) if quick else (2 << 30)
    warm_reps, cold_reps = (5, 5) if quick else (9, 7)
    with tempfile.TemporaryDirectory(prefix="bench-sealed-") as tmp, \
            SecretBuffer.random(32) as dek:
        root = Path(tmp)
        ref = write_dataset(LocalDirStore(root / "store"), _generated(total), dek=dek,
                            tenant_id=TENANT, dataset_id=DATASET, key_version=1,
                            share_holders=["broker"], target_shard_size=SHARD)
        config = SimpleNamespace(  # what open_sealed_reader reads from a JobConfig
            tenant_id=TENANT,
            dataset=SimpleNamespace(id=DATASET, key_version=1, manifest=ref.manifest_name,
                                    store_path=root / "store", store_is_s3=False))
        shards = open_sealed_reader(config, dek)  # type: ignore[arg-type]
        reader = shards.reader
        entries = reader.manifest.shards
        files = [root / "store" / e.object_name for e in entries]
        buf = bytearray(max(e.plaintext_size for e in entries))
        out = memoryview(buf)
        plain_bytes = sum(e.plaintext_size for e in entries)
        ct_bytes = sum(e.ciphertext_size for e in entries)
        print(f"decrypt {plain_bytes / 2**20:.0f} MiB in {len(entries)} shards of "
              f"{SHARD >> 20} MiB through the trainer's store path (open_sealed_reader: "
              f"MappedDirStore), one thread, 1 MiB segments", flush=True)

        # raw: the same ciphertext bytes in memory, the same keys, nonces and output buffer
        ciphertexts = [f.read_bytes() for f in files]
        plans = []
        for j, (e, ct) in enumerate(zip(entries, ciphertexts, strict=True)):
            cipher = reader._cipher(j)  # the derived key and nonces the reader uses
            ctv = memoryview(ct)
            n = streaming.segment_count(e.ciphertext_size)
            for i in range(n):
                start = streaming.ciphertext_start(i)
                end = min(e.ciphertext_size, (i + 1) * streaming.SEGMENT_SIZE)
                pt0 = streaming.plaintext_start(i)
                plans.append((cipher._aead, cipher._nonce(i, i == n - 1), ctv[start:end],
                              out[pt0 : pt0 + end - start - streaming.TAG_SIZE]))

        def raw() -> float:
            def run() -> None:
                for aead, nonce, c, o in plans:
                    aead.decrypt_into(nonce, c, None, o)
            return _timed(run)

        nxt = [*range(1, len(entries)), None]  # the next shard, as the trainer's prefetcher says

        def ours() -> float:
            def run() -> None:
                for j in range(len(entries)):
                    shards.decrypt_shard_into(j, buf, nxt[j])
            return _timed(run)

        ours()  # warm the page cache and the mappings' first touch
        raw()
        warm = _pairs(ours, raw, warm_reps)
        print(f"  warm: ours {plain_bytes / statistics.median(t for t, _ in warm) / 1e9:.2f} "
              f"GB/s, raw AESGCM.decrypt_into "
              f"{plain_bytes / statistics.median(t for _, t in warm) / 1e9:.2f} GB/s")
        warm_ratio = _summary("warm ours/raw", [r / o for o, r in warm])
        plans.clear()
        ciphertexts.clear()

        rbuf = bytearray(8 << 20)
        rview = memoryview(rbuf)
        cpu: dict[str, list[float]] = {"ours": [], "plain": [], "main": []}
        faults: dict[str, list[int]] = {"ours": [], "plain": []}
        disk: dict[str, list[tuple[int, int]]] = {"ours": [], "plain": []}

        def disk_delta(side: str, before: tuple[int, int] | None) -> None:
            after = _disk_reads(files[0])
            if before is not None and after is not None:
                disk[side].append((after[0] - before[0], after[1] - before[1]))

        def plain_read() -> float:
            _drop_cache(files)

            def run() -> None:
                for f in files:
                    with open(f, "rb", buffering=0) as fh:
                        while fh.readinto(rview):
                            pass
            c, f, d = _cpu(), _major_faults(), _disk_reads(files[0])
            took = _timed(run)
            cpu["plain"].append(_cpu() - c)
            faults["plain"].append(_major_faults() - f)
            disk_delta("plain", d)
            return took

        def ours_cold() -> float:
            # a fresh reader as at a job's start: mapped pages cannot be dropped from the
            # cache, so the warm reader's mappings are closed first
            nonlocal shards
            shards.close()
            _drop_cache(files)
            c, f, m, d = _cpu(), _major_faults(), _main_thread_cpu(), _disk_reads(files[0])
            t = time.perf_counter()
            shards = open_sealed_reader(config, dek)  # type: ignore[arg-type]
            for j in range(len(entries)):
                shards.decrypt_shard_into(j, buf, nxt[j])
            took = time.perf_counter() - t
            cpu["ours"].append(_cpu() - c)
            cpu["main"].append(_main_thread_cpu() - m)
            faults["ours"].append(_major_faults() - f)
            disk_delta("ours", d)
            return took

        cold = _pairs(ours_cold, plain_read, cold_reps)
        print(f"  cold: ours {plain_bytes / statistics.median(t for t, _ in cold) / 1e9:.2f} "
              f"GB/s of plaintext, plain read "
              f"{ct_bytes / statistics.median(t for _, t in cold) / 1e9:.2f} GB/s of the same "
              f"files")
        print(f"  cold CPU (all threads, median): ours {statistics.median(cpu['ours']) * 1e3:.0f}"
              f" ms (the decrypting thread {statistics.median(cpu['main']) * 1e3:.0f} ms, the "
              f"store's I/O thread the rest), plain read "
              f"{statistics.median(cpu['plain']) * 1e3:.0f} ms; major page faults per run: "
              f"ours {max(faults['ours'])} at most, plain read {max(faults['plain'])} at most")
        if disk["ours"] and disk["plain"]:
            def med(side: str, k: int) -> float:
                return statistics.median(x[k] for x in disk[side])
            print(f"  cold disk (median per run, the whole device): read requests ours "
                  f"{med('ours', 0):.0f}, plain read {med('plain', 0):.0f}; device busy ours "
                  f"{med('ours', 1):.0f} ms, plain read {med('plain', 1):.0f} ms")
        cold_ratio = _summary("cold ours/plain read (time for the same files)",
                              [p / o for o, p in cold])
        shards.close()
    return warm_ratio, cold_ratio


# --------------------------------------------------------------------------- 2. upload


class _Broker:
    """One real broker (SoftHSM, mTLS) and a registered tenant with its key file."""

    def __init__(self, root: Path) -> None:
        from benchmarks.bench_broker import _setup

        self.root = root
        self.proc, self.pki, self.address, _softhsm, _pin = _setup(root / "broker")
        self.key = root / "tenant.key"
        self.cli("tenant", "init", "--key", str(self.key))
        self.cli("tenant", "register", *self.tenant_args())

    def tenant_args(self) -> list[str]:
        return ["--tenant", TENANT, "--tenant-key", str(self.key), "--broker", self.address,
                "--ca", str(self.pki / "ca.pem"), "--cert", str(self.pki / "tenant-acme.pem"),
                "--key", str(self.pki / "tenant-acme.key")]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "kms_broker.cli", *args], cwd=REPO,
                              capture_output=True, text=True, check=True, timeout=600)

    def upload(self, folder: Path, store: Path, dataset: str) -> tuple[float, int]:
        """Seconds for ``kms-broker dataset upload`` end to end, and its peak RSS (KiB)."""
        code = ("import sys; from kms_broker.cli import main; rc = main(sys.argv[1:]); "
                "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]; "
                "print(hwm[0].split()[1], file=sys.stderr); sys.exit(rc)")
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", code, "dataset", "upload", str(folder), "--store", str(store),
             "--dataset", dataset, *self.tenant_args()],
            cwd=REPO, capture_output=True, text=True, check=False, timeout=1800)
        took = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(proc.stderr[-2000:])
        return took, int(proc.stderr.strip().splitlines()[-1])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def _folder(path: Path, total: int) -> Path:
    path.mkdir(parents=True)
    block = os.urandom(FILE)
    for k in range(total // FILE):
        (path / f"part-{k:05d}.bin").write_bytes(k.to_bytes(8, "big") + block[8:])
    os.sync()
    return path


def _upload(quick: bool) -> tuple[float, float]:
    total = (1 << 30) if quick else (4 << 30)
    small = total // 4
    reps = 2 if quick else 5
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        root = Path(tmp)
        broker = _Broker(root)
        try:
            src = _folder(root / "src", total)
            print(f"upload a folder of {total >> 20} MiB ({total // FILE} files of "
                  f"{FILE >> 20} MiB), same disk, {reps} pairs:", flush=True)
            count = iter(range(10**6))
            rss: list[int] = []
            cpu: dict[str, list[float]] = {"ours": [], "copy": []}

            def ours() -> float:
                out = root / "out"
                os.sync()
                c = _cpu(1)
                took, peak = broker.upload(src, out, f"ds{next(count)}")
                cpu["ours"].append(_cpu(1) - c)
                rss.append(peak)
                shutil.rmtree(out)
                return took

            def copy() -> float:
                out = root / "copy"
                os.sync()
                c = _cpu(1)
                took = _timed(lambda: subprocess.run(
                    f"cp -r '{src}' '{out}' && sync", shell=True, check=True, timeout=1800))
                cpu["copy"].append(_cpu(1) - c)
                shutil.rmtree(out)
                return took

            pairs = _pairs(ours, copy, reps)
            ours_t = statistics.median(t for t, _ in pairs)
            copy_t = statistics.median(t for _, t in pairs)
            label = "kms-broker dataset upload (end to end)"
            print(f"  {label:<42}{total / ours_t / 1e9:7.2f} GB/s")
            print(f"  {'cp -r + sync':<42}{total / copy_t / 1e9:7.2f} GB/s")
            print(f"  CPU (median): upload {statistics.median(cpu['ours']):.2f} s (the CLI "
                  f"process), cp -r + sync {statistics.median(cpu['copy']):.2f} s")
            ratio = _summary("upload/plain copy (time of cp -r + sync / time of upload)",
                             [c / o for o, c in pairs])
            big_peak = statistics.median(rss)
            small_src = root / "small"
            small_src.mkdir()
            for f in sorted(src.iterdir())[: small // FILE]:
                os.link(f, small_src / f.name)
            _, small_peak = broker.upload(small_src, root / "out-small", "ds-small")
            for name, secs in _peers(small_src, root / "peer"):
                print(f"  {name:<42}{small / secs / 1e9:7.2f} GB/s ({small >> 20} MiB)")
            growth = big_peak / small_peak
            print(f"  peak RSS of the upload: {small_peak / 1024:.0f} MiB for {small >> 20} MiB, "
                  f"{big_peak / 1024:.0f} MiB for {total >> 20} MiB (x{growth:.2f} for "
                  f"x{total // small} data)", flush=True)
        finally:
            broker.stop()
    return ratio, growth


def _peers(src: Path, out: Path) -> list[tuple[str, float]]:
    from tests.sealed.tink_oracle import tink_streaming_aead

    tink = tink_streaming_aead(os.urandom(32))
    ident = pyrage.x25519.Identity.generate()
    files = sorted(src.iterdir())

    def run_tink() -> None:
        for f in files:
            with open(out / f.name, "wb") as sink, \
                    tink.new_encrypting_stream(sink, f.name.encode()) as enc, \
                    open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    enc.write(chunk)
        os.sync()

    def run_age() -> None:
        for f in files:
            (out / f.name).write_bytes(pyrage.encrypt(f.read_bytes(), [ident.to_public()]))
        os.sync()

    results = []
    for name, fn in (("tink-py streaming AEAD per file + sync", run_tink),
                     ("pyrage (age x25519) per file + sync", run_age)):
        out.mkdir()
        os.sync()
        results.append((name, _timed(fn)))
        shutil.rmtree(out)
    return results


def main(quick: bool) -> None:
    warm, cold = _decrypt(quick)
    upload, growth = _upload(quick)
    goal("store_decrypt_warm_vs_raw", warm, ">= 0.90", warm >= 0.90)
    goal("store_decrypt_cold_vs_plain_read", cold, ">= 0.90", cold >= 0.90)
    goal("upload_vs_plain_copy", upload, ">= 0.80", upload >= 0.80)
    goal("upload_peak_rss_growth", growth, "<= 1.2", growth <= 1.2)


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
