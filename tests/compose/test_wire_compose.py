"""Issue 14 wire test through docker-compose.yml: both trainer nodes (``torchrun --nnodes 2``
over loopback, each ``trainer --attest`` with its own swtpm and both brokers) train while
this test captures every packet on ``lo`` as root. No 32-byte window of the model's initial
parameters or of the training corpus is on the wire, and the job's sealed frames are.

Gradient buckets are searched for in tests/trainer/test_wire.py, which runs the same
two-node training through a test entry point that records them, with its positive control
(the test-only plaintext switch, which ``trainer --attest`` refuses, so it cannot run here).
That test also checks that ``initial_parameters`` rebuilds exactly rank 0's initial state.

The capture is filtered to TCP segments to or from a socket of the two nodes' processes
(their ports, read from /proc while they run): other work on the machine may train the same
model from the same seed on its own loopback connections.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest

from tests.compose.conftest import live_processes
from tests.compose.test_deployment import REPO, _deployment
from tests.trainer.test_wire import LoopbackCapture, _windows, count_hits, initial_parameters

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _socket_ports(pids: list[int]) -> set[int]:
    inodes = set()
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if int(fields[9]) in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


class NodePorts:
    """Collects, while running, the TCP ports of every socket of the nodes' processes."""

    def __init__(self, run_id: str) -> None:
        self.markers = [f"CT_COMPOSE_ID={run_id}:{n}\0" for n in ("node-a", "node-b")]
        self.ports: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NodePorts:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pids = [p for m in self.markers for p in live_processes(pgids=set(), marker=m)]
            self.ports |= _socket_ports(pids)


def tcp_payloads(frames: list[bytes], ports: set[int]) -> bytes:
    """The TCP payloads of the IPv4 frames on ``lo`` to or from one of ``ports``."""
    out = []
    for f in frames:
        if len(f) < 54 or f[12:14] != b"\x08\x00" or f[23] != 6:
            continue
        ihl = (f[14] & 0x0F) * 4
        sport, dport = struct.unpack_from(">HH", f, 14 + ihl)
        if sport in ports or dport in ports:
            off = 14 + ihl + (f[14 + ihl + 12] >> 4) * 4
            out.append(f[off:])
    return b"\xff".join(out)


def test_two_compose_nodes_send_no_parameter_or_sample_in_the_clear(tmp_path: Path):
    harness, _ = _deployment(tmp_path, TRAIN_STEPS="10")
    marker = f"CT_COMPOSE_ID={harness.run_id}:"
    try:
        with LoopbackCapture() as cap, NodePorts(harness.run_id) as nodes:
            harness.up()
            harness.wait_all_completed(["node-a", "node-b"])
        node_a = harness.logs("node-a")
        assert "world 2 on cpu" in node_a and "collectives sealed" in node_a, node_a[-3000:]
        assert "step 10/10" in node_a
        capture = tcp_payloads(cap.frames, nodes.ports)
        assert cap.drops == 0
        assert capture.count(b"SCM1") > 20  # the nodes' sealed frames were captured
        params = _windows(initial_parameters(
            "tiny-gpt", {"layers": 2, "d_model": 64, "heads": 4}, seq_len=64))
        corpus = _windows(b"".join(p.read_bytes()
                                   for p in sorted((REPO / "deploy/config/corpus").iterdir())))
        assert len(params) > 1000 and len(corpus) > 100
        assert count_hits(capture, params) == 0, "initial parameters on the wire in the clear"
        assert count_hits(capture, corpus) == 0, "training samples on the wire in the clear"
    finally:
        harness.down()
    assert live_processes(pgids=set(), marker=marker) == []
