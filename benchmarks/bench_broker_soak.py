"""Broker soak: many client processes of mixed attest / release / deny traffic against
``kms-broker serve --workers 2`` for a while; unexpected errors, latency and memory growth.

Setup: a fresh SoftHSM2 token, mTLS on 127.0.0.1, one tenant with one dataset, a policy and a
grant for job ``job`` (room for every node); one node identity (certificate) per client
process, enrolled by the operator; a soak-only evidence kind that trusts its claims but checks
the nonce binding (``SoakVerifier``; TPM quoting is not what this measures).

Each client process loops until the time is up, choosing at random:

- ``release`` (60 %): Challenge -> Attest -> Release, a fresh attestation for every release;
- ``attest`` (25 %): Challenge -> Attest;
- ``deny`` (15 %): Challenge -> Attest with evidence the policy refuses: PERMISSION_DENIED is
  the expected answer.

Every other failure (UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, INTERNAL, a deny that
was allowed...) is an unexpected error. RSS is the sum over every broker process (the
supervisor and its workers, from /proc), read once after the warm-up (a quarter of the run)
and once at the end, with the clients still running. Prints p50/p99 per call.

Full: 64 processes x 60 s. ``--quick``: 16 processes x 10 s.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
CALLS = ("Challenge", "Attest", "Release", "Attest(deny)")
POLICY = """\
name: soak
version: 1
rules:
  - name: ksm-off
    expr: claims.node.ksm.enabled == false
    reason: KSM must be off
"""


class SoakVerifier:
    """Soak-only evidence: JSON {"report_data": hex, "claims": {...}}, binding checked."""

    kind = "test-json"

    def verify(self, evidence: bytes, context: Any) -> Any:
        from attest.interface import Failure, VerificationResult

        doc = json.loads(evidence)
        ok = bytes.fromhex(doc["report_data"]) == context.expected_report_data
        failures = () if ok else (Failure("soak.report_data", "not bound to the nonce"),)
        return VerificationResult(kind=self.kind, claims=doc["claims"], failures=failures)


def _endpoint(address: str, pki: Path, role: str, ident: str) -> Any:
    from kms_broker.rpc import BrokerEndpoint

    return BrokerEndpoint.from_files(address, ca=pki / "ca.pem", cert=pki / f"{role}-{ident}.pem",
                                     key=pki / f"{role}-{ident}.key")


def _start_broker(root: Path, nodes: int) -> tuple[subprocess.Popen, Path, str]:
    import yaml

    from kms_broker import certs
    from kms_broker.hsm import softhsm

    pki = root / "pki"
    certs.create_ca(pki)
    for role, ident in (("broker", "b"), ("tenant", "acme"), ("operator", "ops")):
        certs.issue(pki, pki, role=role, ident=ident)
    for i in range(nodes):
        certs.issue(pki, pki, role="node", ident=f"s{i}")
    config = softhsm.write_config(root / "hsm")
    pin = secrets.token_hex(8)
    softhsm.init_token(root / "hsm", "broker", secrets.token_hex(8), pin)
    pin_file = root / "pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, pin.encode())
    os.close(fd)
    cfg = {
        "broker_id": "soak", "listen": "127.0.0.1:0", "state_dir": str(root / "state"),
        "tls": {"ca": str(pki / "ca.pem"), "cert": str(pki / "broker-b.pem"),
                "key": str(pki / "broker-b.key")},
        "hsm": {"backend": "pkcs11", "module": softhsm.find_module(), "token_label": "broker",
                "pin_file": str(pin_file), "softhsm_conf": str(config.config_path)},
        "verifiers": ["benchmarks.bench_broker_soak:SoakVerifier"],
        "workers": 2,
    }
    (root / "broker.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen(
        # the test composition of the server: it adds the test-only EnrolTestNode
        [sys.executable, "-m", "tests.kms_broker.testing_server", "serve", "--config",
         str(root / "broker.yaml")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=(root / "broker.log").open("wb"),
        env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
    )
    port_file = root / "state" / "broker.port"
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError((root / "broker.log").read_text()[-2000:])
        time.sleep(0.05)
    return proc, pki, f"127.0.0.1:{int(port_file.read_text())}"


def _tenant_setup(address: str, pki: Path, nodes: int) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from kms_broker.grants import GrantDocument
    from kms_broker.rpc import open_channel
    from kms_broker.tenant import TenantClient, upload_dataset
    from sealed import MemoryStore
    from tests.kms_broker._proto.kmsbroker.testing.v1 import testing_pb2 as tpb
    from tests.kms_broker._proto.kmsbroker.testing.v1 import testing_pb2_grpc as tpb_grpc

    channel = open_channel(_endpoint(address, pki, "operator", "ops"))
    ops = tpb_grpc.TestEnrolmentServiceStub(channel)
    for i in range(nodes):
        ops.EnrolTestNode(tpb.EnrolTestNodeRequest(node_id=f"s{i}"), timeout=60,
                          wait_for_ready=True)
    channel.close()
    with TenantClient(_endpoint(address, pki, "tenant", "acme"), tenant_id="acme",
                      signing_key=Ed25519PrivateKey.generate()) as tenant:
        tenant.register()
        upload_dataset([tenant], [b"x" * 100] * 4, MemoryStore(), dataset_id="ds")
        digest = tenant.put_policy(POLICY)
        tenant.create_grant(GrantDocument(
            grant_id="g", tenant_id="acme", dataset_id="ds", job_id="job", policy_digest=digest,
            max_nodes=nodes, expires_unix_ms=int(time.time() * 1000) + 3_600_000))


def _client_process(address: str, pki: str, node_id: str, seconds: float, ready: Any,
                    start: Any, results: Any) -> None:
    """A client process: connect, say ready, wait for the start, run, send the results."""
    try:
        results.put(_client(address, pki, node_id, seconds, ready, start))
    except BaseException as exc:  # the parent must hear of a client that died
        results.put(({c: [] for c in CALLS}, {f"client crashed: {exc!r}"[:120]: 1}, 0))


def _client(address: str, pki: str, node_id: str, seconds: float, ready: Any, start: Any
            ) -> tuple[dict[str, list[float]], dict[str, int], int]:
    """Loop for ``seconds`` after the start; latencies per call, unexpected errors."""
    import grpc

    from attest.interface import expected_report_data
    from kms_broker import sealing
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
    from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
    from kms_broker.rpc import open_channel

    channel = open_channel(_endpoint(address, Path(pki), "node", node_id))
    stub = pb_grpc.NodeServiceStub(channel)
    latencies: dict[str, list[float]] = {c: [] for c in CALLS}
    unexpected: dict[str, int] = {}
    ops = 0
    rng = random.Random(node_id)

    def timed(name: str, fn: Any, request: Any) -> Any:
        t = time.perf_counter()
        try:
            return fn(request, timeout=30, wait_for_ready=True)
        finally:
            latencies[name].append(time.perf_counter() - t)

    ready.put(node_id)
    start.wait()
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        op = rng.choices(("release", "attest", "deny"), (60, 25, 15))[0]
        try:
            ch = timed("Challenge", stub.Challenge,
                       pb.ChallengeRequest(node_id=node_id, job_id="job"))
            _, pub = sealing.generate_node_key()
            rd = expected_report_data(ch.nonce, ch.session_id, pub)
            payload = json.dumps({"report_data": rd.hex(),
                                  "claims": {"node.ksm.enabled": op == "deny"}}).encode()
            request = pb.AttestRequest(node_id=node_id, session_id=ch.session_id,
                                       node_public_key=pub,
                                       evidence=pb.Evidence(kind="test-json", payload=payload))
            if op == "deny":
                try:
                    timed("Attest(deny)", stub.Attest, request)
                    unexpected["deny allowed"] = unexpected.get("deny allowed", 0) + 1
                except grpc.RpcError as exc:
                    if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                        raise
            else:
                token = timed("Attest", stub.Attest, request).token
                if op == "release":
                    timed("Release", stub.Release, pb.ReleaseRequest(
                        node_id=node_id, token=token, tenant_id="acme", dataset_id="ds",
                        key_version=1))
            ops += 1
        except grpc.RpcError as exc:
            key = f"{exc.code().name}: {(exc.details() or '')[:80]}"
            unexpected[key] = unexpected.get(key, 0) + 1
    channel.close()
    return latencies, unexpected, ops


def _broker_pids(root_pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    pids, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, []))
    return pids


def _rss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main(quick: bool = False) -> None:
    soak(*((16, 10.0) if quick else (64, 60.0)))


def soak(clients: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp)
        proc, pki, address = _start_broker(root, clients)
        try:
            _tenant_setup(address, pki, clients)
            ctx = multiprocessing.get_context("spawn")
            ready, start, out = ctx.Queue(), ctx.Event(), ctx.Queue()
            procs = [ctx.Process(target=_client_process, daemon=True,
                                 args=(address, str(pki), f"s{i}", seconds, ready, start, out))
                     for i in range(clients)]
            for p in procs:
                p.start()
            for _ in procs:  # every client imported and connected (deadline: a broken setup)
                ready.get(timeout=600)
            start.set()
            began = time.monotonic()
            time.sleep(seconds / 4)  # warm-up
            pids = _broker_pids(proc.pid)
            samples = [_rss_bytes(pids)]  # after the warm-up, then every eighth of the run
            while (left := began + seconds - 0.5 - time.monotonic()) > 0:
                time.sleep(min(left, seconds / 8))
                samples.append(_rss_bytes(_broker_pids(proc.pid)))
            rss_warm, rss_end = samples[0], samples[-1]
            results = [out.get(timeout=600) for _ in procs]
            for p in procs:
                p.join(timeout=60)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    latencies = {c: [x for r in results for x in r[0][c]] for c in CALLS}
    unexpected: dict[str, int] = {}
    for r in results:
        for k, v in r[1].items():
            unexpected[k] = unexpected.get(k, 0) + v
    ops = sum(r[2] for r in results)
    print(f"{clients} client processes x {seconds:.0f} s against serve --workers 2 "
          f"({len(pids)} broker processes); {ops} operations, {ops / seconds:.0f}/s")
    print(f"{'call':<14}{'count':>8}{'p50 ms':>10}{'p99 ms':>10}")
    for c in CALLS:
        v = latencies[c]
        print(f"{c:<14}{len(v):>8}{_pct(v, 0.5) * 1e3:>10.1f}{_pct(v, 0.99) * 1e3:>10.1f}")
    errors = sum(unexpected.values()) + (1 if ops == 0 else 0)  # no work done is no pass
    for k, v in sorted(unexpected.items(), key=lambda kv: -kv[1])[:10]:
        print(f"  unexpected x{v}: {k}")
    growth = rss_end / rss_warm if rss_warm else float("inf")
    print(f"broker RSS (all processes): {rss_warm / 2**20:.1f} MiB after warm-up, "
          f"{rss_end / 2**20:.1f} MiB at the end; MiB over the run: "
          f"{' '.join(f'{x / 2**20:.0f}' for x in samples)}")
    print(f"goal broker_soak_unexpected_errors: {errors} (target 0) "
          f"{'met' if errors == 0 else 'missed'}")
    print(f"goal broker_soak_rss_growth: {growth:.3f}x (target <= 1.05x) "
          f"{'met' if growth <= 1.05 else 'missed'}")


if __name__ == "__main__":
    main(quick="--quick" in sys.argv)
