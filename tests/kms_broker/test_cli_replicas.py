"""Replica sets in the tenant and operator CLIs: a share holder given as several addresses
(``--broker 'A|B'``, ``KMS_BROKER_ADDRESSES``, a profile's list inside the list) is reached
at the replica that answers. Against a real broker subprocess (mTLS) and an address where
nothing listens (a replica that is down), in both orders."""

from __future__ import annotations

import secrets

import pytest
import yaml

from compose.ports import free_port
from kms_broker.clientconfig import ClientConfigError, resolve
from tests.kms_broker.conftest import enrol
from tests.kms_broker.test_cli import cli_broker  # noqa: F401 - the module's broker
from tests.kms_broker.test_cli_json import as_json, cli

pytestmark = pytest.mark.integration

EXIT_UNREACHABLE = 3  # kms_broker/cli.py


def _dead() -> str:
    return f"127.0.0.1:{free_port()}"  # reserved by this process, nothing listens


def test_replica_sets_resolve_from_flag_env_and_profile(tmp_path) -> None:
    c = resolve({"brokers": ["a:1|b:2", "c:3"]}, environ={})
    assert c.brokers == ("a:1|b:2", "c:3") and c.holders() == (("a:1", "b:2"), ("c:3",))
    c = resolve({}, environ={"KMS_BROKER_ADDRESSES": "a:1 | b:2, c:3"})
    assert c.holders() == (("a:1", "b:2"), ("c:3",))
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"default": {"brokers": [["a:1", "b:2"], "c:3"]}}))
    c = resolve({}, environ={"KMS_BROKER_PROFILE_FILE": str(profile)})
    assert c.holders() == (("a:1", "b:2"), ("c:3",))
    for bad, why in ((["a:1|b"], "must be HOST:PORT"), (["a:1|a:1"], "given twice"),
                     (["a:1|", "c:3"], "must be HOST:PORT"), (["a:1", "b:2|a:1"], "given twice")):
        with pytest.raises(ClientConfigError, match=why):
            resolve({"brokers": bad}, environ={})


def test_tenant_and_operator_commands_fail_over_to_the_live_replica(
        cli_broker, tmp_path) -> None:  # noqa: F811
    broker, _, pki_dir = cli_broker
    cli("certs", "issue", "--ca-dir", str(pki_dir), "--out", str(pki_dir), "--role", "tenant",
        "--id", "rep")
    key = tmp_path / "rep.key"
    cli("tenant", "init", "--key", str(key))
    dead = _dead()
    down_first, down_last = f"{dead}|{broker.address}", f"{broker.address}|{dead}"
    who = ["--tenant", "rep", "--tls", str(pki_dir)]

    reg = as_json("tenant", "register", "--broker", down_first, *who, "--tenant-key", str(key))
    assert reg["brokers"] == [{"broker": down_first, "kek_version": 1}]

    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        (data / f"r{i}").write_bytes(secrets.token_bytes(500 + i))
    up = as_json("dataset", "upload", str(data), "--store", str(tmp_path / "store"),
                 "--dataset", "dsr", "--broker", down_last, *who, "--tenant-key", str(key))
    assert up["holders"] == [down_last] and up["manifest"].startswith("manifests/")

    # the environment and a profile file give the same replica set
    env = {"KMS_BROKER_ADDRESSES": down_first, "KMS_BROKER_TLS_DIR": str(pki_dir),
           "KMS_BROKER_TENANT": "rep", "XDG_CONFIG_HOME": str(tmp_path / "none")}
    listed = as_json("dataset", "list", env=env)
    assert [(d["broker"], d["dataset"], d["manifest"]) for d in listed["datasets"]] == [
        (down_first, "dsr", up["manifest"])]
    profile = tmp_path / "profiles.yaml"
    profile.write_text(yaml.safe_dump({"default": {
        "brokers": [[dead, broker.address]], "tls": str(pki_dir), "tenant": "rep"}}))
    listed = as_json("dataset", "list", env={"KMS_BROKER_PROFILE_FILE": str(profile)})
    assert [d["dataset"] for d in listed["datasets"]] == ["dsr"]

    # operator commands: the row names the replica that answered
    enrol(broker, "n1")
    nodes = as_json("node", "list", "--broker", down_first, "--tls", str(pki_dir))
    assert {(n["broker"], n["node"]) for n in nodes["nodes"]} >= {(broker.address, "n1")}

    # every replica down: the documented unreachable status, one line, no traceback
    out = cli("dataset", "list", "--broker", f"{dead}|{_dead()}", *who,
              status=EXIT_UNREACHABLE)
    assert len(out.stderr.strip().splitlines()) == 1 and dead in out.stderr


def test_on_any_replica_moves_on_only_when_unavailable() -> None:
    from kms_broker.replicas import on_any_replica
    from kms_broker.rpc import NotFoundError, UnavailableError

    tried: list[str] = []

    def work(replica: str) -> str:
        tried.append(replica)
        if replica == "down":
            raise UnavailableError("gone", code="UNAVAILABLE", broker=replica)
        if replica == "refuses":
            raise NotFoundError("no such thing", code="NOT_FOUND", broker=replica)
        return replica

    assert on_any_replica(["down", "up"], work) == "up" and tried == ["down", "up"]
    tried.clear()
    with pytest.raises(NotFoundError):  # an answer, not an outage: final
        on_any_replica(["refuses", "up"], work)
    assert tried == ["refuses"]
    tried.clear()
    with pytest.raises(UnavailableError):  # every replica down: until the deadline, then out
        on_any_replica(["down", "down"], work, failover_s=0.0)
    assert tried == ["down", "down"]
