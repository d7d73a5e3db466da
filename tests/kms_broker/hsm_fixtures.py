"""Pytest fixtures for HSM backends: a real SoftHSM2 token, a Pkcs11Hsm on it, a FakeHsm.

The fixtures are named ``softhsm_config``, ``softhsm_token``, ``pkcs11_hsm`` and ``fake_hsm``;
the functions carry a ``_fixture`` suffix so that importing them does not shadow the argument
names. Use them from any test module or conftest with::

    from tests.kms_broker.hsm_fixtures import (  # noqa: F401 - registers the fixtures
        fake_hsm_fixture, pkcs11_hsm_fixture, softhsm_config_fixture, softhsm_token_fixture,
    )

(``pkcs11_hsm`` needs ``softhsm_token`` which needs ``softhsm_config``: import all three), or
list ``"tests.kms_broker.hsm_fixtures"`` in ``pytest_plugins`` of the root conftest.

SoftHSM reads ``SOFTHSM2_CONF`` once per process, so every test in a pytest process shares one
SoftHSM configuration (one token directory under pytest's temporary directory); each
``softhsm_token`` is a fresh token with its own label and random PINs inside it. A broker run
as a subprocess gets the same configuration by passing ``token.env()`` to it.

``token.outage()`` is a context manager that makes the token really unavailable (its directory
is moved away, so SoftHSM fails) and restores it on exit.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_broker.hsm import softhsm
from kms_broker.hsm.fake import FakeHsm
from kms_broker.hsm.pkcs11_hsm import Pkcs11Hsm

__all__ = [
    "SoftHsmToken",
    "fake_hsm",
    "fake_hsm_fixture",
    "pkcs11_hsm",
    "pkcs11_hsm_fixture",
    "softhsm_config",
    "softhsm_config_fixture",
    "softhsm_token",
    "softhsm_token_fixture",
]

_CONFIG: softhsm.SoftHsmConfig | None = None
_LABELS = itertools.count(1)


@dataclass(frozen=True, kw_only=True)
class SoftHsmToken:
    config: softhsm.SoftHsmConfig
    module_path: str
    label: str
    user_pin: str
    so_pin: str

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should see this token (a path, no secret)."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.config.config_path)}

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The token directory is gone inside the block (every token of this process)."""
        softhsm.make_token_unavailable(self.config)
        try:
            yield
        finally:
            softhsm.make_token_available(self.config)

    def open_hsm(self, **kwargs: object) -> Pkcs11Hsm:
        return Pkcs11Hsm(self.module_path, self.label, self.user_pin, **kwargs)  # type: ignore[arg-type]


@pytest.fixture(name="softhsm_config", scope="session")
def softhsm_config_fixture(tmp_path_factory: pytest.TempPathFactory) -> softhsm.SoftHsmConfig:
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = softhsm.write_config(tmp_path_factory.mktemp("softhsm"))
    softhsm.use_config(_CONFIG)
    return _CONFIG


@pytest.fixture(name="softhsm_token")
def softhsm_token_fixture(softhsm_config: softhsm.SoftHsmConfig) -> SoftHsmToken:
    label = f"test-{os.getpid()}-{next(_LABELS)}"
    user_pin = secrets.token_hex(8)
    so_pin = secrets.token_hex(8)
    softhsm.init_token(Path(softhsm_config.state_dir), label, so_pin, user_pin)
    return SoftHsmToken(
        config=softhsm_config,
        module_path=softhsm.find_module(),
        label=label,
        user_pin=user_pin,
        so_pin=so_pin,
    )


@pytest.fixture(name="pkcs11_hsm")
def pkcs11_hsm_fixture(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11Hsm]:
    hsm = softhsm_token.open_hsm()
    yield hsm
    hsm.close()


@pytest.fixture(name="fake_hsm")
def fake_hsm_fixture() -> Iterator[FakeHsm]:
    hsm = FakeHsm()
    yield hsm
    hsm.close()


# Plain names, for modules that import the fixtures without taking them as arguments.
softhsm_config = softhsm_config_fixture
softhsm_token = softhsm_token_fixture
pkcs11_hsm = pkcs11_hsm_fixture
fake_hsm = fake_hsm_fixture
