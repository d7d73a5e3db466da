"""Node-side TPM operations over tpm2-pytss (ESAPI): EK, AK, activation, measurement, quote.

Works over any TCTI: ``"swtpm:host=127.0.0.1,port=N"`` for swtpm, ``"device:/dev/tpmrm0"`` on a
real machine. This is the only module of the package that needs the TSS; the verifier side
(:mod:`attest.tpm2.verifier`, :mod:`attest.tpm2.enrolment`) is pure Python.

* EK: by default the TCG RSA-2048 EK (template L-1, or the one the TPM's NV template index
  names), created as a primary in the endorsement hierarchy, certificate from NV 0x01C00002;
  ``ek_type="EK-ECC256"`` picks the TCG ECC P-256 template (L-2, certificate in 0x01C0000A).
* AK: a restricted ECDSA P-256/SHA-256 signing key, primary in the endorsement hierarchy with a
  fixed template. Primaries are derived from the hierarchy seed, so the same TPM gives back the
  same AK on every start without storing a key blob; another TPM gives another AK.
* Quote: SHA-256 bank, boot PCRs 0-7 plus the application PCR, qualifying data as given.

The commands every attestation repeats (PCR_Reset, one PCR_Extend per event, Quote, PCR_Read)
are marshalled by hand (:mod:`attest.tpm2.commands`) and sent over this ESAPI context's TCTI:
the TPM gets the same bytes, the node spends about a quarter less CPU per attestation. Keys,
sessions and the EK stay with ESAPI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from types import TracebackType

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CAP, TPM2_SE, TPMA_OBJECT
from tpm2_pytss.types import (
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

from attest.eventlog import APP_PCR, EventLog
from attest.tpm2 import commands
from attest.tpm2.commands import TpmError
from attest.tpm2.evidence import Tpm2Evidence
from attest.tpm2.marshal import parse_attest, parse_signature, trim_der
from attest.tpm2.quote import pcr_digest

__all__ = ["BOOT_PCRS", "EK_TYPES", "QUOTED_PCRS", "TpmError", "TpmNode"]

# TCG EK Credential Profile low-range templates L-1 and L-2, the ones most TPMs certify. Their
# authPolicy is PolicySecret(endorsement), which activate_credential satisfies; the high-range
# templates (H-n) use PolicyOR(A, C) over SHA-384 and are not supported yet.
EK_TYPES = frozenset({"ek-rsa2048", "ek-ecc256"})

BOOT_PCRS = tuple(range(8))
QUOTED_PCRS = (*BOOT_PCRS, APP_PCR)

_AK_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.RESTRICTED
    | TPMA_OBJECT.SIGN_ENCRYPT
)
_AK_TEMPLATE = TPM2B_PUBLIC.parse(  # the TPMT_PUBLIC bytes CreatePrimary gets
    "ecc256:ecdsa-sha256:null", objectAttributes=_AK_ATTRIBUTES, nameAlg=TPM2_ALG.SHA256
).publicArea.marshal()
_ENDORSEMENT = 0x4000000B  # TPM_RH_ENDORSEMENT


class _DefinedNvRead:
    """NVReadEK that only touches indices the TPM lists, so absent optional EK template
    indices do not make the TSS log errors for every probe."""

    def __init__(self, ectx: ESAPI) -> None:
        self._read = NVReadEK(ectx)
        self._defined: set[int] = set()
        more = True
        start = 0x01000000
        while more:
            more, data = ectx.get_capability(TPM2_CAP.HANDLES, start, 256)
            handles = [int(h) for h in data.data.handles]
            self._defined.update(handles)
            if not handles:
                break
            start = max(handles) + 1

    def __call__(self, index: int) -> bytes:
        if int(index) not in self._defined:
            raise NoSuchIndex(index)
        return self._read(index)


class TpmNode:
    """One connection to the node's TPM; a context manager that closes it."""

    def __init__(self, tcti: str, *, ek_type: str = "EK-RSA2048") -> None:
        if ek_type.lower() not in EK_TYPES:
            raise ValueError(f"ek_type must be one of {sorted(EK_TYPES)}")
        try:
            self._ectx = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TpmError(f"cannot open TPM over {tcti.split(':', 1)[0]!r}: {exc}") from None
        self._ek_type = ek_type
        self._ek: ESYS_TR | None = None
        self._ek_public: bytes = b""
        self._ek_cert: bytes = b""
        self._ak = 0  # the AK's TPM handle (0: not loaded)
        self._ak_esys: ESYS_TR | None = None  # ESAPI's object for it, made when needed
        self._ak_public: bytes = b""
        self._closed = False

    def __enter__(self) -> TpmNode:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Flush the keys this connection loaded (no resource manager does it for swtpm or
        /dev/tpm0) and close; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._ak:
            with contextlib.suppress(TpmError):
                commands.flush_context(self._ectx.tcti, self._ak)
        if self._ek is not None:
            with contextlib.suppress(TSS2_Exception):
                self._ectx.flush_context(self._ek)
        self._ak, self._ak_esys, self._ek = 0, None, None
        self._ectx.close()

    # -- endorsement key --------------------------------------------------------------
    def _load_ek(self) -> ESYS_TR:
        if self._ek is None:
            try:
                cert, template = create_ek_template(self._ek_type, _DefinedNvRead(self._ectx))
                handle, public, *_ = self._ectx.create_primary(None, template, ESYS_TR.ENDORSEMENT)
            except TSS2_Exception as exc:
                raise TpmError(f"creating the endorsement key failed: {exc}") from None
            self._ek = handle
            self._ek_public = public.publicArea.marshal()
            self._ek_cert = trim_der(bytes(cert)) if cert else b""
        return self._ek

    def _unload_ek(self) -> None:
        # swtpm and bare /dev/tpm0 hold only three transient objects: keep the EK loaded
        # only while it is used, the AK (needed for every quote) stays
        if self._ek is not None:
            with contextlib.suppress(TSS2_Exception):
                self._ectx.flush_context(self._ek)
            self._ek = None

    def _ek_info(self) -> None:
        if not self._ek_public:
            self._load_ek()
            self._unload_ek()

    def ek_public(self) -> bytes:
        """The EK's TPMT_PUBLIC."""
        self._ek_info()
        return self._ek_public

    def ek_certificate(self) -> bytes:
        """The EK certificate (DER) provisioned in NV; TpmError when there is none."""
        self._ek_info()
        if not self._ek_cert:
            raise TpmError(f"this TPM has no {self._ek_type} certificate in NV")
        return self._ek_cert

    # -- attestation key --------------------------------------------------------------
    def _load_ak(self) -> int:
        """The AK's TPM handle, created (hand-marshalled, :mod:`attest.tpm2.commands`: ESAPI's
        CreatePrimary and FlushContext cost the node about 0.8 ms more CPU) on first use."""
        if not self._ak:
            self._ak, self._ak_public = commands.create_primary(
                self._ectx.tcti, "creating the attestation key failed", _ENDORSEMENT,
                _AK_TEMPLATE)
        return self._ak

    def ak_public(self) -> bytes:
        """The AK's TPMT_PUBLIC (what the verifier enrols)."""
        self._load_ak()
        return self._ak_public

    def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """Recover a MakeCredential secret; TpmError when it was not made for this EK and AK."""
        ak = self._ak_esys
        if ak is None:
            try:
                ak = self._ectx.tr_from_tpmpublic(self._load_ak())
            except TSS2_Exception as exc:
                raise TpmError(f"loading the attestation key into ESAPI failed: {exc}") \
                    from None
            self._ak_esys = ak
        ek = self._load_ek()
        session: ESYS_TR | None = None
        try:
            session = self._ectx.start_auth_session(
                tpm_key=ESYS_TR.NONE,
                bind=ESYS_TR.NONE,
                session_type=TPM2_SE.POLICY,
                symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                auth_hash=TPM2_ALG.SHA256,
            )
            # the default EK's policy is PolicySecret(endorsement hierarchy)
            self._ectx.policy_secret(ESYS_TR.ENDORSEMENT, session)
            blob = TPM2B_ID_OBJECT(credential=credential_blob)
            secret = TPM2B_ENCRYPTED_SECRET(secret=encrypted_secret)
            out = self._ectx.activate_credential(
                ak, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
            )
        except TSS2_Exception as exc:
            raise TpmError(f"ActivateCredential refused the challenge: {exc}") from None
        finally:
            if session is not None:
                with contextlib.suppress(TSS2_Exception):
                    self._ectx.flush_context(session)
            self._unload_ek()
        return bytes(out)

    # -- PCRs ----------------------------------------------------------------------------
    def measure(self, log: EventLog) -> None:
        """Reset the application PCR and extend every event of ``log`` into it, in order
        (hand-marshalled commands, :mod:`attest.tpm2.commands`: ESAPI's per-call conversions
        cost more CPU than the TPM's work)."""
        tcti = self._ectx.tcti
        commands.pcr_reset(tcti, APP_PCR)
        for event in log.events:
            commands.pcr_extend(tcti, APP_PCR, event.digest)

    def read_pcrs(self, indices: Iterable[int]) -> dict[int, bytes]:
        """SHA-256 PCR values (PCR_Read returns at most 8 per call, so read in chunks)."""
        return commands.pcr_read(self._ectx.tcti, indices)

    # -- quote ---------------------------------------------------------------------------
    def quote(
        self, qualifying_data: bytes, pcrs: Iterable[int] = QUOTED_PCRS
    ) -> tuple[bytes, bytes]:
        """TPM2_Quote with the AK: (TPMS_ATTEST bytes, TPMT_SIGNATURE bytes)."""
        return commands.quote(self._ectx.tcti, self._load_ak(), qualifying_data, pcrs)

    def evidence(self, log: EventLog, report_data: bytes) -> Tpm2Evidence:
        """Measure ``log``, quote boot PCRs + application PCR over ``report_data``, package it.

        The PCRs are read right after the quote; if anything extended a quoted PCR in between,
        the verifier's digest check fails, so the node retries once before giving up.
        """
        self.measure(log)
        for _ in range(2):
            attest, signature = self.quote(report_data)
            values = self.read_pcrs(QUOTED_PCRS)
            evidence = Tpm2Evidence(attest, signature, values, log.to_bytes())
            if _digest_matches(evidence):
                return evidence
        raise TpmError("PCRs kept changing while quoting")


def _digest_matches(evidence: Tpm2Evidence) -> bool:
    attest = parse_attest(evidence.attest)
    sig = parse_signature(evidence.signature)
    return pcr_digest(sig.hash_alg, attest.pcr_select, evidence.banks) == (
        attest.pcr_digest
    )
