"""``state:`` in broker.yaml: SQLite by default, or a PostgreSQL URL that carries no password;
``open_repository`` builds the store it names (a real PostgreSQL from the system binaries)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kms_broker.app import open_repository
from kms_broker.config import ConfigError, load_config
from kms_broker.domain.errors import Unavailable
from kms_broker.state.postgres import PostgresRepository, safe_dsn
from kms_broker.state.sqlite import SqliteRepository
from tests.kms_broker.pg_fixtures import fresh_database, postgres_cluster  # noqa: F401

BASE = "state_dir: s\ntls: {ca: a, cert: b, key: c}\nhsm: {backend: fake}\n"


def _load(tmp_path: Path, extra: str):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(BASE + extra)
    return load_config(cfg)


def test_state_defaults_to_sqlite(tmp_path: Path) -> None:
    assert _load(tmp_path, "").state == "sqlite"
    assert _load(tmp_path, "state: sqlite\n").state == "sqlite"
    url = "postgresql://kms@db.internal:5432/broker?passfile=/etc/kms/pgpass"
    assert _load(tmp_path, f"state: '{url}'\n").state == url


@pytest.mark.parametrize("value, message", [
    ("mysql://x/y", "sqlite or a postgresql"),
    ("42", "sqlite or a postgresql"),
    ("'postgresql://kms:hunter2@db/broker'", "must not carry a password"),
    ("'postgresql://kms@db/broker?password=hunter2'", "must not carry a password"),
    ("'postgresql://kms@db:99999/broker'", "not a valid URL"),
    ("'postgresql:///broker'", "needs a host"),
])
def test_bad_state_is_refused_without_echoing_secrets(tmp_path: Path, value: str,
                                                      message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _load(tmp_path, f"state: {value}\n")
    assert "hunter2" not in str(info.value)


def test_open_repository_builds_the_named_store(tmp_path: Path,
                                                postgres_cluster) -> None:  # noqa: F811
    cfg = _load(tmp_path, "")
    cfg.state_dir.mkdir()
    repo = open_repository(cfg)
    try:
        assert isinstance(repo, SqliteRepository)
        assert (tmp_path / "s" / "broker.db").exists()
    finally:
        repo.close()
    dsn = fresh_database(postgres_cluster)
    repo = open_repository(_load(tmp_path, f"state: '{dsn}'\n"))
    try:
        assert isinstance(repo, PostgresRepository) and repo.schema_version() >= 1
    finally:
        repo.close()


def test_unreachable_postgresql_is_unavailable_and_names_no_password(tmp_path: Path) -> None:
    from compose.ports import free_port

    dsn = f"postgresql://kms@127.0.0.1:{free_port()}/broker?connect_timeout=1"
    with pytest.raises(Unavailable, match="cannot connect") as info:
        PostgresRepository(dsn, pool_timeout_s=1)
    assert "password" not in str(info.value)
    assert "hunter2" not in safe_dsn("postgresql://kms:hunter2@h/db")
