"""One-shot bootstrap of the compose deployment (service ``bootstrap`` in docker-compose.yml).

Creates, once (a second run finds ``/pki/bootstrapped`` and does nothing):

- a development CA (``kms-broker certs ca``) and certificates (``kms-broker certs issue``):
  one per broker (serverAuth, DNS name = its compose service name), one per node, one for the
  tenant and one for the operator, each copied with ``ca.pem`` into the volume of the service
  that uses it. The CA key stays in the ``pki`` volume, which only this service mounts;
- a SoftHSM token per broker (``kms-broker hsm init``) in that broker's token volume, with a
  random user PIN in a 0600 file there; the SO PIN is used once and deleted;
- ``broker.yaml`` for each broker, rendered from ``/deploy/config/broker.yaml.tmpl``: state
  in SQLite, or for the provider broker with ``--provider-state postgres`` in the
  ``postgres`` service (``--postgres-url``, whose ``passfile=`` is the password file that
  service writes on its first start; the tenant's own broker keeps SQLite);
- a test EK manufacturer CA and, per node, swtpm state with an EK certificate it signed
  (``attest.swtpm``); the EK CA's root (``ek-root.pem``) and issuing CA
  (``ek-intermediates.pem``) go to each broker, which trusts them for TPM enrolment;
- for the development S3 server (service ``s3``, profile ``s3``): a TLS server certificate
  from the development CA (DNS ``s3`` and ``localhost``, IP 127.0.0.1; no broker identity in
  it) in the ``s3`` volume, and for the tenant and each node the standard AWS files in
  ``<home>/aws/``: ``config`` (endpoint ``--s3-endpoint``, the CA bundle, the region) and
  ``credentials`` (0600, random keys; the development server accepts any). The services read
  them through ``AWS_CONFIG_FILE`` and ``AWS_SHARED_CREDENTIALS_FILE`` when the dataset is
  kept in S3 (``DATASET_STORE=s3://...``).

Container paths: every path below is ``ROOT + <container path>``; ROOT is ``--root``, given as
``${CT_ROOT:-}`` in docker-compose.yml (empty under Docker, the service root under the local
harness; see compose/local.py). Every service mounts a volume at the same container path as
this one does, so rendered paths are valid for the services that read them.

No secret is printed, put in argv or in the environment: PINs go from ``secrets`` straight
into 0600 files that ``kms-broker hsm init`` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import string
import subprocess
import sys
from pathlib import Path

BROKERS = ("provider", "tenant")  # broker ids; service "<id>-broker", volumes "<id>-broker/-hsm"


def _log(message: str) -> None:
    print(f"bootstrap: {message}", flush=True)


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(
            f"bootstrap: `{' '.join(argv[:3])} ...` failed ({result.returncode}): "
            f"{result.stderr.strip()[-2000:]}"
        )


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _issue(pki: Path, out: Path, role: str, ident: str, *dns: str) -> None:
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    argv = ["kms-broker", "certs", "issue", "--ca-dir", str(pki), "--out", str(pki / "issued"),
            "--role", role, "--id", ident, "--force"]
    for name in dns:
        argv += ["--dns", name]
    _run(*argv)
    for suffix in ("pem", "key"):
        shutil.copy2(pki / "issued" / f"{role}-{ident}.{suffix}", out / f"{role}-{ident}.{suffix}")
    shutil.copy2(pki / "ca.pem", out / "ca.pem")


def _s3_server_cert(pki: Path, out: Path) -> None:
    """A serverAuth certificate for the development S3 server, signed by the development CA
    (made here: ``kms-broker certs`` issues only broker identities as servers)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from kms_broker.certs import load_ca

    ca_cert, ca_key = load_ca(pki)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "s3")]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("s3"), x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(out / "s3.key", key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (out / "s3.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    shutil.copy2(pki / "ca.pem", out / "ca.pem")


def _aws_files(out: Path, pki: Path, endpoint: str) -> None:
    """The standard AWS config and credentials files for one client of the S3 server."""
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy2(pki / "ca.pem", out / "ca.pem")
    (out / "config").write_text(f"[default]\nregion = us-east-1\nendpoint_url = {endpoint}\n"
                                f"ca_bundle = {out / 'ca.pem'}\n")
    _write_private(out / "credentials", (
        f"[default]\naws_access_key_id = AKIA{secrets.token_hex(8).upper()}\n"
        f"aws_secret_access_key = {secrets.token_urlsafe(30)}\n").encode())


def _token(hsm_dir: Path, label: str) -> None:
    hsm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    so_pin = hsm_dir / "so.pin"
    user_pin = hsm_dir / "user.pin"
    _write_private(so_pin, secrets.token_urlsafe(24).encode())
    _write_private(user_pin, secrets.token_urlsafe(24).encode())
    try:
        _run("kms-broker", "hsm", "init", "--state-dir", str(hsm_dir), "--label", label,
             "--so-pin-file", str(so_pin), "--pin-file", str(user_pin))
    finally:
        so_pin.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--root", default="", help="prefix of every container path (CT_ROOT)")
    parser.add_argument("--tenant", default="acme", help="tenant id")
    parser.add_argument("--nodes", nargs="+", default=["node-a", "node-b"], help="node ids")
    parser.add_argument("--operator", default="ops", help="operator id")
    parser.add_argument("--listen", action="append", default=[], metavar="BROKER=HOST:PORT",
                        help="listen address of a broker (default 0.0.0.0:7443/7444)")
    parser.add_argument("--lease-ttl-ms", type=int, default=60000,
                        help="how long a released share's lease lasts before renewal")
    parser.add_argument("--s3-endpoint", default="https://s3:9000",
                        help="URL of the development S3 server, as the services reach it")
    parser.add_argument("--provider-state", choices=("sqlite", "postgres"), default="sqlite",
                        help="the provider broker's state: embedded SQLite, or the `postgres` "
                             "service (--postgres-url)")
    parser.add_argument("--postgres-url", default="",
                        help="postgresql:// URL of the `postgres` service (passfile=..., no "
                             "password), as the provider broker reaches it")
    args = parser.parse_args(argv)
    root = args.root.rstrip("/")
    if args.provider_state == "postgres" and not args.postgres_url:
        parser.error("--provider-state postgres needs --postgres-url")
    state = {"provider": args.postgres_url if args.provider_state == "postgres" else "sqlite",
             "tenant": "sqlite"}

    def at(container_path: str) -> Path:
        return Path(root + container_path)

    listen = {"provider": "0.0.0.0:7443", "tenant": "0.0.0.0:7444"}
    for item in args.listen:
        broker, sep, address = item.partition("=")
        if not sep or broker not in listen:
            parser.error(f"--listen takes BROKER=HOST:PORT with BROKER in {BROKERS}: {item!r}")
        listen[broker] = address

    pki = at("/pki")
    done = pki / "bootstrapped"
    if done.exists():
        _log("already bootstrapped; nothing to do")
        return 0

    _log("creating the development CA")
    _run("kms-broker", "certs", "ca", "--dir", str(pki), "--force")

    from attest.swtpm import LocalEkCa, manufacture

    _log("creating the EK manufacturer CA for the software TPMs")
    ek_ca = LocalEkCa.create(at("/var/lib/ek-ca"))
    for node in args.nodes:
        _log(f"manufacturing the TPM of {node} (swtpm state with an EK certificate)")
        manufacture(at(f"/var/lib/tpm-{node.removeprefix('node-')}"), ek_ca)
        _issue(pki, at(f"/var/lib/{node}/tls"), "node", node)

    template = string.Template(at("/deploy/config/broker.yaml.tmpl").read_text())
    for broker in BROKERS:
        data = at(f"/var/lib/{broker}-broker")
        hsm = at(f"/var/lib/{broker}-hsm")
        _log(f"{broker} broker: certificate, SoftHSM token, broker.yaml")
        _issue(pki, data / "tls", "broker", broker, f"{broker}-broker")
        _token(hsm, broker)
        (data / "ek-root.pem").write_bytes(ek_ca.root_cert_pem)
        (data / "ek-intermediates.pem").write_bytes(ek_ca.issuer_cert_pem)
        (data / "state").mkdir(parents=True, exist_ok=True, mode=0o700)
        (data / "broker.yaml").write_text(template.substitute(
            broker_id=broker, listen=listen[broker], data=str(data), hsm=str(hsm),
            cert=f"broker-{broker}", lease_ms=args.lease_ttl_ms,
            state=json.dumps(state[broker]),  # a JSON string is a YAML string
        ))

    _log(f"tenant {args.tenant} and operator {args.operator} certificates")
    _issue(pki, at("/var/lib/tenant"), "tenant", args.tenant)
    _issue(pki, at("/var/lib/operator"), "operator", args.operator)

    _log("development S3 server certificate and the AWS files of the tenant and nodes")
    _s3_server_cert(pki, at("/var/lib/s3/tls"))
    for home in ("/var/lib/tenant", *(f"/var/lib/{node}" for node in args.nodes)):
        _aws_files(at(f"{home}/aws"), pki, args.s3_endpoint)

    done.write_text("ok\n")
    _log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
