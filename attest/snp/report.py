"""AMD SEV-SNP attestation report (ATTESTATION_REPORT, SEV-SNP ABI spec 56860, table 23).

The report is exactly 1184 (0x4A0) bytes, little-endian. Versions 2, 3 and 5 are accepted
(v3 adds the CPUID family/model/stepping bytes, v5 the mitigation vectors; v4 was never
issued by firmware). Offsets:

======  ====  ======================  ======================================================
offset  size  field                   notes
======  ====  ======================  ======================================================
0x000   4     version                 u32; 2, 3 or 5
0x004   4     guest_svn               u32
0x008   8     policy                  u64 guest policy (bit 16 SMT, 17 reserved=1, 18 migrate
                                      MA, 19 debug, 20 single socket, ...; 7:0/15:8 ABI minor/major)
0x010   16    family_id
0x020   16    image_id
0x030   4     vmpl                    u32
0x034   4     signature_algo          u32; 1 = ECDSA P-384 with SHA-384
0x038   8     current_tcb             TCB_VERSION (see :class:`TcbVersion`)
0x040   8     platform_info           u64 (bit 0 SMT enabled, 1 TSME enabled, 2 ECC, ...)
0x048   4     key_info                u32: bit 0 author_key_en, bit 1 mask_chip_key,
                                      bits 4:2 signing_key (0 VCEK, 1 VLEK, 7 none)
0x04C   4     reserved
0x050   64    report_data             supplied by the guest
0x090   48    measurement             launch digest
0x0C0   32    host_data
0x0E0   48    id_key_digest
0x110   48    author_key_digest
0x140   32    report_id
0x160   32    report_id_ma            report id of the migration agent (all FF: none)
0x180   8     reported_tcb            TCB_VERSION the VCEK was derived for
0x188   1     cpuid_fam_id            v3+ only (zero in v2)
0x189   1     cpuid_mod_id            v3+ only
0x18A   1     cpuid_step              v3+ only
0x18B   21    reserved
0x1A0   64    chip_id                 zero when mask_chip_id is set (e.g. VLEK reports)
0x1E0   8     committed_tcb
0x1E8   3     current build/minor/major   firmware version (build, minor, major order)
0x1EB   1     reserved
0x1EC   3     committed build/minor/major
0x1EF   1     reserved
0x1F0   8     launch_tcb
0x1F8   8     launch_mit_vector       v5 only
0x200   8     current_mit_vector      v5 only
0x208   152   reserved
0x2A0   512   signature               r: 72 bytes LE, s: 72 bytes LE, 368 zero bytes
======  ====  ======================  ======================================================

The signed bytes are 0x000..0x29F. TCB_VERSION (u64, byte-wise): Milan/Genoa (family 0x19):
byte 0 boot_loader, 1 tee, 2..5 reserved, 6 snp, 7 microcode. Turin (family 0x1A): byte 0
fmc, 1 boot_loader, 2 tee, 3 snp, 4..6 reserved, 7 microcode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

from attest.interface import MalformedEvidence

__all__ = [
    "REPORT_SIZE",
    "SIGNED_SIZE",
    "SigningKey",
    "SnpReport",
    "TcbVersion",
    "parse_report",
]

REPORT_SIZE = 0x4A0
SIGNED_SIZE = 0x2A0
SUPPORTED_VERSIONS = (2, 3, 5)
SIG_ALGO_ECDSA_P384_SHA384 = 1
_COMPONENT_SIZE = 72  # r and s are 72-byte little-endian fields

SigningKey = Literal["vcek", "vlek", "none", "reserved"]
_SIGNING_KEYS: dict[int, SigningKey] = {0: "vcek", 1: "vlek", 7: "none"}

Layout = Literal["milan-genoa", "turin"]

# policy bits (ABI spec table 9)
POLICY_SMT = 1 << 16
POLICY_MIGRATE_MA = 1 << 18
POLICY_DEBUG = 1 << 19
POLICY_SINGLE_SOCKET = 1 << 20


@dataclass(frozen=True, slots=True)
class TcbVersion:
    """A TCB_VERSION decoded for one processor generation; ``fmc`` is None before Turin."""

    raw: bytes
    boot_loader: int
    tee: int
    snp: int
    microcode: int
    fmc: int | None = None

    @classmethod
    def decode(cls, raw: bytes, layout: Layout) -> TcbVersion:
        if len(raw) != 8:
            raise MalformedEvidence(f"TCB_VERSION must be 8 bytes, got {len(raw)}")
        if layout == "turin":
            return cls(raw, boot_loader=raw[1], tee=raw[2], snp=raw[3], microcode=raw[7],
                       fmc=raw[0])
        return cls(raw, boot_loader=raw[0], tee=raw[1], snp=raw[6], microcode=raw[7])

    def as_claims(self) -> dict[str, int | str]:
        out: dict[str, int | str] = {
            "raw": self.raw.hex(),
            "bl": self.boot_loader,
            "tee": self.tee,
            "snp": self.snp,
            "ucode": self.microcode,
        }
        if self.fmc is not None:
            out["fmc"] = self.fmc
        return out


@dataclass(frozen=True, slots=True)
class SnpReport:
    """A parsed report. ``raw`` keeps the exact bytes; ``signed_bytes`` is what the key signed."""

    raw: bytes
    version: int
    guest_svn: int
    policy: int
    family_id: bytes
    image_id: bytes
    vmpl: int
    signature_algo: int
    current_tcb: TcbVersion
    platform_info: int
    key_info: int
    report_data: bytes
    measurement: bytes
    host_data: bytes
    id_key_digest: bytes
    author_key_digest: bytes
    report_id: bytes
    report_id_ma: bytes
    reported_tcb: TcbVersion
    cpuid_fam_id: int | None
    cpuid_mod_id: int | None
    cpuid_step: int | None
    chip_id: bytes
    committed_tcb: TcbVersion
    current_version: tuple[int, int, int]  # (major, minor, build)
    committed_version: tuple[int, int, int]
    launch_tcb: TcbVersion
    launch_mit_vector: int | None
    current_mit_vector: int | None
    signature_r: int
    signature_s: int
    signature_tail_zero: bool  # the 368 bytes after r and s and the top bytes are zero
    layout: Layout

    @property
    def signed_bytes(self) -> bytes:
        return self.raw[:SIGNED_SIZE]

    @property
    def signing_key(self) -> SigningKey:
        return _SIGNING_KEYS.get((self.key_info >> 2) & 0x7, "reserved")

    @property
    def mask_chip_key(self) -> bool:
        return bool(self.key_info & 0x2)

    @property
    def author_key_en(self) -> bool:
        return bool(self.key_info & 0x1)

    @property
    def debug(self) -> bool:
        return bool(self.policy & POLICY_DEBUG)

    @property
    def migrate_ma(self) -> bool:
        return bool(self.policy & POLICY_MIGRATE_MA)

    @property
    def smt_allowed(self) -> bool:
        return bool(self.policy & POLICY_SMT)

    @property
    def single_socket(self) -> bool:
        return bool(self.policy & POLICY_SINGLE_SOCKET)

    @property
    def smt_enabled(self) -> bool:
        return bool(self.platform_info & 0x1)

    @property
    def tsme_enabled(self) -> bool:
        return bool(self.platform_info & 0x2)

    @property
    def has_migration_agent(self) -> bool:
        return self.report_id_ma != b"\xff" * 32


def _layout_for(version: int, family: int | None, turin_hint: bool) -> Layout:
    # v2 reports carry no CPUID bytes; they only come from Milan/Genoa firmware, unless the
    # caller knows the product (from the VCEK issuer) and says it is Turin.
    if family == 0x1A or (family is None and turin_hint):
        return "turin"
    return "milan-genoa"


def parse_report(data: bytes, *, turin: bool = False) -> SnpReport:
    """Parse a 1184-byte report; raises :class:`MalformedEvidence` naming the bad field.

    ``turin`` only matters for v2 reports, which carry no CPUID family: it selects the Turin
    TCB_VERSION layout.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError("report must be bytes")
    data = bytes(data)
    if len(data) != REPORT_SIZE:
        raise MalformedEvidence(
            f"SEV-SNP report must be {REPORT_SIZE} bytes, got {len(data)}")
    version, guest_svn, policy = struct.unpack_from("<IIQ", data, 0x000)
    if version not in SUPPORTED_VERSIONS:
        raise MalformedEvidence(
            f"SEV-SNP report version {version} is not supported (expected 2, 3 or 5)")
    vmpl, signature_algo = struct.unpack_from("<II", data, 0x030)
    platform_info, key_info = struct.unpack_from("<QI", data, 0x040)
    if version >= 3:
        fam, mod, step = data[0x188], data[0x189], data[0x18A]
        family: int | None = fam
    else:
        fam = mod = step = None
        family = None
    layout = _layout_for(version, family, turin)

    def tcb(off: int) -> TcbVersion:
        return TcbVersion.decode(data[off:off + 8], layout)

    cur_build, cur_minor, cur_major = data[0x1E8], data[0x1E9], data[0x1EA]
    com_build, com_minor, com_major = data[0x1EC], data[0x1ED], data[0x1EE]
    launch_mit = current_mit = None
    if version >= 5:
        launch_mit, current_mit = struct.unpack_from("<QQ", data, 0x1F8)
    sig = data[SIGNED_SIZE:]
    r = int.from_bytes(sig[0:_COMPONENT_SIZE], "little")
    s = int.from_bytes(sig[_COMPONENT_SIZE:2 * _COMPONENT_SIZE], "little")
    # P-384 scalars fit in 48 bytes: the top 24 bytes of each component and the tail are zero.
    tail_zero = (
        not any(sig[48:_COMPONENT_SIZE])
        and not any(sig[_COMPONENT_SIZE + 48:2 * _COMPONENT_SIZE])
        and not any(sig[2 * _COMPONENT_SIZE:])
    )
    return SnpReport(
        raw=data,
        version=version,
        guest_svn=guest_svn,
        policy=policy,
        family_id=data[0x010:0x020],
        image_id=data[0x020:0x030],
        vmpl=vmpl,
        signature_algo=signature_algo,
        current_tcb=tcb(0x038),
        platform_info=platform_info,
        key_info=key_info,
        report_data=data[0x050:0x090],
        measurement=data[0x090:0x0C0],
        host_data=data[0x0C0:0x0E0],
        id_key_digest=data[0x0E0:0x110],
        author_key_digest=data[0x110:0x140],
        report_id=data[0x140:0x160],
        report_id_ma=data[0x160:0x180],
        reported_tcb=tcb(0x180),
        cpuid_fam_id=fam,
        cpuid_mod_id=mod,
        cpuid_step=step,
        chip_id=data[0x1A0:0x1E0],
        committed_tcb=tcb(0x1E0),
        current_version=(cur_major, cur_minor, cur_build),
        committed_version=(com_major, com_minor, com_build),
        launch_tcb=tcb(0x1F0),
        launch_mit_vector=launch_mit,
        current_mit_vector=current_mit,
        signature_r=r,
        signature_s=s,
        signature_tail_zero=tail_zero,
        layout=layout,
    )
