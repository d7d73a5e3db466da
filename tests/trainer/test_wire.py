"""Wire test (issue 14): two torchrun agents ("nodes", ``--nnodes 2``) train through
``run_job`` over loopback while this test captures every packet on ``lo`` as root (a raw
``AF_PACKET`` socket). With the sealed transport no 32-byte window of the model's initial
parameters, of any gradient bucket (as it enters or leaves the all-reduce) or of any training
sample appears; with the test-only plaintext switch the same search finds the parameters and
the gradients (the positive control: the capture and the search work).

Training samples never cross the network in DDP, sealed or not (each rank reads its own
shards from the store); the search covers them anyway and the control does not expect them.

Also here, end to end: a "node" whose key server hands it another DEK (it does not hold the
job key) stops both nodes at the rendezvous with ChannelAuthError and a shred report.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from pathlib import Path

import numpy as np
import pytest

from compose.ports import free_port
from sealed.secrets import SecretBuffer
from tests.trainer.conftest import PY, REPO, Proc, SealedDataset, corpus, job_dict, write_job
from tests.trainer.keyserver import KeyServer

pytestmark = pytest.mark.integration

ENTRY = REPO / "tests" / "trainer" / "wire_entry.py"
WINDOW = 32
EXIT_CHANNEL_AUTH = 6
SEED = 1414
SOL_PACKET, PACKET_STATISTICS, ETH_P_ALL = 263, 6, 0x0003


class LoopbackCapture:
    """Every frame on ``lo`` while running (both directions), with the kernel's drop count."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        with contextlib.suppress(OSError):  # SO_RCVBUFFORCE (root): never drop under load
            self.sock.setsockopt(socket.SOL_SOCKET, 33, 512 << 20)
        self.sock.bind(("lo", 0))
        self.sock.settimeout(0.2)
        self.frames: list[bytes] = []
        self.drops = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoopbackCapture:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        _, self.drops = struct.unpack("II", self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8))
        self.sock.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(1 << 17))
            except TimeoutError:
                continue

    @property
    def data(self) -> bytes:
        return b"\xff".join(self.frames)


def _windows(blob: bytes) -> set[bytes]:
    """Aligned 32-byte windows with enough distinct bytes to be unmistakable (zero rows of
    an embedding's gradient would match any run of zeros). Any leak of 63 or more
    consecutive bytes contains one of them."""
    out = set()
    for off in range(0, len(blob) - WINDOW + 1, WINDOW):
        w = blob[off: off + WINDOW]
        if len(set(w)) >= 12:
            out.add(w)
    return out


def count_hits(capture: bytes, windows: set[bytes]) -> int:
    """How many aligned secret windows occur anywhere (any offset) in ``capture``."""
    if not windows or len(capture) < WINDOW:
        return 0
    keys = np.unique(np.frombuffer(b"".join(w[:8] for w in windows), dtype="<u8"))
    found: set[bytes] = set()
    for shift in range(8):
        n = (len(capture) - shift) // 8
        words = np.frombuffer(capture, dtype="<u8", count=n, offset=shift)
        for idx in np.nonzero(np.isin(words, keys))[0]:
            pos = shift + 8 * int(idx)
            w = capture[pos: pos + WINDOW]
            if w in windows:
                found.add(w)
    return len(found)


def initial_parameters(model: str, params: dict, seq_len: int, seed: int = 0) -> bytes:
    """The trainer's initial model state (``_train``: ``torch.manual_seed(seed)``, then
    ``build_model``), rebuilt here; test_wire checks it equals what rank 0 recorded."""
    import torch

    from trainer.models import build_model

    torch.manual_seed(seed)
    net = build_model(model, params, seq_len=seq_len)
    return b"".join(t.detach().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes()
                    for t in [*net.parameters(), *net.buffers()])


def _two_nodes(tmp_path: Path, name: str, job: Path, sockets: tuple[Path, Path],
               record: Path, *extra: str) -> list[Proc]:
    port = free_port()  # torchrun's static rendezvous needs a number (reserved, not raced)
    record.mkdir(parents=True, exist_ok=True)
    procs = []
    for node in (0, 1):
        cmd = [PY, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
               str(port), str(ENTRY), "--job", str(job), "--key-socket", str(sockets[node]),
               "--record", str(record), *extra]
        procs.append(Proc(cmd, tmp_path / "logs", f"{name}-node{node}"))
    return procs


def _run_and_capture(tmp_path: Path, dataset: SealedDataset, key: Path, name: str,
                     *extra: str) -> tuple[LoopbackCapture, Path, list[Proc]]:
    run = tmp_path / name
    # a seed of its own: other work on the machine may train this model on loopback too
    job = write_job(run / "job.yaml", job_dict(dataset, run, steps=6, log_interval=1,
                                               precision="fp32", seed=SEED))
    record = run / "record"
    with LoopbackCapture() as cap:
        procs = _two_nodes(tmp_path, name, job, (key, key), record, *extra)
        try:
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                p.kill_tree()
    for p, code in zip(procs, codes, strict=True):
        assert code == 0, p.err()[-4000:]
    return cap, record, procs


def _secrets(record: Path) -> dict[str, set[bytes]]:
    params = (record / "params-rank0.bin").read_bytes()
    grads = b"".join((record / f"grads-rank{r}.bin").read_bytes() for r in (0, 1))
    return {"initial parameters": _windows(params), "gradient buckets": _windows(grads)}


def test_no_parameter_gradient_or_sample_crosses_loopback_in_the_clear(
    tmp_path: Path, dataset: SealedDataset, key_server: KeyServer
):
    samples = _windows(b"".join(corpus(400, canary=dataset.canary.decode())))
    assert len(samples) > 1000

    sealed_cap, sealed_rec, sealed_procs = _run_and_capture(tmp_path, dataset,
                                                            key_server.path, "sealed")
    err0 = sealed_procs[0].err()
    assert "collectives sealed" in err0 and "step 6/6" in err0, err0[-3000:]
    secrets = _secrets(sealed_rec)
    job = job_dict(dataset, tmp_path)
    assert (sealed_rec / "params-rank0.bin").read_bytes() == initial_parameters(
        job["model"]["name"], job["model"]["params"], job["seq_len"], SEED)
    assert len(secrets["initial parameters"]) > 1000 and len(secrets["gradient buckets"]) > 1000
    capture = sealed_cap.data
    assert sealed_cap.drops == 0
    assert capture.count(b"SCM1") > 20  # the job's sealed frames are in the capture
    for what, windows in {**secrets, "training samples": samples}.items():
        hits = count_hits(capture, windows)
        print(f"sealed: {what}: {hits} of {len(windows)} windows in {len(capture)} B captured")
        assert hits == 0, f"{what} on the wire in the clear"

    plain_cap, plain_rec, plain_procs = _run_and_capture(
        tmp_path, dataset, key_server.path, "plaintext", "--plaintext-collectives")
    assert "collectives plaintext-test" in plain_procs[0].err()
    control = _secrets(plain_rec)
    capture = plain_cap.data
    # DDP's plaintext broadcast of rank 0's weights and its gloo all-reduce are visible
    hits = {what: count_hits(capture, windows) for what, windows in control.items()}
    print(f"plaintext control: {hits} of {[len(w) for w in control.values()]} windows")
    assert hits["initial parameters"] > 0.5 * len(control["initial parameters"])
    assert hits["gradient buckets"] > 0.25 * len(control["gradient buckets"])


def test_node_without_the_job_key_stops_both_nodes_at_rendezvous(
    tmp_path: Path, dataset: SealedDataset, key_server: KeyServer
):
    """Node 1 gets another DEK (it was never released the dataset key): neither node trains;
    each logs ChannelAuthError naming the other and its shred report, and exits 6."""
    run = tmp_path / "rogue"
    job = write_job(run / "job.yaml", job_dict(dataset, run, steps=6))
    other = KeyServer(tmp_path / "other.sock", SecretBuffer.random(32))
    try:
        procs = _two_nodes(tmp_path, "rogue", job, (key_server.path, other.path),
                           run / "record")
        try:
            codes = [p.wait() for p in procs]
        finally:
            for p in procs:
                p.kill_tree()
    finally:
        other.close()
    for node, (p, code) in enumerate(zip(procs, codes, strict=True)):
        err = p.err()
        assert code != 0, err[-3000:]
        assert f"exitcode  : {EXIT_CHANNEL_AUTH}" in err, err[-3000:]
        assert (f"ChannelAuthError: sealed channel: message from rank {1 - node} rejected: "
                "it could not prove it holds the job key") in err, err[-3000:]
        assert "shred report (channel authentication failed:" in err
        assert "step 1/" not in err
    assert not (run / "record" / "grads-rank0.bin").exists()
