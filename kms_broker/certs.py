"""Development PKI for mTLS: a CA and broker, node, tenant and operator certificates.

``kms-broker certs ca|issue ...`` calls :func:`main`. Production deployments bring their own
CA; the certificate profile below is what the broker's interceptor expects either way.

Profile (all keys EC P-256, signatures ECDSA-SHA256):

- CA: ``CN=<name>``, basicConstraints CA:TRUE pathlen 0, keyUsage keyCertSign+cRLSign.
- Leaf: ``CN=<role>:<id>``, subjectAltName ``URI:urn:kmsbroker:<role>:<id>`` (the identity,
  parsed back by :func:`peer_identity` / ``kms_broker.identity``), basicConstraints CA:FALSE,
  keyUsage digitalSignature, extendedKeyUsage clientAuth, plus serverAuth for a ``broker``
  whose SAN also lists ``DNS:localhost``, ``IP:127.0.0.1`` and any extra names given.

Files: ``<dir>/ca.pem`` + ``<dir>/ca.key`` and ``<out>/<role>-<id>.pem`` + ``.key``.
Private keys are PKCS#8 PEM, created with mode 0600 (never world- or group-readable, not even
for an instant) and never overwritten unless ``force`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kms_broker.identity import ROLES, URI_PREFIX, Identity, identity_from_certificate
from sealed.keys import validate_identifier

__all__ = [
    "CaFiles",
    "IssuedFiles",
    "create_ca",
    "identity_uri",
    "issue",
    "load_ca",
    "main",
    "peer_identity",
]

MAX_DAYS = 3650
MAX_NAMES = 32
CA_CERT, CA_KEY = "ca.pem", "ca.key"


@dataclass(frozen=True, kw_only=True)
class CaFiles:
    cert_path: Path
    key_path: Path


@dataclass(frozen=True, kw_only=True)
class IssuedFiles:
    cert_path: Path
    key_path: Path
    ca_path: Path
    identity: Identity


def identity_uri(role: str, ident: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}; got {role!r:.40}")
    return f"{URI_PREFIX}{role}:{validate_identifier(role, ident)}"


def peer_identity(cert: x509.Certificate | bytes) -> Identity | None:
    """The single ``(role, id)`` a peer certificate (object, PEM or DER) names, else None."""
    if isinstance(cert, x509.Certificate):
        pem = cert.public_bytes(serialization.Encoding.PEM)
    elif isinstance(cert, bytes | bytearray):
        data = bytes(cert)
        if data.lstrip().startswith(b"-----BEGIN"):
            pem = data
        else:
            try:
                pem = x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.PEM)
            except ValueError:
                return None
    else:
        raise TypeError("certificate must be an x509.Certificate or PEM/DER bytes")
    return identity_from_certificate(pem)


def _check_days(days: int) -> int:
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"validity must be 1-{MAX_DAYS} days")
    return days


def _write_private_key(path: Path, key: ec.EllipticCurvePrivateKey, *, force: bool) -> None:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if force and path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def _write_public(path: Path, data: bytes, *, force: bool) -> None:
    if path.exists() and not force:
        raise FileExistsError(f"{path} exists; pass force to replace it")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    if force:
        return
    for path in paths:
        if path.exists():
            raise FileExistsError(f"{path} exists; pass force to replace it")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def create_ca(
    directory: str | os.PathLike[str],
    *,
    name: str = "ctrain development CA",
    days: int = 3650,
    force: bool = False,
) -> CaFiles:
    """Create ``ca.pem`` and ``ca.key`` (0600) in ``directory`` (made 0700 if new)."""
    _check_days(days)
    if not isinstance(name, str) or not 1 <= len(name) <= 64:
        raise ValueError("CA name must be 1-64 characters")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = out / CA_CERT, out / CA_KEY
    _refuse_existing([cert_path, key_path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private_key(key_path, key, force=force)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force=True)
    return CaFiles(cert_path=cert_path, key_path=key_path)


def load_ca(
    directory: str | os.PathLike[str],
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    base = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((base / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((base / CA_KEY).read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no CA in {base}: missing {Path(exc.filename).name}") from None
    except ValueError:
        raise ValueError(f"the CA files in {base} are not a PEM certificate and key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError("the CA key must be an EC key")
    if cert.public_key() != key.public_key():
        raise ValueError("the CA certificate and key do not belong together")
    return cert, key


def issue(
    ca_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    role: str,
    ident: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    days: int = 365,
    force: bool = False,
) -> IssuedFiles:
    """Issue a certificate for ``role:ident`` signed by the CA in ``ca_dir``.

    A ``broker`` certificate is also a TLS server certificate for localhost, 127.0.0.1 and the
    given DNS names / IP addresses; other roles are client certificates only.
    """
    uri = identity_uri(role, ident)
    _check_days(days)
    if len(dns_names) + len(ip_addresses) > MAX_NAMES:
        raise ValueError(f"at most {MAX_NAMES} extra names")
    if role != "broker" and (dns_names or ip_addresses):
        raise ValueError("only a broker certificate carries DNS names or IP addresses")
    ips = []
    for text in ip_addresses:
        try:
            ips.append(ipaddress.ip_address(text))
        except ValueError:
            raise ValueError(f"not an IP address: {text!r:.60}") from None
    for name in dns_names:
        if not isinstance(name, str) or not 1 <= len(name) <= 253 or not name.isascii():
            raise ValueError(f"not a DNS name: {name!r:.60}")
    ca_cert, ca_key = load_ca(ca_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    cert_path, key_path = out / f"{role}-{ident}.pem", out / f"{role}-{ident}.key"
    _refuse_existing([cert_path, key_path], force)

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if role == "broker":
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        wanted_dns = ["localhost", *[n for n in dns_names if n != "localhost"]]
        wanted_ips = [ipaddress.ip_address("127.0.0.1"), *[i for i in ips if str(i) != "127.0.0.1"]]
        names += [x509.DNSName(n) for n in wanted_dns]
        names += [x509.IPAddress(i) for i in wanted_ips]
    now = _now()
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{role}:{ident}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    _write_private_key(key_path, key, force=force)
    _write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM), force=True)
    return IssuedFiles(
        cert_path=cert_path,
        key_path=key_path,
        ca_path=Path(ca_dir) / CA_CERT,
        identity=Identity(role, ident),
    )


# --- command line ------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kms-broker certs",
        description="Development CA and mTLS certificates for brokers, nodes, tenants, operators.",
    )
    sub = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = sub.add_parser("ca", help="create a CA (ca.pem, ca.key) in a directory")
    p.add_argument("--dir", type=Path, required=True, help="where ca.pem and ca.key go")
    p.add_argument("--name", default="ctrain development CA", help="CA common name")
    p.add_argument("--days", type=int, default=3650, help="validity in days (max 3650)")
    p.add_argument("--force", action="store_true", help="replace an existing CA")
    p = sub.add_parser("issue", help="issue a certificate signed by the CA")
    p.add_argument("--ca-dir", type=Path, required=True, help="directory holding ca.pem/ca.key")
    p.add_argument("--out", type=Path, required=True, help="where <role>-<id>.pem/.key go")
    p.add_argument("--role", choices=ROLES, required=True)
    p.add_argument("--id", dest="ident", required=True, help="node, tenant, operator or broker id")
    p.add_argument("--dns", action="append", default=[], help="extra DNS name (broker only)")
    p.add_argument("--ip", action="append", default=[], help="extra IP address (broker only)")
    p.add_argument("--days", type=int, default=365, help="validity in days (max 3650)")
    p.add_argument("--force", action="store_true", help="replace existing files")
    for action in sub.choices.values():
        action.add_argument("--format", "-o", choices=("text", "json"), default="text",
                            help="json: one JSON document on stdout")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.action == "ca":
            ca = create_ca(args.dir, name=args.name, days=args.days, force=args.force)
            if args.format == "json":
                print(json.dumps({"cert": str(ca.cert_path), "key": str(ca.key_path)}))
            else:
                print(f"CA certificate {ca.cert_path}, key {ca.key_path} (0600)")
        else:
            issued = issue(
                args.ca_dir,
                args.out,
                role=args.role,
                ident=args.ident,
                dns_names=args.dns,
                ip_addresses=args.ip,
                days=args.days,
                force=args.force,
            )
            if args.format == "json":
                print(json.dumps({"identity": str(issued.identity), "role": args.role,
                                  "id": args.ident, "cert": str(issued.cert_path),
                                  "key": str(issued.key_path)}))
            else:
                print(f"{issued.identity}: certificate {issued.cert_path}, key "
                      f"{issued.key_path} (0600)")
    except (ValueError, FileExistsError, FileNotFoundError, PermissionError) as exc:
        print(f"kms-broker certs: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
