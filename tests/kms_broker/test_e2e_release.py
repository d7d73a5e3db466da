"""Must-show 1: upload -> attest -> release end to end over mTLS against a broker subprocess
on a real SoftHSM token; the node alone opens the share and derives the right DEK; the
broker's memory never holds a share in the clear."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sealed import DatasetReader, derive_dek
from sealed.secrets import SecretBuffer
from tests.kms_broker.conftest import World, make_world
from tests.kms_broker.evidence import every_evidence  # noqa: F401 - fixture

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def world(broker_factory, tmp_path_factory) -> World:
    return make_world(broker_factory("e2e"), tmp_path_factory.mktemp("e2e"))


def _read_all(world: World, dek: SecretBuffer) -> list[bytes]:
    reader = DatasetReader.open(world.store, world.manifest_name, dek=dek,
                                tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                                key_version=1)
    out: list[bytes] = []
    for j in range(reader.num_shards):
        buf = bytearray(reader.shard_plaintext_size(j))
        out.extend(bytes(r) for r in reader.iter_shard_records(j, buf))
    return out


def test_release_gives_the_node_the_right_dek(world: World) -> None:
    with world.broker.key_client("n1", world.job_id) as client:
        released = client.fetch_dek(tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                                    key_version=1)
    shares = [SecretBuffer.from_bytes(s) for s in world.shares]
    expected = derive_dek(shares, tenant_id=world.tenant_id, dataset_id=world.dataset_id,
                          key_version=1)
    with released.dek as dek, expected:
        assert dek.equals(expected)
        assert _read_all(world, dek) == [payload for _, payload in world.data]
    assert len(released.leases) == 1 and released.leases[0].lease_id
    events = [(r["event"], r["outcome"]) for r in world.broker.audit()]
    assert ("attest", "allowed") in events and ("release", "allowed") in events
    # where the time went, for the trainer's log: every phase once, in order, none negative
    address = released.leases[0].broker
    assert [name for name, _ in released.timings] == [
        "challenge", "evidence", f"attest+release {address}", f"open {address}", "derive"]
    assert all(seconds >= 0 for _, seconds in released.timings)


def test_sealed_share_opens_only_with_the_node_key(world: World) -> None:
    """The share on the wire is sealed: a release opened with another key fails."""
    from attest.interface import expected_report_data
    from kms_broker import sealing
    from kms_broker._proto.kmsbroker.v1 import broker_pb2 as pb

    stub = world.broker.node_stub("n1")
    ch = stub.Challenge(pb.ChallengeRequest(node_id="n1", job_id=world.job_id), timeout=10)
    priv, pub = sealing.generate_node_key()
    kind, payload = world.broker.evidence("n1")(expected_report_data(ch.nonce, ch.session_id,
                                                                     pub))
    token = stub.Attest(pb.AttestRequest(node_id="n1", session_id=ch.session_id,
                                         evidence=pb.Evidence(kind=kind, payload=payload),
                                         node_public_key=pub), timeout=10).token
    rel = stub.Release(pb.ReleaseRequest(node_id="n1", token=token, tenant_id=world.tenant_id,
                                         dataset_id=world.dataset_id, key_version=1),
                       timeout=10)
    assert world.shares[0] not in rel.sealed_share
    transcript = sealing.release_transcript(
        session_id=ch.session_id, nonce=ch.nonce, tenant_id=world.tenant_id,
        dataset_id=world.dataset_id, key_version=1, broker_id=ch.broker_id, node_public_key=pub)
    other, _ = sealing.generate_node_key()
    with pytest.raises(sealing.SealingError):
        sealing.open_sealed_share(other, rel.sealed_share, transcript)
    with sealing.open_sealed_share(priv, rel.sealed_share, transcript) as share, share.view() as v:
        assert bytes(v) == world.shares[0]


def _scan_memory(pid: int, needles: list[bytes]) -> dict[bytes, int]:
    """Count occurrences of each needle in every readable mapping of ``pid`` (root only)."""
    found = dict.fromkeys(needles, 0)
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) (\S+)", line)
            if not m or not m.group(3).startswith("r"):
                continue
            start, end = int(m.group(1), 16), int(m.group(2), 16)
            if "[vvar]" in line or "[vsyscall]" in line:
                continue
            try:
                mem.seek(start)
                chunk = mem.read(end - start)
            except (OSError, ValueError, OverflowError):
                continue
            for needle in needles:
                found[needle] += chunk.count(needle)
    return found


def test_broker_memory_never_holds_a_share(world: World) -> None:
    with world.broker.key_client("n1", world.job_id) as client:
        for _ in range(100):
            released = client.fetch_dek(tenant_id=world.tenant_id,
                                        dataset_id=world.dataset_id, key_version=1)
            released.dek.zeroize()
    needles = list(world.shares)
    needles += [s[:16] for s in world.shares] + [s[16:] for s in world.shares]
    # positive control: the scanner finds bytes we know are in the broker (its id string)
    control = b"kmsbroker/v1/token\x00"
    found = _scan_memory(world.broker.pid, [*needles, control])
    assert found[control] > 0, "memory scan read nothing: the test would be vacuous"
    leaked = {n.hex()[:8]: c for n, c in found.items() if n != control and c}
    assert leaked == {}, f"share bytes found in broker memory: {leaked}"
    releases = [r for r in world.broker.audit() if r["event"] == "release"]
    assert len(releases) >= 100
