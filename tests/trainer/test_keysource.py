"""Key sources: the static test source, and the attested adapter's mapping of broker
outcomes (a fake KeyClient stands in here; the broker integration tests use the real one)."""

from __future__ import annotations

import dataclasses
import time
from typing import ClassVar

import pytest

import kms_broker.client as client_module
from kms_broker.client import Lease, RevocationNotice
from kms_broker.domain.errors import RuleOutcome
from kms_broker.rpc import PermissionDeniedError, UnavailableError
from sealed.secrets import SecretBuffer
from tests.trainer.conftest import job_dict
from trainer.attested import AttestedKeySource
from trainer.config import DatasetConfig, JobConfig
from trainer.keysource import (
    AttestationDenied,
    BrokersUnreachable,
    KeySourceUnavailable,
    StaticKeySource,
)


def test_static_source_hands_out_copies():
    dek = SecretBuffer.random(32)
    source = StaticKeySource(dek)
    a, b = source.acquire(), source.acquire()
    assert a.dek.equals(dek) and b.dek.equals(dek)
    a.dek.zeroize()
    assert b.dek.alive and dek.alive
    source.revoke_all("because")
    assert a.revoked.is_set() and b.revoke_reason == "because"
    source.close()
    assert dek.alive  # the caller's key is the caller's


def _config(tmp_path, dataset, **over) -> JobConfig:
    for name in ("ca.pem", "node.pem", "node.key"):
        (tmp_path / name).write_text("-----BEGIN X-----\n-----END X-----\n")
    broker = {"address": "127.0.0.1:1", "ca": str(tmp_path / "ca.pem"),
              "cert": str(tmp_path / "node.pem"), "key": str(tmp_path / "node.key")}
    job = job_dict(dataset, tmp_path / "run", brokers=[broker],
                   attestation={"node_id": "node-1", "tcti": "device:/dev/null"},
                   lease_poll_interval=0.05)
    job.update(over)
    return JobConfig.from_mapping(job)


class FakeClient:
    """Records what the adapter asks; behaviour set per test."""

    instances: ClassVar[list[FakeClient]] = []
    fetch_error: Exception | None = None
    renew_error: Exception | None = None
    record: tuple[int, str] | None = None  # (key version, manifest) the brokers have
    lease_ms = 1_000

    def __init__(self, endpoints, *, node_id, job_id, evidence_for):
        self.endpoints, self.node_id, self.job_id = endpoints, node_id, job_id
        self.evidence_for = evidence_for
        self.renewals = 0
        self.on_revoked = None
        self.closed = False
        FakeClient.instances.append(self)

    def fetch_dek(self, *, tenant_id, dataset_id, key_version, manifest_name="",
                  check_dataset=None):
        if self.fetch_error:
            raise self.fetch_error
        if check_dataset is not None:  # without a record: what the job names
            version, manifest = self.record or (key_version, manifest_name)
            check_dataset(client_module.DatasetRef(tenant_id, dataset_id,
                                                   key_version or version,
                                                   manifest_name or manifest))
        kind, payload = self.evidence_for(b"\x01" * 32)
        assert (kind, payload) == ("tpm2", b"evidence over " + b"\x01" * 32)
        expires = int(time.time() * 1000) + self.lease_ms
        return client_module.ReleasedKey(SecretBuffer.random(32), tenant_id, dataset_id,
                                         key_version, (Lease("b", "lease-1", expires),))

    def watch_revocations(self, on_revoked, on_error=None):
        self.on_revoked = on_revoked

    def renew(self):
        self.renewals += 1
        if self.renew_error:
            raise self.renew_error
        return int(time.time() * 1000) + self.lease_ms

    def close(self):
        self.closed = True


@pytest.fixture
def fake_client(monkeypatch):
    FakeClient.instances = []
    FakeClient.fetch_error = FakeClient.renew_error = FakeClient.record = None
    monkeypatch.setattr(client_module, "KeyClient", FakeClient)
    return FakeClient


def _evidence(report_data: bytes) -> tuple[str, bytes]:
    return "tpm2", b"evidence over " + report_data


def test_release_gives_a_handle_with_lease_renewal_and_push_revocation(
    tmp_path, dataset, fake_client
):
    source = AttestedKeySource(_config(tmp_path, dataset), evidence_for=_evidence)
    handle = source.acquire()
    client = fake_client.instances[0]
    assert (client.node_id, client.job_id) == ("node-1", "job-1")
    assert len(handle.dek) == 32 and handle.lease_expiry > time.time()
    first_expiry = handle.lease_expiry
    deadline = time.monotonic() + 120  # hang guard, not a timing check
    while client.renewals < 2 and time.monotonic() < deadline:  # renews at half the lease
        time.sleep(0.05)
    assert client.renewals >= 2
    assert handle.lease_expiry > first_expiry and not handle.revoked.is_set()
    client.on_revoked(RevocationNotice("broker-a", "lease-1", "acme", "corpus", "grant revoked"))
    assert handle.revoked.is_set()
    assert handle.revoke_reason == "broker broker-a revoked the lease: grant revoked"
    source.close()
    assert client.closed


def test_refused_renewal_revokes(tmp_path, dataset, fake_client):
    fake_client.renew_error = PermissionDeniedError("node revoked", code="PERMISSION_DENIED")
    source = AttestedKeySource(_config(tmp_path, dataset), evidence_for=_evidence)
    handle = source.acquire()
    assert handle.revoked.wait(timeout=120)  # hang guard, not a timing check
    assert handle.revoke_reason.startswith("lease renewal refused: node revoked")
    source.close()


def test_denial_carries_the_failed_rules(tmp_path, dataset, fake_client):
    fake_client.fetch_error = PermissionDeniedError(
        "policy denied", code="PERMISSION_DENIED", broker="broker-a:7443",
        rules=(RuleOutcome("code_digest", False, "digest abc is not allowed"),
               RuleOutcome("no_swap", True, "ok")))
    source = AttestedKeySource(_config(tmp_path, dataset), evidence_for=_evidence)
    with pytest.raises(AttestationDenied) as info:
        source.acquire()
    assert "broker-a:7443: policy denied" in str(info.value)
    assert info.value.reasons == ("code_digest: digest abc is not allowed",)


def test_unavailable_broker_and_bad_setup_are_clear(tmp_path, dataset, fake_client):
    fake_client.fetch_error = UnavailableError("connection refused", code="UNAVAILABLE")
    with pytest.raises(BrokersUnreachable, match=r"could not be reached \(UNAVAILABLE\)"):
        AttestedKeySource(_config(tmp_path, dataset), evidence_for=_evidence).acquire()
    assert issubclass(BrokersUnreachable, KeySourceUnavailable)  # an outage, not a denial
    with pytest.raises(KeySourceUnavailable, match="the job lists no brokers"):
        AttestedKeySource(JobConfig.from_mapping(job_dict(dataset, tmp_path / "r")))
    with pytest.raises(KeySourceUnavailable, match="no attestation section"):
        AttestedKeySource(_config(tmp_path, dataset, attestation=None))
    cfg = _config(tmp_path, dataset)
    (tmp_path / "node.key").unlink()
    with pytest.raises(KeySourceUnavailable, match="cannot read broker TLS material"):
        AttestedKeySource(cfg, evidence_for=_evidence).acquire()


def test_a_job_without_manifest_takes_the_brokers_record_and_checks_the_store(
        tmp_path, dataset, fake_client):
    config = dataclasses.replace(_config(tmp_path, dataset), dataset=DatasetConfig(
        id="corpus", store=str(dataset.store)))
    assert config.dataset.manifest is None
    fake_client.record = (1, dataset.manifest)
    handle = AttestedKeySource(config, evidence_for=_evidence).acquire()
    assert handle.config is not None
    assert (handle.config.dataset.key_version, handle.config.dataset.manifest) == (
        1, dataset.manifest)
    handle.dek.zeroize()

    from trainer.dataset_check import DatasetMissing

    fake_client.record = (1, "manifests/" + "f" * 32)  # on record, but not in this store
    with pytest.raises(DatasetMissing, match="is not in the store"):
        AttestedKeySource(config, evidence_for=_evidence).acquire()
    fake_client.record = (1, "")  # the brokers know the version but no manifest
    with pytest.raises(DatasetMissing, match=r"name dataset\.manifest"):
        AttestedKeySource(config, evidence_for=_evidence).acquire()


def test_a_mismatch_from_the_client_is_a_dataset_mismatch(tmp_path, dataset, fake_client):
    from trainer.dataset_check import DatasetMismatch

    fake_client.fetch_error = client_module.DatasetRefError(
        "dataset.manifest x does not match", code="FAILED_PRECONDITION")
    with pytest.raises(DatasetMismatch, match="does not match"):
        AttestedKeySource(_config(tmp_path, dataset), evidence_for=_evidence).acquire()


def test_replica_sets_reach_the_client_as_lists(tmp_path, dataset, fake_client):
    config = _config(tmp_path, dataset)
    tls = {k: getattr(config.brokers[0], k) for k in ("ca", "cert", "key")}
    config = JobConfig.from_mapping({**job_dict(dataset, tmp_path / "run"),
                                     "attestation": {"node_id": "node-1",
                                                     "tcti": "device:/dev/null"},
                                     "brokers": [{"address": "a:1", **tls},
                                                 {"addresses": ["b1:1", "b2:1"], **tls}]})
    AttestedKeySource(config, evidence_for=_evidence).acquire().dek.zeroize()
    first, second = fake_client.instances[-1].endpoints
    assert first.address == "a:1" and [e.address for e in second] == ["b1:1", "b2:1"]
