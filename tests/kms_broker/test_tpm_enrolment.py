"""TPM enrolment through a real broker (subprocess, mTLS, SoftHSM) with real swtpm TPMs.

The broker runs the default verifiers (the real ``tpm2`` one, no test verifier) and trusts the
test EK manufacturer CA (``ek_roots``). A node enrolled by MakeCredential/ActivateCredential
then attests with a real TPM quote that passes ``policies/dev-swtpm.yaml`` and gets its share;
every refusal names its failure id and is audited.
"""

from __future__ import annotations

import subprocess
import sys
import time

import grpc
import pytest
import yaml

from attest.facts import HostSource
from attest.swtpm import LocalEkCa, Swtpm
from attest.tpm2.agent import collect_evidence, node_claims
from attest.tpm2.node import TpmNode
from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb
from kms_broker.client import KeyClient
from kms_broker.grants import GrantDocument
from kms_broker.node_enrol import enrol_node
from kms_broker.rpc import PermissionDeniedError
from kms_broker.tenant import upload_dataset
from sealed import LocalDirStore
from sealed.keys import derive_dek
from sealed.secrets import SecretBuffer
from tests.attest.conftest import (  # noqa: F401 - fixtures
    ek_ca,
    hardened_root,
    swtpm_factory,
    untrusted_ek_ca,
)
from tests.kms_broker.conftest import REPO, BrokerProc, enrol, records

pytestmark = pytest.mark.integration
ZERO_BOOT = {i: "00" * 32 for i in range(8)}  # swtpm has no firmware: boot PCRs stay zero
JOB = "job-tpm"



@pytest.fixture(scope="module")
def claims(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A hardened node's facts (from a prepared root) and this checkout's trainer code digest."""
    root = hardened_root(tmp_path_factory.mktemp("host"))
    return node_claims(HostSource(root=root, gpu_probe=lambda: None))


@pytest.fixture(scope="module")
def tpm_broker(broker_factory, ek_ca: LocalEkCa, tmp_path_factory) -> BrokerProc:  # noqa: F811
    ca_dir = tmp_path_factory.mktemp("ek-trust")
    (ca_dir / "root.pem").write_bytes(ek_ca.root_cert_pem)
    (ca_dir / "issuer.pem").write_bytes(ek_ca.issuer_cert_pem)
    return broker_factory("tpm", extra_config={
        "verifiers": "default",
        "reference_values": {"tpm2": {"boot_pcrs": ZERO_BOOT}},
        "ek_roots": [str(ca_dir / "root.pem")],
        "ek_intermediates": [str(ca_dir / "issuer.pem")],
    })


@pytest.fixture(scope="module")
def world(tpm_broker: BrokerProc, claims: dict, tmp_path_factory) -> dict:
    """Tenant acme: a dataset, the dev-swtpm policy allowing this trainer code, a grant."""
    shares: list[bytes] = []

    def recording_share() -> SecretBuffer:
        s = SecretBuffer.random(32)
        with s.view() as v:
            shares.append(bytes(v))
        return s

    policy = yaml.safe_load((REPO / "policies" / "dev-swtpm.yaml").read_text())
    policy["params"]["allowed_code_digests"] = [claims["code_digest"]]
    store = LocalDirStore(tmp_path_factory.mktemp("store"))
    with tpm_broker.tenant("acme") as client:
        client.register()
        upload_dataset([client], records(), store, dataset_id="ds-tpm",
                       make_share=recording_share)
        digest = client.put_policy(yaml.safe_dump(policy, sort_keys=False))
        client.create_grant(GrantDocument(
            grant_id="g-tpm", tenant_id="acme", dataset_id="ds-tpm", job_id=JOB,
            policy_digest=digest, max_nodes=4,
            expires_unix_ms=int(time.time() * 1000) + 3_600_000))
    return {"shares": shares}


@pytest.fixture(scope="module")
def tpm_a(swtpm_factory) -> Swtpm:  # noqa: F811
    return swtpm_factory()


@pytest.fixture(scope="module")
def tpm_b(swtpm_factory) -> Swtpm:  # noqa: F811
    return swtpm_factory()


def _operator_args(broker: BrokerProc) -> list[str]:
    root = broker.pki.root
    return ["--broker", broker.address, "--ca", str(broker.pki.ca_path),
            "--cert", str(root / "operator-ops.pem"), "--key", str(root / "operator-ops.key"),
            "--server-name", "localhost"]


def _cli_enrol(broker: BrokerProc, node: str, tpm: Swtpm) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kms_broker.cli", "node", "enrol", node, "--tcti", tpm.tcti,
         "--tenant-scope", "acme", *_operator_args(broker)],
        cwd=REPO, capture_output=True, text=True, check=False)


def _node_row(broker: BrokerProc, node: str) -> tuple | None:
    with broker.db() as db:
        return db.execute("SELECT ak_public, ek_certificate FROM nodes WHERE node_id=?",
                          (node,)).fetchone()


def _records(broker: BrokerProc, event: str, outcome: str) -> list[dict]:
    return [r for r in broker.audit() if r["event"] == event and r["outcome"] == outcome]


def _evidence(tpm: Swtpm, claims: dict):
    return lambda report_data: ("tpm2", collect_evidence(tpm.tcti, report_data, claims))


def test_enrolled_swtpm_node_attests_and_gets_its_share(tpm_broker, world, tpm_a,
                                                        claims) -> None:
    result = _cli_enrol(tpm_broker, "n1", tpm_a)
    assert result.returncode == 0, result.stderr
    with TpmNode(tpm_a.tcti) as tpm:
        ak_public, ek_cert = tpm.ak_public(), tpm.ek_certificate()
    assert "node n1 enrolled at 1 broker(s)" in result.stdout
    assert _node_row(tpm_broker, "n1") == (ak_public, ek_cert)  # the AK this TPM holds
    enrolled = _records(tpm_broker, "enrol_node", "allowed")
    assert any(r["subject"] == "node:n1" and r["actor"] == "operator:ops" for r in enrolled)

    with KeyClient([tpm_broker.endpoint("node", "n1")], node_id="n1", job_id=JOB,
                   evidence_for=_evidence(tpm_a, claims)) as client:
        released = client.fetch_dek(tenant_id="acme", dataset_id="ds-tpm", key_version=1)
    shares = [SecretBuffer.from_bytes(bytearray(s)) for s in world["shares"]]
    with released.dek as dek, dek.view() as got, derive_dek(
        shares, tenant_id="acme", dataset_id="ds-tpm", key_version=1
    ) as want, want.view() as w:
        assert bytes(got) == bytes(w)
    attests = [r for r in _records(tpm_broker, "attest", "allowed") if r["actor"] == "node:n1"]
    assert attests and "tpm2 evidence verified" in attests[-1]["reason"]


def test_enrol_format_json(tpm_broker, tpm_a) -> None:
    """Enrolment is idempotent: enrolling n1 again, as a script would, with JSON output."""
    import hashlib
    import json

    result = subprocess.run(
        [sys.executable, "-m", "kms_broker.cli", "node", "enrol", "n1", "--tcti", tpm_a.tcti,
         "--tenant-scope", "acme", *_operator_args(tpm_broker), "--format", "json"],
        cwd=REPO, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    with TpmNode(tpm_a.tcti) as tpm:
        ek_cert = tpm.ek_certificate()
    (row,) = doc["brokers"]
    assert doc["node"] == "n1" and row["broker"] == tpm_broker.address
    assert row["ek_certificate_sha256"] == hashlib.sha256(ek_cert).hexdigest()
    assert len(bytes.fromhex(row["ak_name"])) == 34  # TPM Name: sha256 algorithm id + digest


def test_quote_by_a_non_enrolled_ak_is_denied_at_attest(tpm_broker, world, tpm_a, tpm_b,
                                                        claims) -> None:
    with TpmNode(tpm_a.tcti) as tpm:
        assert enrol_node([tpm_broker.endpoint("operator", "ops")], node_id="n3",
                          tenant_scope="acme", tpm=tpm)
    # n3's AK is TPM A's; TPM B quotes for it
    with KeyClient([tpm_broker.endpoint("node", "n3")], node_id="n3", job_id=JOB,
                   evidence_for=_evidence(tpm_b, claims)) as client, \
            pytest.raises(PermissionDeniedError) as denied:
        client.fetch_dek(tenant_id="acme", dataset_id="ds-tpm", key_version=1)
    assert "tpm2.signature" in {r.name for r in denied.value.failed_rules}


def test_ek_certificate_from_an_untrusted_ca_is_refused(
    tpm_broker, swtpm_factory, untrusted_ek_ca  # noqa: F811
) -> None:
    rogue = swtpm_factory(untrusted_ek_ca)
    result = _cli_enrol(tpm_broker, "rogue", rogue)
    assert result.returncode == 1
    assert "tpm2.ek_cert_untrusted" in result.stderr
    assert _node_row(tpm_broker, "rogue") is None
    denied = _records(tpm_broker, "enrol_node_begin", "denied")
    assert any(r["subject"] == "node:rogue" and "tpm2.ek_cert_untrusted" in r["reason"]
               for r in denied)


class _AkOfAnotherTpm:
    """An operator presenting TPM A's EK with TPM B's AK; TPM A tries to activate."""

    def __init__(self, a: TpmNode, b: TpmNode) -> None:
        self.a, self.b = a, b

    def ek_certificate(self) -> bytes:
        return self.a.ek_certificate()

    def ek_public(self) -> bytes:
        return self.a.ek_public()

    def ak_public(self) -> bytes:
        return self.b.ak_public()

    def activate_credential(self, blob: bytes, secret: bytes) -> bytes:
        return self.a.activate_credential(blob, secret)


def test_ak_of_another_tpm_fails_activation(tpm_broker, tpm_a, tpm_b) -> None:
    with TpmNode(tpm_a.tcti) as a, TpmNode(tpm_b.tcti) as b, \
            pytest.raises(PermissionDeniedError) as denied:
        enrol_node([tpm_broker.endpoint("operator", "ops")], node_id="mixed",
                   tenant_scope="acme", tpm=_AkOfAnotherTpm(a, b))
    assert "tpm2.credential_activation" in {r.name for r in denied.value.failed_rules}
    assert _node_row(tpm_broker, "mixed") is None
    assert any(r["subject"] == "node:mixed" and "tpm2.credential_activation" in r["reason"]
               for r in _records(tpm_broker, "enrol_node", "denied"))


def test_replayed_or_unknown_enrolment_id_is_refused(tpm_broker, tpm_b) -> None:
    ops = tpm_broker.operator()
    with TpmNode(tpm_b.tcti) as tpm:
        begun = ops.BeginEnrolNode(pb.BeginEnrolNodeRequest(
            node_id="replayed", tenant_scope="acme", ek_certificate=tpm.ek_certificate(),
            ek_public=tpm.ek_public(), ak_public=tpm.ak_public()), timeout=30)
        answer = tpm.activate_credential(begun.credential_blob, begun.encrypted_secret)
    done = ops.CompleteEnrolNode(pb.CompleteEnrolNodeRequest(
        enrolment_id=begun.enrolment_id, activated_secret=answer), timeout=30)
    assert done.node_id == "replayed" and done.ak_name
    for enrolment_id in (begun.enrolment_id, "0" * 32):  # replayed, never issued
        with pytest.raises(grpc.RpcError) as err:
            ops.CompleteEnrolNode(pb.CompleteEnrolNodeRequest(
                enrolment_id=enrolment_id, activated_secret=answer), timeout=30)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "enrolment.unknown" in err.value.details()
    refused = _records(tpm_broker, "enrol_node", "denied")
    assert any(r["subject"] == f"enrolment:{begun.enrolment_id}" for r in refused)


def test_direct_enrolment_without_a_tpm_is_refused(tpm_broker) -> None:
    """Even the test composition refuses it when the test-json verifier is not loaded."""
    with pytest.raises(grpc.RpcError) as err:
        enrol(tpm_broker, "direct")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "enrolment.unattested" in err.value.details()
    assert _node_row(tpm_broker, "direct") is None
