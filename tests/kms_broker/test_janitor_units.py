"""Fast tests of the janitor's rules (FakeHsm, manual clock): what is purged when, and that an
HSM outage leaves the rows of the import keys it could not destroy."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from attest.policy import Policy
from kms_broker.audit import AuditLog
from kms_broker.domain.admin import Admin
from kms_broker.domain.clock import ManualClock, SystemRandom
from kms_broker.domain.deps import BrokerDeps, Settings
from kms_broker.domain.errors import Unavailable
from kms_broker.domain.janitor import Janitor
from kms_broker.domain.node_flow import NodeFlow
from kms_broker.hsm.fake import FakeHsm
from kms_broker.hsm.interface import HsmUnavailable
from kms_broker.state.sqlite import SqliteRepository
from tests.kms_broker.testing_server import enrol_test_node
from tests.kms_broker.verifiers import JsonClaimsVerifier

SETTINGS = Settings(session_ttl_ms=1_000, token_ttl_ms=2_000, lease_ttl_ms=5_000,
                    upload_ttl_ms=3_000)


@pytest.fixture
def parts(tmp_path: Path):
    clock, hsm = ManualClock(), FakeHsm()
    repo = SqliteRepository(tmp_path / "db")
    deps = BrokerDeps(repo=repo, hsm=hsm, clock=clock, random=SystemRandom(),
                      audit=AuditLog(tmp_path / "audit.log", now_ms=clock.now_ms, sign=hsm.sign),
                      verifiers={"test-json": JsonClaimsVerifier()},
                      load_policy=Policy.from_yaml, settings=SETTINGS)
    admin = Admin(deps)
    admin.register_tenant("acme", Ed25519PrivateKey.generate().public_key().public_bytes_raw())
    enrol_test_node(deps, actor="operator:ops", node_id="n1", tenant_scope="")
    janitor = Janitor(repo=repo, hsm=hsm, clock=clock, settings=SETTINGS)
    return admin, NodeFlow(deps), janitor, clock, hsm, repo


def _count(repo: SqliteRepository, table: str) -> int:
    with repo._db:
        return repo._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]


def test_expired_rows_go_a_token_ttl_after_expiry_with_their_import_keys(parts) -> None:
    admin, flow, janitor, clock, hsm, repo = parts
    for i in range(5):
        admin.open_upload(tenant_id="acme", dataset_id=f"d{i}", key_version=1, share_index=0,
                          share_count=1)
        flow.challenge(node_id="n1", job_id="j")
    assert len(hsm._imports) == 5 and _count(repo, "datasets") == 5
    clock.advance(SETTINGS.session_ttl_ms + SETTINGS.token_ttl_ms - 1)
    assert janitor.run_once().sessions == 0  # a token from them could still be valid
    clock.advance(2)
    assert janitor.run_once().sessions == 5
    assert _count(repo, "uploads") == 5  # uploads live longer
    clock.advance(SETTINGS.upload_ttl_ms)
    run = janitor.run_once()
    assert run.uploads == 5 and hsm._imports == {}
    assert _count(repo, "uploads") == 0 and _count(repo, "datasets") == 0


def test_an_hsm_outage_keeps_the_rows_of_keys_not_destroyed(parts) -> None:
    admin, _flow, janitor, clock, hsm, repo = parts
    admin.open_upload(tenant_id="acme", dataset_id="d", key_version=1, share_index=0,
                      share_count=1)
    clock.advance(SETTINGS.upload_ttl_ms + SETTINGS.token_ttl_ms + 1)
    hsm.fail_next(1, HsmUnavailable)
    with pytest.raises(Unavailable):
        janitor.run_once()
    assert _count(repo, "uploads") == 1 and len(hsm._imports) == 1
    assert janitor.run_once().uploads == 1 and hsm._imports == {}
