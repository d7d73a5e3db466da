"""Fixtures for broker tests: a test PKI, real brokers run as subprocesses on real SoftHSM
tokens, and helpers to act as tenant, operator and node over mTLS.

Two kinds of evidence (the ``evidence`` fixture, module scope):

- ``"trusting"`` (the default): the broker runs the test composition of the server
  (``python -m tests.kms_broker.testing_server serve``) with the ``test-json`` verifier, which
  trusts the node's claims; :func:`enrol` uses the test-only ``EnrolTestNode``.
- ``"tpm2"``: the broker is the production ``kms-broker serve`` with the default verifiers (the
  real ``Tpm2Verifier``) trusting the test EK manufacturer CA; :func:`enrol` runs the real
  ``kms-broker node enrol`` CLI (MakeCredential/ActivateCredential) against the node's own
  swtpm, and evidence is a real TPM quote over the claims measured into PCR 23.

Security suites run both: they import :data:`tests.kms_broker.evidence.every_evidence`, which
overrides ``evidence`` with ``params=["trusting", "tpm2"]``. One swtpm per node id serves the
whole session (a TPM is the node's identity; each broker enrols it on its own).
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attest.swtpm import LocalEkCa, Swtpm, manufacture
from compose.postgres import LocalPostgres
from kms_broker._proto.kmsbroker.v1 import broker_pb2_grpc as pb_grpc
from kms_broker.client import KeyClient
from kms_broker.grants import GrantDocument
from kms_broker.hsm import softhsm
from kms_broker.rpc import BrokerEndpoint, open_channel
from kms_broker.tenant import TenantClient, upload_dataset
from sealed import LocalDirStore
from sealed.secrets import SecretBuffer
from tests.attest.conftest import ek_ca  # noqa: F401 - fixture
from tests.kms_broker._proto.kmsbroker.testing.v1 import testing_pb2 as tpb
from tests.kms_broker._proto.kmsbroker.testing.v1 import testing_pb2_grpc as tpb_grpc
from tests.kms_broker.hsm_fixtures import (  # noqa: F401 - fixtures
    fake_hsm,
    pkcs11_hsm,
    softhsm_config,
    softhsm_token,
)
from tests.kms_broker.pki import DevPki
from tests.kms_broker.verifiers import DEFAULT_CLAIMS, POLICY_YAML, make_evidence

REPO = Path(__file__).resolve().parents[2]
NODES = ("n1", "n2", "n3")
TENANTS = ("acme", "beta")
EVIDENCE_KINDS = ("trusting", "tpm2")
ZERO_BOOT = {i: "00" * 32 for i in range(8)}  # swtpm has no firmware: boot PCRs stay zero
TEST_SERVER = "tests.kms_broker.testing_server"  # the test composition (EnrolTestNode)
PRODUCTION_SERVER = "kms_broker.cli"  # kms-broker serve
EvidenceFor = Callable[[bytes], tuple[str, bytes]]


class NodeTpms:
    """One swtpm per node id, started on first use, with an EK certificate from ``ca``.

    Quotes on one TPM take turns (a quote resets and extends PCR 23, like the trainer's flock).
    """

    def __init__(self, root: Path, ca: LocalEkCa) -> None:
        self._root, self._ca = root, ca
        self._tpms: dict[str, Swtpm] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.ek_trust_dir = root / "ek-trust"
        self.ek_trust_dir.mkdir()
        (self.ek_trust_dir / "root.pem").write_bytes(ca.root_cert_pem)
        (self.ek_trust_dir / "issuer.pem").write_bytes(ca.issuer_cert_pem)

    def tpm(self, node_id: str) -> Swtpm:
        with self._guard:
            if node_id not in self._tpms:
                state = manufacture(self._root / f"tpm-{node_id}", self._ca)
                self._tpms[node_id] = Swtpm(Path(state)).start()
                self._locks[node_id] = threading.Lock()
            return self._tpms[node_id]

    def evidence_for(self, node_id: str, claims: dict | None = None) -> EvidenceFor:
        from attest.tpm2.agent import collect_evidence

        tcti = self.tpm(node_id).tcti
        lock = self._locks[node_id]
        measured = dict(DEFAULT_CLAIMS if claims is None else claims)

        def evidence(report_data: bytes) -> tuple[str, bytes]:
            with lock:
                return "tpm2", collect_evidence(tcti, report_data, measured)

        return evidence

    def broker_config(self) -> dict[str, Any]:
        """Config keys of a broker that verifies these TPMs (real verifier, EK CA)."""
        return {
            "verifiers": "default",
            "reference_values": {"tpm2": {"boot_pcrs": ZERO_BOOT}},
            "ek_roots": [str(self.ek_trust_dir / "root.pem")],
            "ek_intermediates": [str(self.ek_trust_dir / "issuer.pem")],
        }

    def stop(self) -> None:
        for tpm in self._tpms.values():
            tpm.stop()


@pytest.fixture(scope="session")
def node_tpms(tmp_path_factory: pytest.TempPathFactory,
              ek_ca: LocalEkCa) -> Iterator[NodeTpms]:  # noqa: F811
    tpms = NodeTpms(tmp_path_factory.mktemp("node-tpms"), ek_ca)
    yield tpms
    tpms.stop()


@pytest.fixture(scope="module")
def pg() -> Iterator[LocalPostgres]:
    """A PostgreSQL cluster of the requesting module's own (system binaries, a temporary
    directory), for modules that stop, restart or lock it or kill brokers on it, so no other
    module sees that; tests that only need a database take ``pg_dsn`` (pg_fixtures.py)."""
    cluster = LocalPostgres().start()
    try:
        yield cluster
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def evidence() -> str:
    """The evidence a module's brokers run on (see the module doc); "trusting" unless the
    module imports :data:`tests.kms_broker.evidence.every_evidence`."""
    return "trusting"


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
    evidence_kind: str = "trusting"
    tpms: NodeTpms | None = None
    entry: str = TEST_SERVER

    @property
    def binding_failure(self) -> str:
        """The failure id for evidence whose report data is not this session's."""
        return "tpm2.nonce" if self.evidence_kind == "tpm2" else "test.report_data"

    def evidence(self, node_id: str, claims: dict | None = None) -> EvidenceFor:
        """Evidence as ``node_id`` makes it for this broker: a swtpm quote over ``claims``
        (tpm2), or test-json claims (trusting). Default claims pass ``POLICY_YAML``."""
        if self.evidence_kind == "tpm2":
            assert self.tpms is not None
            return self.tpms.evidence_for(node_id, claims)
        return lambda report_data: make_evidence(report_data, claims)

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
                   evidence_for: EvidenceFor | None = None) -> KeyClient:
        """A key client for ``node_id``; evidence by default from :meth:`evidence`."""
        return KeyClient([self.endpoint("node", node_id)], node_id=node_id, job_id=job_id,
                         evidence_for=evidence_for or self.evidence(node_id))

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state_dir / "broker.db", timeout=10)

    def audit(self) -> list[dict]:
        return [json.loads(line) for line in (self.state_dir / "audit.log").read_text()
                .splitlines()]

    def actions(self) -> list[dict]:
        """The audit records of actions: every record but the signed checkpoints, which the
        broker writes on a timer whenever anything was appended (so a count taken across a
        refusal may include one)."""
        return [r for r in self.audit() if r.get("event") != "checkpoint"]

    def restart(self) -> None:
        """Stop and start the same broker (same config, state, token and port)."""
        self.stop()
        root = self.state_dir.parent
        cfg_path = root / f"{self.name}.yaml"
        cfg = yaml.safe_load(cfg_path.read_text())
        cfg["listen"] = self.address
        cfg_path.write_text(yaml.safe_dump(cfg))
        (self.state_dir / "broker.port").unlink(missing_ok=True)
        self.proc = _spawn(root, self.name, cfg_path, self.state_dir, self.entry)

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
                 extra_config: dict[str, Any] | None = None,
                 tpms: NodeTpms | None = None, server: str | None = None) -> BrokerProc:
    """A real broker subprocess on a fresh SoftHSM token. ``extra_config`` overrides config
    keys (e.g. ``verifiers: default`` with ``ek_roots`` for TPM enrolment tests). With
    ``tpms`` it is the production ``kms-broker serve`` verifying those TPMs' quotes; without,
    the test composition with the trusting test-json verifier. ``server`` overrides which
    entry point runs (``PRODUCTION_SERVER`` or ``TEST_SERVER``)."""
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
        **(tpms.broker_config() if tpms is not None else {}),
        **(extra_config or {}),
    }
    cfg_path = root / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    entry = server or (PRODUCTION_SERVER if tpms is not None else TEST_SERVER)
    proc = _spawn(root, name, cfg_path, state, entry)
    port = int((state / "broker.port").read_text())
    return BrokerProc(name, proc, state, f"127.0.0.1:{port}", pki, config.token_dir,
                      evidence_kind="tpm2" if tpms is not None else "trusting", tpms=tpms,
                      entry=entry)


def _spawn(root: Path, name: str, cfg_path: Path, state: Path,
           entry: str = TEST_SERVER) -> subprocess.Popen:
    """Start ``python -m ENTRY serve`` and wait until it has written its port file."""
    log = (root / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", entry, "serve", "--config", str(cfg_path)],
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
    evidence: str, request: pytest.FixtureRequest,
) -> Iterator[Callable[..., BrokerProc]]:
    """``factory(name, ttl_ms=, metrics_port=, extra_config=)`` starts a broker on the
    module's ``evidence`` (trusting: test composition; tpm2: ``kms-broker serve``)."""
    started: list[BrokerProc] = []
    root = tmp_path_factory.mktemp("brokers")
    tpms = request.getfixturevalue("node_tpms") if evidence == "tpm2" else None

    def factory(name: str = "b1", **kwargs: Any) -> BrokerProc:
        b = start_broker(root, pki, softhsm_config, name=name, tpms=tpms, **kwargs)
        started.append(b)
        return b

    yield factory
    for b in started:  # all at once: each drains for its grace period
        if b.proc.poll() is None:
            b.proc.terminate()
    for b in started:
        b.stop()


def operator_args(broker: BrokerProc) -> list[str]:
    """``--broker ... --ca ... --cert ... --key ...`` for the operator's CLI."""
    root = broker.pki.root
    return ["--broker", broker.address, "--ca", str(broker.pki.ca_path),
            "--cert", str(root / "operator-ops.pem"), "--key", str(root / "operator-ops.key"),
            "--server-name", "localhost"]


def enrol(broker: BrokerProc, node_id: str, tenant_scope: str = "") -> None:
    """Enrol ``node_id``: on a tpm2 broker through the real ``kms-broker node enrol`` with
    the node's swtpm; on a trusting broker through the test-only ``EnrolTestNode``."""
    if broker.evidence_kind == "tpm2":
        assert broker.tpms is not None
        scope = ["--tenant-scope", tenant_scope] if tenant_scope else []
        done = subprocess.run(
            [sys.executable, "-m", "kms_broker.cli", "node", "enrol", node_id,
             "--tcti", broker.tpms.tpm(node_id).tcti, *scope, *operator_args(broker)],
            cwd=REPO, capture_output=True, text=True, check=False, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"kms-broker node enrol {node_id} failed: {done.stderr}")
        return
    channel = open_channel(broker.endpoint("operator", "ops"))
    try:
        tpb_grpc.TestEnrolmentServiceStub(channel).EnrolTestNode(
            tpb.EnrolTestNodeRequest(node_id=node_id, tenant_scope=tenant_scope), timeout=10)
    finally:
        channel.close()


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
