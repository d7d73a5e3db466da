"""``kms-broker serve --workers 2``: two real broker processes on one port and one state.

Each connection lands on one worker; the health service name ``kmsbroker.worker/N`` tells
which, so every cross-worker property below is shown with connections known to sit on
different workers: releases from both, the lease room of a grant (max_nodes) under races from
both, revocations pushed to a node whose stream is on the other worker, one intact audit chain
written by both, metrics summed over both, a killed worker restarted, a clean stop.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attest.interface import expected_report_data
from compose.ports import free_port
from kms_broker import sealing
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.audit import verify_log
from kms_broker.rpc import PermissionDeniedError, open_channel
from sealed import derive_dek
from sealed.secrets import SecretBuffer
from tests.kms_broker.conftest import REPO, BrokerProc, World, make_world
from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture

pytestmark = pytest.mark.integration

WORKERS = 2
WAIT_S = 60  # how long a helper polls before it gives up (a hang guard, not a timing check)


def _free_port() -> int:
    return free_port()  # reserved for this process, outside the ephemeral range


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    broker = broker_factory("multi", metrics_port=_free_port(),
                            extra_config={"workers": WORKERS})
    return make_world(broker, tmp_path_factory.mktemp("multi"), nodes=("n1", "n2", "n3"))


def worker_of(channel: grpc.Channel) -> int:
    """Which worker this channel's connection reached."""
    stub = health_pb2_grpc.HealthStub(channel)
    for index in range(WORKERS):
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=f"kmsbroker.worker/{index}"),
                               timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND, exc
            continue
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        return index
    raise AssertionError("the connection reached no known worker")


def channel_on(broker: BrokerProc, role: str, ident: str, worker: int) -> grpc.Channel:
    """A fresh channel whose connection sits on ``worker`` (new connections until one does)."""
    for _ in range(200):
        channel = open_channel(broker.endpoint(role, ident))
        if worker_of(channel) == worker:
            return channel
        channel.close()
    raise AssertionError(f"no connection reached worker {worker} in 200 tries")


def key_client_on(broker: BrokerProc, node: str, job: str, worker: int):  # type: ignore[no-untyped-def]
    for _ in range(200):
        client = broker.key_client(node, job)
        if worker_of(client._brokers[0].channel) == worker:
            return client
        client.close()
    raise AssertionError(f"no key client reached worker {worker} in 200 tries")


def worker_pids(broker: BrokerProc) -> list[int]:
    children = Path(f"/proc/{broker.pid}/task/{broker.pid}/children").read_text().split()
    return sorted(int(c) for c in children)


def attested(broker: BrokerProc, stub, node: str,  # type: ignore[no-untyped-def]
             job: str) -> tuple[bytes, object]:
    ch = stub.Challenge(pb.ChallengeRequest(node_id=node, job_id=job), timeout=10)
    private, public = sealing.generate_node_key()
    kind, payload = broker.evidence(node)(expected_report_data(ch.nonce, ch.session_id,
                                                               public))
    token = stub.Attest(pb.AttestRequest(node_id=node, session_id=ch.session_id,
                                         node_public_key=public,
                                         evidence=pb.Evidence(kind=kind, payload=payload)),
                        timeout=10).token
    return token, private


def test_both_workers_release_the_right_dek(world: World) -> None:
    shares = [SecretBuffer.from_bytes(s) for s in world.shares]
    expected = derive_dek(shares, tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                          key_version=1)
    with expected:
        for worker in range(WORKERS):
            with key_client_on(world.broker, "n1", world.job_id, worker) as client:
                released = client.fetch_dek(tenant_id=world.tenant_id,
                                            dataset_id=world.dataset_id, key_version=1)
            with released.dek as dek:
                assert dek.equals(expected), f"worker {worker} released a wrong share"
    assert len(set(worker_pids(world.broker))) == WORKERS


def test_lease_room_holds_across_workers(world: World) -> None:
    """max_nodes=1, two nodes on different workers releasing at the same moment: exactly one
    lease, in every round."""
    stubs = {w: pb_grpc.NodeServiceStub(channel_on(world.broker, "node", f"n{w + 2}", w))
             for w in range(WORKERS)}
    with world.broker.tenant("acme") as acme:
        for rnd in range(6):
            job = f"race-{rnd}"
            world.grant(acme, grant_id=f"g-race-{rnd}", job_id=job, max_nodes=1)
            tokens = {w: attested(world.broker, stubs[w], f"n{w + 2}", job)[0]
                      for w in range(WORKERS)}
            barrier = threading.Barrier(WORKERS)
            outcomes: dict[int, str] = {}

            def go(w: int, job: str = job, tokens: dict = tokens,
                   barrier: threading.Barrier = barrier, outcomes: dict = outcomes) -> None:
                barrier.wait()
                try:
                    stubs[w].Release(pb.ReleaseRequest(
                        node_id=f"n{w + 2}", token=tokens[w], tenant_id="acme",
                        dataset_id=world.dataset_id, key_version=1), timeout=10)
                    outcomes[w] = "released"
                except grpc.RpcError as exc:
                    outcomes[w] = f"{exc.code().name}: {exc.details()}"

            threads = [threading.Thread(target=go, args=(w,)) for w in range(WORKERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            released = [w for w, o in outcomes.items() if o == "released"]
            assert len(released) == 1, (rnd, outcomes)
            loser = outcomes[1 - released[0]]
            assert loser.startswith("PERMISSION_DENIED") and "lease.no_room" in loser, loser
            with world.broker.db() as db:
                leases = db.execute("SELECT COUNT(*) FROM leases WHERE grant_id=?",
                                    (f"g-race-{rnd}",)).fetchone()[0]
            assert leases == 1


def test_revocation_reaches_a_node_on_the_other_worker(world: World) -> None:
    with world.broker.tenant("acme") as acme:
        world.grant(acme, grant_id="g-xrev", job_id="job-xrev")
    notices = []
    with key_client_on(world.broker, "n1", "job-xrev", 1) as client:
        client.watch_revocations(notices.append)
        released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                    key_version=1)
        released.dek.zeroize()
        deadline = time.monotonic() + WAIT_S
        while not client.watching() and time.monotonic() < deadline:
            time.sleep(0.02)
        tenant_channel = channel_on(world.broker, "tenant", "acme", 0)
        pb_grpc.TenantServiceStub(tenant_channel).RevokeGrant(
            pb.RevokeGrantRequest(tenant_id="acme", grant_id="g-xrev"), timeout=10)
        while not notices and time.monotonic() < deadline:
            time.sleep(0.02)
        assert notices, "the revocation made on worker 0 never reached the stream on worker 1"
        assert notices[0].lease_id == released.leases[0].lease_id
        assert "g-xrev" in notices[0].reason
        with pytest.raises(PermissionDeniedError, match=r"lease\.revoked"):
            client.renew()


def release_on(world: World, worker: int, times: int) -> None:
    """``times`` full attest-and-release rounds of node n1 through ``worker``."""
    stub = pb_grpc.NodeServiceStub(channel_on(world.broker, "node", "n1", worker))
    for _ in range(times):
        token, _ = attested(world.broker, stub, "n1", world.job_id)
        stub.Release(pb.ReleaseRequest(node_id="n1", token=token, tenant_id="acme",
                                       dataset_id=world.dataset_id, key_version=1), timeout=10)


def test_one_audit_chain_from_both_workers(world: World) -> None:
    """Traffic on both workers at once, then the CLI verifies one unbroken chain."""
    before = len(world.broker.audit())
    threads = [threading.Thread(target=release_on, args=(world, w, 40)) for w in range(WORKERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = world.broker.audit()
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    releases = [r for r in records[before:] if r["event"] == "release"]
    assert len(releases) == 2 * 40
    assert verify_log(world.broker.state_dir / "audit.log").ok
    root = world.broker.state_dir.parent
    pem = subprocess.run(
        [sys.executable, "-m", "kms_broker.cli", "audit", "public-key", "--config",
         str(root / f"{world.broker.name}.yaml")], cwd=REPO, capture_output=True, text=True)
    assert pem.returncode == 0, pem.stderr
    (root / "audit-key.pem").write_text(pem.stdout)
    out = subprocess.run(
        [sys.executable, "-m", "kms_broker.cli", "audit", "verify", "--state-dir",
         str(world.broker.state_dir), "--public-key", str(root / "audit-key.pem")],
        cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("OK") and "chain intact" in out.stdout


def _metric(broker: BrokerProc, name: str) -> float:
    cfg = (broker.state_dir.parent / f"{broker.name}.yaml").read_text()
    port = int(next(line.split(":")[1] for line in cfg.splitlines()
                    if line.startswith("metrics_port")))
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + " ") or line.startswith(name + "{"))


def test_metrics_count_releases_on_every_worker(world: World) -> None:
    before = _metric(world.broker, "kmsbroker_release_seconds_count")
    for worker in range(WORKERS):
        release_on(world, worker, 3)
    assert _metric(world.broker, "kmsbroker_release_seconds_count") == before + 3 * WORKERS


def test_a_killed_worker_is_restarted(world: World) -> None:
    old = worker_pids(world.broker)
    os.kill(old[-1], signal.SIGKILL)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        now = worker_pids(world.broker)
        if len(now) == WORKERS and old[-1] not in now:
            break
        time.sleep(0.05)
    assert len(worker_pids(world.broker)) == WORKERS and old[-1] not in worker_pids(world.broker)
    # both workers serve again (the new one once it listens)
    for worker in range(WORKERS):
        channel = None
        while channel is None and time.monotonic() < deadline:
            try:
                channel = channel_on(world.broker, "node", "n1", worker)
            except AssertionError:
                time.sleep(0.1)
        assert channel is not None, f"worker {worker} never came back"
        stub = pb_grpc.NodeServiceStub(channel)
        token, _ = attested(world.broker, stub, "n1", world.job_id)
        stub.Release(pb.ReleaseRequest(node_id="n1", token=token, tenant_id="acme",
                                       dataset_id=world.dataset_id, key_version=1), timeout=10)
    assert "restarting it" in (world.broker.state_dir.parent / "multi.log").read_text()


def test_sigterm_stops_every_worker_and_seals_the_log(world: World) -> None:
    pids = worker_pids(world.broker)
    world.broker.proc.send_signal(signal.SIGTERM)
    assert world.broker.proc.wait(timeout=WAIT_S) == 0
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z", f"worker {pid} outlived"
    records = world.broker.audit()
    assert records[-1]["event"] == "checkpoint"
    assert sum(r["event"] == "checkpoint" and r["reason"] == "" for r in records[-WORKERS:]) \
        == WORKERS
    assert verify_log(world.broker.state_dir / "audit.log").ok


def test_workers_value_is_checked(tmp_path: Path) -> None:
    from kms_broker.config import ConfigError, load_config

    for bad in ("0", "65", "two", "true"):
        cfg = tmp_path / "b.yaml"
        cfg.write_text(f"state_dir: s\nworkers: {bad}\nhsm: {{backend: fake}}\n"
                       "tls: {ca: a, cert: b, key: c}\n")
        with pytest.raises(ConfigError, match="workers must be a whole number from 1 to 64"):
            load_config(cfg)
    cfg.write_text("state_dir: s\nworkers: 1\nhsm: {backend: fake}\n"
                   "tls: {ca: a, cert: b, key: c}\n")
    assert load_config(cfg).workers == 1
    out = subprocess.run([sys.executable, "-m", "kms_broker.cli", "serve", "--config",
                          str(cfg), "--workers", "0"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "--workers must be from 1 to 64" in out.stderr
    out = subprocess.run([sys.executable, "-m", "kms_broker.cli", "serve", "--config",
                          str(cfg), "--workers", "2"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode != 0
    assert "needs hsm.backend pkcs11" in out.stderr
