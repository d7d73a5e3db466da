"""Fixtures for broker tests: a test PKI, real brokers run as subprocesses on real SoftHSM
tokens, and helpers to act as tenant, operator and node over mTLS."""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.client import KeyClient
from kms_broker.grants import GrantDocument
from kms_broker.hsm import softhsm
from kms_broker.rpc import BrokerEndpoint, open_channel
from kms_broker.tenant import TenantClient, upload_dataset
from sealed import LocalDirStore
from sealed.secrets import SecretBuffer
from tests.kms_broker.hsm_fixtures import (  # noqa: F401 - fixtures
    fake_hsm,
    pkcs11_hsm,
    softhsm_config,
    softhsm_token,
)
from tests.kms_broker.pki import DevPki
from tests.kms_broker.verifiers import POLICY_YAML, make_evidence

REPO = Path(__file__).resolve().parents[2]
NODES = ("n1", "n2", "n3")
TENANTS = ("acme", "beta")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    p = DevPki(tmp_path_factory.mktemp("pki"))
    p.issue("broker", "b", server=True)
    for n in NODES:
        p.issue("node", n)
    for t in TENANTS:
        p.issue("tenant", t)
    p.issue("operator", "ops")
    p.issue("node", "nobody", uri="urn:other:thing", cn="nobody")  # names no broker identity
    return p


@dataclass
class BrokerProc:
    name: str
    proc: subprocess.Popen
    state_dir: Path
    address: str
    pki: DevPki
    token_dir: Path
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def endpoint(self, role: str, ident: str) -> BrokerEndpoint:
        return BrokerEndpoint.from_files(
            self.address, ca=self.pki.ca_path, cert=self.pki.root / f"{role}-{ident}.pem",
            key=self.pki.root / f"{role}-{ident}.key", server_name="localhost")

    def tenant(self, tenant_id: str) -> TenantClient:
        key = self.keys.setdefault(tenant_id, Ed25519PrivateKey.generate())
        return TenantClient(self.endpoint("tenant", tenant_id), tenant_id=tenant_id,
                            signing_key=key)

    def operator(self) -> Any:
        return pb_grpc.OperatorServiceStub(open_channel(self.endpoint("operator", "ops")))

    def node_stub(self, node_id: str) -> Any:
        return pb_grpc.NodeServiceStub(open_channel(self.endpoint("node", node_id)))

    def key_client(self, node_id: str, job_id: str,
                   evidence_for: Callable[[bytes], tuple[str, bytes]] = make_evidence
                   ) -> KeyClient:
        return KeyClient([self.endpoint("node", node_id)], node_id=node_id, job_id=job_id,
                         evidence_for=evidence_for)

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state_dir / "broker.db", timeout=10)

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in (self.state_dir / "audit.log").read_text()
                .splitlines()]

    def restart(self) -> None:
        """Stop and start the same broker (same config, state, token and port)."""
        self.stop()
        root = self.state_dir.parent
        cfg_path = root / f"{self.name}.yaml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["listen"] = self.address
        cfg_path.write_text(yaml.safe_dump(cfg))
        (self.state_dir / "broker.port").unlink(missing_ok=True)
        self.proc = _spawn(root, self.name, cfg_path, self.state_dir)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_broker(root: Path, pki: DevPki, config: softhsm.SoftHsmConfig, *, name: str = "b1",
                 ttl_ms: dict[str, int] | None = None,
                 metrics_port: int | None = None,
                 extra_config: dict[str, Any] | None = None) -> BrokerProc:
    """A real broker subprocess on a fresh SoftHSM token. ``extra_config`` overrides config
    keys (e.g. ``verifiers: default`` with ``ek_roots`` for TPM enrolment tests)."""
    state = root / f"{name}-state"
    state.mkdir(parents=True)
    label = f"{name}-{secrets.token_hex(4)}"
    pin = secrets.token_hex(8)
    softhsm.init_token(Path(config.state_dir), label, secrets.token_hex(8), pin)
    pin_file = root / f"{name}.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, pin.encode() + b"\n")
    os.close(fd)
    cfg = {
        "broker_id": name,
        "listen": "127.0.0.1:0",
        "state_dir": str(state),
        "tls": {"ca": str(pki.ca_path), "cert": str(pki.root / "broker-b.pem"),
                "key": str(pki.root / "broker-b.key")},
        "hsm": {"backend": "pkcs11", "module": softhsm.find_module(), "token_label": label,
                "pin_file": str(pin_file), "softhsm_conf": str(config.config_path)},
        "verifiers": ["tests.kms_broker.verifiers:JsonClaimsVerifier"],
        "ttl_ms": ttl_ms or {},
        "metrics_port": metrics_port,
        **(extra_config or {}),
    }
    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    proc = _spawn(root, name, cfg_path, state)
    port = int((state / "broker.port").read_text())
    return BrokerProc(name, proc, state, f"127.0.0.1:{port}", pki, config.token_dir)


def _spawn(root: Path, name: str, cfg_path: Path, state: Path) -> subprocess.Popen:
    """Start ``kms-broker serve`` and wait until it has written its port file."""
    log = (root / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms_broker.cli", "serve", "--config", str(cfg_path)],
        cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
    )
    port_file = state / "broker.port"
    deadline = time.monotonic() + 60  # start-up guard for the fixture, not a test assertion
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"broker {name} did not start:\n"
                               f"{(root / f'{name}.log').read_text()[-3000:]}")
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def broker_factory(
    tmp_path_factory: pytest.TempPathFactory, pki: DevPki, softhsm_config: Any,  # noqa: F811
) -> Iterator[Callable[..., BrokerProc]]:
    started: list[BrokerProc] = []
    root = tmp_path_factory.mktemp("brokers")

    def factory(name: str = "b1", **kwargs: Any) -> BrokerProc:
        b = start_broker(root, pki, softhsm_config, name=name, **kwargs)
        started.append(b)
        return b

    yield factory
    for b in started:
        b.stop()


def enrol(broker: BrokerProc, node_id: str, tenant_scope: str = "") -> None:
    """Test-only direct enrolment (no TPM) for brokers that load the test-json verifier."""
    broker.operator().EnrolTestNode(pb.EnrolTestNodeRequest(node_id=node_id,
                                                            tenant_scope=tenant_scope),
                                    timeout=10)


def records(n: int = 20, size: int = 300) -> list[tuple[str, bytes]]:
    return [(f"r{i:04d}.bin", secrets.token_bytes(size)) for i in range(n)]


@dataclass
class World:
    """One tenant with one uploaded dataset, a policy and a grant for a job."""

    broker: BrokerProc
    tenant_id: str
    dataset_id: str
    job_id: str
    grant_id: str
    policy_digest: str
    store: LocalDirStore
    manifest_name: str
    data: list[tuple[str, bytes]]
    shares: list[bytes]

    def grant(self, client: TenantClient, *, grant_id: str, dataset_id: str | None = None,
              job_id: str | None = None, ttl_ms: int = 3_600_000, max_nodes: int = 4) -> str:
        return client.create_grant(GrantDocument(
            grant_id=grant_id, tenant_id=client.tenant_id,
            dataset_id=dataset_id or self.dataset_id, job_id=job_id or self.job_id,
            policy_digest=self.policy_digest, max_nodes=max_nodes,
            expires_unix_ms=int(time.time() * 1000) + ttl_ms,
        ))


def make_world(broker: BrokerProc, tmp: Path, *, tenant_id: str = "acme",
               dataset_id: str = "ds1", job_id: str = "job1", grant_id: str = "g1",
               nodes: tuple[str, ...] = ("n1",)) -> World:
    """Register, upload (recording the shares the tenant generated), policy, grant."""
    shares: list[bytes] = []

    def recording_share() -> SecretBuffer:
        s = SecretBuffer.random(32)
        with s.view() as v:
            shares.append(bytes(v))
        return s

    with broker.tenant(tenant_id) as client:
        client.register()
        for n in nodes:
            enrol(broker, n)
        store = LocalDirStore(tmp / f"store-{tenant_id}")
        data = records()
        result = upload_dataset([client], data, store, dataset_id=dataset_id,
                                make_share=recording_share)
        digest = client.put_policy(POLICY_YAML)
        world = World(broker, tenant_id, dataset_id, job_id, grant_id, digest, store,
                      result.manifest_name, data, shares)
        world.grant(client, grant_id=grant_id)
    return world
