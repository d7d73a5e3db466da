"""The real docker-compose.yml: its structure, and the whole deployment run by the harness."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from compose import LocalHarness, ServiceFailed, load_project
from compose.image import build_image_environment, image_environment_variables
from compose.ports import free_port_pairs
from tests.compose.conftest import live_processes

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ONE_SHOT = {"bootstrap", "enrol", "tenant"}
WAIT_S = 600  # how long a poll loop waits (a hang guard on a busy machine, not a timing check)
# Leases long enough that a loaded machine (slow re-attestation, slow broker restart) renews
# them in time; renewal starts at half the lease and retries every lease_poll_interval.
LEASE_TTL_MS = "60000"
STEPS = 400
# One sentence of each sample corpus file: none may appear in anything the services wrote.
CANARIES = [
    b"The lighthouse keeper wrote the weather in a small book",
    b"In the spring the orchard was white with blossom",
    b"Every tool in the workshop had its outline painted",
]


def test_canaries_are_in_the_sample_corpus():
    corpus = b"".join(p.read_bytes() for p in (REPO / "deploy/config/corpus").iterdir())
    for canary in CANARIES:
        assert canary in corpus


def test_compose_file_declares_the_deployment():
    project = load_project(COMPOSE_FILE, variables={})
    services = project.services
    assert set(services) == {
        "bootstrap", "provider-broker", "tenant-broker", "tpm-a", "tpm-b", "enrol", "tenant",
        "node-a", "node-b", "s3", "postgres",
    }
    # the embedded default runs without them
    assert services["s3"].profiles == ("s3",)
    assert services["postgres"].profiles == ("postgres",)
    for name, service in services.items():
        if name not in ONE_SHOT:
            assert service.healthcheck is not None, f"{name} has no healthcheck"
    assert {name: {(d.service, d.condition) for d in s.depends_on}
            for name, s in services.items()} == {
        "bootstrap": set(),
        **{name: {("bootstrap", "service_completed_successfully")}
           for name in ("tenant-broker", "tpm-a", "tpm-b")},
        # the postgres service when its profile is on (PROVIDER_BROKER_STATE=postgres)
        "provider-broker": {("bootstrap", "service_completed_successfully"),
                            ("postgres", "service_healthy")},
        "enrol": {(b, "service_healthy")
                  for b in ("provider-broker", "tenant-broker", "tpm-a", "tpm-b")},
        "tenant": {("provider-broker", "service_healthy"), ("tenant-broker", "service_healthy"),
                   ("s3", "service_healthy")},
        "s3": {("bootstrap", "service_completed_successfully")},
        "postgres": set(),
        "node-a": {("enrol", "service_completed_successfully"),
                   ("tenant", "service_completed_successfully"), ("tpm-a", "service_healthy")},
        "node-b": {("enrol", "service_completed_successfully"),
                   ("tenant", "service_completed_successfully"), ("tpm-b", "service_healthy"),
                   ("node-a", "service_started")},
    }
    # Each broker has its own token volume, each node its own TPM; the store is shared.
    def volumes(name: str) -> set[str]:
        return {m.source for m in services[name].mounts if m.kind == "volume"}

    assert "provider-hsm" in volumes("provider-broker")
    assert "tenant-hsm" in volumes("tenant-broker")
    assert not volumes("provider-broker") & volumes("tenant-broker")
    assert volumes("tpm-a") == {"tpm-a"} and volumes("tpm-b") == {"tpm-b"}
    assert "store" in volumes("node-a") & volumes("node-b") & volumes("tenant")
    # Only bootstrap sees the CA key.
    assert [n for n in services if "pki" in volumes(n)] == ["bootstrap"]


def test_every_volume_has_one_container_path_everywhere():
    # Paths that one service writes into a file (bootstrap renders broker.yaml) are read by
    # another: that works under Docker and the harness alike only if a volume is mounted at
    # the same container path in every service.
    project = load_project(COMPOSE_FILE, variables={})
    targets: dict[str, set[str]] = {}
    for service in project.services.values():
        for mount in service.mounts:
            key = mount.source if mount.kind == "volume" else f"bind:{mount.source}"
            targets.setdefault(str(key), set()).add(mount.target)
    assert {k: v for k, v in targets.items() if len(v) != 1} == {}


def _files_containing(root: Path, needles: list[bytes]) -> list[str]:
    hits = []
    for directory, _dirs, files in os.walk(root):  # does not follow links (bind mounts)
        for name in files:
            path = Path(directory) / name
            if path.is_symlink():
                continue
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # renamed or removed meanwhile (a broker's temp file)
                continue
            hits += [f"{path}: {n[:20]!r}" for n in needles if n in data]
    return hits


def _deployment(tmp_path: Path, **settings: str) -> tuple[LocalHarness, dict[str, str]]:
    """A harness on docker-compose.yml with free ports and a frozen copy of the code, and
    the variables it was given."""
    provider, tenant, tpm_a, tpm_b, master = free_port_pairs(5)
    variables = {
        "PROVIDER_BROKER_PORT": str(provider), "TENANT_BROKER_PORT": str(tenant),
        "TPM_A_PORT": str(tpm_a), "TPM_A_CTRL_PORT": str(tpm_a + 1),
        "TPM_B_PORT": str(tpm_b), "TPM_B_CTRL_PORT": str(tpm_b + 1),
        "MASTER_PORT": str(master), **settings,
    }
    image = _image(tmp_path / "image")
    harness = LocalHarness(COMPOSE_FILE, tmp_path / "run", variables=variables,
                           image_env=image_environment_variables(image))
    return harness, variables


def _image(directory: Path) -> Path:
    """The measured environment standing in for the image (compose/image.py): a frozen copy
    of the project's packages in a virtual environment with its code manifest, so edits made
    to the checkout while the test runs cannot change the code digest between the tenant's
    approval and the nodes' attestation, and `trainer --attest` runs isolated from it."""
    return build_image_environment(directory)


def _assert_nodes_alive(harness: LocalHarness) -> None:
    states = {s.name: s.state for s in harness.ps()}
    for node in ("node-a", "node-b"):
        assert states[node] in ("created", "running"), harness.logs(node)[-3000:]


def _verify_audit(harness: LocalHarness, broker: str, scratch: Path):
    """``kms-broker audit verify`` of ``broker``'s log with its audit public key, exported by
    ``kms-broker audit public-key`` from the broker's own config (authenticity checked)."""
    home = f"/var/lib/{broker}-broker"
    exported = harness.exec(f"{broker}-broker", [
        "kms-broker", "audit", "public-key", "--config",
        str(harness.host_path(f"{broker}-broker", f"{home}/broker.yaml"))])
    assert exported.returncode == 0, exported.stderr
    key = scratch / f"{broker}-audit.pem"
    key.write_bytes(exported.stdout)
    return harness.exec(f"{broker}-broker", [
        "kms-broker", "audit", "verify", "--public-key", str(key), "--state-dir",
        str(harness.host_path(f"{broker}-broker", f"{home}/state"))])


def _audit(harness: LocalHarness, broker: str) -> list[dict]:
    path = harness.volume_path(f"{broker}-broker") / "state" / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def _released_to(harness: LocalHarness, broker: str) -> set[str]:
    return {r["actor"] for r in _audit(harness, broker)
            if r["event"] == "release" and r["outcome"] == "allowed"}


@pytest.mark.integration
@pytest.mark.slow
def test_two_brokers_two_attested_nodes_train_through_a_broker_restart(tmp_path: Path):
    """Issue 6 scenarios 1, 3 and 7 through docker-compose.yml: each broker holds one share,
    both nodes attest and train together; the provider broker restarts mid-training and the
    leases renew once it is back; nothing in the clear reaches disk; nothing is left."""
    # The provider broker is down from the restart until it is healthy again; the nodes
    # renew from half the lease on, every 2 s, until it ends. 24 s leaves a loaded machine
    # 12 s of retries for the restart and a re-attestation; 400 steps keep the nodes training
    # past half the lease (a loaded machine only trains slower, which is the safe side).
    harness, _ = _deployment(tmp_path, TRAIN_STEPS=str(STEPS), LEASE_TTL_MS="24000")
    marker = f"CT_COMPOSE_ID={harness.run_id}:"
    try:
        harness.up()
        nodes = {"node:node-a", "node:node-b"}
        # Restart the provider broker as soon as both nodes hold their shares (training is
        # starting): it is back well before the first renewal, at half the lease.
        deadline = time.monotonic() + WAIT_S
        while _released_to(harness, "provider") != nodes:
            _assert_nodes_alive(harness)
            assert time.monotonic() < deadline, "no release to both nodes"
            time.sleep(0.2)
        restarted_ms = int(time.time() * 1000)
        harness.restart("provider-broker")
        harness.wait_healthy("provider-broker")
        harness.wait_all_completed(["node-a", "node-b"])
        states = {s.name: s for s in harness.ps()}
        assert states["tenant-broker"].health == "healthy"
        assert states["tenant-broker"].restarts == 0

        node_a = harness.logs("node-a")
        assert "rank 0/2" in node_a and "world 2 on cpu" in node_a
        assert f"step {STEPS}/{STEPS}" in node_a
        losses = [float(x) for x in re.findall(rf"step \d+/{STEPS} loss ([\d.]+)", node_a)]
        assert losses[-1] < losses[0]
        assert "shred report (normal exit)" in harness.logs("node-b")
        assert harness.logs("provider-broker").count("listening on") == 2

        store = harness.volume_path("store")
        assert list((store / "checkpoints" / "job-1").iterdir()), "no checkpoint written"

        for broker in ("provider", "tenant"):
            assert _released_to(harness, broker) == nodes, broker
            verified = _verify_audit(harness, broker, tmp_path)
            assert verified.returncode == 0, verified.stdout + verified.stderr
            assert verified.stdout.startswith(b"OK")
        renewed_after_restart = {
            r["actor"] for r in _audit(harness, "provider")
            if r["event"] == "renew" and r["outcome"] == "allowed"
            and r["time_ms"] > restarted_ms
        }
        assert renewed_after_restart == nodes, "training ended before half the lease?"

        # Plaintext reached no file that any service wrote: volumes, logs, homes, temp dirs.
        assert _files_containing(harness.run_dir, CANARIES) == []
    finally:
        harness.down()
    assert live_processes(pgids=set(), marker=marker) == []
    assert not harness.run_dir.exists()


@pytest.mark.integration
@pytest.mark.slow
def test_tenant_revokes_at_its_own_broker_and_both_nodes_shred(tmp_path: Path):
    """Issue 6 scenario 4: the tenant revokes the grant at the broker it runs; both nodes
    shred and stop although the provider broker never saw the revocation. Each node runs two
    local ranks (issue 12): local rank 0 attests for its node and hands the key to rank 1
    (trainer/local_keys.py), and the revocation reaches and shreds every rank."""
    harness, variables = _deployment(tmp_path, TRAIN_STEPS="100000",
                                    LEASE_TTL_MS=LEASE_TTL_MS, NODE_NPROC="2")
    marker = f"CT_COMPOSE_ID={harness.run_id}:"
    nodes = {"node:node-a", "node:node-b"}
    try:
        harness.up()
        deadline = time.monotonic() + WAIT_S
        while _released_to(harness, "tenant") != nodes or "step 5/" not in harness.logs("node-a"):
            _assert_nodes_alive(harness)
            assert time.monotonic() < deadline, "nodes not training"
            time.sleep(0.2)
        home = "/var/lib/tenant"
        tls = [f"--ca={harness.host_path('tenant', f'{home}/ca.pem')}",
               f"--cert={harness.host_path('tenant', f'{home}/tenant-acme.pem')}",
               f"--key={harness.host_path('tenant', f'{home}/tenant-acme.key')}"]
        broker = f"--broker=127.0.0.1:{variables['TENANT_BROKER_PORT']}"
        revoked = harness.run("tenant", ["kms-broker", "grant", "revoke", "grant-job-1",
                                         "--tenant=acme", broker, *tls])
        assert revoked.returncode == 0, revoked.stderr
        for node in ("node-a", "node-b"):
            with pytest.raises(ServiceFailed):
                harness.wait_completed(node)
            log = harness.logs(node)
            tenant_broker = f"127.0.0.1:{variables['TENANT_BROKER_PORT']}"
            # both local ranks: rank 0 learnt it from the broker, rank 1 from rank 0
            assert log.count(f"shred report (revoked: broker {tenant_broker} revoked the "
                             "lease") == 2, log[-3000:]
            assert log.count("dataset key from local rank 0 in") == 1, log[-3000:]
            assert "step 100000/100000" not in log
        for broker in ("tenant", "provider"):  # one attestation and release per node
            assert len([r for r in _audit(harness, broker) if r["event"] == "release"
                        and r["outcome"] == "allowed"]) == 2
        assert [r["event"] for r in _audit(harness, "tenant")].count("revoke_grant") == 1
        assert not any("revoke" in r["event"] for r in _audit(harness, "provider"))
        assert {s.name: s.state for s in harness.ps()}["provider-broker"] == "running"
        assert _files_containing(harness.run_dir, CANARIES) == []
    finally:
        harness.down()
    assert live_processes(pgids=set(), marker=marker) == []
