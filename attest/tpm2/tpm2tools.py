"""Reader for the PCR file ``tpm2_quote -o`` writes (tpm2-tools 4.x/5.x, keylime's ``pcrs``).

tpm2-tools dumps its in-memory structures in host (little-endian) order, not TPM marshalling::

    TPML_PCR_SELECTION as a C struct (132 bytes):
        LE32 count (<= 16)
        16 x TPMS_PCR_SELECTION (8 bytes each): LE16 hash | u8 sizeofSelect (<= 4) |
                                                 4-byte bitmap | 1 padding byte
    LE32 number of TPML_DIGEST blocks n (<= 16)
    n x TPML_DIGEST (532 bytes each): LE32 count (<= 8) |
                                       8 x TPM2B_DIGEST (LE16 size (<= 64) | 64-byte buffer)

The digests fill the selection in order: banks in selection order, PCR indices ascending.
"""

from __future__ import annotations

import struct

from attest.interface import MalformedEvidence
from attest.tpm2.marshal import digest_size

__all__ = ["parse_tpm2tools_pcrs"]

_SEL_SIZE = 4 + 16 * 8
_DIGEST_LIST_SIZE = 4 + 8 * (2 + 64)


def parse_tpm2tools_pcrs(data: bytes) -> dict[int, dict[int, bytes]]:
    """``{hash alg: {PCR index: value}}`` from a tpm2-tools PCR file."""
    if len(data) < _SEL_SIZE + 4:
        raise MalformedEvidence("tpm2-tools pcrs: truncated selection")
    (count,) = struct.unpack_from("<I", data, 0)
    if count > 16:
        raise MalformedEvidence(f"tpm2-tools pcrs: {count} banks, maximum 16")
    wanted: list[tuple[int, int]] = []
    for b in range(count):
        alg, size = struct.unpack_from("<HB", data, 4 + 8 * b)
        if size > 4:
            raise MalformedEvidence(f"tpm2-tools pcrs: sizeofSelect {size}, maximum 4")
        bitmap = data[4 + 8 * b + 3 : 4 + 8 * b + 3 + size]
        wanted += [(alg, i) for i in range(size * 8) if bitmap[i // 8] >> (i % 8) & 1]
    (blocks,) = struct.unpack_from("<I", data, _SEL_SIZE)
    if blocks > 16 or len(data) != _SEL_SIZE + 4 + blocks * _DIGEST_LIST_SIZE:
        raise MalformedEvidence("tpm2-tools pcrs: digest block count does not match the size")
    digests: list[bytes] = []
    for k in range(blocks):
        base = _SEL_SIZE + 4 + k * _DIGEST_LIST_SIZE
        (n,) = struct.unpack_from("<I", data, base)
        if n > 8:
            raise MalformedEvidence(f"tpm2-tools pcrs: {n} digests in a block, maximum 8")
        for j in range(n):
            off = base + 4 + j * 66
            (size,) = struct.unpack_from("<H", data, off)
            if size > 64:
                raise MalformedEvidence(f"tpm2-tools pcrs: digest of {size} bytes")
            digests.append(data[off + 2 : off + 2 + size])
    if len(digests) != len(wanted):
        raise MalformedEvidence(
            f"tpm2-tools pcrs: {len(digests)} values for {len(wanted)} selected PCRs"
        )
    out: dict[int, dict[int, bytes]] = {}
    for (alg, idx), value in zip(wanted, digests, strict=True):
        try:
            ok = len(value) == digest_size(alg)
        except ValueError:
            ok = False
        if not ok:
            raise MalformedEvidence(f"tpm2-tools pcrs: PCR {idx} value has the wrong size")
        out.setdefault(alg, {})[idx] = value
    return out
