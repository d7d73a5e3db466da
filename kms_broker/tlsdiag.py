"""Why a client cannot reach a broker, said on the client side.

gRPC reports every failed TLS handshake as ``UNAVAILABLE ... Socket closed``: an expired
client certificate, a certificate from another CA, or a broker certificate the client does
not trust all look like a network fault, and the reason appears only in the broker's log.
:func:`check_local` and :func:`probe` find the reason themselves, with the same material the
gRPC channel uses:

- :func:`check_local` (no network): the client certificate is readable, within its validity
  period, belongs to its key, and names the role the command needs (``tenant`` for tenant
  commands, ``operator`` for node commands; ``kms_broker.identity``).
- :func:`probe`: one TCP connection and TLS handshake (ALPN ``h2``, as gRPC) to the broker,
  with a deadline. It tells apart: nothing listening (refused), no answer (timeout), a name
  that does not resolve, a broker certificate not signed by the given CA (unknown CA) or not
  naming the address (``--server-name``), an expired broker certificate, and the broker's
  refusal of the client certificate (TLS alerts ``certificate expired``, ``unknown CA``,
  ``bad certificate``, ``certificate required``). TLS 1.3 sends the server's refusal after
  the client considers the handshake done, so the probe reads until the broker's first bytes
  (its HTTP/2 SETTINGS frame) or an alert. It also checks that the peer's certificate names a
  ``broker`` identity (wrong role).

Each finding is a :class:`TlsProblem` whose message says what to do. The probe sends nothing
but the handshake; no secret is printed (paths and certificate names only).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["TlsProblem", "Unreachable", "check_local", "probe"]


class TlsProblem(Exception):
    """The TLS handshake fails (or would) for a reason the message names."""


class Unreachable(Exception):
    """Nothing answers at the broker address. ``final``: refused or unresolvable (nothing
    listens there); otherwise slow (a timeout), which a longer wait may cure."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


@dataclass(frozen=True)
class _Material:
    ca: Path
    cert: Path
    key: Path


def _load_cert(path: Path):  # -> x509.Certificate
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise TlsProblem(f"{path} is not a PEM certificate") from None


def _issued_by(cert: Any, authority: Any, invalid: type[Exception]) -> bool:
    try:
        cert.verify_directly_issued_by(authority)
    except (ValueError, TypeError, invalid):
        return False
    return True


def check_local(ca: Path, cert: Path, key: Path, *, role: str | None,
                now: dt.datetime | None = None) -> None:
    """Raise :class:`TlsProblem` if the client material cannot work (see module docstring)."""
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import serialization

    from kms_broker.identity import identity_from_certificate

    now = now or dt.datetime.now(dt.UTC)
    certificate = _load_cert(cert)
    if certificate.not_valid_after_utc < now:
        raise TlsProblem(
            f"your client certificate {cert} expired on "
            f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC: the broker will refuse the "
            f"TLS handshake; issue a new one (kms-broker certs issue)")
    if certificate.not_valid_before_utc > now:
        raise TlsProblem(
            f"your client certificate {cert} is not valid before "
            f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (check this machine's clock)")
    try:
        authorities = x509.load_pem_x509_certificates(ca.read_bytes())
    except ValueError:
        raise TlsProblem(f"{ca} is not a PEM certificate (bundle)") from None
    # Only a CA of the same name can be checked here (a chain through an intermediate is left
    # to the handshake): same name but another key is a certificate from another CA.
    namesakes = [a for a in authorities if a.subject == certificate.issuer]
    if namesakes and not any(_issued_by(certificate, a, InvalidSignature) for a in namesakes):
        raise TlsProblem(
            f"your client certificate {cert} was not issued by the CA in {ca}, which signs the "
            f"broker's certificate: the broker does not trust the CA that issued your client "
            f"certificate (unknown CA); use a certificate from the broker's CA")
    try:
        private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    except (ValueError, TypeError):
        raise TlsProblem(f"{key} is not an unencrypted PEM private key") from None
    if private.public_key() != certificate.public_key():
        raise TlsProblem(f"the key {key} does not belong to the certificate {cert}")
    ident = identity_from_certificate(cert.read_bytes())
    if role is not None and (ident is None or ident.role != role):
        named = f"{ident}" if ident else "no kms-broker identity"
        raise TlsProblem(
            f"your client certificate {cert} names {named}, but this command needs "
            f"{'an' if role[0] in 'aeiou' else 'a'} {role} "
            f"certificate (wrong role): use the {role}'s certificate (kms-broker certs issue "
            f"--role {role})")


_ALERTS = {
    "CERTIFICATE_EXPIRED": "refused your client certificate as expired: issue a new one",
    "UNKNOWN_CA": "does not trust the CA that issued your client certificate (unknown CA): "
                  "use a certificate from the broker's CA",
    "BAD_CERTIFICATE": "refused your client certificate (bad certificate)",
    "CERTIFICATE_UNKNOWN": "refused your client certificate (certificate unknown)",
    "UNSUPPORTED_CERTIFICATE": "refused your client certificate (unsupported certificate)",
    "CERTIFICATE_REVOKED": "refused your client certificate as revoked",
    "CERTIFICATE_REQUIRED": "requires a client certificate and got none it accepts",
    "HANDSHAKE_FAILURE": "refused the TLS handshake (no common parameters)",
    "NO_APPLICATION_PROTOCOL": "does not speak HTTP/2 (is this a kms-broker port?)",
}


def _explain_ssl(exc: ssl.SSLError, address: str, server_name: str, ca: Path) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = (exc.verify_message or str(exc)).lower()
        if "expired" in why:
            return (f"the broker at {address} presents an expired certificate: the broker's "
                    f"operator must renew it")
        if "hostname" in why or "ip address mismatch" in why:
            return (f"the broker's certificate at {address} does not name {server_name!r}: "
                    f"give --server-name with the name it carries")
        if "issuer" in why or "self-signed" in why or "self signed" in why:
            return (f"the broker's certificate at {address} is not signed by the CA in {ca} "
                    f"(unknown CA): give the CA that issued the broker's certificate")
        return f"the broker's certificate at {address} is not trusted: {exc.verify_message}"
    reason = (exc.reason or "").upper()
    for key, text in _ALERTS.items():
        if key in reason:
            return f"the broker at {address} {text}"
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason or "PACKET_LENGTH" in reason:
        return f"{address} does not speak TLS (is this a kms-broker port?)"
    return f"TLS handshake with {address} failed: {exc.reason or exc}"


def probe(address: str, *, ca: Path, cert: Path, key: Path, server_name: str | None = None,
          timeout_s: float = 10.0) -> None:
    """One handshake to ``address`` (``HOST:PORT``): returns if the broker accepts this client
    and presents a broker certificate; else :class:`TlsProblem` or :class:`Unreachable`."""
    from kms_broker.clientconfig import parse_address
    from kms_broker.identity import identity_from_certificate

    host, port = parse_address(address)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    context.set_alpn_protocols(["h2"])
    name = server_name or host
    try:
        raw = socket.create_connection((host, port), timeout=timeout_s)
    except ConnectionRefusedError:
        raise Unreachable(f"nothing listens at {address} (connection refused): is the broker "
                          f"running, and is the port right?", final=True) from None
    except socket.gaierror as exc:
        raise Unreachable(f"cannot resolve {host!r}: {exc.strerror}", final=True) from None
    except TimeoutError:
        raise Unreachable(f"no answer from {address} within {timeout_s:g} s") from None
    except OSError as exc:
        raise Unreachable(f"cannot connect to {address}: {exc.strerror or exc}") from None
    with raw:
        try:
            with context.wrap_socket(raw, server_hostname=name) as tls:
                peer = tls.getpeercert(binary_form=True)
                # TLS 1.3: a refusal of our certificate arrives after the handshake
                with contextlib.suppress(TimeoutError):
                    if tls.recv(1) == b"":
                        raise TlsProblem(
                            f"the broker at {address} closed the connection right after the TLS "
                            f"handshake: it refused your client certificate (not from a CA it "
                            f"trusts, expired or revoked; its log says which)")
        except ssl.SSLError as exc:
            raise TlsProblem(_explain_ssl(exc, address, name, ca)) from None
        except TimeoutError:
            raise Unreachable(f"{address} accepted the connection but did not finish the TLS "
                              f"handshake within {timeout_s:g} s") from None
        except (ConnectionResetError, BrokenPipeError):
            raise TlsProblem(f"the broker at {address} closed the connection during the TLS "
                             f"handshake: it refused this client's certificate (see the "
                             f"broker's log)") from None
    if peer:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        pem = x509.load_der_x509_certificate(peer).public_bytes(serialization.Encoding.PEM)
        ident = identity_from_certificate(pem)
        if ident is not None and ident.role != "broker":  # a PKI without identities: no check
            raise TlsProblem(f"the server at {address} presents a certificate for {ident}, "
                             f"not a broker (wrong role): check the address")
