"""Quote verification core: raw ``TPMS_ATTEST`` + ``TPMT_SIGNATURE`` + AK public key.

Serves our own evidence and quotes from producers no one here wrote (``tpm2_quote``, the
keylime and go-tpm-tools vectors) alike. It checks, collecting every failure:

* ``tpm2.signature``: the signature verifies under the AK over the exact attest bytes
  (RSASSA-PKCS1-v1_5, RSA-PSS or ECDSA with the hash the signature names);
* ``tpm2.nonce``: ``extraData`` equals the expected qualifying data;
* ``tpm2.pcr_digest``: ``pcrDigest == H_sig(concatenation of the selected PCR values, banks
  in selection order, indices ascending)`` (part 1, 18.4 / part 3, 18.4).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from attest.interface import Failure
from attest.tpm2.marshal import (
    ALG_ECDSA,
    ALG_RSAPSS,
    ALG_RSASSA,
    Attest,
    PcrSelection,
    Signature,
    hash_for,
    hashlib_name,
    parse_attest,
    parse_signature,
)

__all__ = ["QuoteCheck", "check_quote", "pcr_digest", "signature_valid"]

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
PcrValues = Mapping[int, Mapping[int, bytes]]  # hash alg -> PCR index -> value


def signature_valid(ak: PublicKey, signed: bytes, sig: Signature) -> bool:
    """Whether ``sig`` is a valid AK signature over ``signed``; False on any mismatch."""
    h = hash_for(sig.hash_alg)
    try:
        if isinstance(ak, rsa.RSAPublicKey) and sig.sig_alg == ALG_RSASSA:
            ak.verify(sig.sig, signed, padding.PKCS1v15(), h)
        elif isinstance(ak, rsa.RSAPublicKey) and sig.sig_alg == ALG_RSAPSS:
            pss = padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO)
            ak.verify(sig.sig, signed, pss, h)
        elif isinstance(ak, ec.EllipticCurvePublicKey) and sig.sig_alg == ALG_ECDSA:
            ak.verify(sig.sig, signed, ec.ECDSA(h))
        else:
            return False
    except InvalidSignature:
        return False
    return True


def pcr_digest(hash_alg: int, selection: PcrSelection, values: PcrValues) -> bytes | None:
    """H(selected PCR values in quote order); None when a selected value is missing."""
    h = hashlib.new(hashlib_name(hash_alg))
    for bank, indices in selection.banks:
        bank_values = values.get(bank, {})
        for i in indices:
            v = bank_values.get(i)
            if v is None:
                return None
            h.update(v)
    return h.digest()


@dataclass(frozen=True, slots=True)
class QuoteCheck:
    attest: Attest
    signature: Signature
    failures: tuple[Failure, ...]

    @property
    def ok(self) -> bool:
        return not self.failures


def check_quote(
    attest_bytes: bytes,
    signature_bytes: bytes,
    ak: PublicKey,
    *,
    expected_extra_data: bytes,
    pcr_values: PcrValues,
) -> QuoteCheck:
    """Check one quote; raises MalformedEvidence only when a structure cannot be parsed."""
    attest = parse_attest(attest_bytes)
    sig = parse_signature(signature_bytes)
    failures: list[Failure] = []
    if not signature_valid(ak, attest_bytes, sig):
        failures.append(Failure("tpm2.signature", "quote signature does not verify under the AK"))
    if not hmac.compare_digest(attest.extra_data, expected_extra_data):
        failures.append(
            Failure("tpm2.nonce", "quote qualifying data is not the expected nonce binding")
        )
    digest = pcr_digest(sig.hash_alg, attest.pcr_select, pcr_values)
    if digest is None:
        failures.append(
            Failure("tpm2.pcr_digest", "a PCR selected by the quote has no value in the evidence")
        )
    elif not hmac.compare_digest(digest, attest.pcr_digest):
        failures.append(
            Failure("tpm2.pcr_digest", "quoted PCR digest does not match the PCR values given")
        )
    return QuoteCheck(attest, sig, tuple(failures))
