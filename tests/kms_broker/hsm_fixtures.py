"""Pytest fixtures for HSM backends: a real SoftHSM2 token, a Pkcs11Hsm on it, a FakeHsm.

Use from any test module (or a conftest) with::

    from tests.kms_broker.hsm_fixtures import softhsm_token, pkcs11_hsm, fake_hsm  # noqa: F401

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

__all__ = ["SoftHsmToken", "fake_hsm", "pkcs11_hsm", "softhsm_config", "softhsm_token"]

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


@pytest.fixture(scope="session")
def softhsm_config(tmp_path_factory: pytest.TempPathFactory) -> softhsm.SoftHsmConfig:
    global _CONFIG
    if _CONFIG is None:
        _CONFIG = softhsm.write_config(tmp_path_factory.mktemp("softhsm"))
    softhsm.use_config(_CONFIG)
    return _CONFIG


@pytest.fixture
def softhsm_token(softhsm_config: softhsm.SoftHsmConfig) -> SoftHsmToken:
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


@pytest.fixture
def pkcs11_hsm(softhsm_token: SoftHsmToken) -> Iterator[Pkcs11Hsm]:
    hsm = softhsm_token.open_hsm()
    yield hsm
    hsm.close()


@pytest.fixture
def fake_hsm() -> Iterator[FakeHsm]:
    hsm = FakeHsm()
    yield hsm
    hsm.close()
