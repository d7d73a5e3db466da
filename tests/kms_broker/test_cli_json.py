"""``kms-broker --format json``: every printing command's output parsed and its fields
asserted, against a real broker subprocess; the client configuration from environment
variables and a profile file instead of flags; the README's documented forms
(``--tls DIR``, ``grant create --expires-in``, ``grant create --policy NAME``)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.kms_broker.conftest import REPO, enrol
from tests.kms_broker.test_cli import cli_broker, tls  # noqa: F401 - the module's broker
from tests.kms_broker.verifiers import POLICY_YAML, make_evidence

pytestmark = pytest.mark.integration


def cli(*args: str, env: dict[str, str] | None = None, status: int = 0
        ) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMS_BROKER_")}
    proc = subprocess.run([sys.executable, "-m", "kms_broker.cli", *args], cwd=REPO,
                          capture_output=True, text=True, check=False,
                          env={**base, **(env or {})})
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


def as_json(*args: str, env: dict[str, str] | None = None, status: int = 0) -> dict:
    proc = cli(*args, "--format", "json", env=env, status=status)
    return json.loads(proc.stdout)


def test_every_printing_command_speaks_json(cli_broker, tmp_path) -> None:  # noqa: F811
    broker, _, pki_dir = cli_broker
    state_home = tmp_path / "state"
    base_env = {"XDG_STATE_HOME": str(state_home), "XDG_CONFIG_HOME": str(tmp_path / "cfg")}
    key = tmp_path / "tenant.key"
    init = as_json("tenant", "init", "--key", str(key), env=base_env)
    assert init["key"] == str(key) and len(bytes.fromhex(init["public_key"])) == 32

    # the README's form: --tls DIR picks ca.pem and tenant-<tenant>.pem/.key from it
    who = ["--tenant", "acme", "--broker", broker.address, "--tls", str(pki_dir)]
    reg = as_json("tenant", "register", *who, "--tenant-key", str(key), env=base_env)
    assert reg == {"tenant": "acme", "brokers": [{"broker": broker.address, "kek_version": 1}]}

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"r{i}").write_bytes(secrets.token_bytes(1000 + i))
    store = tmp_path / "store"
    up = as_json("dataset", "upload", str(data), "--store", str(store), "--dataset", "dsj",
                 *who, "--tenant-key", str(key), env=base_env)
    assert up["dataset"] == "dsj" and up["key_version"] == 1 and up["num_records"] == 3
    assert up["plaintext_bytes"] == 3003 and up["holders"] == [broker.address]
    assert up["manifest"] and up["num_shards"] >= 1 and any(store.rglob("*"))

    listing = as_json("dataset", "list", *who, env=base_env)
    (row,) = [d for d in listing["datasets"] if d["dataset"] == "dsj"]
    assert row == {"broker": broker.address, "dataset": "dsj", "status": "active",
                   "key_versions": [1], "kek_version": 1, "share_index": 0, "share_count": 1,
                   "manifest": up["manifest"]}

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    put = as_json("policy", "put", str(policy), *who, env=base_env)
    assert len(put["digest"]) == 64 and put["brokers"][0]["digest"] == put["digest"]
    lint = as_json("policy", "lint", str(policy), env=base_env)
    assert lint["ok"] is True and lint["digest"] == put["digest"]

    # a grant names the policy by name (recorded by `policy put`) and uses --expires-in
    grant = as_json("grant", "create", "--dataset", "dsj", "--job", "j1", "--policy",
                    put["policy"], "--expires-in", "600", "--grant-id", "gj1", *who,
                    "--tenant-key", str(key), env=base_env)
    assert grant["policy_digest"] == put["digest"] and grant["grant_id"] == "gj1"
    assert grant["brokers"] == [{"broker": broker.address, "grant_id": "gj1"}]
    by_file = as_json("grant", "create", "--dataset", "dsj", "--job", "j2", "--policy",
                      str(policy), *who, "--tenant-key", str(key), env=base_env)
    assert by_file["policy_digest"] == put["digest"] and by_file["grant_id"].startswith("g-")

    revoke = as_json("grant", "revoke", "gj1", *who, env=base_env)
    assert revoke == {"grant_id": "gj1", "brokers": [{"broker": broker.address,
                                                       "leases_ended": 0}]}
    rotate = as_json("dataset", "rotate", *who, env=base_env)
    assert rotate["brokers"][0]["kek_version"] == 2
    assert rotate["brokers"][0]["shares_rewrapped"] >= 1

    tail = as_json("audit", "tail", "--state-dir", str(broker.state_dir), "--limit", "3")
    assert len(tail["records"]) == 3 and all("event" in r for r in tail["records"])
    online = as_json("audit", "tail", *who, "--limit", "2", env=base_env)
    assert len(online["records"]) == 2 and online["records"][0]["broker"] == broker.address
    verify = as_json("audit", "verify", *who, env=base_env)
    assert verify["brokers"][0]["ok"] is True
    unkeyed = as_json("audit", "verify", "--state-dir", str(broker.state_dir), status=2)
    assert unkeyed["status"] == "CHAIN_INTACT_UNAUTHENTICATED" and unkeyed["ok"] is False
    pub = as_json("audit", "public-key", "--config", str(broker.state_dir.parent / "cli.yaml"))
    assert pub["pem"].startswith("-----BEGIN PUBLIC KEY-----")
    assert len(bytes.fromhex(pub["sec1_hex"])) == 65
    (tmp_path / "audit.pem").write_text(pub["pem"])
    keyed = as_json("audit", "verify", "--state-dir", str(broker.state_dir), "--public-key",
                    str(tmp_path / "audit.pem"))
    assert keyed["status"] == "OK" and keyed["ok"] is True

    ops = ["--broker", broker.address, "--tls", str(pki_dir)]
    enrol(broker, "nj")  # test-only direct enrolment (the test composition of the server)
    (nj,) = [n for n in as_json("node", "list", *ops)["nodes"] if n["node"] == "nj"]
    assert nj["state"] == "active" and nj["revoked"] is False
    revoked = as_json("node", "revoke", "nj", *ops)
    assert revoked == {"node": "nj", "revoked": True,
                       "brokers": [{"broker": broker.address, "leases_revoked": 0}]}
    nodes = as_json("node", "list", *ops)["nodes"]
    (nj,) = [n for n in nodes if n["node"] == "nj"]
    assert nj["state"] == "revoked" and nj["revoked"] is True and nj["broker"] == broker.address
    assert nj["enrolled_unix_ms"] > 0
    back = as_json("node", "reinstate", "nj", *ops)
    (nj,) = [n for n in as_json("node", "list", *ops)["nodes"] if n["node"] == "nj"]
    assert nj["state"] == "reinstated" and nj["revoked"] is True
    assert back == {"node": "nj", "reinstated": True, "brokers": [{"broker": broker.address}]}

    deleted = as_json("dataset", "delete", "--dataset", "dsj", *who, env=base_env)
    assert deleted["brokers"] == [{"broker": broker.address, "deleted": True}]
    shred = as_json("tenant", "shred", "--yes", *who, env=base_env)
    assert shred["tenant"] == "acme" and shred["brokers"][0]["keys_destroyed"] >= 1


def test_policy_test_certs_and_hsm_init_json(tmp_path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY_YAML)
    report_data = secrets.token_bytes(32)
    evidence = tmp_path / "ev.json"
    evidence.write_bytes(make_evidence(report_data, {"node.ksm.enabled": True,
                                                          "node.swap.enabled": False})[1])
    doc = as_json("policy", "test", str(policy), str(evidence), "--kind", "test-json",
                  "--report-data", report_data.hex(), "--verifier",
                  "tests.kms_broker.verifiers:JsonClaimsVerifier", status=1)
    assert doc["allowed"] is False and len(doc["policy_digest"]) == 64
    failed = [r["name"] for r in doc["rules"] if not r["passed"]]
    assert failed == ["ksm-off"]

    pins = []
    for name in ("so", "user"):
        path = tmp_path / f"{name}.pin"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, secrets.token_hex(8).encode())
        os.close(fd)
        pins.append(path)
    ca = json.loads(cli("certs", "ca", "--dir", str(tmp_path / "ca"), "--format", "json").stdout)
    assert Path(ca["cert"]).is_file() and Path(ca["key"]).stat().st_mode & 0o777 == 0o600
    leaf = json.loads(cli("certs", "issue", "--ca-dir", str(tmp_path / "ca"), "--out",
                          str(tmp_path / "ca"), "--role", "tenant", "--id", "t9", "-o",
                          "json").stdout)
    assert leaf["identity"] == "tenant:t9" and Path(leaf["cert"]).name == "tenant-t9.pem"

    made = as_json("hsm", "init", "--state-dir", str(tmp_path / "hsm"), "--label", "tj",
                   "--so-pin-file", str(pins[0]), "--pin-file", str(pins[1]))
    assert made["label"] == "tj" and Path(made["softhsm2_conf"]).is_file()


def test_client_configuration_from_env_and_profile(cli_broker, tmp_path) -> None:  # noqa: F811
    """Precedence: flag > environment > profile; the profile's relative paths are relative
    to the profile file."""
    broker, _, pki_dir = cli_broker
    cli("certs", "issue", "--ca-dir", str(pki_dir), "--out", str(pki_dir), "--role", "tenant",
        "--id", "cfgt")
    cli("tenant", "init", "--key", str(tmp_path / "cfgt.key"))
    cli("tenant", "register", "--tenant", "cfgt", "--tenant-key", str(tmp_path / "cfgt.key"),
        "--broker", broker.address, "--tls", str(pki_dir))
    profile_dir = tmp_path / "conf"
    profile_dir.mkdir()
    (profile_dir / "pki").symlink_to(pki_dir)
    (profile_dir / "profiles.yaml").write_text(yaml.safe_dump({
        "default": {"brokers": [broker.address], "tls": "pki", "tenant": "cfgt"},
        "wrong": {"brokers": ["127.0.0.1"]},
    }))
    env = {"KMS_BROKER_PROFILE_FILE": str(profile_dir / "profiles.yaml")}
    listed = as_json("dataset", "list", env=env)
    assert listed["tenant"] == "cfgt"
    # the environment beats the profile: tenant "other" has no certificate in the directory
    refused = cli("dataset", "list", env={**env, "KMS_BROKER_TENANT": "other"}, status=2)
    assert "want tenant-other.pem" in refused.stderr and len(refused.stderr.splitlines()) == 1
    # with a certificate from the environment too, the broker itself refuses the mismatch
    mismatch = cli("dataset", "list", env={**env, "KMS_BROKER_TENANT": "other",
                                           "KMS_BROKER_CERT": str(pki_dir / "tenant-cfgt.pem"),
                                           "KMS_BROKER_KEY": str(pki_dir / "tenant-cfgt.key")},
                   status=1)
    assert "does not match the client certificate" in mismatch.stderr
    # and a flag beats the environment
    assert as_json("dataset", "list", "--tenant", "cfgt",
                   env={**env, "KMS_BROKER_TENANT": "other"})["tenant"] == "cfgt"
    # everything from the environment alone
    only_env = {"KMS_BROKER_ADDRESSES": broker.address, "KMS_BROKER_TENANT": "cfgt",
                "KMS_BROKER_CA": str(pki_dir / "ca.pem"),
                "KMS_BROKER_CERT": str(pki_dir / "tenant-cfgt.pem"),
                "KMS_BROKER_KEY": str(pki_dir / "tenant-cfgt.key"),
                "XDG_CONFIG_HOME": str(tmp_path / "none")}
    assert as_json("dataset", "list", env=only_env)["tenant"] == "cfgt"
    # a profile's bare host is refused like a flag's
    bad = cli("dataset", "list", "--profile", "wrong", env=env, status=2)
    assert "must be HOST:PORT" in bad.stderr and len(bad.stderr.splitlines()) == 1
