"""Peer identities from mTLS client certificates.

A certificate names exactly one identity ``(role, id)`` with role ``node``, ``tenant`` or
``operator``, as a URI subject alternative name ``urn:kmsbroker:<role>:<id>`` or, failing
that, a common name ``<role>:<id>``. ``kms_broker.certs`` issues certificates in this form.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.x509.oid import NameOID

from sealed.keys import validate_identifier

__all__ = ["ROLES", "Identity", "identity_from_certificate"]

ROLES = ("node", "tenant", "operator", "broker")
URI_PREFIX = "urn:kmsbroker:"


@dataclass(frozen=True, slots=True)
class Identity:
    role: str
    id: str

    def __str__(self) -> str:
        return f"{self.role}:{self.id}"


def _parse(text: str) -> Identity | None:
    role, sep, ident = text.partition(":")
    if not sep or role not in ROLES:
        return None
    try:
        validate_identifier(role, ident)
    except ValueError:
        return None
    return Identity(role, ident)


def identity_from_certificate(pem: bytes) -> Identity | None:
    """The identity a PEM certificate names, or None if it names none (or several)."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    found: set[Identity] = set()
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            if uri.startswith(URI_PREFIX) and (ident := _parse(uri[len(URI_PREFIX):])):
                found.add(ident)
    except x509.ExtensionNotFound:
        pass
    if not found:
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attr.value if isinstance(attr.value, str) else attr.value.decode()
            if ident := _parse(value):
                found.add(ident)
    return found.pop() if len(found) == 1 else None
