"""Enrolment checks that need no quote: AK attributes, EK certificate validity, bad input."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509

from attest.swtpm import LocalEkCa, Swtpm
from attest.tpm2 import EkTrustStore, EnrolmentRefused, begin_enrolment, complete_enrolment
from attest.tpm2.credential import kdfa, make_credential
from attest.tpm2.marshal import ALG_SHA256, parse_public
from attest.tpm2.node import TpmNode

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def trust(ek_ca: LocalEkCa) -> EkTrustStore:
    return EkTrustStore.from_pem([ek_ca.root_cert_pem], [ek_ca.issuer_cert_pem])


@pytest.fixture(scope="module")
def node(swtpm: Swtpm) -> Iterator[TpmNode]:
    with TpmNode(swtpm.tcti) as tpm:
        yield tpm


def refusal_ids(call) -> set[str]:
    with pytest.raises(EnrolmentRefused) as info:
        call()
    return {f.id for f in info.value.failures}


def test_decrypting_key_presented_as_ak_is_refused(node, trust):
    # the EK is a restricted *decryption* key: it must never be accepted as an AK
    ids = refusal_ids(
        lambda: begin_enrolment(node.ek_certificate(), node.ek_public(), node.ek_public(), trust)
    )
    assert ids == {"tpm2.ak_attributes"}


def test_ek_certificate_outside_its_validity_is_refused(node, trust):
    # EK certificates usually end in 9999 (no expiry), so check the other end of the window
    cert = x509.load_der_x509_certificate(node.ek_certificate())
    earlier = cert.not_valid_before_utc - timedelta(days=1)
    ids = refusal_ids(
        lambda: begin_enrolment(
            node.ek_certificate(), node.ek_public(), node.ak_public(), trust, now=earlier
        )
    )
    assert ids == {"tpm2.ek_cert_untrusted"}


def test_chain_must_verify_up_to_a_root_we_hold(node, ek_ca):
    # a CA configured as a root is an anchor even when it is an intermediate elsewhere
    only_issuer = EkTrustStore.from_pem([ek_ca.issuer_cert_pem])
    challenge, _ = begin_enrolment(
        node.ek_certificate(), node.ek_public(), node.ak_public(), only_issuer
    )
    assert challenge.credential_blob
    # a root with the right *name* but another key does not anchor the real intermediate
    rootless = EkTrustStore.from_pem([_self_signed_pem()], [ek_ca.issuer_cert_pem])
    ids = refusal_ids(
        lambda: begin_enrolment(node.ek_certificate(), node.ek_public(), node.ak_public(),
                                rootless)
    )
    assert ids == {"tpm2.ek_cert_untrusted"}


def test_garbage_inputs_are_refused_with_a_reason(node, trust):
    assert refusal_ids(
        lambda: begin_enrolment(b"not a cert", node.ek_public(), node.ak_public(), trust)
    ) == {"tpm2.ek_cert_untrusted"}
    assert refusal_ids(
        lambda: begin_enrolment(node.ek_certificate(), b"\x00\x01", node.ak_public(), trust)
    ) == {"tpm2.enrolment_malformed"}


def test_answer_is_single_purpose(node, trust):
    challenge, pending = begin_enrolment(
        node.ek_certificate(), node.ek_public(), node.ak_public(), trust
    )
    answer = node.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    enrolled = complete_enrolment(pending, answer)
    assert enrolled.ak_public == node.ak_public()
    assert "hidden" in repr(pending)
    flipped = bytes([answer[0] ^ 1]) + answer[1:]
    assert refusal_ids(lambda: complete_enrolment(pending, flipped)) == {
        "tpm2.credential_activation"
    }


def test_tampered_credential_blob_is_refused_by_the_tpm(node):
    from attest.tpm2.node import TpmError

    made = make_credential(parse_public(node.ek_public()),
                           parse_public(node.ak_public()).name, b"s" * 32)
    blob = bytearray(made.credential_blob)
    blob[-1] ^= 1
    with pytest.raises(TpmError, match="ActivateCredential"):
        node.activate_credential(bytes(blob), made.encrypted_secret)


def test_kdfa_known_answer():
    # SP800-108 counter mode with HMAC-SHA256, one block: computed independently below
    import hashlib
    import hmac

    expected = hmac.new(
        b"k", b"\x00\x00\x00\x01" + b"STORAGE\x00" + b"u" + b"v" + b"\x00\x00\x00\x80",
        hashlib.sha256,
    ).digest()[:16]
    assert kdfa(ALG_SHA256, b"k", b"STORAGE", b"u", b"v", 128) == expected
    assert len(kdfa(ALG_SHA256, b"k", b"INTEGRITY", b"", b"", 512)) == 64


def _self_signed_pem() -> bytes:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "swtpm-localca-rootca")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def test_ecc_p256_ek_activates_our_make_credential(swtpm):
    # swtpm certifies only the RSA EK, so this checks the ECDH/KDFe path of MakeCredential
    # against the real TPM, without a certificate
    with TpmNode(swtpm.tcti, ek_type="EK-ECC256") as tpm:
        ek = parse_public(tpm.ek_public())
        assert ek.type == 0x0023 and ek.curve == 0x0003
        made = make_credential(ek, parse_public(tpm.ak_public()).name, b"e" * 32)
        assert tpm.activate_credential(made.credential_blob, made.encrypted_secret) == b"e" * 32


def test_unsupported_ek_type_is_a_usage_error(swtpm):
    with pytest.raises(ValueError, match="ek_type"):
        TpmNode(swtpm.tcti, ek_type="EK-HIGH-ECC384")


def test_unreachable_tpm_is_a_clear_error():
    from attest.tpm2.node import TpmError

    with pytest.raises(TpmError, match="cannot open TPM over 'swtpm'"):
        TpmNode("swtpm:host=127.0.0.1,port=1")
