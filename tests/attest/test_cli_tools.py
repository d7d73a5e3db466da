"""``attest swtpm create|run``, ``attest ak export``, ``--format json`` on every printing
``attest`` command, ``--version`` and shell completion, as real subprocesses (real swtpm,
real TPM commands through tpm2-pytss)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from attest.tpm2.marshal import parse_public
from attest.tpm2.node import TpmNode

REPO = Path(__file__).resolve().parents[2]


def attest(*args: str, status: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "attest.cli", *args], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == status, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    return proc


@pytest.mark.integration
def test_swtpm_create_run_and_ak_export(tmp_path) -> None:
    made = json.loads(attest("swtpm", "create", str(tmp_path / "tpm"), "-o", "json").stdout)
    assert Path(made["state_dir"]).is_dir()
    root = x509.load_pem_x509_certificate(Path(made["ek_root"]).read_bytes())
    inter = x509.load_pem_x509_certificate(Path(made["ek_intermediates"]).read_bytes())
    inter.verify_directly_issued_by(root)
    again = attest("swtpm", "create", str(tmp_path / "tpm"), status=2)
    assert "already holds a TPM" in again.stderr

    run = subprocess.Popen([sys.executable, "-m", "attest.cli", "swtpm", "run",
                            str(tmp_path / "tpm")], cwd=REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    try:
        line = run.stdout.readline()  # blocks until it serves (or exits: empty line)
        assert "TCTI swtpm:host=127.0.0.1,port=" in line, (line, run.stderr.read())
        tcti = line.split("TCTI ")[1].split()[0]
        with TpmNode(tcti) as node:  # the EK certificate chains to the CA it wrote
            ek_cert = x509.load_der_x509_certificate(node.ek_certificate())
            expected = parse_public(node.ak_public()).key
        ek_cert.verify_directly_issued_by(inter)

        pem = attest("ak", "export", "--tcti", tcti).stdout
        key = serialization.load_pem_public_key(pem.encode())
        assert key == expected
        out = tmp_path / "ak.pem"
        doc = json.loads(attest("ak", "export", "--tcti", tcti, "--out", str(out),
                                "-o", "json").stdout)
        assert doc["pem"] == pem == out.read_text() and doc["out"] == str(out)
        assert parse_public(bytes.fromhex(doc["tpmt_public"])).key == expected
    finally:
        run.send_signal(signal.SIGINT)
        try:
            run.wait(timeout=60)
        finally:
            if run.poll() is None:
                run.kill()
    assert run.returncode == 0


def test_ak_export_without_a_tpm_is_one_line(tmp_path) -> None:
    proc = attest("ak", "export", "--tcti", "swtpm:host=127.0.0.1,port=1", status=1)
    assert proc.stderr.startswith("attest: error: TPM:") and len(proc.stderr.splitlines()) == 1


def test_code_digest_json_matches_text() -> None:
    text = attest("code-digest").stdout.strip()
    doc = json.loads(attest("code-digest", "--format", "json").stdout)
    assert doc["code_digest"] == text and doc["written"] is False
    assert doc["manifest_bytes"] > 1000


def test_doctor_and_collect_format_json(tmp_path) -> None:
    collected = json.loads(attest("collect", "--no-gpu", "-o", "json").stdout)
    assert len(collected["code_digest"]) == 64 and "ksm_enabled" in collected
    # doctor exits 1 when this machine fails a rule (swap on, say): either way, JSON
    proc = subprocess.run([sys.executable, "-m", "attest.cli", "doctor", "--no-gpu",
                           "--policy", str(REPO / "policies" / "dev-swtpm.yaml"), "-o", "json"],
                          cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["policy"]["name"] == "dev-swtpm"
    assert {r["name"] for r in doc["policy"]["rules"]} >= {"ksm-off", "swap-off"}
    assert doc["policy"]["allowed"] in (True, False, None)


@pytest.mark.parametrize("module,prog", [("attest.cli", "attest"),
                                         ("kms_broker.cli", "kms-broker"),
                                         ("trainer.cli", "trainer")])
def test_version_and_completion(module: str, prog: str, tmp_path) -> None:
    env = {k: v for k, v in os.environ.items()}
    version = subprocess.run([sys.executable, "-m", module, "--version"], cwd=REPO,
                             capture_output=True, text=True, check=False, env=env)
    assert version.returncode == 0 and version.stdout.startswith(f"{prog} "), version
    assert "(confidential-training)" in version.stdout
    script = subprocess.run([sys.executable, "-m", module, "completion", "bash"], cwd=REPO,
                            capture_output=True, text=True, check=False, env=env)
    assert script.returncode == 0, script.stderr
    path = tmp_path / "c.bash"
    path.write_text(script.stdout)
    # ask bash itself what it completes after "PROG " and after "PROG <first> --"
    first, option = {"attest": ("collect", "--tcti"), "kms-broker": ("serve", "--config"),
                     "trainer": ("validate", "--job")}[prog]
    probe = (f"source {path}\n"
             f"COMP_WORDS=({prog} ''); COMP_CWORD=1; {_fn(prog)}; echo \"${{COMPREPLY[*]}}\"\n"
             f"COMP_WORDS=({prog} {first} --); COMP_CWORD=2; {_fn(prog)}; "
             f"echo \"${{COMPREPLY[*]}}\"\n")
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, check=True)
    top, options = out.stdout.splitlines()
    assert first in top.split()
    assert option in options.split()


def _fn(prog: str) -> str:
    return "_" + "".join(c if c.isalnum() else "_" for c in prog) + "_complete"
