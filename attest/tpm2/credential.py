"""TPM2_MakeCredential in pure Python (TPM 2.0 spec part 1, section 24; part 2, 11.4.10).

The verifier encrypts a random credential so that only the TPM holding the EK's private key,
and only for a loaded object whose Name is the AK's Name, can recover it (ActivateCredential).

Construction for an RSA EK (the standard templates use SHA-256 and AES-128-CFB):

* ``seed``: random, digest-size of the EK's nameAlg;
* ``encryptedSecret = RSA-OAEP(EK, seed, hash = nameAlg, label = b"IDENTITY\\x00")``;
* ``symKey = KDFa(nameAlg, seed, "STORAGE", AK Name, b"", EK symmetric key bits)``;
* ``encIdentity = AES-CFB(symKey, IV = 0, BE16 len(credential) || credential)``;
* ``hmacKey = KDFa(nameAlg, seed, "INTEGRITY", b"", b"", digest bits)``;
* ``outerHMAC = HMAC(nameAlg, hmacKey, encIdentity || AK Name)``;
* ``credentialBlob`` (TPM2B_ID_OBJECT contents)
  ``= BE16 len(outerHMAC) || outerHMAC || encIdentity``.

``KDFa(H, key, label, u, v, bits)`` = first ``bits`` of HMAC_H(key, BE32 i || label || 0x00 ||
u || v || BE32 bits) for i = 1, 2, ... (part 1, 11.4.10.2).

For an ECC EK the seed comes from one-pass ECDH instead of OAEP (part 1, C.6.1 / 11.4.10.3):

* an ephemeral key pair on the EK's curve; ``Z`` = x-coordinate of ``eph * EK``, curve-size bytes;
* ``seed = KDFe(nameAlg, Z, "IDENTITY", eph.x, EK.x, digest bits)`` where ``KDFe`` = first
  ``bits`` of H(BE32 i || Z || label || 0x00 || u || v) for i = 1, 2, ...;
* ``encryptedSecret`` = TPMS_ECC_POINT of the ephemeral public key
  (``BE16 len(x) || x || BE16 len(y) || y``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from attest.tpm2.marshal import (
    ALG_ECC,
    ALG_RSA,
    TpmPublic,
    digest_size,
    hash_for,
    hashlib_name,
)

__all__ = ["MadeCredential", "kdfa", "kdfe", "make_credential"]

ALG_AES = 0x0006
ALG_CFB = 0x0043


def kdfa(
    hash_alg: int, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int
) -> bytes:
    """SP800-108 counter-mode KDF with HMAC as the TPM uses it; returns ``bits // 8`` bytes."""
    name = hashlib_name(hash_alg)
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        msg = struct.pack(">I", counter) + label + b"\x00" + context_u + context_v
        out += hmac.new(key, msg + struct.pack(">I", bits), name).digest()
    return out[: bits // 8]


def kdfe(hash_alg: int, z: bytes, label: bytes, party_u: bytes, party_v: bytes, bits: int) -> bytes:
    """SP800-56A concatenation KDF as the TPM uses it; returns ``bits // 8`` bytes."""
    name = hashlib_name(hash_alg)
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        msg = struct.pack(">I", counter) + z + label + b"\x00" + party_u + party_v
        out += hashlib.new(name, msg).digest()
    return out[: bits // 8]


def _ecdh_seed(ek: ec.EllipticCurvePublicKey, h: int) -> tuple[bytes, bytes]:
    size = (ek.curve.key_size + 7) // 8
    eph = ec.generate_private_key(ek.curve)
    z = eph.exchange(ec.ECDH(), ek)  # x-coordinate, already curve-size bytes
    eph_pub = eph.public_key().public_numbers()
    eph_x = eph_pub.x.to_bytes(size, "big")
    eph_y = eph_pub.y.to_bytes(size, "big")
    ek_x = ek.public_numbers().x.to_bytes(size, "big")
    seed = kdfe(h, z, b"IDENTITY", eph_x, ek_x, digest_size(h) * 8)
    point = struct.pack(">H", size) + eph_x + struct.pack(">H", size) + eph_y
    return seed, point


@dataclass(frozen=True, slots=True)
class MadeCredential:
    """Contents (without the outer TPM2B size) of the two ActivateCredential inputs."""

    credential_blob: bytes  # TPM2B_ID_OBJECT.credential
    encrypted_secret: bytes  # TPM2B_ENCRYPTED_SECRET.secret


def make_credential(ek: TpmPublic, ak_name: bytes, credential: bytes) -> MadeCredential:
    """Encrypt ``credential`` (1-64 bytes) to ``ek`` for the object named ``ak_name``."""
    if not 1 <= len(credential) <= 64:
        raise ValueError("credential must be 1-64 bytes")
    sym_alg, sym_bits, sym_mode = ek.symmetric
    if sym_alg != ALG_AES or sym_mode != ALG_CFB or sym_bits not in (128, 256):
        raise ValueError("EK symmetric parameters must be AES-128/256-CFB")
    h = ek.name_alg
    if ek.type == ALG_RSA and isinstance(ek.key, rsa.RSAPublicKey):
        seed = os.urandom(digest_size(h))
        oaep = padding.OAEP(
            mgf=padding.MGF1(hash_for(h)), algorithm=hash_for(h), label=b"IDENTITY\x00"
        )
        encrypted_seed = ek.key.encrypt(seed, oaep)
    elif ek.type == ALG_ECC and isinstance(ek.key, ec.EllipticCurvePublicKey):
        seed, encrypted_seed = _ecdh_seed(ek.key, h)
    else:
        raise ValueError("the EK must be an RSA or ECC storage key")
    sym_key = kdfa(h, seed, b"STORAGE", ak_name, b"", sym_bits)
    plain = struct.pack(">H", len(credential)) + credential
    enc = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = enc.update(plain) + enc.finalize()
    hmac_key = kdfa(h, seed, b"INTEGRITY", b"", b"", digest_size(h) * 8)
    outer = hmac.new(hmac_key, enc_identity + ak_name, hashlib_name(h)).digest()
    blob = struct.pack(">H", len(outer)) + outer + enc_identity
    return MadeCredential(blob, encrypted_seed)
