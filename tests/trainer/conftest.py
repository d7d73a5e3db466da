"""Shared fixtures of the trainer tests: a real sealed dataset, job files, process helpers."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sealed import SecretBuffer, derive_dek
from sealed.store import LocalDirStore
from sealed.writer import write_dataset
from tests.trainer.keyserver import KeyServer

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
ENTRY = REPO / "tests" / "trainer" / "socket_entry.py"
_TEXT = (
    "the quick brown fox jumps over a lazy dog while the cat sat on the warm mat and "
    "a small bird sings in the old tree near the river bank"
)
WORDS = _TEXT.split(" ")


def corpus(n: int, *, seed: int = 0, canary: str | None = None) -> list[bytes]:
    """Learnable byte-level text records; the canary (if any) is planted in several."""
    rng = random.Random(seed)
    recs = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(50)) + ".\n"
        if canary is not None and i % 25 == 0:
            text = f"{canary} " + text
        recs.append(text.encode())
    return recs


@dataclass
class SealedDataset:
    root: Path
    store: Path
    manifest: str
    dek: SecretBuffer
    canary: bytes
    num_shards: int

    def dek_bytes(self) -> bytes:
        with self.dek.view() as v:
            return bytes(v)


def make_dataset(root: Path, *, records: int = 400, shard_size: int = 16384) -> SealedDataset:
    shares = [SecretBuffer.random(32) for _ in range(2)]
    dek = derive_dek(shares, tenant_id="acme", dataset_id="corpus", key_version=1)
    for s in shares:
        s.zeroize()
    canary = f"CANARY-{uuid.uuid4().hex}"
    store = root / "store"
    ref = write_dataset(
        LocalDirStore(store), corpus(records, canary=canary), dek=dek, tenant_id="acme",
        dataset_id="corpus", key_version=1, share_holders=["broker-a", "broker-b"],
        target_shard_size=shard_size,
    )
    return SealedDataset(root, store, ref.manifest_name, dek, canary.encode(), ref.num_shards)


@pytest.fixture
def dataset(tmp_path: Path) -> Iterator[SealedDataset]:
    ds = make_dataset(tmp_path)
    yield ds
    ds.dek.zeroize()


def job_dict(ds: SealedDataset, run: Path, **overrides: object) -> dict:
    job = {
        "job_id": "job-1",
        "tenant_id": "acme",
        "dataset": {"id": "corpus", "key_version": 1, "manifest": ds.manifest,
                    "store": str(ds.store)},
        "checkpoint": {"dir": str(run / "ckpt"), "interval": 10, "keep_last": 2},
        "model": {"name": "tiny-gpt", "params": {"layers": 2, "d_model": 64, "heads": 4}},
        "optimizer": {"lr": 3.0e-3, "weight_decay": 0.05},
        "schedule": {"warmup_steps": 5, "min_lr_ratio": 0.1},
        "steps": 60,
        "batch_size": 8,
        "seq_len": 64,
        "precision": "bf16",
        "log_interval": 5,
        "lease_poll_interval": 0.2,
    }
    job.update(overrides)
    return job


def write_job(path: Path, job: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(job))
    return path


@pytest.fixture
def key_server(tmp_path: Path, dataset: SealedDataset) -> Iterator[KeyServer]:
    server = KeyServer(tmp_path / "key.sock", dataset.dek)
    yield server
    server.close()


@pytest.fixture(scope="session")
def measured_env(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The project installed as the image holds it, with its code manifest (compose/image.py):
    ``trainer --attest`` runs only from a measured environment (trainer/guard.py)."""
    from compose.image import build_image_environment

    return build_image_environment(tmp_path_factory.mktemp("measured") / "env")


def attest_env(**extra: str) -> dict[str, str]:
    """``child_env`` for ``trainer --attest``: no PYTHONPATH or loader variable, which the
    code identity guard refuses."""
    from trainer.guard import refused_variables

    env = child_env()
    for name in refused_variables(env):
        del env[name]
    env.update(extra)
    return env


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINER_")}
    env["PYTHONPATH"] = str(REPO)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def torchrun_cmd(job: Path, sock: Path, nproc: int = 2) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            str(ENTRY), "--job", str(job), "--key-socket", str(sock)]


def single_cmd(job: Path, sock: Path) -> list[str]:
    return [PY, str(ENTRY), "--job", str(job), "--key-socket", str(sock)]


PROC_WAIT_S = 600  # hang guard for a whole training subprocess on a busy machine


class Proc:
    """A started process tree with its output in files under ``logs``."""

    def __init__(self, cmd: list[str], logs: Path, name: str, **env: str) -> None:
        logs.mkdir(parents=True, exist_ok=True)
        self.out_path = logs / f"{name}.out"
        self.err_path = logs / f"{name}.err"
        self._out = open(self.out_path, "wb")  # noqa: SIM115 - closed in finish()
        self._err = open(self.err_path, "wb")  # noqa: SIM115
        self.popen = subprocess.Popen(cmd, cwd=REPO, env=child_env(**env), stdout=self._out,
                                      stderr=self._err, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def out(self) -> str:
        return self.out_path.read_text(errors="replace")

    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    def wait(self, timeout: float = PROC_WAIT_S) -> int:
        """The exit status; a process tree still running after ``timeout`` seconds (a hang
        guard, not a speed check) is killed and the test fails with its stderr."""
        try:
            rc = self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            tail = self.err()[-3000:]
            raise AssertionError(f"still running after {timeout} s:\n{tail}") from None
        self._out.close()
        self._err.close()
        return rc

    def kill_tree(self) -> None:
        for pid in [*descendants(self.pid), self.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            self.popen.wait(timeout=30)
        self._out.close()
        self._err.close()


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for t in tasks:
            try:
                kids = Path(f"/proc/{p}/task/{t}/children").read_text().split()
            except (FileNotFoundError, ProcessLookupError):
                continue
            for k in kids:
                found.append(int(k))
                stack.append(int(k))
    return found


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.kill_tree()


_STEP = re.compile(r"rank 0 INFO trainer: step (\d+)/(\d+) loss ([0-9.]+)")


def losses(log: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(3))) for m in _STEP.finditer(log)]


def files_containing(roots: list[Path], needles: list[bytes], *, max_bytes: int = 64 << 20
                     ) -> list[tuple[Path, int]]:
    """Every regular file under ``roots`` that contains one of ``needles`` (file, needle no)."""
    hits: list[tuple[Path, int]] = []
    overlap = max(len(n) for n in needles)
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath) / name
                try:
                    if not path.is_file() or path.is_symlink():
                        continue
                    with open(path, "rb") as fh:
                        tail, read = b"", 0
                        while read < max_bytes:
                            chunk = fh.read(1 << 20)
                            if not chunk:
                                break
                            read += len(chunk)
                            window = tail + chunk
                            for i, needle in enumerate(needles):
                                if needle in window:
                                    hits.append((path, i))
                            tail = window[-overlap:]
                except OSError:
                    continue
    return hits


def memory_contains(pid: int, needles: list[bytes]) -> list[tuple[str, int]]:
    """Scan every readable mapping of a live process for the needles (region, needle no)."""
    hits: list[tuple[str, int]] = []
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            parts = line.split()
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if "r" not in parts[1] or (len(parts) > 5 and parts[5] in ("[vvar]", "[vsyscall]")):
                continue
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except (OSError, ValueError, OverflowError):
                continue
            for i, needle in enumerate(needles):
                if needle in data:
                    hits.append((line, i))
    return hits
