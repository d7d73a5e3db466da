"""The node's hot TPM commands, marshalled by hand and sent over the ESAPI context's own TCTI.

Every attestation creates the AK (a primary), extends the application PCR once per event
(twenty to forty commands), quotes, reads the quoted PCRs back and flushes the AK. Through ESAPI
each of those builds and converts several tpm2-pytss/cffi objects per call, which costs the
node more CPU than the TPM's own work; here a command is one ``struct.pack``, one
``transmit``/``receive`` pair and one header check. The TPM sees byte for byte the commands
ESAPI sends (same tag, handles, password session and parameters), so the AK, PCR values, quotes
and the event log are unchanged. Only commands that need no HMAC or policy session live here
(the endorsement hierarchy and the AK have empty auth); the EK, ActivateCredential and its
policy session stay with ESAPI (:mod:`attest.tpm2.node`).

Byte formats (TPM 2.0 spec part 1 section 18, part 2, part 3; big-endian throughout)::

    command:   u16 tag (0x8001 TPM_ST_NO_SESSIONS | 0x8002 TPM_ST_SESSIONS)
               u32 commandSize (the whole command, these 10 header bytes included)
               u32 commandCode
               u32 handle x n                                  (the handle area)
               [TPM_ST_SESSIONS only: u32 authorizationSize = 9, then the password session
                u32 0x40000009 (TPM_RS_PW) | u16 nonceSize = 0 | u8 sessionAttributes = 0x01
                (continueSession, as ESAPI sends it) | u16 hmacSize = 0 (empty auth)]
               parameters
    response:  u16 tag | u32 responseSize | u32 responseCode (0 = success; anything else is a
               :class:`TpmError` naming the operation, the code decoded as the TSS does;
               TPM_RC_YIELDED/TESTING/RETRY resend the command, 5 submissions at most)
               u32 handle x n                        (one for CreatePrimary, else none)
               [TPM_ST_SESSIONS only: u32 parameterSize]
               parameters
               [TPM_ST_SESSIONS only: the session's response auth, ignored]

Commands and their parameters:

* ``TPM2_CreatePrimary`` (0x00000131), handle: the hierarchy, password session; parameters:
  ``TPM2B_SENSITIVE_CREATE`` = u16 size = 4 | u16 userAuth size = 0 | u16 data size = 0 |
  ``TPM2B_PUBLIC`` inPublic (u16 size | TPMT_PUBLIC template) | ``TPM2B_DATA`` outsideInfo =
  u16 0 | ``TPML_PCR_SELECTION`` creationPCR = u32 count 0. Response: u32 objectHandle, then
  parameters ``TPM2B_PUBLIC`` outPublic (u16 size | TPMT_PUBLIC) | creationData,
  creationHash, creationTicket, name (ignored).
* ``TPM2_FlushContext`` (0x00000165), no sessions; parameters: u32 flushHandle.
* ``TPM2_PCR_Reset`` (0x0000013D), handle: the PCR, password session; no parameters.
* ``TPM2_PCR_Extend`` (0x00000182), handle: the PCR, password session; parameters:
  ``TPML_DIGEST_VALUES`` = u32 count = 1 | u16 hashAlg = 0x000B (SHA-256) | 32-byte digest.
* ``TPM2_PCR_Read`` (0x0000017E), no sessions; parameters: ``TPML_PCR_SELECTION`` = u32 count
  = 1 | u16 hash = 0x000B | u8 sizeofSelect = 3 | 3-byte bitmap (bit ``i % 8`` of byte
  ``i // 8`` selects PCR ``i``). Response parameters: u32 pcrUpdateCounter |
  ``TPML_PCR_SELECTION`` (what the TPM read, at most 8 PCRs) | ``TPML_DIGEST`` = u32 count |
  count x (u16 size | digest).
* ``TPM2_Quote`` (0x00000158), handle: the signing key, password session; parameters:
  ``TPM2B_DATA`` qualifyingData (u16 size | bytes) | ``TPMT_SIG_SCHEME`` = u16 0x0010
  (TPM_ALG_NULL: the key's own scheme) | ``TPML_PCR_SELECTION`` as above. Response
  parameters: ``TPM2B_ATTEST`` (u16 size | TPMS_ATTEST) | ``TPMT_SIGNATURE`` (the rest of
  parameterSize).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from tpm2_pytss import TSS2_Exception

from attest.interface import MalformedEvidence
from attest.tpm2.marshal import Reader, parse_pcr_selection

__all__ = ["TpmError", "create_primary", "flush_context", "pcr_extend", "pcr_read", "pcr_reset",
           "quote"]

ST_NO_SESSIONS = 0x8001
ST_SESSIONS = 0x8002
CC_PCR_RESET = 0x0000013D
CC_PCR_EXTEND = 0x00000182
CC_PCR_READ = 0x0000017E
CC_QUOTE = 0x00000158
CC_CREATE_PRIMARY = 0x00000131
CC_FLUSH_CONTEXT = 0x00000165
ALG_SHA256 = 0x000B
ALG_NULL = 0x0010
PCR_SELECT_BYTES = 3  # PCRs 0-23: what every PC-client TPM implements
# TPM_RC_YIELDED, TPM_RC_TESTING, TPM_RC_RETRY: send the same command again, at most
# MAX_SUBMISSIONS times in all (ESAPI's own rule)
RC_AGAIN = frozenset({0x908, 0x90A, 0x922})
MAX_SUBMISSIONS = 5
MAX_RESPONSE = 4096  # the TSS's own maximum command/response size
# authorizationSize, then TPM_RS_PW | empty nonce | continueSession | empty hmac
_PASSWORD_SESSION = struct.pack(">IIHBH", 9, 0x40000009, 0, 0x01, 0)
_HEADER = struct.Struct(">HII")


class TpmError(RuntimeError):
    """A TPM command failed; the message names the operation."""


def _code(rc: int) -> str:
    try:
        return str(TSS2_Exception(rc))
    except Exception:  # an unknown code still gets its number
        return f"0x{rc:08x}"


def _call(tcti: Any, what: str, code: int, handles: tuple[int, ...], params: bytes,
          *, sessions: bool, handles_out: int = 0) -> bytes:
    """Send one command; the response's handle area (``handles_out`` handles) and
    parameters, without the session area."""
    body = struct.pack(f">{len(handles)}I", *handles)
    if sessions:
        body += _PASSWORD_SESSION
    body += params
    tag = ST_SESSIONS if sessions else ST_NO_SESSIONS
    command = _HEADER.pack(tag, _HEADER.size + len(body), code) + body
    for _ in range(MAX_SUBMISSIONS):  # the TPM may ask for the command again, as ESAPI does
        try:
            tcti.transmit(command)
            response = bytes(tcti.receive(MAX_RESPONSE))
        except TSS2_Exception as exc:
            raise TpmError(f"{what} failed: {exc}") from None
        if len(response) < _HEADER.size:
            raise TpmError(f"{what} failed: a {len(response)}-byte response")
        _, size, rc = _HEADER.unpack_from(response)
        if rc not in RC_AGAIN:
            break
    if rc != 0:
        raise TpmError(f"{what} failed: {_code(rc)}")
    if size != len(response):
        raise TpmError(f"{what} failed: the response says {size} bytes, {len(response)} came")
    start = _HEADER.size + 4 * handles_out
    if not sessions:
        if start > len(response):
            raise TpmError(f"{what} failed: no handle in the response")
        return response[_HEADER.size:]
    if len(response) < start + 4:
        raise TpmError(f"{what} failed: no parameterSize in the response")
    (param_size,) = struct.unpack_from(">I", response, start)
    if start + 4 + param_size > len(response):
        raise TpmError(f"{what} failed: parameterSize {param_size} runs past the response")
    return response[_HEADER.size : start] + response[start + 4 : start + 4 + param_size]


def _selection(indices: Iterable[int]) -> bytes:
    bitmap = bytearray(PCR_SELECT_BYTES)
    for i in indices:
        if not 0 <= i < PCR_SELECT_BYTES * 8:
            raise ValueError(f"PCR {i} is out of range")
        bitmap[i // 8] |= 1 << (i % 8)
    return struct.pack(">IHB", 1, ALG_SHA256, PCR_SELECT_BYTES) + bytes(bitmap)


def create_primary(tcti: Any, what: str, hierarchy: int, template: bytes) -> tuple[int, bytes]:
    """TPM2_CreatePrimary of ``template`` (TPMT_PUBLIC bytes) under ``hierarchy`` (empty auth,
    no sensitive data): (the object's TPM handle, its TPMT_PUBLIC as the TPM made it)."""
    params = (struct.pack(">HHH", 4, 0, 0) + struct.pack(">H", len(template)) + template
              + struct.pack(">HI", 0, 0))
    out = _call(tcti, what, CC_CREATE_PRIMARY, (hierarchy,), params, sessions=True,
                handles_out=1)
    try:
        r = Reader(out, "TPM2_CreatePrimary response")
        handle = r.u32("objectHandle")
        public = r.tpm2b("outPublic", MAX_RESPONSE)
    except MalformedEvidence as exc:
        raise TpmError(f"{what}: {exc}") from None
    if not public:
        raise TpmError(f"{what}: the TPM returned no public area")
    return handle, public


def flush_context(tcti: Any, handle: int) -> None:
    """TPM2_FlushContext of a transient object or session."""
    _call(tcti, "TPM2_FlushContext", CC_FLUSH_CONTEXT, (), struct.pack(">I", handle),
          sessions=False)


def pcr_reset(tcti: Any, pcr: int) -> None:
    """TPM2_PCR_Reset of ``pcr`` (a resettable PCR: 16 or 23 on PC-client TPMs)."""
    _call(tcti, f"TPM2_PCR_Reset of PCR {pcr}", CC_PCR_RESET, (pcr,), b"", sessions=True)


def pcr_extend(tcti: Any, pcr: int, digest: bytes) -> None:
    """TPM2_PCR_Extend of ``pcr``'s SHA-256 bank with one 32-byte ``digest``."""
    if len(digest) != 32:
        raise ValueError(f"a SHA-256 digest is 32 bytes, not {len(digest)}")
    _call(tcti, f"TPM2_PCR_Extend of PCR {pcr}", CC_PCR_EXTEND, (pcr,),
          struct.pack(">IH", 1, ALG_SHA256) + digest, sessions=True)


def pcr_read(tcti: Any, indices: Iterable[int]) -> dict[int, bytes]:
    """SHA-256 values of ``indices`` (one TPM2_PCR_Read per 8 PCRs, the most one call
    returns); TpmError when the TPM leaves any out."""
    wanted = sorted(set(indices))
    out: dict[int, bytes] = {}
    for start in range(0, len(wanted), 8):
        chunk = wanted[start : start + 8]
        params = _call(tcti, "TPM2_PCR_Read", CC_PCR_READ, (), _selection(chunk),
                       sessions=False)
        try:
            r = Reader(params, "TPM2_PCR_Read response")
            r.u32("pcrUpdateCounter")
            got = parse_pcr_selection(r).indices(ALG_SHA256)
            count = r.u32("pcrValues.count")
            values = [r.tpm2b("pcrValues.digest", 32) for _ in range(count)]
            r.end()
        except MalformedEvidence as exc:
            raise TpmError(f"TPM2_PCR_Read failed: {exc}") from None
        if len(values) != len(got) or any(len(v) != 32 for v in values):
            raise TpmError("TPM2_PCR_Read failed: the values do not match the selection")
        out.update(zip(got, values, strict=True))
    if sorted(out) != wanted:
        raise TpmError("the TPM did not return every requested SHA-256 PCR")
    return out


def quote(tcti: Any, key: int, qualifying_data: bytes,
          pcrs: Iterable[int]) -> tuple[bytes, bytes]:
    """TPM2_Quote of the SHA-256 ``pcrs`` by the key at TPM handle ``key`` with its own
    scheme: (TPMS_ATTEST bytes, TPMT_SIGNATURE bytes)."""
    if len(qualifying_data) > 64:
        raise ValueError("qualifying data is at most 64 bytes")
    params = (struct.pack(">H", len(qualifying_data)) + qualifying_data
              + struct.pack(">H", ALG_NULL) + _selection(pcrs))
    out = _call(tcti, "TPM2_Quote", CC_QUOTE, (key,), params, sessions=True)
    if len(out) < 2:
        raise TpmError("TPM2_Quote failed: no TPM2B_ATTEST in the response")
    (size,) = struct.unpack_from(">H", out)
    if 2 + size >= len(out):
        raise TpmError("TPM2_Quote failed: the response has no signature after the attest")
    return out[2 : 2 + size], out[2 + size :]
