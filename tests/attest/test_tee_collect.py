"""Node-side TEE collection that can run without TEE hardware: the SEV-SNP certificate table
(auxblob) parser on the real VCEK/ASK vectors, and clear refusals where there is no TEE."""

from __future__ import annotations

import struct
import uuid
from pathlib import Path

import pytest

from attest.tee_collect import (
    TeeUnavailable,
    configfs_tsm_report,
    snp_certificates,
    tee_interfaces,
)

VECTORS = Path(__file__).resolve().parents[3] / "shared" / "vectors"
if not VECTORS.is_dir():
    VECTORS = Path("/work/shared/vectors")
VCEK = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd")
ASK = uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782")


def _table(entries: list[tuple[uuid.UUID, bytes]]) -> bytes:
    header_len = 24 * (len(entries) + 1)
    header, body = b"", b""
    for guid, der in entries:
        header += guid.bytes_le + struct.pack("<II", header_len + len(body), len(der))
        body += der
    return header + bytes(24) + body


def test_the_certificate_table_yields_the_vcek_and_ask() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    vcek = (VECTORS / "snp/virtee-sev/vcek_milan.der").read_bytes()
    ask = x509.load_pem_x509_certificates(
        (VECTORS / "snp/virtee-sev/cert_chain_milan").read_bytes())[0].public_bytes(
        Encoding.DER)
    certs = snp_certificates(_table([(VCEK, vcek), (ASK, ask)]))
    assert certs == {"vcek": vcek, "ask": ask}


def test_broken_certificate_tables_are_refused() -> None:
    vcek = (VECTORS / "snp/virtee-sev/vcek_milan.der").read_bytes()
    table = bytearray(_table([(VCEK, vcek)]))
    with pytest.raises(TeeUnavailable, match="not terminated"):
        snp_certificates(bytes(table[:20]))
    struct.pack_into("<I", table, 20, 10**6)  # length past the end
    with pytest.raises(TeeUnavailable, match="runs past"):
        snp_certificates(bytes(table))


def test_no_configfs_tsm_is_a_clear_refusal(tmp_path: Path) -> None:
    with pytest.raises(TeeUnavailable, match="no configfs-tsm"):
        configfs_tsm_report(bytes(64), root=tmp_path / "absent")
    with pytest.raises(ValueError):
        configfs_tsm_report(bytes(32), root=tmp_path)
    assert set(tee_interfaces()) == {"configfs_tsm", "tdx_guest", "sev_guest"}


def test_a_trainer_asking_for_composite_evidence_without_a_tee_says_why() -> None:
    from trainer.attested import AttestedKeySource
    from trainer.config import JobConfig
    from trainer.keysource import KeySourceUnavailable

    config = JobConfig.from_mapping({
        "job_id": "j", "tenant_id": "acme",
        "dataset": {"id": "d", "key_version": 1, "manifest": "m", "store": "/nonexistent"},
        "checkpoint": {"dir": "/nonexistent/ckpt"},
        "brokers": [{"address": "127.0.0.1:1", "ca": "/x", "cert": "/x", "key": "/x"}],
        "attestation": {"node_id": "n1", "evidence": "composite"},
    })
    assert config.attestation is not None and config.attestation.evidence == "composite"
    with pytest.raises(KeySourceUnavailable, match="no composite evidence on this node"):
        AttestedKeySource(config).evidence_for(bytes(32))
