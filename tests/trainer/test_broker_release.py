"""The trainer against a real broker (subprocess, mTLS, SoftHSM): attested release to every
torchrun rank, training, revocation of the grant mid-training, a policy denial, and a memory
scan for DEK and share bytes after SIGTERM.

Evidence is the broker tests' ``test-json`` kind (claims trusted, binding to nonce, session
and node key enforced); the TPM quote path is covered by the attestation tests.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from sealed import derive_dek
from sealed.secrets import SecretBuffer
from tests.kms_broker.conftest import enrol, pki, start_broker  # noqa: F401 - fixture
from tests.kms_broker.hsm_fixtures import softhsm_config  # noqa: F401 - fixture
from tests.kms_broker.verifiers import POLICY_YAML
from tests.trainer.conftest import (
    PY,
    REPO,
    Proc,
    corpus,
    files_containing,
    job_dict,
    losses,
    memory_contains,
    write_job,
)

pytestmark = pytest.mark.integration
ENTRY = REPO / "tests" / "trainer" / "attested_entry.py"
WAIT_S = 300  # how long a helper waits for a log line (a hang guard, not a timing check)


class Release:
    def __init__(self, root: Path, pki, softhsm_config, *, name: str = "b1",  # noqa: F811
                 ttl_ms: dict[str, int] | None = None):
        import uuid

        from kms_broker.grants import GrantDocument
        from kms_broker.tenant import upload_dataset
        from sealed.store import LocalDirStore

        self.broker = start_broker(root, pki, softhsm_config, name=name, ttl_ms=ttl_ms)
        self.canary = f"CANARY-{uuid.uuid4().hex}".encode()
        self.shares: list[bytes] = []

        def recording_share() -> SecretBuffer:
            s = SecretBuffer.random(32)
            with s.view() as v:
                self.shares.append(bytes(v))
            return s

        self.store = root / "store"
        with self.broker.tenant("acme") as client:
            client.register()
            enrol(self.broker, "n1")
            up = upload_dataset([client], corpus(400, canary=self.canary.decode()),
                                LocalDirStore(self.store), dataset_id="corpus",
                                make_share=recording_share)
            self.manifest = up.manifest_name
            digest = client.put_policy(POLICY_YAML)
            for grant_id, job in (("g1", "job-1"), ("g2", "job-2"), ("g3", "job-3")):
                client.create_grant(GrantDocument(
                    grant_id=grant_id, tenant_id="acme", dataset_id="corpus", job_id=job,
                    policy_digest=digest, max_nodes=4,
                    expires_unix_ms=int(time.time() * 1000) + 3_600_000))
        shares = [SecretBuffer.from_bytes(s) for s in self.shares]
        dek = derive_dek(shares, tenant_id="acme", dataset_id="corpus", key_version=1)
        with dek.view() as v:
            self.dek = bytes(v)
        dek.zeroize()

    def job(self, root: Path, job_id: str, **over) -> Path:
        dev = self.broker.pki
        broker = {"address": self.broker.address, "ca": str(dev.ca_path),
                  "cert": str(dev.root / "node-n1.pem"), "key": str(dev.root / "node-n1.key"),
                  "server_name": "localhost"}
        ds = type("DS", (), {"manifest": self.manifest, "store": self.store})
        job = job_dict(ds, root / job_id, job_id=job_id, brokers=[broker],
                       attestation={"node_id": "n1", "tcti": "device:/dev/null"}, **over)
        return write_job(root / f"{job_id}.yaml", job)

    def needles(self) -> list[bytes]:
        return [self.canary, self.dek, *self.shares]


@pytest.fixture(scope="module")
def release(tmp_path_factory, pki, softhsm_config):  # noqa: F811
    r = Release(tmp_path_factory.mktemp("release"), pki, softhsm_config)
    yield r
    r.broker.stop()


def torchrun(job: Path, *extra: str) -> list[str]:
    return [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            str(ENTRY), "--job", str(job), *extra]


def _wait_for(proc: Proc, text: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while text not in proc.err() + proc.out():
        assert proc.popen.poll() is None, f"exited early:\n{proc.err()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} after {WAIT_S} s:\n{proc.err()[-3000:]}"
        time.sleep(0.05)


def test_ddp_trains_on_a_key_released_by_the_broker(tmp_path, release, procs):
    job = release.job(tmp_path, "job-1", steps=40)
    proc = Proc(torchrun(job), tmp_path / "logs", "train")
    procs.append(proc)
    assert proc.wait() == 0, proc.err()[-4000:]
    err = proc.err()
    found = losses(err)
    assert found[0][1] > 5.0 and found[-1][1] < 0.6 * found[0][1]
    assert "world 2 on cpu, backend gloo, precision bf16" in err
    # rank 0 says where its start-up time went (benchmarks/bench_first_step.py reads these)
    assert re.search(r"dataset key from 1 broker\(s\) in \d+ ms: code identity \d+ ms, "
                     r"challenge \d+ ms, evidence \d+ ms, attest\+release \S+ \d+ ms, "
                     r"open \S+ \d+ ms, derive \d+ ms$", err, re.MULTILINE), err[-3000:]
    assert err.count("first batch after") == 1
    assert err.count("shred report (normal exit)") == 2
    assert list((tmp_path / "job-1" / "ckpt").glob("ckpt-0000000040.ctck"))
    released = [e for e in release.broker.audit()
                if e["event"] == "release" and e["outcome"] == "allowed"
                and "job job-1" in e["reason"]]
    # local rank 0 attested and took the release for the node; rank 1 took the key from it
    assert len(released) == 1, released
    assert err.count("dataset key from local rank 0 in") == 1, err[-3000:]
    assert files_containing([Path("/tmp")], release.needles()) == []


def test_revoking_the_grant_stops_and_shreds_every_rank(tmp_path, release, procs):
    job = release.job(tmp_path, "job-2", steps=1_000_000, log_interval=1,
                      lease_poll_interval=0.2)
    proc = Proc(torchrun(job), tmp_path / "logs", "revoked")
    procs.append(proc)
    _wait_for(proc, "step 3/")
    with release.broker.tenant("acme") as acme:
        assert acme.revoke_grant("g2") >= 1
    proc.wait()
    err = proc.err()
    assert err.count("shred report (revoked: broker") == 2, err[-3000:]
    assert len(re.findall(r"exitcode\s*:\s*3 \(pid", err)) == 2, err[-3000:]
    # one rank attested for the node; the revocation reached the other through it
    assert err.count("dataset key from local rank 0 in") == 1, err[-3000:]
    assert files_containing([tmp_path], release.needles()) == []


def test_policy_denial_exits_4_having_decrypted_nothing(tmp_path, release, procs):
    job = release.job(tmp_path, "job-3", steps=10)
    proc = Proc([PY, str(ENTRY), "--job", str(job), "--ksm-on"], tmp_path / "logs", "denied")
    procs.append(proc)
    assert proc.wait() == 4, proc.err()[-3000:]
    err = proc.err()
    assert "trainer: attestation denied" in err and "ksm-off" in err
    assert err.count("KSM merges identical") == 1, err[-3000:]  # each reason once (issue 16)
    assert "plaintext buffers 0 (0.00 MiB)" in err  # nothing was ever decrypted
    assert "step 1/" not in err and not (tmp_path / "job-3" / "ckpt").exists()


def test_a_denial_under_torchrun_reaches_every_local_rank_from_one_attestation(
        tmp_path, release, procs):
    """Local rank 0 attests for the node; the broker denies it once and the other local rank
    learns the denial (with its reasons) from rank 0, never asking the broker itself."""
    job = release.job(tmp_path, "job-3", steps=10)
    before = len(release.broker.actions())
    proc = Proc(torchrun(job, "--ksm-on"), tmp_path / "logs", "denied-torchrun")
    procs.append(proc)
    assert proc.wait() != 0
    err = proc.err()
    # the first rank to leave exits 4 naming the failed rule (torchrun then stops the
    # other, which may be mid-exit itself); only rank 0 asked the broker
    assert re.search(r"exitcode\s*:\s*4", err), err[-3000:]
    assert "trainer: attestation denied" in err and "ksm-off" in err, err[-3000:]
    assert "step 1/" not in err and not (tmp_path / "job-3" / "ckpt").exists()
    attests = [e for e in release.broker.actions()[before:] if e["event"] == "attest"]
    assert [e["outcome"] for e in attests] == ["denied"], attests


def test_sigterm_scan_finds_no_dek_or_share_bytes(tmp_path, release, procs):
    job = release.job(tmp_path, "job-1", steps=1_000_000, log_interval=1)
    proc = Proc([PY, str(ENTRY), "--job", str(job)], tmp_path / "logs", "term",
                TRAINER_TEST_SHRED_HOOK="pause")
    procs.append(proc)
    _wait_for(proc, "step 3/")
    assert memory_contains(proc.pid, [release.dek])  # positive control: the key is there
    os.kill(proc.pid, signal.SIGTERM)
    _wait_for(proc, f"SHRED-DONE {proc.pid}")
    assert memory_contains(proc.pid, [release.dek, *release.shares]) == []
    proc.kill_tree()


def test_broker_outage_is_not_a_revocation(tmp_path, pki, softhsm_config, procs):  # noqa: F811
    """The broker dies mid-training: renewals cannot reach it, the lease runs out, and the
    trainer shreds and exits 7 saying the broker is unreachable (never 3, "revoked")."""
    outage = Release(tmp_path / "outage", pki, softhsm_config, name="b-outage",
                     ttl_ms={"lease": 20_000})
    try:
        job = outage.job(tmp_path, "job-1", steps=1_000_000, log_interval=1,
                         lease_poll_interval=0.2)
        proc = Proc([PY, str(ENTRY), "--job", str(job)], tmp_path / "logs", "outage")
        procs.append(proc)
        _wait_for(proc, "step 2/")
        outage.broker.proc.kill()
        outage.broker.proc.wait()
        assert proc.wait() == 7, proc.err()[-3000:]
        err = proc.err()
        assert "broker unreachable: the key lease ran out before a broker renewed it" in err
        assert "shred report (broker unreachable:" in err
        assert "key revoked" not in err and "revoked:" not in err
        assert files_containing([tmp_path], outage.needles()) == []
    finally:
        outage.broker.stop()
