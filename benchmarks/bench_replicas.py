"""Release throughput of two broker replicas against one, on one PostgreSQL and one token.

Setup: a PostgreSQL server from the system binaries (:class:`compose.postgres.LocalPostgres`),
a SoftHSM2 token, and ``kms-broker serve`` processes (one worker each) with
``state: postgresql://...`` on that database and token, the default verifiers (real ``tpm2``)
and the production-like policy of :mod:`benchmarks.bench_broker`. Each client is a process
with its own swtpm, enrolled with MakeCredential/ActivateCredential; it attests once (a real
quote) and then sends Release after Release with its token (grant signature, lease room in
the database, HSM unwrap + ECDH + KDF + wrap, audit record), back to back.

The same clients run twice: all against one replica, then split evenly over two replicas
(client i to replica i mod 2; the second replica is started for that run). Printed: releases
per second and p50/p99 latency of each run, the ratio, and
``goal replica_release_throughput_2_vs_1`` (target >= 1.5: a second replica process should
add most of a core's worth of release work when the machine has cores to spare; on a machine
whose cores are already busy with the clients and the database the ratio says so).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_broker import (
    DATASET,
    JOB,
    REPO,
    TENANT,
    ZERO_BOOT,
    _claims,
    _cpu_seconds,
    _endpoint,
    _pct,
    _policy,
    _setup,
    _tenant_setup,
)

TARGET = 1.5


def _client_main(address: str, pki: str, node_id: str, tcti: str, releases: int,
                 claims_file: str) -> None:
    """One node in its own process: attest once, "ready", wait for "go", then releases."""
    import grpc

    from attest.interface import expected_report_data
    from attest.tpm2.agent import collect_evidence
    from kms_broker import sealing
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
    from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
    from kms_broker.rpc import open_channel

    claims = json.loads(Path(claims_file).read_text())
    stub = pb_grpc.NodeServiceStub(open_channel(_endpoint(address, Path(pki), "node", node_id)))
    request = None
    for attempt in range(5):  # a loaded machine may drop the first handshake
        try:
            ch = stub.Challenge(pb.ChallengeRequest(node_id=node_id, job_id=JOB), timeout=120)
            _, pub = sealing.generate_node_key()
            evidence = collect_evidence(
                tcti, expected_report_data(ch.nonce, ch.session_id, pub), claims)
            token = stub.Attest(pb.AttestRequest(
                node_id=node_id, session_id=ch.session_id, node_public_key=pub,
                evidence=pb.Evidence(kind="tpm2", payload=evidence)), timeout=120).token
            request = pb.ReleaseRequest(node_id=node_id, token=token, tenant_id=TENANT,
                                        dataset_id=DATASET, key_version=1)
            stub.Release(request, timeout=120)  # warm-up
            break
        except grpc.RpcError:
            if attempt == 4:
                raise
            time.sleep(1)
    print("ready", flush=True)
    sys.stdin.readline()
    latencies = []
    for _ in range(releases):
        t0 = time.perf_counter()
        stub.Release(request, timeout=120)
        latencies.append(time.perf_counter() - t0)
    print(json.dumps(latencies), flush=True)


def _start_replica(broker_root: Path) -> tuple[subprocess.Popen, str]:
    """A second ``serve`` with the first one's config (database, token, audit directory)."""
    import yaml

    cfg = yaml.safe_load((broker_root / "broker.yaml").read_text())
    cfg["listen"] = "127.0.0.1:0"
    path = broker_root / "replica.yaml"
    path.write_text(yaml.safe_dump(cfg))
    port_file = Path(cfg["state_dir"]) / "broker.port"
    port_file.unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms_broker.cli", "serve", "--config", str(path)], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=(broker_root / "replica.log").open("wb"))
    deadline = time.monotonic() + 300
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((broker_root / "replica.log").read_text()[-2000:])
        time.sleep(0.05)
    return proc, f"127.0.0.1:{int(port_file.read_text())}"


def _postgres_pids(pg) -> list[int]:  # type: ignore[no-untyped-def]
    """The postmaster and its backends."""
    root = pg.pid()
    pids = [root] if root else []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == root:
                pids.append(int(entry.name))
    return pids


def _cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):  # a backend that exited
            total += _cpu_seconds(pid)
    return total


def _run(addresses: list[str], pki: Path, tpms: list, claims_file: Path, clients: int,
         releases: int, server_pids) -> tuple[list[float], float, float]:  # type: ignore[no-untyped-def]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_replicas", "--client",
         addresses[i % len(addresses)], str(pki), f"n{i}", tpms[i].tcti, str(releases),
         str(claims_file)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for i in range(clients)]
    try:
        for p in procs:
            line = p.stdout.readline()  # type: ignore[union-attr]
            if line.strip() != "ready":
                raise RuntimeError(f"client did not start: {line!r}")
        pids = server_pids()
        cpu0 = _cpu(pids)
        t0 = time.perf_counter()
        for p in procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = [json.loads(p.stdout.readline()) for p in procs]  # type: ignore[union-attr]
        wall = time.perf_counter() - t0
        cpu = _cpu(pids) - cpu0  # backends that exited meanwhile are not counted
        for p in procs:
            p.wait(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [x for r in results for x in r], wall, cpu


def main(quick: bool) -> None:
    from attest.swtpm import LocalEkCa, Swtpm, manufacture
    from attest.tpm2.node import TpmNode
    from compose.postgres import LocalPostgres
    from kms_broker import certs
    from kms_broker.node_enrol import enrol_node

    clients = 6 if quick else 16
    releases = 40 if quick else 150
    with tempfile.TemporaryDirectory(prefix="bench-replicas-") as tmp, \
            LocalPostgres() as pg:
        root = Path(tmp)
        ek_ca = LocalEkCa.create(root / "ek-ca")
        states = [manufacture(root / f"tpm{i}", ek_ca) for i in range(clients)]
        (root / "ek-root.pem").write_bytes(ek_ca.root_cert_pem)
        (root / "ek-issuer.pem").write_bytes(ek_ca.issuer_cert_pem)
        proc, pki, address, _, _ = _setup(root / "broker", 1, {
            "state": pg.dsn,
            "ttl_ms": {"token": 3_600_000},
            "reference_values": {"tpm2": {"boot_pcrs": ZERO_BOOT}},
            "ek_roots": [str(root / "ek-root.pem")],
            "ek_intermediates": [str(root / "ek-issuer.pem")],
        })
        tpms: list[Swtpm] = []
        replica = None
        try:
            claims = _claims(root / "host")
            claims_file = root / "claims.json"
            claims_file.write_text(json.dumps(claims))
            _tenant_setup(address, pki, _policy(claims), clients)
            operator = _endpoint(address, pki, "operator", "ops")
            for i in range(clients):
                tpm = Swtpm(states[i]).start()
                tpms.append(tpm)
                certs.issue(pki, pki, role="node", ident=f"n{i}")
                with TpmNode(tpm.tcti) as node:
                    enrol_node([operator], node_id=f"n{i}", tenant_scope=TENANT, tpm=node)
            print(f"{clients} client processes, {releases} Release calls each with one "
                  f"attested token; state on PostgreSQL {pg.port}, one SoftHSM token; "
                  f"{os.cpu_count()} cores", flush=True)
            one, wall1, cpu1 = _run([address], pki, tpms, claims_file, clients, releases,
                                    lambda: [proc.pid, *_postgres_pids(pg)])
            replica, address2 = _start_replica(root / "broker")
            two, wall2, cpu2 = _run([address, address2], pki, tpms, claims_file, clients,
                                    releases,
                                    lambda: [proc.pid, replica.pid, *_postgres_pids(pg)])
        except BaseException:
            for log in ("broker.log", "replica.log"):
                path = root / "broker" / log
                if path.exists():
                    print(f"{log} tail:\n" + path.read_text()[-3000:])
            raise
        finally:
            for tpm in tpms:
                tpm.stop()
            for p in (proc, replica):
                if p is not None:
                    p.terminate()
                    p.wait(timeout=60)
    rate1, rate2 = len(one) / wall1, len(two) / wall2
    print(f"{'replicas':>9}{'releases/s':>12}{'p50':>10}{'p99':>10}"
          f"{'broker+PostgreSQL CPU/release':>32}")
    for n, lat, rate, cpu in ((1, one, rate1, cpu1), (2, two, rate2, cpu2)):
        print(f"{n:>9}{rate:>12.1f}{_pct(lat, .5) * 1e3:>8.1f}ms{_pct(lat, .99) * 1e3:>8.1f}ms"
              f"{cpu / len(lat) * 1e3:>30.2f}ms")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores "
          f"(the ratio is only meaningful on a machine with cores to spare)")
    ratio = rate2 / rate1
    print(f"2 replicas vs 1: {ratio:.2f}x")
    print(f"goal replica_release_throughput_2_vs_1: {ratio:.2f} (target >= {TARGET}) "
          f"{'met' if ratio >= TARGET else 'missed'}")


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "--client":
        _client_main(*sys.argv[2:6], int(sys.argv[6]), sys.argv[7])
    else:
        main(quick="--quick" in sys.argv)
