"""kms_broker/clientconfig.py without a broker: precedence flag > environment > profile per
setting, the --tls directory's certificate choice, HOST:PORT, and profile file errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kms_broker.clientconfig import ClientConfigError, parse_address, resolve


def _pki(directory: Path, *names: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_text("ca")
    for name in names:
        (directory / f"{name}.pem").write_text("cert")
        (directory / f"{name}.key").write_text("key")
    return directory


@pytest.mark.parametrize("text,host,port", [("b.example:7001", "b.example", 7001),
                                            ("127.0.0.1:1", "127.0.0.1", 1),
                                            ("[::1]:7002", "::1", 7002)])
def test_addresses(text: str, host: str, port: int) -> None:
    assert parse_address(text) == (host, port)


@pytest.mark.parametrize("text", ["127.0.0.1", "b.example", "b:0", "b:65536", ":7001",
                                  "b:x", "[::1]", "a b:1"])
def test_bad_addresses(text: str) -> None:
    with pytest.raises(ClientConfigError, match="must be HOST:PORT"):
        parse_address(text)


def test_precedence_per_setting(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki", "tenant-acme", "tenant-other", "operator-ops")
    profile = tmp_path / "profiles.yaml"
    profile.write_text(yaml.safe_dump({"default": {
        "brokers": ["p:1", "p:2"], "tls": "pki", "tenant": "acme", "server_name": "prof"}}))
    env = {"KMS_BROKER_PROFILE_FILE": str(profile)}
    c = resolve({}, role="tenant", environ=env)
    assert c.brokers == ("p:1", "p:2") and c.tenant == "acme" and c.server_name == "prof"
    assert (c.ca, c.cert, c.key) == (pki / "ca.pem", pki / "tenant-acme.pem",
                                     pki / "tenant-acme.key")
    assert c.sources["brokers"].startswith("profile 'default'")

    env2 = {**env, "KMS_BROKER_TENANT": "other", "KMS_BROKER_ADDRESSES": "e:1, e:2"}
    c = resolve({}, role="tenant", environ=env2)
    assert c.tenant == "other" and c.brokers == ("e:1", "e:2")
    assert c.cert == pki / "tenant-other.pem"  # the directory follows the tenant in force

    c = resolve({"brokers": ["f:1"], "tenant": "acme", "cert": tmp_path / "mine.pem"},
                role="tenant", environ=env2)
    assert c.brokers == ("f:1",) and c.tenant == "acme" and c.cert == tmp_path / "mine.pem"
    assert c.key == pki / "tenant-acme.key" and c.sources["brokers"] == "flag"

    c = resolve({}, role="operator", environ=env)
    assert c.cert == pki / "operator-ops.pem"


def test_tls_directory_must_be_unambiguous(tmp_path: Path) -> None:
    pki = _pki(tmp_path / "pki", "a", "b")
    with pytest.raises(ClientConfigError, match="cannot tell which client certificate"):
        resolve({"tls": pki}, role="tenant", environ={})
    single = _pki(tmp_path / "one", "whatever")
    assert resolve({"tls": single}, role=None, environ={}).cert == single / "whatever.pem"


def test_profile_errors(tmp_path: Path) -> None:
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"default": {"broker": ["x:1"]}}))
    with pytest.raises(ClientConfigError, match="unknown key"):
        resolve({"profile_file": profile}, environ={})
    with pytest.raises(ClientConfigError, match="profile 'nope' is not in"):
        resolve({"profile_file": profile, "profile": "nope"}, environ={})
    with pytest.raises(ClientConfigError, match="does not exist"):
        resolve({"profile_file": tmp_path / "missing.yaml"}, environ={})
    # no profile file at the default place is fine: nothing comes from it
    c = resolve({}, environ={"XDG_CONFIG_HOME": str(tmp_path / "none")})
    assert c.brokers == () and c.ca is None
    with pytest.raises(ClientConfigError, match="no broker address"):
        c.require_brokers()
    with pytest.raises(ClientConfigError, match="no client TLS material"):
        c.require_tls()


def test_duplicate_broker_and_unix_socket(tmp_path: Path) -> None:
    with pytest.raises(ClientConfigError, match="given twice"):
        resolve({"brokers": ["a:1", "a:1"]}, environ={})
    assert resolve({"brokers": ["unix:/run/b.sock"]}, environ={}).brokers == ("unix:/run/b.sock",)
