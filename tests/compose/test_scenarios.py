"""Issue 6 scenarios 2, 5, 6 and 7, and issue 5 item 5, through docker-compose.yml.

One deployment serves the module: bootstrap, both brokers, both TPMs, enrolment and the
tenant's setup run once. The refusals (scenarios 2 and 6, the modified trainer) are one-off
node runs next to it (``harness.run``, i.e. ``docker compose run``) that never reach
training, so they do not disturb each other; the tampered shard (scenario 5) comes last and
runs the real ``node-a`` and ``node-b`` services. After every scenario no plaintext canary
is in any file the services wrote and the scenario's processes are gone (scenario 7); at the
end the whole deployment is brought down, nothing of it survives and the run dir is wiped.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from attest.code_digest import MANIFEST_NAME, environment_manifest
from compose import LocalHarness, ServiceFailed
from compose.ports import free_port
from sealed.manifest import MANIFEST_PREFIX
from tests.compose.conftest import live_processes
from tests.compose.test_deployment import (
    CANARIES,
    LEASE_TTL_MS,
    WAIT_S,
    _audit,
    _deployment,
    _files_containing,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXIT_ATTESTATION_DENIED = 4  # trainer/cli.py
EXIT_CODE_IDENTITY = 5  # trainer/guard.py
EXIT_DATASET = 8  # trainer/dataset_check.py


class Deployment:
    def __init__(self, harness: LocalHarness, variables: dict[str, str], base: Path) -> None:
        self.harness = harness
        self.variables = variables
        self.base = base  # scratch space outside the run dir (test inputs only)

    @property
    def brokers(self) -> list[str]:
        return [f"127.0.0.1:{self.variables['PROVIDER_BROKER_PORT']}",
                f"127.0.0.1:{self.variables['TENANT_BROKER_PORT']}"]

    def node_argv(
        self, service: str, node_id: str, tpm_port: str, *, reverse: bool = False
    ) -> list[str]:
        """deploy/bin/node.py as docker-compose.yml runs it, alone (one node, one rank).

        ``reverse`` lists the tenant broker first. The key client attests to the brokers in
        order and stops at the first refusal, so a refused node is run once each way to
        show that each broker refuses it on its own (shares carry their index, so the
        order does not change the key)."""
        root = str(self.harness.host_path(service, "/"))
        argv = ["python", f"{root}/deploy/bin/node.py", f"--root={root}", f"--node={node_id}",
                "--rank=0", "--nnodes=1", f"--tcti=swtpm:host=127.0.0.1,port={tpm_port}",
                f"--job-info={root}/store/jobs/job-1.json", "--steps=5"]
        brokers = self.brokers[::-1] if reverse else self.brokers
        return argv + [f"--broker={b}" for b in brokers]

    def run_refused(
        self, service: str, node_id: str, tpm_port: str, *, prefix: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> list[str]:
        """Run the node once with each broker first; both runs must exit 4 (attestation
        denied). Returns their outputs."""
        outputs = []
        for reverse in (False, True):
            argv = (prefix or []) + self.node_argv(service, node_id, tpm_port, reverse=reverse)
            result = self.harness.run(service, argv, env=env)
            output = (result.stdout + result.stderr).decode(errors="replace")
            assert result.returncode == EXIT_ATTESTATION_DENIED, output[-3000:]
            outputs.append(output)
        return outputs

    def audit_since(self, broker: str, since_ms: int) -> list[dict]:
        return [r for r in _audit(self.harness, broker) if r["time_ms"] >= since_ms]

    def assert_clean(self, service: str) -> None:
        """Scenario 7 for one scenario: no canary on disk, no process of ``service`` left."""
        assert _files_containing(self.harness.run_dir, CANARIES) == []
        # environ entries end with NUL: "tenant" must not match "tenant-broker"
        marker = f"CT_COMPOSE_ID={self.harness.run_id}:{service}\0"
        # a service counts as finished when its main process exits; its children (torchrun's
        # workers) may take a moment longer to exit, so give them a grace before judging
        deadline = time.monotonic() + 10
        while live_processes(pgids=set(), marker=marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert live_processes(pgids=set(), marker=marker) == []


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("scenarios")
    # Steps enough that training is still running when the store is tampered with.
    harness, variables = _deployment(base, TRAIN_STEPS="100000", LEASE_TTL_MS=LEASE_TTL_MS)
    with enrolled_deployment(harness, variables, base) as deployment:
        yield deployment


@contextlib.contextmanager
def enrolled_deployment(harness: LocalHarness, variables: dict[str, str],
                        base: Path) -> Iterator[Deployment]:
    """Brokers, TPMs, enrolment and the tenant's upload up; afterwards everything down, no
    process of the run left and its run directory gone."""
    marker = f"CT_COMPOSE_ID={harness.run_id}:"
    try:
        harness.up(["enrol", "tenant"])
        harness.wait_all_completed(["bootstrap", "enrol", "tenant"])
        yield Deployment(harness, variables, base)
    finally:
        harness.down()
    assert live_processes(pgids=set(), marker=marker) == []
    assert not harness.run_dir.exists()


def _denials(records: list[dict], actor: str) -> list[str]:
    return [r["reason"] for r in records if r["actor"] == actor and r["outcome"] == "denied"]


def _released(records: list[dict], actor: str) -> list[dict]:
    return [r for r in records
            if r["actor"] == actor and r["event"] == "release" and r["outcome"] == "allowed"]


def test_node_with_ksm_on_is_denied_naming_the_rule(deployment: Deployment):
    """Scenario 2: node-b's kernel reports KSM on; both brokers deny it naming `ksm-off`,
    the job never starts there, and both audit logs say why."""
    # How the node comes to have KSM on: the test gives node-b's processes a private mount
    # namespace in which /sys/kernel/mm/ksm/run reads "1", which is exactly what the agent
    # sees on a host where KSM runs. Nothing in the trainer or the agent is switched or
    # pointed elsewhere (there is no flag, variable or config key that could fake a fact in
    # production: attest.facts reads the real paths), and the trainer code, hence its
    # digest, is the one the tenant approved: the only difference is the node's state. We
    # do not turn KSM on for real because it is machine-wide.
    fake_ksm = deployment.base / "ksm-run"
    fake_ksm.write_text("1\n")
    script = 'mount --bind "$0" /sys/kernel/mm/ksm/run && exec "$@"'
    since = int(time.time() * 1000)
    outputs = deployment.run_refused(
        "node-b", "node-b", deployment.variables["TPM_B_PORT"],
        prefix=["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                str(fake_ksm)])
    for output in outputs:
        assert "attestation denied" in output
        assert "ksm-off: KSM (kernel same-page merging) must be off" in output
        # The other rules of the policy passed: KSM is the only reason.
        assert "swap-off:" not in output and "trainer-code-allowed:" not in output
        assert "step 1/5" not in output
    for broker in ("provider", "tenant"):
        records = deployment.audit_since(broker, since)
        reasons = _denials(records, "node:node-b")
        assert any("ksm-off" in r and "policy" in r for r in reasons), (broker, reasons)
        assert _released(records, "node:node-b") == [], broker
    deployment.assert_clean("node-b")


def test_modified_trainer_code_is_denied_and_decrypts_nothing(deployment: Deployment):
    """Issue 5 item 5: one byte changed in node-a's trainer code changes its digest; the
    brokers deny the release and the trainer exits 4 saying so, having decrypted nothing.

    The attacker edits the image in place and rewrites its code manifest to match, so the
    trainer's own guard (trainer/guard.py) finds nothing amiss: what stops it is the digest,
    which `attest code-digest` (offline, nothing run from the image) shows has changed. The
    shortcut an attacker would take instead, another copy of the code on PYTHONPATH, is
    refused by the trainer itself before it asks any broker (exit 5)."""
    harness = deployment.harness
    image = deployment.base / "image"
    (site,) = (image / "lib").glob("python3*/site-packages")
    target = site / "trainer" / "__init__.py"
    manifest = image / MANIFEST_NAME
    original, original_manifest = target.read_bytes(), manifest.read_bytes()

    def digest() -> str:
        computed = harness.run("tenant", ["attest", "code-digest", str(image)])
        assert computed.returncode == 0, computed.stderr
        return computed.stdout.decode().strip()

    approved = digest()
    try:
        target.write_bytes(original + b"\n")  # one byte more, behaviour unchanged
        manifest.write_bytes(environment_manifest(str(image)))
        assert digest() != approved

        since = int(time.time() * 1000)
        outputs = deployment.run_refused("node-a", "node-a", deployment.variables["TPM_A_PORT"])
    finally:
        target.write_bytes(original)
        manifest.write_bytes(original_manifest)
    assert digest() == approved
    for output in outputs:
        assert "attestation denied" in output
        assert "trainer-code-allowed: the trainer code that receives the key must be a " \
               "version the tenant approved" in output
        assert "ksm-off:" not in output
        # Nothing decrypted: the data pipeline never started and no share was released.
        assert "decrypt" not in output.lower()
        assert "step 1/5" not in output
    for broker in ("provider", "tenant"):
        records = deployment.audit_since(broker, since)
        assert any("trainer-code-allowed" in r for r in _denials(records, "node:node-a")), broker
        assert _released(records, "node:node-a") == [], broker

    since = int(time.time() * 1000)
    argv = deployment.node_argv("node-a", "node-a", deployment.variables["TPM_A_PORT"])
    shortcut = harness.run("node-a", argv, env={"PYTHONPATH": str(deployment.base)})
    output = (shortcut.stdout + shortcut.stderr).decode(errors="replace")
    assert shortcut.returncode == EXIT_CODE_IDENTITY, output[-3000:]
    assert "code identity refused: environment variable PYTHONPATH is set" in output
    for broker in ("provider", "tenant"):
        assert [r for r in deployment.audit_since(broker, since)
                if r["actor"] == "node:node-a"] == [], broker
    deployment.assert_clean("node-a")


def test_client_without_a_valid_certificate_is_refused(deployment: Deployment):
    """Scenario 6a: no client certificate, or one from a CA the brokers do not trust (with
    the tenant's very name in it): the TLS handshake fails and nothing changes."""
    harness = deployment.harness
    home = "/var/lib/tenant"
    ca = harness.host_path("tenant", f"{home}/ca.pem").read_bytes()
    since = int(time.time() * 1000)
    for broker in deployment.brokers:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca)  # no client cert
        name = "provider-broker" if broker == deployment.brokers[0] else "tenant-broker"
        with grpc.secure_channel(broker, credentials,
                                 options=[("grpc.ssl_target_name_override", name)]) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    # A certificate for tenant-acme issued by a CA of the attacker's own.
    rogue = deployment.base / "rogue-ca"
    made = harness.run("tenant", ["kms-broker", "certs", "ca", "--dir", str(rogue)])
    assert made.returncode == 0, made.stderr
    issued = harness.run("tenant", ["kms-broker", "certs", "issue", "--ca-dir", str(rogue),
                                    "--out", str(rogue), "--role", "tenant", "--id", "acme"])
    assert issued.returncode == 0, issued.stderr
    tls = [f"--ca={harness.host_path('tenant', f'{home}/ca.pem')}",
           f"--cert={rogue / 'tenant-acme.pem'}", f"--key={rogue / 'tenant-acme.key'}"]
    for broker in deployment.brokers:
        revoked = harness.run("tenant", ["kms-broker", "grant", "revoke", "grant-job-1",
                                         "--tenant=acme", f"--broker={broker}", *tls])
        assert revoked.returncode != 0
        assert b"Traceback" not in revoked.stderr, revoked.stderr
    for broker in ("provider", "tenant"):
        assert not [r for r in deployment.audit_since(broker, since)
                    if r["event"] == "revoke_grant"], broker
    assert {s.name: s.state for s in harness.ps()}["provider-broker"] == "running"
    assert {s.name: s.state for s in harness.ps()}["tenant-broker"] == "running"
    deployment.assert_clean("tenant")


def test_node_enrolled_for_another_tenant_is_refused(deployment: Deployment):
    """Scenario 6b: node-c, a genuine attested node with a valid certificate but enrolled by
    the operator for tenant globex only, asks for acme's dataset: both brokers refuse."""
    harness = deployment.harness
    pki = harness.host_path("bootstrap", "/pki")
    issued = harness.run("bootstrap", ["kms-broker", "certs", "issue", "--ca-dir", str(pki),
                                       "--out", str(pki / "issued"), "--role", "node",
                                       "--id", "node-c"])
    assert issued.returncode == 0, issued.stderr
    tls = harness.host_path("node-a", "/var/lib/node-c/tls")
    tls.mkdir(parents=True, mode=0o700)
    for name in ("node-node-c.pem", "node-node-c.key"):
        (tls / name).write_bytes((pki / "issued" / name).read_bytes())
    (tls / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())
    tpm = deployment.variables["TPM_A_PORT"]
    root = str(harness.host_path("enrol", "/"))
    enrolled = harness.run("enrol", [
        "python", f"{root}/deploy/bin/enrol.py", f"--root={root}", "--tenant=globex",
        f"--node=node-c=swtpm:host=127.0.0.1,port={tpm}",
        *[f"--broker={b}" for b in deployment.brokers]])
    assert enrolled.returncode == 0, enrolled.stderr

    since = int(time.time() * 1000)
    for output in deployment.run_refused("node-a", "node-c", tpm):
        assert "node is enrolled for tenant globex only" in output
        assert "step 1/5" not in output
    for broker in ("provider", "tenant"):
        records = deployment.audit_since(broker, since)
        assert any("node.scope" in r for r in _denials(records, "node:node-c")), broker
        assert _released(records, "node:node-c") == [], broker
    deployment.assert_clean("node-a")


def test_trainer_fails_over_to_the_live_replica_of_each_broker(deployment: Deployment):
    """Issue 15: each share holder given to the node as a replica set whose first replica is
    down (an address where nothing listens): node.py renders `addresses: [...]` into the job
    file and `trainer --attest` leaves the dead replica for the live one, attests, receives
    both shares and trains; both brokers record the release."""
    harness = deployment.harness
    dead = [f"127.0.0.1:{free_port()}" for _ in deployment.brokers]
    argv = [a for a in deployment.node_argv("node-a", "node-a",
                                            deployment.variables["TPM_A_PORT"])
            if not a.startswith("--broker=")]
    argv += [f"--broker={d}|{b}" for d, b in zip(dead, deployment.brokers, strict=True)]
    since = int(time.time() * 1000)
    result = harness.run("node-a", argv)
    output = (result.stdout + result.stderr).decode(errors="replace")
    assert result.returncode == 0, output[-3000:]
    assert "step 5/5" in output and "Traceback" not in output
    job = harness.host_path("node-a", "/var/lib/node-a/job.yaml").read_text()
    assert f'addresses: ["{dead[0]}", "{deployment.brokers[0]}"]' in job
    for broker in ("provider", "tenant"):
        assert len(_released(deployment.audit_since(broker, since), "node:node-a")) == 1, broker
    deployment.assert_clean("node-a")


def _shard_objects(store: Path) -> list[Path]:
    return sorted(
        p for p in store.rglob("*")
        if p.is_file() and p.relative_to(store).parts[0] not in ("jobs", "checkpoints")
        and not p.relative_to(store).as_posix().startswith(MANIFEST_PREFIX)
        and not p.name.startswith(".")
    )


def test_shard_modified_mid_run_stops_training_naming_the_shard(deployment: Deployment):
    """Scenario 5: both nodes train; one byte of the stored shard ciphertext changes under
    them; the next read of that shard fails authentication, training stops on every node
    with an error naming the shard (the AEAD tag is checked before a segment's plaintext is
    handed on, and the failed output is zeroed: sealed/reader.py), and both nodes shred."""
    harness = deployment.harness
    store = harness.volume_path("store")
    shards = _shard_objects(store)
    assert shards, sorted(p.as_posix() for p in store.rglob("*"))
    # training under way: a step line of this run (an earlier test's job may have left a
    # checkpoint, so this run may resume past step 5)
    before = len(harness.logs("node-a"))
    harness.up(["node-a", "node-b"])
    deadline = time.monotonic() + WAIT_S
    while not re.search(r"\bstep \d+/", harness.logs("node-a")[before:]):
        assert time.monotonic() < deadline, harness.logs("node-a")[-3000:]
        states = {s.name: s.state for s in harness.ps()}
        assert states["node-a"] == "running", harness.logs("node-a")[-3000:]
        assert states["node-b"] == "running", harness.logs("node-b")[-3000:]
        time.sleep(0.2)
    for shard in shards:  # in place, as a storage attacker would (same inode, same size)
        with open(shard, "r+b") as f:
            f.seek(shard.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, 1)
            f.write(bytes([byte[0] ^ 0x01]))
    named = []
    for node in ("node-a", "node-b"):
        with pytest.raises(ServiceFailed):
            harness.wait_completed(node)
        log = harness.logs(node)
        # The rank that reads the changed bytes first names the shard; its peer may instead
        # see that rank go away (gloo: connection closed by peer). Both stop and shred.
        named += re.findall(r"training failed: DecryptionError: [^\n]*\(shard (\d+)", log)
        assert "shred report (error)" in log, log[-3000:]
        assert "step 100000/100000" not in log
    assert named, harness.logs("node-a")[-2000:] + harness.logs("node-b")[-2000:]
    assert {int(j) for j in named} <= set(range(len(shards)))
    assert _files_containing(harness.run_dir, CANARIES) == []
    for node in ("node-a", "node-b"):
        deployment.assert_clean(node)


def test_manifest_comes_from_the_brokers_and_is_checked_before_any_release(
        deployment: Deployment):
    """Issue 16: the node's job file names no manifest (deploy/bin/node.py renders none); the
    trainer learns it from the brokers. A job description that pins another manifest, and a
    store that lacks the manifest on record, both stop `trainer --attest` with exit 8 before
    any broker releases anything (no release record at either broker)."""
    harness = deployment.harness
    store = harness.volume_path("store")
    info_path = store / "jobs" / "job-1.json"
    info = json.loads(info_path.read_text())
    assert "manifest" not in info and "key_version" not in info  # ids only
    (manifest,) = [p for p in store.rglob("*")
                   if p.relative_to(store).as_posix().startswith(MANIFEST_PREFIX)]
    tpm = deployment.variables["TPM_A_PORT"]

    def run(job_info: Path) -> str:
        argv = [a if not a.startswith("--job-info=") else f"--job-info={job_info}"
                for a in deployment.node_argv("node-a", "node-a", tpm)]
        result = harness.run("node-a", argv)
        output = (result.stdout + result.stderr).decode(errors="replace")
        assert result.returncode == EXIT_DATASET, output[-3000:]
        assert "Traceback" not in output and "step 1/5" not in output
        return output

    since = int(time.time() * 1000)
    pinned = store / "jobs" / "job-1-pinned.json"
    # another manifest object that is in the store (so the trainer's own store check passes
    # and the brokers' record is what refuses it)
    wrong = "manifests/" + "0" * 32
    (store / wrong).write_bytes(manifest.read_bytes())
    pinned.write_text(json.dumps({**info, "key_version": 1, "manifest": wrong}))
    try:
        output = run(pinned)
    finally:
        pinned.unlink()
        (store / wrong).unlink()
    assert "trainer: dataset mismatch, no key requested" in output
    assert wrong in output and manifest.relative_to(store).as_posix() in output

    hidden = manifest.with_name(manifest.name + ".away")
    manifest.rename(hidden)
    try:
        output = run(info_path)
    finally:
        hidden.rename(manifest)
    assert "trainer: dataset not found, no key requested" in output
    assert f"{manifest.relative_to(store).as_posix()} of dataset" in output
    for broker in ("provider", "tenant"):
        assert _released(deployment.audit_since(broker, since), "node:node-a") == [], broker
    deployment.assert_clean("node-a")
