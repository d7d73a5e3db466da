"""Ordinary mistakes at the ``kms-broker`` command line: each is one line on stderr that says
what to do, the documented exit status (``kms-broker --help``: 1 failed, 2 usage, 3
unreachable, 4 TLS, 130 interrupted), no traceback, no gRPC core log line, and nothing
changed at the broker. Real broker subprocess, real sockets, real SoftHSM2."""

from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.kms_broker.conftest import REPO
from tests.kms_broker.test_cli import cli_broker  # noqa: F401 - the module's broker

pytestmark = pytest.mark.integration


def cli(*args: str, status: int, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("KMS_BROKER_", "GRPC_"))}
    proc = subprocess.run([sys.executable, "-m", "kms_broker.cli", *args], cwd=REPO,
                          capture_output=True, text=True, check=False,
                          env={**base, **(env or {})}, timeout=timeout)
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def last_line(proc: subprocess.CompletedProcess) -> str:
    """``serve`` logs (its start) before it fails: the failure is the last line, and there
    is no traceback."""
    assert "Traceback" not in proc.stderr, proc.stderr
    line = proc.stderr.splitlines()[-1]
    assert line.startswith("kms-broker: error: "), proc.stderr
    return line


def one_line(proc: subprocess.CompletedProcess) -> str:
    """The whole stderr: exactly one `kms-broker: error:` line, no traceback, no gRPC log."""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kms-broker: error: "), proc.stderr
    return lines[0]


@pytest.fixture(scope="module")
def tenant(cli_broker, tmp_path_factory):  # noqa: F811
    broker, _, pki_dir = cli_broker
    home = tmp_path_factory.mktemp("tenant")
    key = home / "tenant.key"
    cli("tenant", "init", "--key", str(key), status=0)
    who = ["--tenant", "acme", "--broker", broker.address, "--tls", str(pki_dir)]
    cli("tenant", "register", *who, "--tenant-key", str(key), status=0)
    return broker, pki_dir, [*who, "--tenant-key", str(key)], home


def datasets(broker, pki_dir) -> list[str]:
    import json

    out = cli("dataset", "list", "--tenant", "acme", "--broker", broker.address, "--tls",
              str(pki_dir), "-o", "json", status=0)
    return [d["dataset"] for d in json.loads(out.stdout)["datasets"]]


def test_upload_of_an_empty_folder_or_a_file(tenant, tmp_path) -> None:
    broker, pki_dir, who, _ = tenant
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    line = one_line(cli("dataset", "upload", str(empty), "--store", str(tmp_path / "s"),
                        "--dataset", "e1", *who, status=1))
    assert "is empty: there is nothing to upload" in line
    a_file = tmp_path / "data.bin"
    a_file.write_bytes(b"x" * 100)
    line = one_line(cli("dataset", "upload", str(a_file), "--store", str(tmp_path / "s"),
                        "--dataset", "e2", *who, status=1))
    assert "is a file, not a folder" in line
    missing = one_line(cli("dataset", "upload", str(tmp_path / "nope"), "--store",
                           str(tmp_path / "s"), "--dataset", "e3", *who, status=1))
    assert "does not exist" in missing
    assert not (tmp_path / "s").exists()
    assert not {"e1", "e2", "e3"} & set(datasets(broker, pki_dir))


def test_ctrl_c_during_upload_rolls_back(tenant, tmp_path) -> None:
    """SIGINT (what Ctrl-C sends) while the upload waits on its second broker, after the
    first broker took its share: exit 130, one line, and the first broker's share is gone."""
    broker, pki_dir, who, _ = tenant
    data = tmp_path / "data"
    data.mkdir()
    (data / "r").write_bytes(os.urandom(4096))
    stall = socket.socket()  # a "broker" that accepts TCP and never answers the handshake
    stall.bind(("127.0.0.1", 0))
    stall.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = stall.accept()
            except OSError:
                return
            accepted.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    base = {k: v for k, v in os.environ.items() if not k.startswith("KMS_BROKER_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms_broker.cli", "dataset", "upload", str(data), "--store",
         str(tmp_path / "store"), "--dataset", "ci1", *who, "--broker",
         f"127.0.0.1:{stall.getsockname()[1]}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=base)
    try:
        # first connection: the CLI's TLS probe; second: gRPC's channel to the second
        # broker, opened only after the first broker committed its share
        deadline = time.monotonic() + 120
        while len(accepted) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the upload never reached the second broker"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        stall.close()
        for c in accepted:
            c.close()
    assert proc.returncode == 130, (out, err)
    # the folder is encrypted while the shares are committed, so its progress line may come
    # first; the failure itself is one line
    lines = [line for line in err.splitlines() if not line.startswith("encrypting:")]
    assert len(lines) == 1 and lines[0].startswith("kms-broker: error: interrupted"), err
    assert "rolled back" in lines[0]
    assert "ci1" not in datasets(broker, pki_dir)


def test_bare_host_without_port(tenant) -> None:
    _, pki_dir, _, _ = tenant
    line = one_line(cli("dataset", "list", "--tenant", "acme", "--broker", "127.0.0.1",
                        "--tls", str(pki_dir), status=2))
    assert "'127.0.0.1' must be HOST:PORT (for example 127.0.0.1:7001)" in line


def test_nothing_listening(tenant) -> None:
    _, pki_dir, _, _ = tenant
    with socket.socket() as s:  # a port nobody listens on (bound, never listening)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        line = one_line(cli("dataset", "list", "--tenant", "acme", "--broker",
                            f"127.0.0.1:{port}", "--tls", str(pki_dir), status=3))
    assert "nothing listens at" in line and "connection refused" in line


# ------------------------------------------------------------------ TLS
def _issue(ca_dir: Path, out: Path, role: str, ident: str, *, expired: bool = False
           ) -> tuple[Path, Path]:
    """A client certificate as `kms-broker certs issue` makes it, optionally already expired."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else \
        (now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}:{ident}")]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:kmsbroker:{role}:{ident}")]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    out.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = out / f"{role}-{ident}.pem", out / f"{role}-{ident}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


def _list(broker, ca: Path, cert: Path, key: Path, status: int, *extra: str) -> str:
    return one_line(cli("dataset", "list", "--tenant", "acme", "--broker", broker.address,
                        "--ca", str(ca), "--cert", str(cert), "--key", str(key), *extra,
                        status=status))


def test_tls_expired_client_certificate(tenant, tmp_path) -> None:
    broker, pki_dir, _, _ = tenant
    cert, key = _issue(pki_dir, tmp_path, "tenant", "acme", expired=True)
    line = _list(broker, pki_dir / "ca.pem", cert, key, 4)
    assert "expired on" in line and "issue a new one" in line


def test_tls_client_certificate_from_another_ca(tenant, tmp_path) -> None:
    broker, pki_dir, _, _ = tenant
    other = tmp_path / "other-ca"
    cli("certs", "ca", "--dir", str(other), status=0)
    cert, key = _issue(other, tmp_path / "o", "tenant", "acme")
    # the client trusts the broker's CA, but its own certificate comes from another CA
    line = _list(broker, pki_dir / "ca.pem", cert, key, 4)
    assert "does not trust the CA that issued your client certificate" in line
    # and a client that trusts only the other CA cannot trust the broker
    line = _list(broker, other / "ca.pem", cert, key, 4)
    assert "is not signed by the CA in" in line and "unknown CA" in line


def test_tls_wrong_role(tenant) -> None:
    broker, pki_dir, _, _ = tenant
    line = _list(broker, pki_dir / "ca.pem", pki_dir / "node-n1.pem", pki_dir / "node-n1.key", 4)
    assert "names node:n1, but this command needs a tenant certificate (wrong role)" in line
    # an operator command with a tenant certificate
    line = one_line(cli("node", "revoke", "n1", "--broker", broker.address, "--ca",
                        str(pki_dir / "ca.pem"), "--cert", str(pki_dir / "tenant-acme.pem"),
                        "--key", str(pki_dir / "tenant-acme.key"), status=4))
    assert "names tenant:acme, but this command needs an operator certificate" in line


def test_grpc_core_logs_only_when_asked(tenant) -> None:
    """A real call through gRPC: stderr stays empty by default; GRPC_VERBOSITY=debug (or
    --grpc-debug) brings gRPC core's own lines back."""
    who = tenant[2]
    flags = [a for a in who if a != "--tenant-key"][:-1]
    quiet = cli("dataset", "list", *flags, status=0)
    assert quiet.stderr == ""
    loud = cli("dataset", "list", *flags, status=0, env={"GRPC_VERBOSITY": "debug"})
    assert loud.stderr.strip(), "gRPC core said nothing at debug level"
    asked = cli("dataset", "list", *flags, "--grpc-debug", status=0)
    assert asked.stderr.strip(), "--grpc-debug did not bring gRPC core's lines back"
    assert quiet.stdout == loud.stdout == asked.stdout


# ------------------------------------------------------------------ serve
def _config_like(broker, tmp_path: Path, **changes) -> Path:
    cfg = yaml.safe_load((broker.state_dir.parent / "cli.yaml").read_text())
    state = tmp_path / "state"
    state.mkdir()
    cfg["state_dir"] = str(state)
    for k, v in changes.items():
        if k == "token_label":
            cfg["hsm"]["token_label"] = v
        else:
            cfg[k] = v
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_serve_with_a_wrong_token_label(cli_broker, tmp_path) -> None:  # noqa: F811
    broker, _, _ = cli_broker
    config = _config_like(broker, tmp_path, token_label="no-such-token")
    line = last_line(cli("serve", "--config", str(config), status=1))
    assert "no PKCS#11 token labelled 'no-such-token'" in line and "token_label" in line
    line = one_line(cli("audit", "public-key", "--config", str(config), status=1))
    assert "no PKCS#11 token labelled 'no-such-token'" in line


def test_serve_on_a_port_in_use(cli_broker, tmp_path) -> None:  # noqa: F811
    broker, _, _ = cli_broker
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        config = _config_like(broker, tmp_path, listen=f"127.0.0.1:{port}")
        line = last_line(cli("serve", "--config", str(config), status=1))
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in line


# ------------------------------------------------------------------ policy put lints
def test_policy_put_refuses_a_rule_on_a_claim_no_verifier_produces(tenant, tmp_path) -> None:
    """Before: `policy put` stored it and every node was then denied. Now it is refused
    before any broker is asked, with the suggestion; --no-lint stores it anyway."""
    import json

    from tests.kms_broker.verifiers import POLICY_YAML

    who = tenant[2]
    assert "node.ksm.enabled" in POLICY_YAML
    bad = tmp_path / "bad.yaml"
    bad.write_text(POLICY_YAML.replace("node.ksm.enabled", "node.ksm.enable"))
    tenant_flags = [a for a in who if a != "--tenant-key"][:-1]  # no tenant key needed
    line = one_line(cli("policy", "put", str(bad), *tenant_flags, status=1))
    assert "no verifier produces claims.node.ksm.enable" in line
    assert "did you mean claims.node.ksm.enabled" in line and "--no-lint" in line
    stored = cli("policy", "put", str(bad), "--no-lint", *tenant_flags, "-o", "json", status=0)
    doc = json.loads(stored.stdout)
    assert doc["lint"][0]["code"] == "unknown-claim" and len(doc["digest"]) == 64
    assert "policy lint: error" in stored.stderr


def test_serve_with_its_metrics_port_in_use(cli_broker, tmp_path) -> None:  # noqa: F811
    broker, _, _ = cli_broker
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen(1)
        port = held.getsockname()[1]
        config = _config_like(broker, tmp_path, metrics_port=port)
        line = last_line(cli("serve", "--config", str(config), status=1))
    assert f"cannot serve metrics on port {port}: it is already in use" in line
