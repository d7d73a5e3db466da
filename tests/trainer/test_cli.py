"""The trainer command: help, refusals, config errors, hardening refusal, key errors."""

from __future__ import annotations

import datetime
import shutil
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from compose.ports import free_port
from tests.trainer.conftest import PY, REPO, attest_env, child_env, job_dict, write_job

_MEASURED: list = []  # the session's measured environment (see the autouse fixture)


@pytest.fixture(autouse=True)
def _measured(measured_env):
    _MEASURED[:] = [measured_env]


def trainer(*args: str, wrap: list[str] | None = None) -> subprocess.CompletedProcess:
    """``python -m trainer ARGS``; with --attest from the measured environment (the code
    identity guard refuses any other), else from this checkout."""
    if "--attest" in args:
        py, env = str(_MEASURED[0] / "bin" / "python"), attest_env()
    else:
        py, env = PY, child_env()
    return subprocess.run([*(wrap or []), py, "-m", "trainer", *args], cwd=REPO,
                          env=env, capture_output=True, text=True)


def _pem_files(tmp_path):
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(1).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "ca.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "node.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "node.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))


def _closed_port() -> int:
    # reserved for this process and outside the ephemeral range: nothing else listens there
    return free_port()


def _attested_job(tmp_path, dataset):
    _pem_files(tmp_path)
    broker = {"address": f"127.0.0.1:{_closed_port()}", "ca": str(tmp_path / "ca.pem"),
              "cert": str(tmp_path / "node.pem"), "key": str(tmp_path / "node.key")}
    return write_job(tmp_path / "job.yaml", job_dict(
        dataset, tmp_path / "run", brokers=[broker],
        attestation={"node_id": "node-1", "tcti": "device:/nonexistent/tpm"}))


def test_help_explains_commands_and_exit_codes():
    out = trainer("--help")
    assert out.returncode == 0
    for text in ("--attest", "--job", "check", "validate", "exit codes", "143 SIGTERM",
                 "4 attestation denied", "5 code identity refused", "7 broker unreachable",
                 "8 dataset not found or not as the brokers have it on record",
                 "--threads", "--log-format"):
        assert text in out.stdout


def test_without_attest_the_cli_refuses_to_get_keys(tmp_path, dataset):
    job = write_job(tmp_path / "job.yaml", job_dict(dataset, tmp_path / "run"))
    out = trainer("--job", str(job))
    assert out.returncode == 2
    assert "refusing to train without --attest" in out.stderr
    assert not (tmp_path / "run" / "ckpt").exists()


def test_usage_and_config_errors_exit_2(tmp_path, dataset):
    assert trainer("--attest").returncode == 2
    assert "--job JOB.yaml is required" in trainer("--attest").stderr
    assert trainer("frobnicate").returncode == 2
    job = write_job(tmp_path / "bad.yaml", job_dict(dataset, tmp_path / "run", steps=0,
                                                    precision="fp8"))
    out = trainer("--attest", "--job", str(job))
    assert out.returncode == 2
    assert "invalid job file: steps must be an integer from 1" in out.stderr


def test_validate_prints_a_summary(tmp_path, dataset):
    job = write_job(tmp_path / "job.yaml", job_dict(dataset, tmp_path / "run"))
    out = trainer("validate", "--job", str(job))
    assert out.returncode == 0
    assert "job job-1 (tenant acme): dataset corpus v1, model tiny-gpt, 60 steps" in out.stdout


def test_validate_a_job_that_leaves_the_manifest_to_the_brokers(tmp_path, dataset):
    job = job_dict(dataset, tmp_path / "run")
    job["dataset"] = {"id": "corpus", "store": str(dataset.store)}
    out = trainer("validate", "--job", str(write_job(tmp_path / "job.yaml", job)))
    assert out.returncode == 0, out.stderr
    assert "dataset corpus (key version and manifest from the brokers)" in out.stdout


def test_attest_without_brokers_says_why(tmp_path, dataset):
    job = write_job(tmp_path / "job.yaml", job_dict(dataset, tmp_path / "run"))
    out = trainer("--attest", "--job", str(job))
    assert out.returncode == 1
    assert "the job lists no brokers" in out.stderr


@pytest.mark.parametrize("name", ["runpy:run_module", "tests.trainer.custom_model:make"])
def test_attest_refuses_model_code_outside_the_measured_packages(tmp_path, dataset, name):
    job = job_dict(dataset, tmp_path / "run")
    job["model"] = {"name": name, "params": {"mod_name": "this"}}
    out = trainer("--attest", "--job", str(write_job(tmp_path / "job.yaml", job)))
    assert out.returncode == 2, out.stderr
    assert f"model.name {name!r} names code outside the measured packages" in out.stderr
    assert "The Zen of Python" not in out.stdout + out.stderr  # the module never ran


def test_attest_with_unreachable_broker_is_an_outage_exit_7(tmp_path, dataset):
    job = _attested_job(tmp_path, dataset)
    out = trainer("--attest", "--job", str(job), "--threads", "1")
    assert out.returncode == 7, out.stderr
    assert "trainer: broker unreachable (an outage, not a revocation)" in out.stderr
    assert "UNAVAILABLE" in out.stderr and "revoked" not in out.stderr
    assert "shred report (error)" in out.stderr
    assert "using 1 CPU thread(s) per process" in out.stderr
    assert "Traceback" not in out.stderr


def test_no_key_is_requested_before_the_manifest_is_found(tmp_path, dataset):
    """The broker address is closed: reaching it would exit 7. A missing manifest stops the
    trainer before it asks any broker for anything."""
    job = _attested_job(tmp_path, dataset)
    text = job.read_text().replace(str(dataset.manifest), "no-such.manifest")
    assert "no-such.manifest" in text
    job.write_text(text)
    out = trainer("--attest", "--job", str(job))
    assert out.returncode == 8, out.stderr
    assert "dataset not found, no key requested" in out.stderr
    assert "no-such.manifest of dataset" in out.stderr and "is not in the store" in out.stderr
    assert "UNAVAILABLE" not in out.stderr and "Traceback" not in out.stderr


def test_validate_names_each_missing_file(tmp_path, dataset):
    job = _attested_job(tmp_path, dataset)
    (tmp_path / "node.key").unlink()
    out = trainer("validate", "--job", str(job))
    assert out.returncode == 2, out.stderr
    assert f"brokers[0].key: no file {tmp_path / 'node.key'}" in out.stderr
    assert "attestation.tcti: no TPM device /nonexistent/tpm" in out.stderr
    assert "brokers[0].ca" not in out.stderr  # the files that are there are not named


def test_threads_must_be_positive(tmp_path, dataset):
    job = write_job(tmp_path / "job.yaml", job_dict(dataset, tmp_path / "run"))
    out = trainer("--attest", "--job", str(job), "--threads", "0")
    assert out.returncode == 2 and "--threads must be at least 1" in out.stderr
    bad = write_job(tmp_path / "bad.yaml", {**job_dict(dataset, tmp_path / "run"), "threads": 0})
    out = trainer("validate", "--job", str(bad))
    assert out.returncode == 2 and "threads must be an integer from 1" in out.stderr


def test_json_logs_are_one_object_per_line(tmp_path, dataset):
    import json

    job = _attested_job(tmp_path, dataset)
    out = trainer("--attest", "--job", str(job), "--log-format", "json")
    assert out.returncode == 7, out.stderr
    logged = [json.loads(line) for line in out.stderr.splitlines() if line.startswith("{")]
    shred = [r for r in logged if r["logger"] == "trainer.shred"]
    assert shred and shred[-1]["message"].startswith("shred report (error)")
    assert shred[-1]["level"] == "WARNING" and shred[-1]["process_role"] == "rank 0"


def test_check_passes_here():
    out = trainer("check")
    assert out.returncode == 0, out.stdout
    for name in ("not-dumpable", "no-core-dumps", "umask-077", "mlock-key-buffers"):
        assert f"[ok  ] {name}" in out.stdout
    assert "self-check passed" in out.stdout


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_attest_refuses_to_start_when_keys_cannot_be_locked(tmp_path, dataset):
    # without CAP_IPC_LOCK and with a zero locked-memory limit, key buffers cannot be mlocked
    wrap = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "prlimit",
            "--memlock=0:0", "--"]
    out = trainer("check", wrap=wrap)
    assert out.returncode == 1
    assert "[FAIL] mlock-key-buffers" in out.stdout and "fix: raise the locked-memory" in out.stdout
    job = _attested_job(tmp_path, dataset)
    out = trainer("--attest", "--job", str(job), wrap=wrap)
    assert out.returncode == 1
    assert "refusing to start: process hardening self-check failed" in out.stderr
    assert "[FAIL] mlock-key-buffers" in out.stderr and "CAP_IPC_LOCK" in out.stderr
    assert "key release failed" not in out.stderr  # no key was asked for


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs util-linux setpriv")
def test_finite_memlock_limit_skips_mlockall_but_locks_keys():
    # mlockall(MCL_FUTURE) under a finite limit would make later allocations fail
    wrap = ["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock", "prlimit",
            "--memlock=65536:65536", "--"]
    out = trainer("check", wrap=wrap)
    assert out.returncode == 0, out.stdout
    assert "[ok  ] mlock-key-buffers" in out.stdout
    assert "[warn] mlockall" in out.stdout
    assert "skipped: RLIMIT_MEMLOCK is 65536 bytes and CAP_IPC_LOCK is absent" in out.stdout


def test_default_threads_share_the_cores_among_local_ranks(monkeypatch):
    import os

    from trainer.cli import default_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert default_threads() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")
    assert default_threads() == 1  # never zero
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    assert default_threads() == 8
