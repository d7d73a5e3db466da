"""The attested key source's evidence is a real TPM quote (swtpm): the node's hardening facts
and the trainer's code digest, measured and quoted over the broker's report data, verify with
the broker's TPM verifier. Two callers at once take turns at the TPM."""

from __future__ import annotations

import os
import threading

import pytest

from attest.code_digest import code_digest
from attest.interface import VerificationContext, expected_report_data
from attest.tpm2 import EkTrustStore, Tpm2Verifier, begin_enrolment, complete_enrolment
from attest.tpm2.node import TpmNode
from tests.attest.conftest import ek_ca, swtpm, swtpm_factory  # noqa: F401 - fixtures
from tests.trainer.conftest import job_dict
from trainer.attested import AttestedKeySource
from trainer.config import JobConfig

pytestmark = pytest.mark.integration
ZERO_BOOT = {i: "00" * 32 for i in range(8)}  # swtpm has no firmware: boot PCRs stay zero


def test_evidence_is_a_verifiable_quote_over_the_report_data(tmp_path, dataset, swtpm,  # noqa: F811
                                                             ek_ca):  # noqa: F811
    trust = EkTrustStore.from_pem([ek_ca.root_cert_pem], [ek_ca.issuer_cert_pem])
    with TpmNode(swtpm.tcti) as tpm:
        challenge, pending = begin_enrolment(tpm.ek_certificate(), tpm.ek_public(),
                                             tpm.ak_public(), trust)
        enrolled = complete_enrolment(pending, tpm.activate_credential(
            challenge.credential_blob, challenge.encrypted_secret))
    broker = {"address": "127.0.0.1:1", "ca": "ca.pem", "cert": "n.pem", "key": "n.key"}
    config = JobConfig.from_mapping(job_dict(
        dataset, tmp_path / "run", brokers=[broker],
        attestation={"node_id": "node-1", "tcti": swtpm.tcti}))
    source = AttestedKeySource(config)

    results: dict[int, tuple[bytes, tuple[str, bytes]]] = {}

    def attest(i: int) -> None:
        rd = expected_report_data(os.urandom(32), f"session-{i}", b"\x04" + bytes(64))
        results[i] = (rd, source.evidence_for(rd))

    threads = [threading.Thread(target=attest, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    digest = code_digest().digest
    for rd, (kind, payload) in results.values():
        assert kind == "tpm2"
        result = Tpm2Verifier().verify(payload, VerificationContext(
            expected_report_data=rd, node=enrolled.node_context(),
            reference={"boot_pcrs": ZERO_BOOT}))
        assert result.ok, result.failures
        assert result.claims["code_digest"] == digest
        assert isinstance(result.claims["core_dumps_allowed"], bool)
    # evidence for one report is not evidence for another
    _, (_, payload0) = results[0]
    other = Tpm2Verifier().verify(payload0, VerificationContext(
        expected_report_data=results[1][0], node=enrolled.node_context(),
        reference={"boot_pcrs": ZERO_BOOT}))
    assert not other.ok
