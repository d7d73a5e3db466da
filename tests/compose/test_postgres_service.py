"""The docker-compose ``postgres`` service (profile ``postgres``) run by the local harness as
a process: it initialises its volume on first start, becomes healthy, serves the broker's
PostgreSQL repository through the password file it wrote, keeps its data across a restart,
and is not part of the default deployment."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from compose.local import LocalHarness
from compose.ports import free_port
from kms_broker.domain.model import Tenant
from kms_broker.state.postgres import PostgresRepository

COMPOSE_FILE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


@pytest.fixture
def harness() -> Iterator[tuple[LocalHarness, int]]:
    # the server runs as the postgres user when this is root: a run directory it can reach
    # (a pytest tmp_path sits under a 0700 directory of root's)
    top = Path(tempfile.mkdtemp(prefix="ct-compose-pg-"))
    top.chmod(0o711)
    port = free_port()
    h = LocalHarness(COMPOSE_FILE, top / "run", variables={"POSTGRES_PORT": str(port)},
                     profiles=("postgres",))
    try:
        yield h, port
    finally:
        h.down()
        shutil.rmtree(top, ignore_errors=True)


def test_postgres_is_optional() -> None:
    default = LocalHarness(COMPOSE_FILE, Path(tempfile.mkdtemp(prefix="ct-compose-")) / "r",
                           variables={})
    assert "postgres" not in default.enabled
    assert "provider-broker" in default.enabled


def test_postgres_service_serves_the_broker_state_and_keeps_it(harness) -> None:
    h, port = harness
    h.up(["postgres"], wait=True)
    root = h.run_dir / "roots" / "postgres" / "var" / "lib" / "postgres"
    passfile = root / "pgpass"
    assert passfile.exists() and (os.stat(passfile).st_mode & 0o077) == 0
    dsn = f"postgresql://ctrain@127.0.0.1:{port}/broker?passfile={passfile}&sslmode=disable"
    repo = PostgresRepository(dsn)
    try:
        repo.add_tenant(Tenant(tenant_id="acme", signing_public_key=b"k" * 32, kek_version=1))
    finally:
        repo.close()
    h.restart("postgres")
    h.wait_healthy("postgres")
    repo = PostgresRepository(dsn)
    try:
        assert repo.get_tenant("acme").kek_version == 1  # the volume kept it
    finally:
        repo.close()
    secret = passfile.read_text().strip().rsplit(":", 1)[1]
    assert secret not in h.logs("postgres")
