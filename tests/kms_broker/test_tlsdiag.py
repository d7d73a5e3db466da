"""kms_broker/tlsdiag.check_local without a broker: what it refuses, and that it leaves a
chain it cannot judge (through an intermediate) to the handshake."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from kms_broker.certs import create_ca, issue
from kms_broker.tlsdiag import TlsProblem, check_local


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    create_ca(tmp_path)
    issue(tmp_path, tmp_path, role="tenant", ident="acme")
    return tmp_path


def test_good_material_passes(pki: Path) -> None:
    check_local(pki / "ca.pem", pki / "tenant-acme.pem", pki / "tenant-acme.key", role="tenant")


def test_expired_and_not_yet_valid(pki: Path) -> None:
    args = (pki / "ca.pem", pki / "tenant-acme.pem", pki / "tenant-acme.key")
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=400)
    with pytest.raises(TlsProblem, match="expired on"):
        check_local(*args, role="tenant", now=later)
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)
    with pytest.raises(TlsProblem, match="not valid before"):
        check_local(*args, role="tenant", now=earlier)


def test_wrong_role_and_foreign_key(pki: Path, tmp_path: Path) -> None:
    with pytest.raises(TlsProblem, match="needs an operator certificate"):
        check_local(pki / "ca.pem", pki / "tenant-acme.pem", pki / "tenant-acme.key",
                    role="operator")
    issue(pki, pki, role="node", ident="n1")
    with pytest.raises(TlsProblem, match="does not belong to the certificate"):
        check_local(pki / "ca.pem", pki / "tenant-acme.pem", pki / "node-n1.key", role="tenant")


def test_namesake_ca_with_another_key_is_unknown_ca(pki: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    create_ca(other)  # the same default name, another key
    with pytest.raises(TlsProblem, match="unknown CA"):
        check_local(other / "ca.pem", pki / "tenant-acme.pem", pki / "tenant-acme.key",
                    role="tenant")
    # a bundle that holds the right CA too is fine
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes((other / "ca.pem").read_bytes() + (pki / "ca.pem").read_bytes())
    check_local(bundle, pki / "tenant-acme.pem", pki / "tenant-acme.key", role="tenant")
    # a CA of another name (the certificate may chain through an intermediate): not judged
    named = tmp_path / "named"
    create_ca(named, name="another root")
    check_local(named / "ca.pem", pki / "tenant-acme.pem", pki / "tenant-acme.key",
                role="tenant")
