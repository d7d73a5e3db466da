"""``kms-broker serve --config broker.yaml``: the broker's configuration, read once at the edge.

Example::

    broker_id: provider                 # bound into sealing transcripts
    listen: 127.0.0.1:7443              # port 0: pick one, written to STATE/broker.port
    state_dir: /var/lib/kms-broker      # broker.db (SQLite), audit.log, audit.anchor
    state: sqlite                       # or postgresql://user@host:5432/db?passfile=/etc/pgpass
    tls: {ca: ca.pem, cert: broker.pem, key: broker.key}
    hsm:
      backend: pkcs11                   # pkcs11 | fake (tests only: not a custody boundary)
      module: /usr/lib/softhsm/libsofthsm2.so
      token_label: broker
      pin_file: hsm.pin                 # mode 0600; never argv or env
      softhsm_conf: softhsm2.conf       # optional, sets SOFTHSM2_CONF for this process
    verifiers: default                  # or a list of "module:factory" plugin names
    reference_values: {tpm2: {...}}     # passed to verifiers as VerificationContext.reference
    ek_roots: [ek-ca.pem]               # TPM manufacturer root CAs (PEM files) for enrolment
    ek_intermediates: []                # their intermediate CAs (PEM files), optional
    trusted_tenant_keys: {acme: <hex Ed25519 public key>}   # optional allow-list
    metrics_port: 9464                  # optional Prometheus endpoint on 127.0.0.1
    workers: 1                          # broker processes on one port (see kms_broker.workers)
    ttl_ms: {session: 30000, token: 60000, lease: 300000, upload: 600000, enrolment: 120000}
    limits:                             # per identity (kms_broker.limits); these are defaults
      rate_per_s: 100                   # requests per second per certificate identity
      burst: 500                        # token bucket size (a node's release is 3 calls)
      inflight_per_identity: 16         # unary calls of one identity handled at once
      streams_per_node: 8               # open WatchRevocations streams per node
      max_streams: 32                   # all streams of one process (at most 32)
      pending_sessions_per_node: 64     # unused challenges per node
      pending_uploads_per_tenant: 64    # open uploads per tenant
    janitor_interval_ms: 10000          # how often expired sessions/uploads/leases are purged
    audit_checkpoint_s: 2.0             # signed checkpoint + anchor at least this often

``state``: ``sqlite`` (the default, ``STATE_DIR/broker.db``) or a PostgreSQL URL
(``postgresql://`` or ``postgres://``, see :mod:`kms_broker.state.postgres`), shared by
several broker replicas. The URL must not carry a password: put it in a libpq password file
(``passfile=`` in the URL, mode 0600) or use client certificates (``sslcert=``/``sslkey=``).

Without ``ek_roots`` the broker refuses every TPM enrolment (``tpm2.ek_cert_untrusted``).

Relative paths are relative to the config file's directory.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import yaml

from kms_broker.limits import Limits

__all__ = ["BrokerConfig", "ConfigError", "HsmConfig", "load_config", "read_secret_file"]

MAX_CONFIG_BYTES = 1 << 20
MAX_PIN_BYTES = 255


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


@dataclass(frozen=True, slots=True, kw_only=True)
class HsmConfig:
    backend: Literal["pkcs11", "fake"]
    module: str = ""
    token_label: str = ""
    pin_file: Path | None = None
    softhsm_conf: Path | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerConfig:
    broker_id: str
    listen: str
    state_dir: Path
    ca: Path
    cert: Path
    key: Path
    hsm: HsmConfig
    verifiers: tuple[str, ...] | Literal["default"] = "default"
    reference_values: dict[str, Any] = field(default_factory=dict)
    trusted_tenant_keys: dict[str, bytes] = field(default_factory=dict)
    ek_roots: tuple[Path, ...] = ()
    ek_intermediates: tuple[Path, ...] = ()
    metrics_port: int | None = None
    ttl_ms: dict[str, int] = field(default_factory=dict)
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    janitor_interval_ms: int = 10_000
    audit_checkpoint_s: float = 2.0
    state: str = "sqlite"  # or a postgresql:// URL without a password


def read_secret_file(path: Path) -> bytearray:
    """Read a PIN file that must be a regular file only its owner can read (0600 or 0400)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ConfigError(f"cannot read PIN file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        raise ConfigError(f"PIN file {path} must be a regular file with mode 0600")
    if st.st_size > MAX_PIN_BYTES + 1:
        raise ConfigError(f"PIN file {path} is larger than {MAX_PIN_BYTES} bytes")
    with open(path, "rb") as f:
        data = bytearray(f.read(MAX_PIN_BYTES + 2))
    while data and data[-1:] in (b"\n", b"\r"):
        data.pop()
    if not data:
        raise ConfigError(f"PIN file {path} is empty")
    return data


def _path(base: Path, value: Any, key: str) -> Path:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a path")
    p = Path(value)
    return p if p.is_absolute() else base / p


def parse_state(value: Any) -> str:
    """``sqlite`` or a ``postgresql://`` URL that carries no password (a secret belongs in a
    password file, not in a config file that is copied, logged and diffed)."""
    if value is None or value == "sqlite":
        return "sqlite"
    if not isinstance(value, str) or not value.startswith(("postgresql://", "postgres://")):
        raise ConfigError("state must be sqlite or a postgresql:// URL")
    try:
        url = urlsplit(value)
        password, _port = url.password, url.port
        query = parse_qs(url.query, strict_parsing=False)
    except ValueError as exc:
        raise ConfigError(f"state: not a valid URL: {exc}") from None
    if password is not None or "password" in query:
        raise ConfigError("state: the URL must not carry a password; put it in a libpq "
                          "password file (passfile=...) or use client certificates")
    if not url.hostname and "host" not in query:
        raise ConfigError("state: the postgresql URL needs a host")
    return value


def load_config(path: Path) -> BrokerConfig:
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError("config file is too large")
    try:
        doc = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an integer past 4300 digits
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path} is nested too deeply") from None
    if not isinstance(doc, dict):
        raise ConfigError("config must be a mapping")
    known = {"broker_id", "listen", "state_dir", "tls", "hsm", "verifiers", "reference_values",
             "trusted_tenant_keys", "metrics_port", "ttl_ms", "ek_roots", "ek_intermediates",
             "workers", "limits", "janitor_interval_ms", "audit_checkpoint_s", "state"}
    if unknown := set(doc) - known:
        raise ConfigError(f"unknown config keys: {sorted(map(str, unknown))}")
    base = path.resolve().parent
    tls = doc.get("tls") or {}
    hsm = doc.get("hsm") or {}
    if not isinstance(tls, dict) or not isinstance(hsm, dict):
        raise ConfigError("tls and hsm must be mappings")
    backend = hsm.get("backend", "pkcs11")
    if backend not in ("pkcs11", "fake"):
        raise ConfigError("hsm.backend must be pkcs11 or fake")
    hsm_cfg = HsmConfig(
        backend=backend,
        module=str(hsm.get("module", "/usr/lib/softhsm/libsofthsm2.so")),
        token_label=str(hsm.get("token_label", "broker")),
        pin_file=_path(base, hsm["pin_file"], "hsm.pin_file") if backend == "pkcs11" else None,
        softhsm_conf=_path(base, hsm["softhsm_conf"], "hsm.softhsm_conf")
        if hsm.get("softhsm_conf") else None,
    )
    verifiers = doc.get("verifiers", "default")
    if verifiers != "default":
        if not isinstance(verifiers, list) or not all(isinstance(v, str) for v in verifiers):
            raise ConfigError('verifiers must be "default" or a list of "module:factory"')
        verifiers = tuple(verifiers)
    trusted: dict[str, bytes] = {}
    for tenant, key in (doc.get("trusted_tenant_keys") or {}).items():
        try:
            trusted[str(tenant)] = bytes.fromhex(str(key))
        except ValueError:
            raise ConfigError(f"trusted_tenant_keys.{tenant} must be hex") from None
    port = doc.get("metrics_port")
    if port is not None and (not isinstance(port, int) or not 0 <= port < 65536):
        raise ConfigError("metrics_port must be a port number")
    workers = doc.get("workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or not 1 <= workers <= 64:
        raise ConfigError("workers must be a whole number from 1 to 64")
    every = doc.get("audit_checkpoint_s", 2.0)
    if isinstance(every, bool) or not isinstance(every, int | float) or not 0.05 <= every <= 3600:
        raise ConfigError("audit_checkpoint_s must be a number of seconds from 0.05 to 3600")
    ttl = doc.get("ttl_ms") or {}
    if not isinstance(ttl, dict) or set(ttl) - {"session", "token", "lease", "upload",
                                                "enrolment"}:
        raise ConfigError("ttl_ms keys are session, token, lease, upload, enrolment")
    raw_limits = doc.get("limits") or {}
    if not isinstance(raw_limits, dict):
        raise ConfigError("limits must be a mapping")
    if unknown_limits := set(raw_limits) - set(Limits.__dataclass_fields__):
        raise ConfigError(f"unknown limits keys: {sorted(map(str, unknown_limits))}")
    try:
        limits = Limits(**raw_limits)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    janitor = doc.get("janitor_interval_ms", 10_000)
    if isinstance(janitor, bool) or not isinstance(janitor, int) or not (
        10 <= janitor <= 86_400_000
    ):
        raise ConfigError("janitor_interval_ms must be a whole number from 10 to 86400000")
    ek_files = {}
    for key in ("ek_roots", "ek_intermediates"):
        value = doc.get(key) or []
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list of PEM file paths")
        ek_files[key] = tuple(_path(base, v, key) for v in value)
    try:
        return BrokerConfig(
            broker_id=str(doc.get("broker_id", "broker")),
            listen=str(doc.get("listen", "127.0.0.1:7443")),
            state_dir=_path(base, doc.get("state_dir"), "state_dir"),
            ca=_path(base, tls.get("ca"), "tls.ca"),
            cert=_path(base, tls.get("cert"), "tls.cert"),
            key=_path(base, tls.get("key"), "tls.key"),
            hsm=hsm_cfg,
            verifiers=verifiers,
            reference_values=dict(doc.get("reference_values") or {}),
            trusted_tenant_keys=trusted,
            ek_roots=ek_files["ek_roots"],
            ek_intermediates=ek_files["ek_intermediates"],
            metrics_port=port,
            ttl_ms={k: int(v) for k, v in ttl.items()},
            workers=workers,
            limits=limits,
            janitor_interval_ms=janitor,
            audit_checkpoint_s=float(every),
            state=parse_state(doc.get("state")),
        )
    except KeyError as exc:
        raise ConfigError(f"missing config key {exc}") from None
