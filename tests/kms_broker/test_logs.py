"""Broker logs (issue 16): one structured line per request outcome, start and shutdown, and
no secret in any line.

The broker is the production ``kms-broker serve`` (real swtpm quotes, SoftHSM2, mTLS) started
with ``KMS_BROKER_LOG_FORMAT=json``; its stderr is the file the fixture writes.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kms_broker.rpc import PermissionDeniedError
from tests.kms_broker.conftest import BrokerProc, World, make_world

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evidence() -> str:
    return "tpm2"  # production `kms-broker serve`, real quotes (tests/kms_broker/conftest.py)


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> Iterator[World]:
    saved = os.environ.get("KMS_BROKER_LOG_FORMAT")
    os.environ["KMS_BROKER_LOG_FORMAT"] = "json"  # the subprocess inherits the environment
    try:
        broker = broker_factory("logs")
    finally:
        if saved is None:
            os.environ.pop("KMS_BROKER_LOG_FORMAT")
        else:
            os.environ["KMS_BROKER_LOG_FORMAT"] = saved
    yield make_world(broker, tmp_path_factory.mktemp("logs"), nodes=("n1", "n2"))


def log_path(broker: BrokerProc) -> Path:
    return broker.state_dir.parent / f"{broker.name}.log"


def log_lines(broker: BrokerProc) -> tuple[list[dict], list[str]]:
    """(JSON objects, other lines) of the broker's output so far."""
    parsed, other = [], []
    for line in log_path(broker).read_text().splitlines():
        if line.startswith("{"):
            parsed.append(json.loads(line))
        elif line.strip():
            other.append(line)
    return parsed, other


def wait_for(broker: BrokerProc, match, what: str) -> list[dict]:
    """The JSON lines matching ``match``, once there is one (the log is written after the
    reply is sent, so it may trail the client by a moment)."""
    deadline = time.monotonic() + 60
    while True:
        found = [r for r in log_lines(broker)[0] if match(r)]
        if found or time.monotonic() > deadline:
            assert found, f"no broker log line for {what}:\n{log_path(broker).read_text()[-3000:]}"
            return found
        time.sleep(0.1)


def test_every_line_is_structured_and_start_is_logged(world: World) -> None:
    parsed, other = log_lines(world.broker)
    # the only plain line is the documented "listening" line on stdout
    assert len(other) == 1 and "listening on" in other[0], other
    for record in parsed:
        assert {"time", "level", "logger", "message"} <= set(record), record
        assert record["time"].endswith("Z")
    started = [r for r in parsed if r["logger"] == "kms_broker" and "started" in r["message"]]
    assert len(started) == 1 and started[0]["broker_id"] == "logs"
    assert started[0]["port"] == int(world.broker.address.rsplit(":", 1)[1])


def test_release_logs_one_allowed_line_per_call(world: World) -> None:
    with world.broker.key_client("n1", world.job_id) as client:
        released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                    key_version=1)
        released.dek.zeroize()
    # the client releases in its Attest (AttestRequest.release): two calls, one line each
    for method in ("Challenge", "Attest"):
        lines = wait_for(world.broker, lambda r, m=method: r.get("identity") == "node:n1"
                         and r.get("method", "").endswith(f"/{m}"), f"n1 {method}")
        assert len(lines) == 1, lines
        (line,) = lines
        assert line["logger"] == "kms_broker.request" and line["level"] == "INFO"
        assert line["status"] == "OK" and line["decision"] == "allowed"
        assert line["reasons"] == [] and isinstance(line["latency_ms"], float)
    assert not [line for line in log_lines(world.broker)[0] if line.get("identity") == "node:n1"
                and line.get("method", "").endswith("/Release")]


def test_denial_is_one_structured_line_with_the_reasons(world: World) -> None:
    job = "job-never-granted"
    with world.broker.key_client("n2", job) as client, \
            pytest.raises(PermissionDeniedError) as info:
        client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id, key_version=1)
    reason = next(r for r in info.value.failed_rules if r.name == "grant.missing")
    denied = wait_for(world.broker, lambda r: r.get("identity") == "node:n2"
                      and r.get("decision") == "denied", "the denial")
    assert len(denied) == 1, denied
    (line,) = denied
    assert line["level"] == "WARNING" and line["status"] == "PERMISSION_DENIED"
    # grants are checked at release, here the release inside the Attest call
    assert line["method"] == "/kmsbroker.v1.NodeService/Attest"
    assert line["reasons"] == [reason.reason] and reason.reason.startswith("grant.missing: ")
    assert job in reason.reason
    # the reasons are said once: no other line repeats them
    text = log_path(world.broker).read_text()
    assert text.count(reason.reason) == 1, text[-3000:]


def test_refusal_before_the_servicer_is_logged(world: World) -> None:
    """A request naming another node than its certificate ends UNAUTHENTICATED in the
    interceptor; its line names the certificate's identity and the refusal."""
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb

    stub = world.broker.node_stub("n2")
    with pytest.raises(Exception, match="does not match"):
        stub.Challenge(pb.ChallengeRequest(node_id="n1", job_id="j"), timeout=30)
    lines = wait_for(world.broker, lambda r: r.get("identity") == "node:n2"
                     and r.get("status") == "UNAUTHENTICATED", "the refusal")
    assert lines[-1]["decision"] == "denied" and "does not match" in lines[-1]["detail"]


def test_no_secret_in_any_line_and_shutdown_is_logged(world: World) -> None:
    broker = world.broker
    with broker.key_client("n1", world.job_id) as client:
        released = client.fetch_dek(tenant_id="acme", dataset_id=world.dataset_id,
                                    key_version=1)
        with released.dek.view() as view:
            dek = bytes(view)
        released.dek.zeroize()
    broker.proc.send_signal(signal.SIGTERM)
    broker.proc.wait(timeout=60)
    parsed, _ = log_lines(broker)
    messages = [r["message"] for r in parsed if r["logger"] == "kms_broker"]
    assert any("shutting down (SIGTERM)" in m for m in messages), messages
    assert messages[-1] == "broker logs stopped", messages
    pin = (broker.state_dir.parent / f"{broker.name}.pin").read_bytes().strip()
    secrets = {"the HSM PIN": pin, "the dataset key": dek}
    secrets.update({f"share {i}": s for i, s in enumerate(world.shares)})
    text = log_path(broker).read_text()
    for name, value in secrets.items():
        for form in encodings(value):
            assert form not in text, f"{name} appears in the broker log"
    assert world.data[0][1].hex() not in text  # a plaintext record


def encodings(value: bytes) -> set[str]:
    forms = {value.hex(), value.hex().upper(), base64.b64encode(value).decode(),
             base64.urlsafe_b64encode(value).decode().rstrip("=")}
    if value.isascii() and value.decode().isprintable():
        forms.add(value.decode())
    return {f for f in forms if len(f) >= 8}
