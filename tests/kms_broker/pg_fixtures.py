"""A real PostgreSQL for the broker tests, started from the system binaries
(:class:`compose.postgres.LocalPostgres`: initdb + pg_ctl in a temporary directory). One
cluster per test session; :func:`fresh_database` gives each test its own empty database;
``pg`` (tests/kms_broker/conftest.py) is a module's own cluster."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import psycopg
import pytest

from compose.postgres import DB_NAME, LocalPostgres

_names = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[LocalPostgres]:
    pg = LocalPostgres().start()
    try:
        yield pg
    finally:
        pg.destroy()


def fresh_database(pg: LocalPostgres, prefix: str = "t") -> str:
    """Create an empty database on ``pg``; its DSN (same user and password file)."""
    name = f"{prefix}{next(_names)}"
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")  # a generated name: nothing from outside
    return pg.dsn.replace(f"/{DB_NAME}?", f"/{name}?")


@pytest.fixture
def pg_dsn(postgres_cluster: LocalPostgres) -> str:
    return fresh_database(postgres_cluster)
