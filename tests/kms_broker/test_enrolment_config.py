"""The broker's manufacturer-CA configuration for TPM enrolment (``ek_roots``,
``ek_intermediates``): paths relative to the config file, clear errors for bad values."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from attest.swtpm import LocalEkCa
from kms_broker.app import load_ek_trust
from kms_broker.config import ConfigError, load_config
from tests.attest.conftest import ek_ca  # noqa: F401 - fixture


def _config(tmp_path: Path, **extra: object) -> Path:
    doc = {"state_dir": "state", "tls": {"ca": "ca.pem", "cert": "b.pem", "key": "b.key"},
           "hsm": {"backend": "fake"}, **extra}
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_ek_roots_and_intermediates_load(tmp_path: Path, ek_ca: LocalEkCa) -> None:  # noqa: F811
    (tmp_path / "root.pem").write_bytes(ek_ca.root_cert_pem)
    (tmp_path / "issuer.pem").write_bytes(ek_ca.issuer_cert_pem)
    config = load_config(_config(tmp_path, ek_roots=["root.pem"], ek_intermediates="issuer.pem"))
    assert config.ek_roots == (tmp_path / "root.pem",)
    assert config.ek_intermediates == (tmp_path / "issuer.pem",)
    trust = load_ek_trust(config)
    assert len(trust.roots) == 1 and len(trust.intermediates) == 1


def test_no_ek_roots_means_no_trust_store(tmp_path: Path) -> None:
    assert load_ek_trust(load_config(_config(tmp_path))) is None
    with pytest.raises(ConfigError, match="ek_intermediates needs ek_roots"):
        load_ek_trust(load_config(_config(tmp_path, ek_intermediates=["x.pem"])))


@pytest.mark.parametrize("value", [{"a": 1}, 7, [""]])
def test_bad_ek_roots_value_is_a_config_error(tmp_path: Path, value: object) -> None:
    with pytest.raises(ConfigError, match="ek_roots"):
        load_config(_config(tmp_path, ek_roots=value))


def test_unreadable_or_non_pem_ek_roots_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_ek_trust(load_config(_config(tmp_path, ek_roots=["missing.pem"])))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="not PEM certificates"):
        load_ek_trust(load_config(_config(tmp_path, ek_roots=["junk.pem"])))
