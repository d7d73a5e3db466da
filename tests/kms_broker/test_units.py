"""Fast unit tests of the broker's building blocks (no sockets)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from kms_broker.config import ConfigError, load_config, read_secret_file
from kms_broker.domain.model import Grant, Lease, Node, Session, Tenant
from kms_broker.encoding import canonical_json, parse_canonical_json
from kms_broker.errors import STATUS_TABLE, status_for
from kms_broker.grants import GrantDocument, InvalidGrantSignature, sign_grant, verify_grant
from kms_broker.hsm.fake import FakeHsm
from kms_broker.identity import identity_from_certificate
from kms_broker.state.sqlite import MIGRATIONS, SqliteRepository
from kms_broker.tokens import InvalidToken, TokenClaims, TokenVerifier, issue_token
from tests.kms_broker.pki import DevPki

DIGEST = "ab" * 32


def _grant(**kw) -> GrantDocument:
    fields = dict(grant_id="g1", tenant_id="acme", dataset_id="ds1", job_id="j1",
                  policy_digest=DIGEST, max_nodes=2, expires_unix_ms=2_000_000_000_000)
    return GrantDocument(**{**fields, **kw})


def test_grant_signature_round_trip_and_tamper() -> None:
    key = Ed25519PrivateKey.generate()
    pub = key.public_key().public_bytes_raw()
    doc, sig = sign_grant(_grant(), key)
    assert verify_grant(doc, sig, pub) == _grant()
    with pytest.raises(InvalidGrantSignature):
        verify_grant(doc.replace(b'"max_nodes":2', b'"max_nodes":9'), sig, pub)
    with pytest.raises(InvalidGrantSignature):
        verify_grant(doc, sig, Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    with pytest.raises(ValueError, match="canonical"):
        verify_grant(doc.replace(b",", b", ", 1), sig, pub)
    with pytest.raises(ValueError, match="at most 4096"):
        verify_grant(b"{" + b" " * 5000 + b"}", sig, pub)
    with pytest.raises(ValueError, match="64 bytes"):
        verify_grant(doc, sig[:10], pub)


@pytest.mark.parametrize("bad", [
    {"max_nodes": 0}, {"max_nodes": 2000}, {"policy_digest": "xyz"}, {"dataset_id": "../x"},
    {"expires_unix_ms": -1},
])
def test_grant_fields_are_validated(bad) -> None:
    with pytest.raises(ValueError):
        _grant(**bad)


def test_canonical_json_rejects_floats_and_non_objects() -> None:
    assert parse_canonical_json(canonical_json({"b": 1, "a": "x"}), what="t", max_size=99)
    with pytest.raises(ValueError, match="floats"):
        parse_canonical_json(b'{"a":1.5}', what="t", max_size=99)
    with pytest.raises(ValueError, match="object"):
        parse_canonical_json(b"[1]", what="t", max_size=99)


def test_tokens_verify_expire_and_reject_forgeries() -> None:
    hsm, other = FakeHsm(), FakeHsm()
    claims = TokenClaims(session_id="s1", node_id="n1", node_key=b"\x04" + b"k" * 64,
                         job_id="j1", tenant_scope="", claims_digest="00" * 32, iat=1000,
                         exp=61_000)
    token = issue_token(claims, hsm.sign)
    verifier = TokenVerifier(hsm.signing_public_key())
    assert verifier.verify(token, now_ms=2000) == claims
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(token, now_ms=61_000)
    with pytest.raises(InvalidToken, match="signature"):
        TokenVerifier(other.signing_public_key()).verify(token, now_ms=2000)
    with pytest.raises(InvalidToken, match="signature"):
        verifier.verify(token.replace(b'"n1"', b'"n2"'), now_ms=2000)
    with pytest.raises(InvalidToken, match="length"):
        verifier.verify(b"\xff\xff" + b"x" * 10, now_ms=2000)


def test_sqlite_repository(tmp_path: Path) -> None:
    repo = SqliteRepository(tmp_path / "db")
    assert repo.schema_version() == len(MIGRATIONS)
    repo.close()
    repo = SqliteRepository(tmp_path / "db")  # migrations are idempotent
    repo.add_tenant(Tenant(tenant_id="acme", signing_public_key=b"k" * 32, kek_version=1))
    from kms_broker.domain.errors import AlreadyExists

    with pytest.raises(AlreadyExists):
        repo.add_tenant(Tenant(tenant_id="acme", signing_public_key=b"k" * 32, kek_version=1))
    repo.put_node(Node(node_id="n1", tenant_scope="", ak_public=b"", ek_certificate=b""))
    repo.add_session(Session(session_id="s1", node_id="n1", job_id="j", nonce=b"n" * 32,
                             expires_ms=10))
    repo.put_node(Node(node_id="n2", tenant_scope="", ak_public=b"", ek_certificate=b""))
    assert repo.consume_session("s1", "n2").used is False  # another node's: not consumed
    assert repo.consume_session("s1", "n1").used is False
    assert repo.consume_session("s1", "n1").used is True  # single use
    assert repo.consume_session("nope", "n1") is None
    with pytest.raises(AlreadyExists):  # foreign key: unknown node
        repo.add_session(Session(session_id="s2", node_id="ghost", job_id="j",
                                 nonce=b"n" * 32, expires_ms=10))
    repo.add_grant(Grant(grant_id="g", tenant_id="acme", dataset_id="d", job_id="j",
                         policy_digest=DIGEST, max_nodes=1, expires_ms=100), b"doc", b"sig")
    for i, node in enumerate(("n1", "n1", "n2")):
        repo.add_lease(Lease(lease_id=f"l{i}", node_id=node, grant_id="g", tenant_id="acme",
                             dataset_id="d", expires_ms=50))
    assert repo.active_lease_nodes("acme", "g", now_ms=10) == {"n1", "n2"}
    assert repo.active_lease_nodes("acme", "g", now_ms=60) == set()
    revoked = repo.revoke_leases(now_ms=10, node_id="n1")
    assert sorted(le.lease_id for le in revoked) == ["l0", "l1"]
    assert repo.active_lease_nodes("acme", "g", now_ms=10) == {"n2"}
    with repo._db:
        mode = repo._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_identity_from_certificates(tmp_path: Path) -> None:
    pki = DevPki(tmp_path)
    cert, _ = pki.issue("node", "n1")
    assert str(identity_from_certificate(cert.read_bytes())) == "node:n1"
    cert, _ = pki.issue("tenant", "x", uri="urn:other:1", cn="tenant:acme")
    assert str(identity_from_certificate(cert.read_bytes())) == "tenant:acme"
    cert, _ = pki.issue("node", "y", uri="urn:other:1", cn="just a name")
    assert identity_from_certificate(cert.read_bytes()) is None
    assert identity_from_certificate(b"not a cert") is None


def test_error_table_covers_every_domain_error() -> None:
    import grpc

    from kms_broker.domain import errors

    names = {n for n in errors.__all__ if n not in ("BrokerError", "RuleOutcome")}
    assert {c.__name__ for c in STATUS_TABLE} == names
    assert status_for(errors.InvalidArgument("x"))[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert status_for(RuntimeError("secret detail")) == (grpc.StatusCode.INTERNAL,
                                                         "internal error")


def test_pin_file_must_be_private(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    with pytest.raises(ConfigError, match="0600"):
        read_secret_file(pin)
    pin.chmod(0o600)
    assert read_secret_file(pin) == bytearray(b"1234")


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "b.yaml"
    cfg.write_text("bogus: 1\n")
    with pytest.raises(ConfigError, match="bogus"):
        load_config(cfg)
    cfg.write_text("state_dir: s\ntls: {ca: a, cert: b, key: c}\nhsm: {backend: fake}\n"
                   "metrics_port: -4\n")
    with pytest.raises(ConfigError, match="metrics_port"):
        load_config(cfg)


def test_gen_protos_check_detects_stale_stubs(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gen_protos", Path(__file__).parents[2] / "scripts" / "gen_protos.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.main(["--check"]) == 0
    fresh = tmp_path / "fresh"
    gen.generate(gen.TARGETS[0], fresh)
    copy = tmp_path / "copy"
    shutil.copytree(fresh, copy)
    assert gen.differences(fresh, copy) == []
    stub = copy / "kmsbroker" / "v1" / "broker_pb2.pyi"
    stub.write_text(stub.read_text() + "# edited\n")
    os.remove(copy / "kmsbroker" / "v1" / "broker_pb2_grpc.py")
    assert gen.differences(fresh, copy) == [
        "missing: kmsbroker/v1/broker_pb2_grpc.py", "differs: kmsbroker/v1/broker_pb2.pyi"]


def test_domain_imports_neither_grpc_nor_pkcs11() -> None:
    import subprocess
    import sys

    code = ("import sys, kms_broker.domain.node_flow, kms_broker.domain.admin, "
            "kms_broker.state.sqlite, kms_broker.audit, kms_broker.grants, kms_broker.tokens; "
            "print(sorted(m for m in ('grpc', 'pkcs11', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[2]).stdout.strip()
    assert out == "[]"


def test_sqlite_list_nodes_with_their_revoked_state(tmp_path: Path) -> None:
    repo = SqliteRepository(tmp_path / "db")
    assert repo.list_nodes() == []
    for node_id in ("n2", "n1", "n3"):
        repo.put_node(Node(node_id=node_id, tenant_scope="acme" if node_id == "n3" else "",
                           ak_public=b"a", ek_certificate=b"e", enrolled_ms=5))
    repo.revoke_node("n2")
    repo.revoke_node("n3")
    repo.reinstate_node("n3")
    nodes = repo.list_nodes()
    assert [n.node_id for n in nodes] == ["n1", "n2", "n3"]
    assert [(n.revoked, n.reinstated) for n in nodes] == [(False, False), (True, False),
                                                           (True, True)]
    assert nodes[2].tenant_scope == "acme" and nodes[0].enrolled_ms == 5
    repo.close()


def test_sqlite_migration_records_the_manifest_key_version_only_when_unambiguous(
        tmp_path: Path) -> None:
    """A state directory from before the manifest's key version was recorded: a dataset with
    one key version gets it; one with several stays unknown (0: the broker then names no
    manifest, and the job must)."""
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY)")
    for version, script in enumerate(MIGRATIONS[:4], start=1):
        db.executescript(script)
        db.execute("INSERT INTO schema_migrations VALUES (?)", (version,))
    db.execute("INSERT INTO tenants VALUES ('acme', x'00', 1, 'active', 0, x'')")
    for ds, versions in (("one", (1,)), ("two", (1, 2))):
        db.execute("INSERT INTO datasets VALUES ('acme', ?, 0, 1, 'manifests/m', '', '[]', "
                   "'active', 0)", (ds,))
        for v in versions:
            db.execute("INSERT INTO dataset_shares VALUES ('acme', ?, ?, 1, x'00')", (ds, v))
    db.commit()
    db.close()
    repo = SqliteRepository(path)
    assert repo.schema_version() == len(MIGRATIONS)
    assert repo.get_dataset("acme", "one").manifest_key_version == 1
    assert repo.get_dataset("acme", "two").manifest_key_version == 0
    repo.close()
