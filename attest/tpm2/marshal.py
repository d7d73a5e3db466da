"""Pure-Python parsing of the TPM 2.0 structures a verifier needs (no TSS on the broker).

All TPM structures are big-endian ("canonical" marshalling, TPM 2.0 spec part 2). Every
``TPM2B`` size is checked against the structure's maximum before anything is sliced, and
every parser demands that the whole input is consumed, so trailing bytes are an error.

Structures parsed here:

``TPMS_ATTEST`` (part 2, 10.12.12)::

    u32 magic (0xFF544347 "\\xffTCG") | u16 type (0x8018 = TPM_ST_ATTEST_QUOTE)
    TPM2B_NAME qualifiedSigner (u16 size <= 68) | TPM2B_DATA extraData (u16 size <= 64)
    TPMS_CLOCK_INFO: u64 clock | u32 resetCount | u32 restartCount | u8 safe
    u64 firmwareVersion
    TPMS_QUOTE_INFO: TPML_PCR_SELECTION pcrSelect | TPM2B_DIGEST pcrDigest (u16 size <= 64)

``TPML_PCR_SELECTION``: u32 count (<= 16), then count x (u16 hashAlg | u8 sizeofSelect (<= 4)
| sizeofSelect bytes bitmap; bit ``i % 8`` of byte ``i // 8`` selects PCR ``i``).

``TPMT_SIGNATURE``: u16 sigAlg | u16 hashAlg | RSASSA/RSAPSS: TPM2B sig (<= 512) |
ECDSA: TPM2B r (<= 66) | TPM2B s (<= 66).

``TPMT_PUBLIC`` (RSA and ECC only): u16 type | u16 nameAlg | u32 objectAttributes |
TPM2B authPolicy | parameters | unique. RSA parameters: TPMT_SYM_DEF_OBJECT (u16 alg, then
u16 keyBits and u16 mode unless TPM_ALG_NULL) | TPMT_RSA_SCHEME (u16 scheme, then u16 hash
unless NULL) | u16 keyBits | u32 exponent (0 = 65537); unique: TPM2B modulus. ECC parameters:
symmetric as above | scheme as above | u16 curveID | TPMT_KDF_SCHEME (u16, then u16 hash unless
NULL); unique: TPM2B x | TPM2B y. ``Name = u16 nameAlg || H_nameAlg(TPMT_PUBLIC bytes)``.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from attest.interface import MalformedEvidence

__all__ = [
    "ALG_ECC",
    "ALG_ECDSA",
    "ALG_NULL",
    "ALG_RSA",
    "ALG_RSAPSS",
    "ALG_RSASSA",
    "ALG_SHA1",
    "ALG_SHA256",
    "ALG_SHA384",
    "ALG_SHA512",
    "ATTEST_MAGIC",
    "ST_ATTEST_QUOTE",
    "Attest",
    "PcrSelection",
    "Reader",
    "Signature",
    "TpmPublic",
    "digest_size",
    "hash_for",
    "parse_attest",
    "parse_pcr_selection",
    "parse_public",
    "parse_signature",
    "trim_der",
]

ATTEST_MAGIC = 0xFF544347
ST_ATTEST_QUOTE = 0x8018

ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_NULL = 0x0010
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_RSASSA = 0x0014
ALG_RSAPSS = 0x0016
ALG_ECDSA = 0x0018
ALG_ECC = 0x0023

ECC_NIST_P256 = 0x0003
ECC_NIST_P384 = 0x0004

# object attributes (part 2, 8.3)
ATTR_FIXED_TPM = 1 << 1
ATTR_FIXED_PARENT = 1 << 4
ATTR_SENSITIVE_DATA_ORIGIN = 1 << 5
ATTR_RESTRICTED = 1 << 16
ATTR_DECRYPT = 1 << 17
ATTR_SIGN = 1 << 18

_HASHES: dict[int, tuple[str, int]] = {
    ALG_SHA1: ("sha1", 20),
    ALG_SHA256: ("sha256", 32),
    ALG_SHA384: ("sha384", 48),
    ALG_SHA512: ("sha512", 64),
}
_CRYPTO_HASHES = {
    ALG_SHA1: hashes.SHA1,
    ALG_SHA256: hashes.SHA256,
    ALG_SHA384: hashes.SHA384,
    ALG_SHA512: hashes.SHA512,
}
_CURVES = {ECC_NIST_P256: ec.SECP256R1, ECC_NIST_P384: ec.SECP384R1}

MAX_NAME = 2 + 64
MAX_DATA = 64
MAX_DIGEST = 64
MAX_PCR_BANKS = 16
MAX_PCR_SELECT = 4
MAX_RSA_BYTES = 512
MAX_ECC_BYTES = 66
MAX_POLICY = 64


def digest_size(hash_alg: int) -> int:
    """Digest length of a TPM hash algorithm id; ValueError for an unknown one."""
    try:
        return _HASHES[hash_alg][1]
    except KeyError:
        raise ValueError(f"unsupported TPM hash algorithm 0x{hash_alg:04x}") from None


def hash_for(hash_alg: int) -> hashes.HashAlgorithm:
    """The ``cryptography`` hash object for a TPM hash algorithm id."""
    try:
        return _CRYPTO_HASHES[hash_alg]()
    except KeyError:
        raise ValueError(f"unsupported TPM hash algorithm 0x{hash_alg:04x}") from None


def hashlib_name(hash_alg: int) -> str:
    try:
        return _HASHES[hash_alg][0]
    except KeyError:
        raise ValueError(f"unsupported TPM hash algorithm 0x{hash_alg:04x}") from None


class Reader:
    """Bounded big-endian reader; every error is :class:`MalformedEvidence` naming ``what``."""

    __slots__ = ("_data", "_pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = bytes(data)
        self._pos = 0
        self.what = what

    def _take(self, n: int, field: str) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise MalformedEvidence(f"{self.what}: truncated at {field}")
        out = self._data[self._pos : self._pos + n]
        self._pos += n
        return out

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self._take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self._take(4, field))[0])

    def u64(self, field: str) -> int:
        return int(struct.unpack(">Q", self._take(8, field))[0])

    def raw(self, n: int, field: str) -> bytes:
        return self._take(n, field)

    def tpm2b(self, field: str, maximum: int) -> bytes:
        size = self.u16(field)
        if size > maximum:
            raise MalformedEvidence(f"{self.what}: {field} is {size} bytes, maximum {maximum}")
        return self._take(size, field)

    @property
    def offset(self) -> int:
        return self._pos

    def end(self) -> None:
        if self._pos != len(self._data):
            raise MalformedEvidence(
                f"{self.what}: {len(self._data) - self._pos} trailing bytes after the structure"
            )


@dataclass(frozen=True, slots=True)
class PcrSelection:
    """Selected PCR indices per hash bank, in marshalled order."""

    banks: tuple[tuple[int, tuple[int, ...]], ...]

    def indices(self, hash_alg: int) -> tuple[int, ...]:
        for alg, idx in self.banks:
            if alg == hash_alg:
                return idx
        return ()


def parse_pcr_selection(r: Reader) -> PcrSelection:
    count = r.u32("pcrSelect.count")
    if count > MAX_PCR_BANKS:
        raise MalformedEvidence(f"{r.what}: {count} PCR banks selected, maximum {MAX_PCR_BANKS}")
    banks = []
    for _ in range(count):
        alg = r.u16("pcrSelect.hash")
        size = r.u8("pcrSelect.sizeofSelect")
        if size > MAX_PCR_SELECT:
            raise MalformedEvidence(f"{r.what}: sizeofSelect {size}, maximum {MAX_PCR_SELECT}")
        bitmap = r.raw(size, "pcrSelect.bitmap")
        idx = tuple(i for i in range(size * 8) if bitmap[i // 8] >> (i % 8) & 1)
        banks.append((alg, idx))
    return PcrSelection(tuple(banks))


@dataclass(frozen=True, slots=True)
class Attest:
    """A parsed ``TPMS_ATTEST`` of type quote."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_select: PcrSelection
    pcr_digest: bytes


def parse_attest(data: bytes) -> Attest:
    """Parse a quote's ``TPMS_ATTEST``; a wrong magic or type is MalformedEvidence."""
    if len(data) > 1024:
        raise MalformedEvidence(f"TPMS_ATTEST: {len(data)} bytes, maximum 1024")
    r = Reader(data, "TPMS_ATTEST")
    magic = r.u32("magic")
    if magic != ATTEST_MAGIC:
        raise MalformedEvidence(f"TPMS_ATTEST: magic 0x{magic:08x} is not TPM_GENERATED_VALUE")
    st = r.u16("type")
    if st != ST_ATTEST_QUOTE:
        raise MalformedEvidence(f"TPMS_ATTEST: type 0x{st:04x} is not TPM_ST_ATTEST_QUOTE")
    signer = r.tpm2b("qualifiedSigner", MAX_NAME)
    extra = r.tpm2b("extraData", MAX_DATA)
    clock = r.u64("clock")
    reset = r.u32("resetCount")
    restart = r.u32("restartCount")
    safe = r.u8("safe")
    fw = r.u64("firmwareVersion")
    sel = parse_pcr_selection(r)
    digest = r.tpm2b("pcrDigest", MAX_DIGEST)
    r.end()
    return Attest(signer, extra, clock, reset, restart, bool(safe), fw, sel, digest)


@dataclass(frozen=True, slots=True)
class Signature:
    """A parsed ``TPMT_SIGNATURE``: RSA signatures in ``sig``, ECDSA as DER in ``sig``."""

    sig_alg: int
    hash_alg: int
    sig: bytes


def parse_signature(data: bytes) -> Signature:
    if len(data) > 1024:
        raise MalformedEvidence(f"TPMT_SIGNATURE: {len(data)} bytes, maximum 1024")
    r = Reader(data, "TPMT_SIGNATURE")
    alg = r.u16("sigAlg")
    hash_alg = r.u16("hashAlg")
    if hash_alg not in _HASHES:
        raise MalformedEvidence(f"TPMT_SIGNATURE: unsupported hash 0x{hash_alg:04x}")
    if alg in (ALG_RSASSA, ALG_RSAPSS):
        sig = r.tpm2b("sig", MAX_RSA_BYTES)
    elif alg == ALG_ECDSA:
        sr = r.tpm2b("signatureR", MAX_ECC_BYTES)
        ss = r.tpm2b("signatureS", MAX_ECC_BYTES)
        sig = encode_dss_signature(int.from_bytes(sr, "big"), int.from_bytes(ss, "big"))
    else:
        raise MalformedEvidence(f"TPMT_SIGNATURE: unsupported sigAlg 0x{alg:04x}")
    r.end()
    return Signature(alg, hash_alg, sig)


@dataclass(frozen=True, slots=True)
class TpmPublic:
    """A parsed ``TPMT_PUBLIC`` (RSA or ECC) with its marshalled bytes and Name."""

    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]  # (alg, keyBits, mode); (ALG_NULL, 0, 0) when none
    scheme: tuple[int, int]  # (scheme, hash); (ALG_NULL, 0) when none
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    curve: int  # ECC curve id, 0 for RSA
    marshalled: bytes

    @property
    def name(self) -> bytes:
        h = hashlib.new(hashlib_name(self.name_alg), self.marshalled).digest()
        return struct.pack(">H", self.name_alg) + h

    def has(self, attribute: int) -> bool:
        return bool(self.attributes & attribute)


def parse_public(data: bytes) -> TpmPublic:
    """Parse a ``TPMT_PUBLIC`` (or a ``TPM2B_PUBLIC``, whose size prefix is stripped)."""
    if len(data) > 2048:
        raise MalformedEvidence(f"TPMT_PUBLIC: {len(data)} bytes, maximum 2048")
    if len(data) >= 2 and struct.unpack(">H", data[:2])[0] == len(data) - 2:
        data = data[2:]  # TPM2B_PUBLIC
    r = Reader(data, "TPMT_PUBLIC")
    typ = r.u16("type")
    name_alg = r.u16("nameAlg")
    if name_alg not in _HASHES:
        raise MalformedEvidence(f"TPMT_PUBLIC: unsupported nameAlg 0x{name_alg:04x}")
    attrs = r.u32("objectAttributes")
    policy = r.tpm2b("authPolicy", MAX_POLICY)
    sym_alg = r.u16("symmetric.algorithm")
    symmetric = (sym_alg, 0, 0)
    if sym_alg != ALG_NULL:
        symmetric = (sym_alg, r.u16("symmetric.keyBits"), r.u16("symmetric.mode"))
    scheme_alg = r.u16("scheme")
    scheme = (scheme_alg, 0) if scheme_alg == ALG_NULL else (scheme_alg, r.u16("scheme.hash"))
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    curve = 0
    if typ == ALG_RSA:
        bits = r.u16("keyBits")
        exponent = r.u32("exponent") or 65537
        modulus = r.tpm2b("unique.rsa", MAX_RSA_BYTES)
        if len(modulus) * 8 != bits:
            raise MalformedEvidence(f"TPMT_PUBLIC: modulus is {len(modulus)} bytes, keyBits {bits}")
        try:
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError as exc:
            raise MalformedEvidence(f"TPMT_PUBLIC: invalid RSA key ({exc})") from None
    elif typ == ALG_ECC:
        curve = r.u16("curveID")
        kdf = r.u16("kdf")
        if kdf != ALG_NULL:
            r.u16("kdf.hash")
        x = r.tpm2b("unique.x", MAX_ECC_BYTES)
        y = r.tpm2b("unique.y", MAX_ECC_BYTES)
        if curve not in _CURVES:
            raise MalformedEvidence(f"TPMT_PUBLIC: unsupported curve 0x{curve:04x}")
        try:
            key = ec.EllipticCurvePublicNumbers(
                int.from_bytes(x, "big"), int.from_bytes(y, "big"), _CURVES[curve]()
            ).public_key()
        except ValueError as exc:
            raise MalformedEvidence(f"TPMT_PUBLIC: invalid ECC point ({exc})") from None
    else:
        raise MalformedEvidence(f"TPMT_PUBLIC: unsupported key type 0x{typ:04x}")
    r.end()
    return TpmPublic(typ, name_alg, attrs, policy, symmetric, scheme, key, curve, bytes(data))


def trim_der(data: bytes) -> bytes:
    """Cut NV padding after a DER certificate (its outer SEQUENCE length says where it ends)."""
    if len(data) < 4 or data[0] != 0x30:
        return data
    first = data[1]
    if first < 0x80:
        return data[: 2 + first]
    n = first & 0x7F
    if not 1 <= n <= 3 or len(data) < 2 + n:
        return data
    return data[: 2 + n + int.from_bytes(data[2 : 2 + n], "big")]
