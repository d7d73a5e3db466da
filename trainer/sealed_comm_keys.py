"""Key schedule of the sealed collectives: job channel key, handshake records, link keys.

Pure byte and key logic (no torch, no process group); :mod:`trainer.sealed_comm` runs it.

Job channel key. Every attested rank derives the DEK in memory after release; the job
channel key is derived from it with a label of its own, so it never equals a data key::

    K_job = HKDF-SHA256(ikm = DEK, salt = empty,
                        info = b"sealed-comm/v1/job-key" || 0x00 || job_id (ASCII))

Only a process that received every key share (attested by every broker) holds the DEK, so
only such a process holds ``K_job``. ``K_job`` lives in a :class:`SecretBuffer` for the
length of the handshake and is zeroed as soon as the link keys exist.

Hello record (76 bytes, big-endian), exchanged in the clear by every rank at rendezvous::

    offset size field
    0      4    magic b"SCH1"
    4      4    rank
    8      4    world size
    12     32   nonce: 32 fresh random bytes of this rank, this run
    44     32   node digest: SHA-256(b"sealed-comm/v1/node\\0" || hostname || 0x00 || boot id)

Nothing in a hello is secret; it is bound into the transcript, so a hello altered in transit
makes every key confirmation fail (the job stops, nobody joins).

Transcript and keys (``T`` is public; the keys need ``K_job``)::

    T        = SHA-256(b"sealed-comm/v1/transcript\\0" || BE16 len(job_id) || job_id
                       || BE32 world || hello_0 || ... || hello_{world-1})
    K_i->j   = HKDF-SHA256(ikm = K_job, salt = T,
                           info = b"sealed-comm/v1/link\\0" || BE32 i || BE32 j)   (32 bytes)
    confirm_i = HKDF-SHA256(ikm = K_job, salt = T, info = b"sealed-comm/v1/confirm\\0"
                            || BE16 len(job_id) || job_id || BE32 i || BE32 world)  (32 bytes)

One key per ordered rank pair (per link, per direction), fresh for every run because every
rank's nonce is in ``T``: a restarted job (same job id, same DEK) never reuses a key, so the
AES-GCM nonce, a per-link sequence number, never repeats under one key.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from sealed.keys import derive_subkey, validate_identifier
from sealed.secrets import SecretBuffer

__all__ = [
    "HELLO_SIZE",
    "KEY_SIZE",
    "Hello",
    "confirm_tag",
    "derive_job_channel_key",
    "derive_link_key",
    "local_node_digest",
    "transcript_hash",
]

KEY_SIZE = 32
NONCE_SIZE = 32
HELLO_SIZE = 76
MAX_WORLD = 1 << 16
_HELLO_MAGIC = b"SCH1"
_JOB_INFO = b"sealed-comm/v1/job-key\x00"
_LINK_INFO = b"sealed-comm/v1/link\x00"
_CONFIRM_MSG = b"sealed-comm/v1/confirm\x00"
_TRANSCRIPT = b"sealed-comm/v1/transcript\x00"
_NODE = b"sealed-comm/v1/node\x00"


def derive_job_channel_key(dek: SecretBuffer, job_id: str) -> SecretBuffer:
    """``K_job`` (see the module docstring) in a new locked buffer; the DEK is untouched."""
    validate_identifier("job", job_id)
    return derive_subkey(dek, salt=b"", info=_JOB_INFO + job_id.encode("ascii"), size=KEY_SIZE)


def local_node_digest() -> bytes:
    """A digest naming this machine (hostname and kernel boot id), not the machine itself."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_bytes().strip()
    except OSError:
        boot = b""
    return hashlib.sha256(_NODE + socket.gethostname().encode() + b"\x00" + boot).digest()


@dataclass(frozen=True, slots=True)
class Hello:
    rank: int
    world_size: int
    nonce: bytes
    node: bytes

    def __post_init__(self) -> None:
        if not 0 < self.world_size <= MAX_WORLD or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} / world {self.world_size} out of range")
        if len(self.nonce) != NONCE_SIZE or len(self.node) != 32:
            raise ValueError("hello nonce and node digest must be 32 bytes each")

    def encode(self) -> bytes:
        return (_HELLO_MAGIC + struct.pack(">II", self.rank, self.world_size) + self.nonce
                + self.node)

    @classmethod
    def decode(cls, data: bytes) -> Hello:
        if len(data) != HELLO_SIZE or data[:4] != _HELLO_MAGIC:
            raise ValueError("malformed hello record")
        rank, world = struct.unpack_from(">II", data, 4)
        return cls(rank=rank, world_size=world, nonce=bytes(data[12:44]), node=bytes(data[44:76]))


def transcript_hash(job_id: str, hellos: list[Hello]) -> bytes:
    """``T``: binds the job, the world and every rank's hello, in rank order."""
    world = len(hellos)
    job = job_id.encode("ascii")
    h = hashlib.sha256(_TRANSCRIPT + struct.pack(">H", len(job)) + job + struct.pack(">I", world))
    for i, hello in enumerate(hellos):
        if hello.rank != i or hello.world_size != world:
            raise ValueError(f"hello {i} claims rank {hello.rank} of {hello.world_size}")
        h.update(hello.encode())
    return h.digest()


def derive_link_key(job_key: SecretBuffer, transcript: bytes, src: int, dst: int) -> SecretBuffer:
    """``K_src->dst``: the key of one link in one direction for this run."""
    if src == dst or min(src, dst) < 0:
        raise ValueError("a link joins two different ranks")
    return derive_subkey(job_key, salt=transcript,
                         info=_LINK_INFO + struct.pack(">II", src, dst), size=KEY_SIZE)


def confirm_tag(job_key: SecretBuffer, transcript: bytes, job_id: str, rank: int,
                world_size: int) -> bytes:
    """``confirm_rank``: proves the sender holds ``K_job`` and saw the same transcript."""
    job = job_id.encode("ascii")
    info = (_CONFIRM_MSG + struct.pack(">H", len(job)) + job
            + struct.pack(">II", rank, world_size))
    with derive_subkey(job_key, salt=transcript, info=info, size=32) as tag, tag.view() as v:
        return bytes(v)  # public once sent: it proves the key, it is not one


def tags_equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
