"""Server-side CPU of one mTLS unary call: grpcio's sync server against ``grpc.aio``.

The question it answers: would moving the broker from grpcio's thread-pool server
(``grpc.server`` with a ``ThreadPoolExecutor``, what ``kms_broker.server`` runs) to a
``grpc.aio`` server save CPU per call? The broker's cold cycle is two unary calls (Challenge,
then the releasing Attest); a move pays only if it saves at least 0.4 ms of server CPU per
call (a tenth of the 4 ms per cycle that ``broker_cold_cycle_cpu_vs_raw_seal`` needs).
``goal grpc_sync_server_extra_cpu_per_call_ms`` is what the sync server costs per call beyond
the cheaper aio variant (negative: the sync server is cheaper); under 0.4 ms the broker stays
on the sync server.

Three servers, each a subprocess, all with mTLS and client authentication like the broker
(``grpc.ssl_server_credentials(..., require_client_auth=True)``, certificates from
``kms_broker.certs``), each handler reading the peer's ``auth_context()`` as the broker's
interceptor does and returning 64 bytes:

- ``sync``: ``grpc.server`` on a 64-thread ``ThreadPoolExecutor`` (the broker's pool size);
- ``aio inline``: ``grpc.aio.server``, the handler an ``async def`` that runs the
  (synchronous) work inline on the event loop;
- ``aio to-thread``: the same, the work handed to a thread (``asyncio.to_thread``), as a
  blocking HSM call or fsync would be.

A client process (sync grpcio) opens its channels and makes one warm-up call on each, then
``n`` calls on 1 channel back to back, or on 8 channels from 8 threads; requests of 0 bytes
and of 3,000 bytes (about an Attest carrying a quote, event log and key). Measured: the
server process's CPU (``/proc/PID/stat``, user + system, every thread) over the calls, per
call; the servers alternate, three times, medians printed with their ranges. Beside them,
the same figure for ``kms-broker serve`` itself (one worker, real SoftHSM and state) answering
an empty health Check, alternated with the bare sync server: what the broker's request layer
(interceptor, servicer, options) adds to grpcio's own cost.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

from benchmarks._proc import cpu_seconds

MODES = ("sync", "aio inline", "aio to-thread")
SAVING_TARGET_MS = 0.4
_METHOD = "/bench.Echo/Call"


def _reply(request: bytes) -> bytes:  # the "domain call": synchronous, tiny
    return b"r" * 64


def _handler(mode: str):  # type: ignore[no-untyped-def]
    import grpc

    if mode == "sync":
        def call(request: bytes, context: grpc.ServicerContext) -> bytes:
            context.auth_context()
            return _reply(request)
    elif mode == "aio inline":
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            context.auth_context()
            return _reply(request)
    else:
        async def call(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            context.auth_context()
            return await asyncio.to_thread(_reply, request)
    service, method = _METHOD.strip("/").split("/")
    return grpc.method_handlers_generic_handler(
        service, {method: grpc.unary_unary_rpc_method_handler(call)})


def _serve(mode: str, pki: str, port_file: str) -> None:
    import grpc

    base = Path(pki)
    credentials = grpc.ssl_server_credentials(
        [((base / "broker-b.key").read_bytes(), (base / "broker-b.pem").read_bytes())],
        root_certificates=(base / "ca.pem").read_bytes(), require_client_auth=True)
    if mode == "sync":
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
        server.add_generic_rpc_handlers((_handler(mode),))
        port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        Path(port_file).write_text(str(port))
        server.wait_for_termination()
        return

    async def main() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_handler(mode),))
        port = server.add_secure_port("127.0.0.1:0", credentials)
        await server.start()
        Path(port_file).write_text(str(port))
        await server.wait_for_termination()

    asyncio.run(main())


def _client(pki: str, address: str, calls: int, size: int, channels: int,
            method: str = _METHOD) -> None:
    import grpc

    base = Path(pki)
    credentials = grpc.ssl_channel_credentials(
        (base / "ca.pem").read_bytes(), (base / "node-n.key").read_bytes(),
        (base / "node-n.pem").read_bytes())
    payload = os.urandom(size)
    stubs = []
    for _ in range(channels):
        stub = grpc.secure_channel(address, credentials).unary_unary(method)
        stub(payload, timeout=60)  # connected and warm
        stubs.append(stub)
    print("ready", flush=True)
    sys.stdin.readline()

    def loop(stub) -> None:  # type: ignore[no-untyped-def]
        for _ in range(calls // channels):
            stub(payload, timeout=60)

    threads = [threading.Thread(target=loop, args=(s,)) for s in stubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print("done", flush=True)


_ME = [sys.executable, "-m", "benchmarks.bench_grpc_server"]
_REPO = Path(__file__).resolve().parent.parent


def _client_cpu(pids: list[int], pki: Path, address: str, size: int, calls: int,
                channels: int, method: str = _METHOD, idle_per_s: float = 0.0) -> float:
    """CPU seconds per call of the processes ``pids`` while a client makes ``calls``, less
    ``idle_per_s`` (what they use per second with no calls) over the calls' wall time."""
    client = subprocess.Popen(
        [*_ME, "--client", str(pki), address, str(calls), str(size), str(channels), method],
        cwd=_REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        if client.stdout.readline().strip() != "ready":  # type: ignore[union-attr]
            raise RuntimeError("the client did not connect")
        before = sum(cpu_seconds(p) for p in pids)
        started = time.perf_counter()
        client.stdin.write("go\n")  # type: ignore[union-attr]
        client.stdin.flush()  # type: ignore[union-attr]
        if client.stdout.readline().strip() != "done":  # type: ignore[union-attr]
            raise RuntimeError("the client failed")
        used = sum(cpu_seconds(p) for p in pids) - before
        used -= idle_per_s * (time.perf_counter() - started)
        client.wait(timeout=60)
        return used / calls
    finally:
        if client.poll() is None:
            client.kill()
            client.wait(timeout=60)


def _measure(mode: str, pki: Path, size: int, calls: int, channels: int) -> float:
    """Server CPU seconds per call."""
    port_file = pki / "port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen([*_ME, "--serve", mode, str(pki), str(port_file)], cwd=_REPO)
    try:
        deadline = time.monotonic() + 120
        while not (port_file.exists() and port_file.read_text()):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the {mode} server did not start")
            time.sleep(0.02)
        return _client_cpu([server.pid], pki, f"127.0.0.1:{port_file.read_text()}", size,
                           calls, channels)
    finally:
        server.kill()
        server.wait(timeout=60)


def _broker_health(root: Path, calls: int) -> tuple[list[float], list[float]]:
    """CPU per health Check of ``kms-broker serve`` (one worker: its interceptor, health
    servicer and gRPC server), alternated with the bare sync server; 1 client, 3 times. The
    broker's background threads (audit checkpoints, revocation relay, janitor) are taken out:
    their CPU per second, measured over 5 idle seconds first."""
    from benchmarks.bench_broker import _setup
    from kms_broker import certs

    proc, pki, address, _, _ = _setup(root, 1)
    try:
        certs.issue(pki, pki, role="node", ident="n")
        time.sleep(2)  # past start-up
        idle0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        time.sleep(5)
        idle = (cpu_seconds(proc.pid) - idle0) / (time.perf_counter() - t0)
        broker, bare = [], []
        for _ in range(3):
            broker.append(_client_cpu([proc.pid], pki, address, 0, calls, 1,
                                      "/grpc.health.v1.Health/Check", idle))
            bare.append(_measure("sync", pki, 0, calls, 1))
        return broker, bare
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(quick: bool) -> None:
    from kms_broker import certs

    calls = 1000 if quick else 4000
    print(f"server CPU per mTLS unary call (user + system, every server thread), {calls} calls "
          f"per run, servers alternated 3 times; medians (range)")
    savings = []
    with tempfile.TemporaryDirectory(prefix="bench-grpc-") as tmp:
        pki = Path(tmp)
        certs.create_ca(pki)
        certs.issue(pki, pki, role="broker", ident="b")
        certs.issue(pki, pki, role="node", ident="n")
        print(f"{'request':>8}{'clients':>8}" + "".join(f"{m:>24}" for m in MODES)
              + f"{'aio inline / sync':>19}")
        for size in (0, 3000):
            for channels in (1, 8):
                runs: dict[str, list[float]] = {m: [] for m in MODES}
                for _ in range(3):
                    for mode in MODES:
                        runs[mode].append(_measure(mode, pki, size, calls, channels))
                med = {m: statistics.median(v) for m, v in runs.items()}
                cells = "".join(
                    f"{med[m] * 1e3:>8.3f} ms ({min(runs[m]) * 1e3:.2f}-{max(runs[m]) * 1e3:.2f})"
                    for m in MODES)
                print(f"{size:>7}B{channels:>8}{cells}{med['aio inline'] / med['sync']:>18.2f}x",
                      flush=True)
                savings.append(med["sync"] - min(med["aio inline"], med["aio to-thread"]))
        broker, bare = _broker_health(Path(tmp) / "broker", calls)
    print(f"kms-broker serve (1 worker), an empty health Check: "
          f"{statistics.median(broker) * 1e3:.3f} ms ({min(broker) * 1e3:.2f}-"
          f"{max(broker) * 1e3:.2f}) against the bare sync server's 0-byte call "
          f"{statistics.median(bare) * 1e3:.3f} ms ({min(bare) * 1e3:.2f}-{max(bare) * 1e3:.2f})"
          f" in the same run (the broker's idle CPU taken out): its request layer adds "
          f"{(statistics.median(broker) - statistics.median(bare)) * 1e3:.3f} ms per call")
    extra = statistics.median(savings) * 1e3
    print(f"CPU per call of the sync server beyond the cheaper aio server, median over the four "
          f"cases: {extra:.3f} ms (the broker would move to grpc.aio from {SAVING_TARGET_MS} ms)")
    print(f"goal grpc_sync_server_extra_cpu_per_call_ms: {extra:.3f} "
          f"(target < {SAVING_TARGET_MS}) {'met' if extra < SAVING_TARGET_MS else 'missed'}")

if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        _serve(*sys.argv[2:])
    elif len(sys.argv) == 8 and sys.argv[1] == "--client":
        _client(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]), sys.argv[7])
    else:
        main(quick="--quick" in sys.argv)
