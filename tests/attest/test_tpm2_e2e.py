"""swtpm end to end: enrol (Make/ActivateCredential), measure, quote, verify; and each refusal.

Every test talks to real swtpm processes over the swtpm TCTI; the verifier is the broker's
pure-Python one. The failing check is named by its id in every refusal.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from attest.code_digest import code_digest
from attest.eventlog import Event, EventLog
from attest.facts import HostSource
from attest.interface import MalformedEvidence, VerificationContext, expected_report_data
from attest.swtpm import LocalEkCa, Swtpm
from attest.tpm2 import (
    EkTrustStore,
    EnrolledAk,
    EnrolmentRefused,
    Tpm2Evidence,
    Tpm2Verifier,
    begin_enrolment,
    complete_enrolment,
)
from attest.tpm2.agent import node_claims
from attest.tpm2.node import TpmError, TpmNode
from tests.attest.conftest import hardened_root

pytestmark = pytest.mark.integration

ZERO_BOOT = {i: "00" * 32 for i in range(8)}  # swtpm has no firmware: boot PCRs stay zero
NODE_KEY = b"\x04" + b"node-public-key-A".ljust(64, b"\x00")
OTHER_KEY = b"\x04" + b"node-public-key-B".ljust(64, b"\x00")


def _no_gpu() -> None:
    return None


@pytest.fixture(scope="module")
def trust(ek_ca: LocalEkCa) -> EkTrustStore:
    return EkTrustStore.from_pem([ek_ca.root_cert_pem], [ek_ca.issuer_cert_pem])


@pytest.fixture(scope="module")
def node(swtpm: Swtpm) -> Iterator[TpmNode]:
    with TpmNode(swtpm.tcti) as tpm:
        yield tpm


@pytest.fixture(scope="module")
def other_node(swtpm_factory: Callable[..., Swtpm]) -> Iterator[TpmNode]:
    with TpmNode(swtpm_factory().tcti) as tpm:
        yield tpm


def enrol(tpm: TpmNode, trust: EkTrustStore) -> EnrolledAk:
    challenge, pending = begin_enrolment(
        tpm.ek_certificate(), tpm.ek_public(), tpm.ak_public(), trust
    )
    answer = tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    return complete_enrolment(pending, answer)


@pytest.fixture(scope="module")
def enrolled(node: TpmNode, trust: EkTrustStore) -> EnrolledAk:
    return enrol(node, trust)


@pytest.fixture(scope="module")
def claims() -> dict[str, Any]:
    return node_claims(HostSource(gpu_probe=_no_gpu))


def challenge(key: bytes = NODE_KEY) -> tuple[bytes, str, bytes]:
    nonce = os.urandom(32)
    return nonce, "session-1", expected_report_data(nonce, "session-1", key)


def context(report_data: bytes, enrolled: EnrolledAk | None, boot=None) -> VerificationContext:
    return VerificationContext(
        expected_report_data=report_data,
        node=enrolled.node_context() if enrolled else {},
        reference={"boot_pcrs": ZERO_BOOT if boot is None else boot},
    )


def ids(result) -> set[str]:
    return {f.id for f in result.failures}


# -- 1. end to end ------------------------------------------------------------------------


def test_enrol_quote_verify_end_to_end(node, enrolled, claims):
    _, _, rd = challenge()
    evidence = node.evidence(EventLog.from_claims(claims), rd).to_bytes()

    result = Tpm2Verifier().verify(evidence, context(rd, enrolled))

    assert result.ok, result.failures
    assert result.kind == "tpm2"
    assert dict(result.claims) == claims
    assert result.claims["code_digest"] == code_digest().digest
    assert result.claims["ksm_enabled"] is claims["ksm_enabled"]
    assert result.claims["gpu_present"] is False
    assert enrolled.ak_name == bytes.fromhex(enrolled.node_context()["ak_name"])


def test_a_log_sent_again_is_read_once_and_every_quote_is_still_checked(node, enrolled, claims):
    """The event log's parse is memoised by its bytes (a node resends the same log at every
    attestation): the quote of each attestation is still checked, claims come only with an
    authentic quote, and each result's claims are its own."""
    from attest.tpm2.verifier import _read_log_memo

    log = EventLog.from_claims(claims)
    _, _, rd1 = challenge()
    first = Tpm2Verifier().verify(node.evidence(log, rd1).to_bytes(), context(rd1, enrolled))
    hits = _read_log_memo.cache_info().hits
    _, _, rd2 = challenge()
    second = node.evidence(log, rd2).to_bytes()

    again = Tpm2Verifier().verify(second, context(rd2, enrolled))
    _, _, other = challenge()
    stale = Tpm2Verifier().verify(second, context(other, enrolled))  # not this session's

    assert _read_log_memo.cache_info().hits >= hits + 2
    assert first.ok and again.ok, (first.failures, again.failures)
    assert dict(again.claims) == claims and again.claims is not first.claims
    assert ids(stale) == {"tpm2.nonce"} and stale.claims == {}


def test_a_log_whose_claims_do_not_parse_is_malformed_every_time(node, enrolled, claims):
    twice = EventLog((Event.claim("ksm_enabled", False), Event.claim("ksm_enabled", True)))
    for _ in range(2):  # the second answer comes from the memo: the same refusal
        _, _, rd = challenge()
        evidence = node.evidence(twice, rd).to_bytes()
        with pytest.raises(MalformedEvidence, match="measured twice"):
            Tpm2Verifier().verify(evidence, context(rd, enrolled))


def test_enrolment_binds_the_ak_name_of_this_tpm(node, enrolled):
    from attest.tpm2.marshal import parse_public

    assert enrolled.ak_name == parse_public(node.ak_public()).name
    assert enrolled.ak_public == node.ak_public()


# -- 2. refusals --------------------------------------------------------------------------


def test_quote_over_another_nonce_is_refused(node, enrolled, claims):
    _, _, quoted_rd = challenge()
    _, _, expected_rd = challenge()
    evidence = node.evidence(EventLog.from_claims(claims), quoted_rd).to_bytes()

    result = Tpm2Verifier().verify(evidence, context(expected_rd, enrolled))

    assert ids(result) == {"tpm2.nonce"}
    assert not result.ok
    assert result.claims == {}  # stale claims are not claims


def test_evidence_bound_to_another_node_key_is_refused(node, enrolled, claims):
    nonce = os.urandom(32)
    evidence = node.evidence(
        EventLog.from_claims(claims), expected_report_data(nonce, "s", OTHER_KEY)
    ).to_bytes()

    result = Tpm2Verifier().verify(
        evidence, context(expected_report_data(nonce, "s", NODE_KEY), enrolled)
    )

    assert ids(result) == {"tpm2.nonce"}


def test_ak_not_enrolled_is_refused(node, claims):
    _, _, rd = challenge()
    evidence = node.evidence(EventLog.from_claims(claims), rd).to_bytes()

    result = Tpm2Verifier().verify(evidence, context(rd, None))

    assert ids(result) == {"tpm2.ak_not_enrolled"}
    assert result.claims == {}


def test_quote_by_the_ak_of_another_tpm_is_refused(other_node, enrolled, claims):
    _, _, rd = challenge()
    evidence = other_node.evidence(EventLog.from_claims(claims), rd).to_bytes()

    result = Tpm2Verifier().verify(evidence, context(rd, enrolled))

    assert ids(result) == {"tpm2.signature"}


def test_enrolling_an_ak_of_another_tpm_under_this_ek_is_refused(node, other_node, trust):
    challenge_, pending = begin_enrolment(
        node.ek_certificate(), node.ek_public(), other_node.ak_public(), trust
    )
    # Neither TPM can answer: the one with the EK lacks that AK, the one with the AK lacks the EK.
    with pytest.raises(TpmError, match="ActivateCredential"):
        node.activate_credential(challenge_.credential_blob, challenge_.encrypted_secret)
    with pytest.raises(TpmError, match="ActivateCredential"):
        other_node.activate_credential(challenge_.credential_blob, challenge_.encrypted_secret)
    with pytest.raises(EnrolmentRefused) as info:
        complete_enrolment(pending, os.urandom(32))
    assert [f.id for f in info.value.failures] == ["tpm2.credential_activation"]


def test_ek_certificate_from_an_untrusted_ca_is_refused(swtpm_factory, untrusted_ek_ca, trust):
    rogue = swtpm_factory(untrusted_ek_ca)
    with TpmNode(rogue.tcti) as tpm, pytest.raises(EnrolmentRefused) as info:
        begin_enrolment(tpm.ek_certificate(), tpm.ek_public(), tpm.ak_public(), trust)
    assert {f.id for f in info.value.failures} == {"tpm2.ek_cert_untrusted"}


def test_ek_certificate_of_another_ek_is_refused(node, other_node, trust):
    with pytest.raises(EnrolmentRefused) as info:
        begin_enrolment(
            node.ek_certificate(), other_node.ek_public(), other_node.ak_public(), trust
        )
    assert {f.id for f in info.value.failures} == {"tpm2.ek_mismatch"}


def test_edited_event_log_is_refused_and_yields_no_claims(node, enrolled, claims):
    _, _, rd = challenge()
    ev = node.evidence(EventLog.from_claims(claims), rd)
    log = EventLog.from_bytes(ev.event_log)
    flipped = Event.claim("ksm_enabled", not claims["ksm_enabled"])
    edited = EventLog(tuple(flipped if e.type == "ksm_enabled" else e for e in log.events))
    assert edited.claims()["ksm_enabled"] != claims["ksm_enabled"]
    tampered = Tpm2Evidence(ev.attest, ev.signature, ev.pcrs, edited.to_bytes())

    result = Tpm2Verifier().verify(tampered.to_bytes(), context(rd, enrolled))

    assert ids(result) == {"tpm2.eventlog_replay"}
    assert result.claims == {}


def test_event_appended_to_the_log_is_refused(node, enrolled, claims):
    _, _, rd = challenge()
    ev = node.evidence(EventLog.from_claims(claims), rd)
    log = EventLog.from_bytes(ev.event_log)
    appended = EventLog((*log.events, Event.claim("gpu_cc_mode", "on")))
    tampered = Tpm2Evidence(ev.attest, ev.signature, ev.pcrs, appended.to_bytes())

    result = Tpm2Verifier().verify(tampered.to_bytes(), context(rd, enrolled))

    assert ids(result) == {"tpm2.eventlog_replay"}


def test_reordered_event_log_is_refused(node, enrolled, claims):
    _, _, rd = challenge()
    ev = node.evidence(EventLog.from_claims(claims), rd)
    log = EventLog.from_bytes(ev.event_log)
    reordered = EventLog(tuple(reversed(log.events)))
    tampered = Tpm2Evidence(ev.attest, ev.signature, ev.pcrs, reordered.to_bytes())

    result = Tpm2Verifier().verify(tampered.to_bytes(), context(rd, enrolled))

    assert ids(result) == {"tpm2.eventlog_replay"}


def test_boot_pcr_not_matching_its_reference_is_refused(swtpm_factory, trust, claims):
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

    with TpmNode(swtpm_factory().tcti) as tpm:
        enrolled = enrol(tpm, trust)
        # this node "booted other firmware": PCR 0 holds one more measurement
        digest = hashlib.sha256(b"unexpected firmware").digest()
        ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))
        tpm._ectx.pcr_extend(ESYS_TR.PCR0, TPML_DIGEST_VALUES([ha]))
        _, _, rd = challenge()
        evidence = tpm.evidence(EventLog.from_claims(claims), rd).to_bytes()

    result = Tpm2Verifier().verify(evidence, context(rd, enrolled))

    assert ids(result) == {"tpm2.boot_pcr"}
    assert "PCR 0" in result.failures[0].message


def test_missing_boot_reference_fails_closed(node, enrolled, claims):
    _, _, rd = challenge()
    evidence = node.evidence(EventLog.from_claims(claims), rd).to_bytes()

    result = Tpm2Verifier().verify(evidence, context(rd, enrolled, boot={}))

    assert ids(result) == {"tpm2.boot_pcr"}


def test_pcr_value_changed_in_transit_is_refused(node, enrolled, claims):
    _, _, rd = challenge()
    ev = node.evidence(EventLog.from_claims(claims), rd)
    pcrs = dict(ev.pcrs)
    pcrs[3] = b"\x01" * 32
    tampered = Tpm2Evidence(ev.attest, ev.signature, pcrs, ev.event_log)

    result = Tpm2Verifier().verify(tampered.to_bytes(), context(rd, enrolled))

    assert "tpm2.pcr_digest" in ids(result)


def test_one_byte_change_in_the_quote_breaks_the_signature(node, enrolled, claims):
    _, _, rd = challenge()
    ev = node.evidence(EventLog.from_claims(claims), rd)
    attest = bytearray(ev.attest)
    signer_len = int.from_bytes(ev.attest[6:8], "big")
    clock = 8 + signer_len + 2 + 32 + 7  # last byte of clockInfo.clock: still parses
    attest[clock] ^= 1
    tampered = Tpm2Evidence(bytes(attest), ev.signature, ev.pcrs, ev.event_log)

    result = Tpm2Verifier().verify(tampered.to_bytes(), context(rd, enrolled))

    assert ids(result) == {"tpm2.signature"}
    assert result.claims == {}  # a forged quote vouches for nothing


def test_truncated_evidence_is_malformed(node, enrolled, claims):
    _, _, rd = challenge()
    evidence = node.evidence(EventLog.from_claims(claims), rd).to_bytes()
    with pytest.raises(MalformedEvidence, match="truncated"):
        Tpm2Verifier().verify(evidence[:-3], context(rd, enrolled))


# -- claims a policy fails on -------------------------------------------------------------


def _hostile_root(root: Path) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "sys/kernel/mm/ksm").mkdir(parents=True)
    (root / "proc/sys/kernel").mkdir(parents=True)
    (root / "proc/cmdline").write_text("quiet\n")
    (root / "sys/kernel/mm/ksm/run").write_text("1\n")
    (root / "proc/swaps").write_text(
        "Filename Type Size Used Priority\n/dev/sda2 partition 8388604 0 -2\n"
    )
    (root / "proc/self/limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units\n"
        "Max core file size        unlimited            unlimited            bytes\n"
    )
    (root / "proc/sys/kernel/core_pattern").write_text("core\n")
    return root


def test_ksm_swap_and_core_dumps_are_attested_as_claims(node, enrolled, tmp_path):
    hostile = node_claims(HostSource(root=_hostile_root(tmp_path), gpu_probe=_no_gpu))
    _, _, rd = challenge()
    evidence = node.evidence(EventLog.from_claims(hostile), rd).to_bytes()

    result = Tpm2Verifier().verify(evidence, context(rd, enrolled))

    assert result.ok  # the evidence is genuine; the policy is what refuses these claims
    assert result.claims["ksm_enabled"] is True
    assert result.claims["swap_enabled"] is True
    assert result.claims["swap_devices"] == ["/dev/sda2"]
    assert result.claims["core_dumps_allowed"] is True
    assert result.claims["core_rlimit_hard"] == -1


def _tiny_env(directory: Path) -> tuple[str, Path]:
    """An installation prefix with an interpreter, a standard library and a trainer package;
    returns it and the trainer package directory."""
    (directory / "bin").mkdir(parents=True)
    (directory / "bin" / "python3").write_bytes(b"\x7fELF")
    std = directory / "lib" / "python3.11"
    (std / "site-packages" / "trainer").mkdir(parents=True)
    (std / "os.py").write_text("")
    return str(directory), std / "site-packages" / "trainer"


def test_trainer_code_changed_by_one_byte_gives_another_attested_digest(
    node, enrolled, tmp_path
):
    env, pkg = _tiny_env(tmp_path / "env")
    (pkg / "__init__.py").write_text("LR = 0.001\n")
    before = node_claims(HostSource(gpu_probe=_no_gpu), env)
    (pkg / "__init__.py").write_text("LR = 0.002\n")
    after = node_claims(HostSource(gpu_probe=_no_gpu), env)
    _, _, rd = challenge()
    evidence = node.evidence(EventLog.from_claims(after), rd).to_bytes()

    result = Tpm2Verifier().verify(evidence, context(rd, enrolled))

    assert result.ok
    assert result.claims["code_digest"] == after["code_digest"]
    assert result.claims["code_digest"] != before["code_digest"]


# -- the dev policy over verified swtpm evidence ------------------------------------------



def _dev_policy_decision(node, enrolled, claims, allowed_digest):
    from attest.policy import Policy, evidence_claims

    policy = Policy.from_file(Path(__file__).resolve().parents[2] / "policies/dev-swtpm.yaml")
    policy = policy.with_params({"allowed_code_digests": [allowed_digest]})
    _, _, rd = challenge()
    evidence = node.evidence(EventLog.from_claims(claims), rd).to_bytes()
    result = Tpm2Verifier().verify(evidence, context(rd, enrolled))
    return policy.evaluate(evidence_claims(result))


def test_dev_policy_allows_a_hardened_swtpm_node(node, enrolled, tmp_path):
    claims = node_claims(HostSource(root=hardened_root(tmp_path), gpu_probe=_no_gpu))
    decision = _dev_policy_decision(node, enrolled, claims, claims["code_digest"])
    assert decision.allowed, decision.summary()


@pytest.mark.parametrize(
    ("edit", "failing_rule"),
    [
        (("sys/kernel/mm/ksm/run", "1\n"), "ksm-off"),
        (("proc/swaps", "Filename Type Size Used Priority\n/dev/sda2 partition 1 0 -2\n"),
         "swap-off"),
        (("proc/self/limits", "Max core file size        unlimited  unlimited  bytes\n"),
         "core-dumps-disabled"),
    ],
)
def test_dev_policy_names_the_rule_a_hostile_node_fails(node, enrolled, tmp_path, edit,
                                                         failing_rule):
    root = hardened_root(tmp_path)
    (root / edit[0]).write_text(edit[1])
    claims = node_claims(HostSource(root=root, gpu_probe=_no_gpu))
    decision = _dev_policy_decision(node, enrolled, claims, claims["code_digest"])
    assert not decision.allowed
    assert [r.name for r in decision.failed] == [failing_rule]


def test_dev_policy_refuses_trainer_code_changed_by_one_byte(node, enrolled, tmp_path):
    env, pkg = _tiny_env(tmp_path / "env")
    (pkg / "loop.py").write_text("STEPS = 100\n")
    root = hardened_root(tmp_path / "root")
    approved = node_claims(HostSource(root=root, gpu_probe=_no_gpu), env)
    (pkg / "loop.py").write_text("STEPS = 101\n")
    changed = node_claims(HostSource(root=root, gpu_probe=_no_gpu), env)
    decision = _dev_policy_decision(node, enrolled, changed, approved["code_digest"])
    assert [r.name for r in decision.failed] == ["trainer-code-allowed"]


def test_agent_collect_evidence_is_what_the_trainer_calls(swtpm, enrolled):
    from attest.tpm2.agent import collect_evidence

    _, _, rd = challenge()
    evidence = collect_evidence(swtpm.tcti, rd)  # real facts + real code digest

    result = Tpm2Verifier().verify(evidence, context(rd, enrolled))

    assert result.ok, result.failures
    assert result.claims["code_digest"] == code_digest().digest


def test_every_failure_is_collected_not_just_the_first(node, enrolled, claims):
    _, _, quoted_rd = challenge()
    _, _, expected_rd = challenge()
    ev = node.evidence(EventLog.from_claims(claims), quoted_rd)
    edited = EventLog((*EventLog.from_bytes(ev.event_log).events, Event.claim("x", 1)))
    tampered = Tpm2Evidence(ev.attest, ev.signature, ev.pcrs, edited.to_bytes())
    wrong_boot = {**ZERO_BOOT, 7: "11" * 32}

    result = Tpm2Verifier().verify(tampered.to_bytes(), context(expected_rd, enrolled, wrong_boot))

    assert ids(result) == {"tpm2.nonce", "tpm2.boot_pcr", "tpm2.eventlog_replay"}
    assert all(f.severity == "error" and f.message for f in result.failures)
    assert result.claims == {}
