"""The swtpm harness: own state and EK certificate per node, clean start and stop."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509

from attest.swtpm import LocalEkCa, Swtpm, SwtpmError, manufacture
from attest.tpm2.node import TpmNode

pytestmark = pytest.mark.integration


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone once reaped, which stop() does
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def test_start_serve_stop_leaves_no_process(tmp_path, ek_ca):
    state = manufacture(tmp_path / "node", ek_ca)
    with Swtpm(state) as tpm:
        pid = tpm.pid
        assert pid is not None and _alive(pid)
        with TpmNode(tpm.tcti) as node:
            assert len(node.read_pcrs(range(8))) == 8
    assert not os.path.exists(f"/proc/{pid}")
    tpm.stop()  # idempotent


def test_each_node_has_its_own_state_port_and_ek(tmp_path, ek_ca):
    a = manufacture(tmp_path / "a", ek_ca)
    b = manufacture(tmp_path / "b", ek_ca)
    with Swtpm(a) as ta, Swtpm(b) as tb:
        assert ta.port != tb.port
        with TpmNode(ta.tcti) as na, TpmNode(tb.tcti) as nb:
            assert na.ek_public() != nb.ek_public()
            assert na.ak_public() != nb.ak_public()
            cert_a = x509.load_der_x509_certificate(na.ek_certificate())
            cert_b = x509.load_der_x509_certificate(nb.ek_certificate())
    assert cert_a.serial_number != cert_b.serial_number
    assert any(p.name.startswith("tpm2-") for p in a.iterdir())


def test_ek_certificate_is_signed_by_the_local_ca(swtpm, ek_ca):
    issuer = x509.load_pem_x509_certificate(ek_ca.issuer_cert_pem)
    root = x509.load_pem_x509_certificate(ek_ca.root_cert_pem)
    with TpmNode(swtpm.tcti) as node:
        cert = x509.load_der_x509_certificate(node.ek_certificate())
    cert.verify_directly_issued_by(issuer)
    issuer.verify_directly_issued_by(root)
    assert cert.not_valid_before_utc <= datetime.now(UTC) <= cert.not_valid_after_utc


def test_state_survives_a_restart(tmp_path, ek_ca):
    state = manufacture(tmp_path / "node", ek_ca)
    with Swtpm(state) as tpm, TpmNode(tpm.tcti) as node:
        ak_before = node.ak_public()
    with Swtpm(state) as tpm, TpmNode(tpm.tcti) as node:
        assert node.ak_public() == ak_before  # same seed, same AK: nothing to store


def test_manufacture_reports_swtpm_setup_errors(tmp_path):
    ca = LocalEkCa.create(tmp_path / "ca")
    ca.setup_config.write_text("create_certs_tool = /nonexistent/tool\n")
    with pytest.raises(SwtpmError, match="swtpm_setup failed"):
        manufacture(tmp_path / "node", ca)


def test_start_twice_is_refused(tmp_path, ek_ca):
    with Swtpm(manufacture(tmp_path / "n", ek_ca)) as tpm, pytest.raises(SwtpmError):
        tpm.start()


def test_a_relative_state_path_serves_like_an_absolute_one(tmp_path, ek_ca, monkeypatch):
    # swtpm given a relative --tpmstate answered tpm2-pytss's NVReadEK capability queries one
    # at a time and NVReadEK looped forever; the harness now hands swtpm absolute paths
    monkeypatch.chdir(tmp_path)
    state = manufacture(Path("rel"), ek_ca)
    assert state.is_absolute()
    with Swtpm(Path("rel")) as tpm:
        assert tpm.state_dir == tmp_path / "rel"
        with TpmNode(tpm.tcti) as node:
            cert = x509.load_der_x509_certificate(node.ek_certificate())
    assert cert.issuer == x509.load_pem_x509_certificate(ek_ca.issuer_cert_pem).subject
