"""A confidential GPU node (software TEE: TDX quote + two Hopper GPU reports, composite
evidence) against two real brokers that each hold one share of the dataset key: it attests
to both and trains; each misbehaviour is denied by both brokers (production-gpu-cc policy or
verification), naming the rule, in the trainer's error and in each broker's audit log.

Brokers are ``kms-broker serve`` subprocesses over mTLS with SoftHSM tokens, configured with
the ``composite`` verifier and ``reference_values`` that trust the test TEE's roots (the only
thing that differs from a production configuration). The node is a trainer process
(tests/attest/softtee_entry.py: AttestedKeySource + run_job) that makes its evidence over
each broker's fresh challenge.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest
import yaml

from tests.attest.softtee import SOFT_TD_MEASUREMENTS, SoftGpu, SoftTdx
from tests.kms_broker.conftest import enrol, pki, start_broker  # noqa: F401 - fixture
from tests.kms_broker.hsm_fixtures import softhsm_config  # noqa: F401 - fixture
from tests.trainer.conftest import (  # noqa: F401 - procs is a fixture
    PY,
    REPO,
    Proc,
    corpus,
    job_dict,
    losses,
    procs,
    write_job,
)

pytestmark = pytest.mark.integration
ENTRY = REPO / "tests" / "attest" / "softtee_entry.py"
POLICY = REPO / "policies" / "production-gpu-cc.yaml"
RTMR3 = hashlib.sha384(b"approved trainer code").hexdigest()


class GpuNodeWorld:
    def __init__(self, root: Path, pki, softhsm_config):  # noqa: F811
        from kms_broker.grants import GrantDocument
        from kms_broker.tenant import upload_dataset
        from sealed.store import LocalDirStore

        self.tdx = SoftTdx.create(root / "tee" / "tdx")
        self.gpus = [SoftGpu.create(root / "tee" / f"gpu{i}") for i in range(2)]
        nvidia = self.gpus[0].reference()
        nvidia["device_roots"] = [r for g in self.gpus for r in g.reference()["device_roots"]]
        extra = {
            "verifiers": ["tests.kms_broker.verifiers:JsonClaimsVerifier",
                          "attest.composite:CompositeVerifier"],
            "reference_values": {"composite": {"tdx": self.tdx.reference(),
                                               "nvidia-gpu": nvidia}},
        }
        self.brokers = [start_broker(root, pki, softhsm_config, name=name, extra_config=extra)
                        for name in ("provider", "tenant")]
        policy = yaml.safe_load(POLICY.read_text())
        policy["params"].update({"gpus_per_node": 2, "allowed_tdx_images": [
            {**SOFT_TD_MEASUREMENTS, "rtmr3": RTMR3}]})
        self.store = root / "store"
        clients = [b.tenant("acme") for b in self.brokers]
        try:
            for broker, client in zip(self.brokers, clients, strict=True):
                client.__enter__()
                client.register()
                enrol(broker, "n1")
            up = upload_dataset(clients, corpus(300), LocalDirStore(self.store),
                                dataset_id="corpus")
            self.manifest = up.manifest_name
            for client in clients:
                digest = client.put_policy(yaml.safe_dump(policy))
                client.create_grant(GrantDocument(
                    grant_id="g1", tenant_id="acme", dataset_id="corpus", job_id="gpu-job",
                    policy_digest=digest, max_nodes=16,
                    expires_unix_ms=int(time.time() * 1000) + 3_600_000))
        finally:
            for client in clients:
                client.__exit__(None, None, None)

    def job(self, root: Path, name: str) -> Path:
        brokers = [{"address": b.address, "ca": str(b.pki.ca_path),
                    "cert": str(b.pki.root / "node-n1.pem"),
                    "key": str(b.pki.root / "node-n1.key"), "server_name": "localhost"}
                   for b in self.brokers]
        ds = type("DS", (), {"manifest": self.manifest, "store": self.store})
        job = job_dict(ds, root / name, job_id="gpu-job", brokers=brokers, steps=30,
                       attestation={"node_id": "n1", "tcti": "device:/dev/null"})
        return write_job(root / f"{name}.yaml", job)

    def node(self, job: Path, *flags: str) -> list[str]:
        gpus = [a for g in self.gpus for a in ("--gpu", str(g.directory))]
        return [PY, str(ENTRY), "--job", str(job), "--tdx", str(self.tdx.directory), *gpus,
                "--rtmr3", RTMR3, *flags]

    def stop(self) -> None:
        for broker in self.brokers:
            broker.stop()


@pytest.fixture(scope="module")
def world(tmp_path_factory, pki, softhsm_config):  # noqa: F811
    w = GpuNodeWorld(tmp_path_factory.mktemp("gpu-node"), pki, softhsm_config)
    yield w
    w.stop()


def test_a_composite_node_attests_to_both_brokers_and_trains(tmp_path, world, procs):  # noqa: F811
    proc = Proc(world.node(world.job(tmp_path, "ok")), tmp_path / "logs", "ok")
    procs.append(proc)
    assert proc.wait() == 0, proc.err()[-4000:]
    assert "RESULT steps_done=30" in proc.out()
    found = losses(proc.err())
    assert found[-1][1] < found[0][1]
    for broker in world.brokers:
        events = broker.audit()
        assert any(e["event"] == "attest" and e["outcome"] == "allowed"
                   and "composite evidence verified" in e["reason"] for e in events)
        assert any(e["event"] == "release" and e["outcome"] == "allowed" for e in events)


@pytest.mark.parametrize(("flag", "named"), [
    ("--drop-gpu", "gpu-count"),
    ("--foreign-gpu-nonce", "gpu1.nvidia.nonce"),
    ("--debug-td", "cpu-not-debuggable"),
    ("--out-of-date-tcb", "tdx-tcb-up-to-date"),
    ("--gpu-cc-off", "gpus-cc-mode-on"),
])
def test_each_misbehaviour_is_denied_naming_the_rule(tmp_path, world, procs, flag,  # noqa: F811
                                                     named):
    def denials(broker) -> int:
        return sum(1 for e in broker.audit() if e["event"] == "attest"
                   and e["outcome"] == "denied" and named in e["reason"])

    before = [denials(b) for b in world.brokers]
    proc = Proc(world.node(world.job(tmp_path, flag.strip("-")), flag), tmp_path / "logs",
                flag.strip("-"))
    procs.append(proc)
    assert proc.wait() == 4, proc.err()[-3000:]
    err = proc.err()
    assert "trainer: attestation denied" in err and named in err, err[-3000:]
    assert "step 1/" not in err
    assert "RESULT" not in proc.out()
    # both brokers refused, each naming the same rule in its audit log
    assert [denials(b) for b in world.brokers] == [n + 1 for n in before]
