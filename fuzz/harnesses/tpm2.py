"""TPM 2.0: the raw structures, the ``tpm2`` evidence through its verifier, the event log.

* ``tpm2_structures``: ``parse_attest`` (TPMS_ATTEST), ``parse_signature`` (TPMT_SIGNATURE),
  ``parse_public`` (TPMT_PUBLIC); the first input byte picks which, the rest is the structure.
  Expected error: ``MalformedEvidence``.
* ``tpm2_evidence``: ``Tpm2Verifier().verify`` (the container, the quote, the PCR banks, the
  event log, the signature check against an enrolled AK), as the broker's Attest runs it.
  Expected error: ``MalformedEvidence`` (anything else that is wrong is a Failure).
* ``eventlog``: ``EventLog.from_bytes`` then replay and ``claims()``. Expected error:
  ``MalformedEvidence``.

Seeds: the keylime, go-tpm-tools (GCE) and go-attestation quotes in ../shared/vectors/tpm and
the Azure vTPM quotes, wrapped in the project's own container.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Iterator

from fuzz.base import Harness, vectors_dir

__all__ = ["HARNESSES"]

_PARSERS = ("attest", "signature", "public")


def _structures(data: bytes) -> None:
    from attest.tpm2.marshal import parse_attest, parse_public, parse_signature

    if not data:
        return
    which, body = data[0] % 3, data[1:]
    if which == 0:
        parse_attest(body)
    elif which == 1:
        parse_signature(body)
    else:
        parse_public(body).name  # noqa: B018 - the Name hashes the parsed structure


def _quotes() -> Iterator[tuple[str, bytes, bytes, bytes | None]]:
    """(name, TPMS_ATTEST, TPMT_SIGNATURE, AK PEM or TPMT_PUBLIC) from the vectors."""
    tpm = vectors_dir() / "tpm"
    k = tpm / "keylime"
    yield ("keylime", (k / "quote.tpms_attest.bin").read_bytes(),
           (k / "quote.tpmt_signature.bin").read_bytes(), (k / "aik_pub.pem").read_bytes())
    g = tpm / "go-tpm-tools" / "derived_from_nonce9009"
    ak = (g / "ak_pub.tpmt_public.bin").read_bytes()
    for stem in ("quote0_0x4", "quote1_0xb", "quote2_0xc"):
        yield (f"gce-{stem}", (g / f"{stem}.tpms_attest.bin").read_bytes(),
               (g / f"{stem}.tpmt_signature.bin").read_bytes(), ak)
    j = json.loads((tpm / "go-attestation" / "windows_gcp_shielded_vm.json").read_text())
    yield ("go-attestation", base64.b64decode(j["Quote"]["Quote"]),
           base64.b64decode(j["Quote"]["Signature"]), base64.b64decode(j["AK"]["Public"]))
    for folder in ("azure-snp-vtpm", "azure-tdx-vtpm"):
        q = json.loads((vectors_dir() / folder / "tpm-quote-v1.json").read_text())
        raw = bytes.fromhex(q["signature"])
        yield (folder, bytes.fromhex(q["message"]),
               struct.pack(">HHH", 0x0014, 0x000B, len(raw)) + raw, None)


def _structure_seeds() -> Iterator[tuple[str, bytes]]:
    seen_ak: set[bytes] = set()
    for name, attest, sig, ak in _quotes():
        yield f"{name}-attest", b"\x00" + attest
        yield f"{name}-signature", b"\x01" + sig
        if ak is not None and not ak.startswith(b"-----") and ak not in seen_ak:
            seen_ak.add(ak)
            yield f"{name}-public", b"\x02" + ak


# keylime's AK (../shared/vectors/tpm/keylime/aik_pub.pem), a public key: inline so the corpus
# replay needs no vectors
KEYLIME_AK = b"""\
-----BEGIN PUBLIC KEY-----
MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEAw3owm7uitOaspMCDlhEv
bxNgGsxa1MpbHytT/Y9K0sdpTxgay571B8zvLOUbJHEJ0gt4NHY0+/NCzIAzT6kB
n7aL67BV8QiyKBcywlVGS9PqYGoB9uxozDap/O9Bc5WrQUCso4m4TxrW1QOOBkNX
x5OnresvsRv5O3m6BYZeUk2pJOyiBXM0HEkEC/Q/hxsfF1KfJG3JYOhpdF0E//dy
LHOtdW9FP8Dt3YZuchJmyhFDjMKuxF2Zt7YVk9Pg4ZvmJ64CmOtshUj9k+Ctj44Z
gMS/cIVmMrk7cdUBEBtq8x3g0cARZ5cUb4KB+dO0v/fvZkb4Qt5zwym1eUzmvVfD
6QIDAQAB
-----END PUBLIC KEY-----
"""


def _log(claims: dict) -> bytes:
    from attest.eventlog import EventLog

    return EventLog.from_claims(claims).to_bytes()


def _evidence(data: bytes) -> None:
    from attest.interface import VerificationContext
    from attest.tpm2.verifier import Tpm2Verifier

    context = VerificationContext(
        expected_report_data=b"Ai5M5SjYjnkyv4P7itH1", node={"ak_public": KEYLIME_AK},
        reference={"boot_pcrs": {str(i): "00" * 32 for i in range(8)}})
    result = Tpm2Verifier().verify(data, context)
    assert isinstance(result.failures, tuple)


def _evidence_seeds() -> Iterator[tuple[str, bytes]]:
    from attest.tpm2.evidence import Tpm2Evidence
    from attest.tpm2.marshal import parse_attest
    from attest.tpm2.tpm2tools import parse_tpm2tools_pcrs

    log = _log({"node.swap.enabled": False, "code.digest": "ab" * 32})
    k = vectors_dir() / "tpm" / "keylime"
    pcrs = parse_tpm2tools_pcrs((k / "pcrs.tpm2tools_pcrs_output.bin").read_bytes())
    for name, attest, sig, _ in _quotes():
        banks: dict[int, dict[int, bytes]] = {}
        if name == "keylime":
            banks = pcrs
        else:
            sel = parse_attest(attest).pcr_select
            for alg, idx in sel.banks:
                size = {0x4: 20, 0xB: 32, 0xC: 48, 0xD: 64}[alg]
                banks[alg] = {i: bytes([i]) * size for i in idx}
        sha256 = banks.pop(0x000B, {})
        yield name, Tpm2Evidence(attest, sig, sha256, log, banks).to_bytes()


def _eventlog(data: bytes) -> None:
    from attest.eventlog import EventLog

    log = EventLog.from_bytes(data)
    assert len(log.replay()) == 32
    log.claims()


def _eventlog_seeds() -> Iterator[tuple[str, bytes]]:
    yield "empty", _log({})
    yield "claims", _log({"node.swap.enabled": False, "node.ksm.enabled": False,
                          "node.core_dump.limit": 0, "code.digest": "ab" * 32,
                          "job.model": "tiny-gpt", "job.steps": 60})
    yield "nested", _log({"gpu.facts": {"cc_mode": "on", "list": [1, 2.5, None, "x"]}})


def _harnesses() -> list[Harness]:
    from attest.interface import MalformedEvidence

    return [
        Harness("tpm2_structures", "attest.tpm2.marshal: TPMS_ATTEST, TPMT_SIGNATURE, "
                "TPMT_PUBLIC", _structures, (MalformedEvidence,), _structure_seeds,
                max_len=4096),
        Harness("tpm2_evidence", "attest.tpm2.verifier.Tpm2Verifier.verify (container, "
                "quote, banks, event log)", _evidence, (MalformedEvidence,), _evidence_seeds,
                max_len=16384),
        Harness("eventlog", "attest.eventlog.EventLog.from_bytes + replay + claims",
                _eventlog, (MalformedEvidence,), _eventlog_seeds, max_len=16384),
    ]


HARNESSES = _harnesses
