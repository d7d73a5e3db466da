"""Domain tests of node enrolment (FakeHsm, manual clock, no sockets) with a real swtpm: the
pending enrolment's TTL and single use, bad input that changes nothing, a broker without
manufacturer CAs, and the test-only direct enrolment."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from attest.policy import Policy
from attest.swtpm import LocalEkCa, Swtpm
from attest.tpm2.enrolment import EkTrustStore
from attest.tpm2.node import TpmNode
from kms_broker.audit import AuditLog
from kms_broker.domain.clock import ManualClock, SystemRandom
from kms_broker.domain.deps import BrokerDeps, Settings
from kms_broker.domain.enrolment import NodeEnrolment
from kms_broker.domain.errors import InvalidArgument, PermissionDenied, ResourceExhausted
from kms_broker.hsm.fake import FakeHsm
from kms_broker.state.sqlite import SqliteRepository
from tests.attest.conftest import ek_ca, swtpm, swtpm_factory  # noqa: F401 - fixtures
from tests.kms_broker.testing_server import enrol_test_node
from tests.kms_broker.verifiers import JsonClaimsVerifier

OPS = "operator:ops"


@pytest.fixture(scope="module")
def tpm_parts(swtpm: Swtpm) -> dict[str, bytes]:  # noqa: F811
    with TpmNode(swtpm.tcti) as tpm:
        return {"ek_certificate": tpm.ek_certificate(), "ek_public": tpm.ek_public(),
                "ak_public": tpm.ak_public()}


def _deps(tmp_path: Path, clock: ManualClock, verifiers: dict | None = None) -> BrokerDeps:
    hsm = FakeHsm()
    return BrokerDeps(
        repo=SqliteRepository(tmp_path / "db"), hsm=hsm,
        audit=AuditLog(tmp_path / "audit.log", now_ms=clock.now_ms, sign=hsm.sign),
        clock=clock, random=SystemRandom(), verifiers=verifiers or {},
        load_policy=Policy.from_yaml, settings=Settings(enrolment_ttl_ms=10_000),
    )


@pytest.fixture
def setup(tmp_path: Path, ek_ca: LocalEkCa):  # noqa: F811
    clock = ManualClock(int(time.time() * 1000))
    deps = _deps(tmp_path, clock)
    trust = EkTrustStore.from_pem([ek_ca.root_cert_pem], [ek_ca.issuer_cert_pem])
    return NodeEnrolment(deps, trust), deps, clock


def _activate(swtpm: Swtpm, begun) -> bytes:  # noqa: F811
    with TpmNode(swtpm.tcti) as tpm:
        return tpm.activate_credential(begun.credential_blob, begun.encrypted_secret)


def test_enrolment_stores_the_ak_and_is_single_use(setup, swtpm, tpm_parts) -> None:  # noqa: F811
    enrolment, deps, _ = setup
    begun = enrolment.begin(actor=OPS, node_id="n1", tenant_scope="acme", **tpm_parts)
    answer = _activate(swtpm, begun)
    done = enrolment.complete(actor=OPS, enrolment_id=begun.enrolment_id,
                              activated_secret=answer)
    node = deps.repo.get_node("n1")
    assert node is not None and node.ak_public == tpm_parts["ak_public"]
    assert node.tenant_scope == "acme" and done.node_id == "n1"
    with pytest.raises(PermissionDenied, match=r"enrolment\.unknown"):
        enrolment.complete(actor=OPS, enrolment_id=begun.enrolment_id, activated_secret=answer)


def test_a_wrong_answer_consumes_the_enrolment(setup, swtpm, tpm_parts) -> None:  # noqa: F811
    enrolment, deps, _ = setup
    begun = enrolment.begin(actor=OPS, node_id="n1", tenant_scope="", **tpm_parts)
    with pytest.raises(PermissionDenied) as denied:
        enrolment.complete(actor=OPS, enrolment_id=begun.enrolment_id,
                           activated_secret=bytes(32))
    assert [r.name for r in denied.value.rules] == ["tpm2.credential_activation"]
    right = _activate(swtpm, begun)  # the right answer, too late: no second guess
    with pytest.raises(PermissionDenied, match=r"enrolment\.unknown"):
        enrolment.complete(actor=OPS, enrolment_id=begun.enrolment_id, activated_secret=right)
    assert deps.repo.get_node("n1") is None


def test_an_expired_enrolment_is_refused(setup, swtpm, tpm_parts) -> None:  # noqa: F811
    enrolment, deps, clock = setup
    begun = enrolment.begin(actor=OPS, node_id="n1", tenant_scope="", **tpm_parts)
    answer = _activate(swtpm, begun)
    clock.advance(10_000)
    with pytest.raises(PermissionDenied, match=r"enrolment\.unknown"):
        enrolment.complete(actor=OPS, enrolment_id=begun.enrolment_id, activated_secret=answer)
    assert deps.repo.get_node("n1") is None


def test_another_operator_cannot_complete(setup, swtpm, tpm_parts) -> None:  # noqa: F811
    enrolment, deps, _ = setup
    begun = enrolment.begin(actor=OPS, node_id="n1", tenant_scope="", **tpm_parts)
    with pytest.raises(PermissionDenied, match=r"enrolment\.unknown"):
        enrolment.complete(actor="operator:other", enrolment_id=begun.enrolment_id,
                           activated_secret=_activate(swtpm, begun))
    assert deps.repo.get_node("n1") is None


def test_bad_input_is_refused_and_changes_nothing(setup, tpm_parts) -> None:
    enrolment, deps, _ = setup
    log_before = deps.audit.path.read_bytes() if deps.audit.path.exists() else b""
    with pytest.raises(InvalidArgument):
        enrolment.begin(actor=OPS, node_id="../n1", tenant_scope="", **tpm_parts)
    with pytest.raises(InvalidArgument):
        enrolment.begin(actor=OPS, node_id="n1", tenant_scope="bad tenant", **tpm_parts)
    with pytest.raises(ResourceExhausted):
        enrolment.begin(actor=OPS, node_id="n1", tenant_scope="",
                        **{**tpm_parts, "ek_certificate": bytes(5000)})
    with pytest.raises(ResourceExhausted):
        enrolment.complete(actor=OPS, enrolment_id="abc", activated_secret=bytes(65))
    assert deps.repo.get_node("n1") is None
    assert (deps.audit.path.read_bytes() if deps.audit.path.exists() else b"") == log_before
    # garbage TPM structures are a refusal with a failure id, not a crash
    with pytest.raises(PermissionDenied) as denied:
        enrolment.begin(actor=OPS, node_id="n1", tenant_scope="",
                        **{**tpm_parts, "ak_public": b"\x00\x01garbage"})
    assert denied.value.rules[0].name == "tpm2.enrolment_malformed"


def test_without_manufacturer_cas_every_enrolment_is_refused(tmp_path, tpm_parts) -> None:
    deps = _deps(tmp_path, ManualClock(int(time.time() * 1000)))
    with pytest.raises(PermissionDenied) as denied:
        NodeEnrolment(deps, None).begin(actor=OPS, node_id="n1", tenant_scope="", **tpm_parts)
    assert [r.name for r in denied.value.rules] == ["tpm2.ek_cert_untrusted"]


def test_direct_enrolment_needs_the_test_verifier(tmp_path) -> None:
    clock = ManualClock()
    (tmp_path / "p").mkdir()
    production = _deps(tmp_path / "p", clock)
    with pytest.raises(PermissionDenied, match=r"enrolment\.unattested"):
        enrol_test_node(production, actor=OPS, node_id="n1", tenant_scope="")
    assert production.repo.get_node("n1") is None
    (tmp_path / "t").mkdir()
    test_deps = _deps(tmp_path / "t", clock, {"test-json": JsonClaimsVerifier()})
    enrol_test_node(test_deps, actor=OPS, node_id="n1", tenant_scope="")
    node = test_deps.repo.get_node("n1")
    assert node is not None and node.ak_public == b""
