"""One client configuration for every ``kms-broker`` command that talks to a broker.

Each setting comes from the first of these that gives it:

1. a command-line flag;
2. an environment variable (names below);
3. the profile file: ``--profile-file FILE``, else ``$KMS_BROKER_PROFILE_FILE``, else
   ``$XDG_CONFIG_HOME/kms-broker/profiles.yaml`` (``~/.config/...``); the profile in it is
   ``--profile NAME``, else ``$KMS_BROKER_PROFILE``, else ``default``.

=============  =========================  ===========================  ==================
setting        flag                       environment variable         profile key
=============  =========================  ===========================  ==================
brokers        ``--broker HOST:PORT``     ``KMS_BROKER_ADDRESSES``     ``brokers``
               (repeat, in share order)   (comma-separated)            (list)
               replicas: ``A|B``          ``A|B,C``                    ``[[A, B], C]``
TLS directory  ``--tls DIR``              ``KMS_BROKER_TLS_DIR``       ``tls``
CA             ``--ca FILE``              ``KMS_BROKER_CA``            ``ca``
certificate    ``--cert FILE``            ``KMS_BROKER_CERT``          ``cert``
private key    ``--key FILE``             ``KMS_BROKER_KEY``           ``key``
TLS name       ``--server-name NAME``     ``KMS_BROKER_SERVER_NAME``   ``server_name``
tenant         ``--tenant ID``            ``KMS_BROKER_TENANT``        ``tenant``
tenant key     ``--tenant-key FILE``      ``KMS_BROKER_TENANT_KEY``    ``tenant_key``
=============  =========================  ===========================  ==================

A profile file is YAML, one mapping per profile; relative paths are relative to the file::

    default:
      brokers: [provider.example:7001, tenant.example:7002]
      tls: pki/          # ca.pem plus this client's <role>-<id>.pem and .key
      tenant: acme
      tenant_key: tenant.key

``--tls DIR`` (or its variable or key) stands for ``DIR/ca.pem`` and a client certificate and
key in DIR: the one for the role the command needs (``tenant-<tenant>.pem`` for tenant
commands, ``operator-*.pem`` for node commands), else ``client.pem``, else the only
``*.pem``/``*.key`` pair there. A file given alone (``--ca``, ``--cert``, ``--key``) at a
higher level overrides the one the directory gives.

A share holder that runs as several replicas (on one PostgreSQL database and HSM token) is
a replica set: its addresses joined by ``|`` (``--broker 'a.example:7001|b.example:7001'``)
or, in a profile, a list inside the list. Each command tries a set's replicas in turn and
leaves one that is unavailable for the next, for up to 30 s (:mod:`kms_broker.replicas`).

Every broker address must be ``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) or ``unix:PATH``:
gRPC would otherwise take a bare host to mean port 443. The resolved configuration holds
paths and names only; the key files are read when the channel is opened
(:meth:`ClientConfig.endpoints`), never logged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ENV",
    "ClientConfig",
    "ClientConfigError",
    "default_profile_file",
    "parse_address",
    "resolve",
]

ENV = {
    "brokers": "KMS_BROKER_ADDRESSES",
    "tls": "KMS_BROKER_TLS_DIR",
    "ca": "KMS_BROKER_CA",
    "cert": "KMS_BROKER_CERT",
    "key": "KMS_BROKER_KEY",
    "server_name": "KMS_BROKER_SERVER_NAME",
    "tenant": "KMS_BROKER_TENANT",
    "tenant_key": "KMS_BROKER_TENANT_KEY",
}
PROFILE_ENV = "KMS_BROKER_PROFILE"
PROFILE_FILE_ENV = "KMS_BROKER_PROFILE_FILE"
_PATH_KEYS = ("tls", "ca", "cert", "key", "tenant_key")
_KEYS = frozenset(ENV)
_HOST = re.compile(r"[A-Za-z0-9._-]{1,253}")


class ClientConfigError(ValueError):
    """The client configuration is missing something or is malformed (a usage error)."""


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port); anything else is a
    :class:`ClientConfigError` that says what to give."""
    text = text.strip()
    host, sep, port = text.rpartition(":")
    if text.startswith("["):
        ok = host.startswith("[") and host.endswith("]") and len(host) > 2
    else:
        ok = bool(_HOST.fullmatch(host))
    if not sep or not ok or not port.isdigit() or not 1 <= int(port) <= 65535:
        hint = f" (for example {text}:7001)" if sep == "" and _HOST.fullmatch(text) else ""
        raise ClientConfigError(
            f"broker address {text!r:.80} must be HOST:PORT{hint}; without a port gRPC would "
            f"use 443")
    return host.strip("[]"), int(port)


def default_profile_file(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "kms-broker" / "profiles.yaml"


@dataclass(frozen=True)
class ClientConfig:
    """Resolved client settings; ``sources`` says where each came from (flag, env, profile).
    ``brokers``: one entry per share holder, in share order; a replica set's addresses are
    joined by ``|`` (:meth:`holders` splits them)."""

    brokers: tuple[str, ...]
    ca: Path | None
    cert: Path | None
    key: Path | None
    server_name: str | None = None
    tenant: str | None = None
    tenant_key: Path | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def require_tls(self) -> tuple[Path, Path, Path]:
        missing = [n for n, v in (("ca", self.ca), ("cert", self.cert), ("key", self.key))
                   if v is None]
        if missing:
            raise ClientConfigError(
                f"no client TLS material ({', '.join(missing)}): give --tls DIR or "
                f"--ca/--cert/--key, or set {ENV['tls']} (or a profile, see "
                f"`kms-broker --help`)")
        assert self.ca and self.cert and self.key
        for what, path in (("CA", self.ca), ("certificate", self.cert), ("key", self.key)):
            if not path.is_file():
                raise ClientConfigError(f"TLS {what} {path} ({self.sources.get(what.lower(), '')}"
                                        f") is not a file".replace(" ()", ""))
        return self.ca, self.cert, self.key

    def require_brokers(self) -> tuple[str, ...]:
        if not self.brokers:
            raise ClientConfigError(
                f"no broker address: give --broker HOST:PORT, set {ENV['brokers']}, or add "
                f"brokers: to a profile")
        return self.brokers

    def require_tenant(self) -> str:
        if not self.tenant:
            raise ClientConfigError(f"no tenant: give --tenant ID or set {ENV['tenant']}")
        return self.tenant

    def require_tenant_key(self) -> Path:
        if self.tenant_key is None:
            raise ClientConfigError(
                f"no tenant signing key: give --tenant-key FILE (from `kms-broker tenant "
                f"init`) or set {ENV['tenant_key']}")
        return self.tenant_key

    def holders(self) -> tuple[tuple[str, ...], ...]:
        """Each share holder's addresses (one, or a replica set's), in share order."""
        from kms_broker.replicas import split_set

        return tuple(split_set(b) for b in self.brokers)

    def endpoints(self) -> list[list[Any]]:
        """One list of endpoints per share holder (its replicas, in the order to try)."""
        from kms_broker.rpc import BrokerEndpoint

        ca, cert, key = self.require_tls()
        self.require_brokers()
        return [[BrokerEndpoint.from_files(a, ca=ca, cert=cert, key=key,
                                           server_name=self.server_name) for a in holder]
                for holder in self.holders()]


def _load_profile(path: Path, name: str, explicit: bool) -> dict[str, Any]:
    import yaml

    if not path.is_file():
        if explicit:
            raise ClientConfigError(f"profile file {path} does not exist")
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError, ValueError) as exc:  # ValueError: an int past 4300 digits
        raise ClientConfigError(f"profile file {path}: {exc}") from None
    except RecursionError:
        raise ClientConfigError(f"profile file {path} is nested too deeply") from None
    if not isinstance(data, dict):
        raise ClientConfigError(f"profile file {path} must map profile names to settings")
    if name not in data:
        if explicit or name != "default":
            raise ClientConfigError(f"profile {name!r} is not in {path} (it has: "
                                    f"{', '.join(map(str, data)) or 'none'})")
        return {}
    profile = data[name]
    if not isinstance(profile, dict):
        raise ClientConfigError(f"profile {name!r} in {path} must be a mapping")
    unknown = sorted(set(map(str, profile)) - _KEYS)
    if unknown:
        raise ClientConfigError(f"profile {name!r} in {path}: unknown key(s) "
                                f"{', '.join(unknown)} (known: {', '.join(sorted(_KEYS))})")
    out: dict[str, Any] = {}
    for k, v in profile.items():
        if v is None:
            continue
        if k == "brokers":
            v = [v] if isinstance(v, str) else v
            if not isinstance(v, list) or not all(
                    isinstance(a, str) or (isinstance(a, list) and a
                                           and all(isinstance(r, str) for r in a)) for a in v):
                raise ClientConfigError(f"profile {name!r}: brokers must be a list of HOST:PORT "
                                        f"(a replica set: a list of HOST:PORT inside it)")
            v = [a if isinstance(a, str) else "|".join(a) for a in v]
        elif k in _PATH_KEYS:
            v = path.parent / Path(str(v)).expanduser()
        else:
            v = str(v)
        out[k] = v
    return out


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, var in ENV.items():
        value = environ.get(var, "").strip()
        if not value:
            continue
        if k == "brokers":
            out[k] = [a for a in (s.strip() for s in value.split(",")) if a]
        elif k in _PATH_KEYS:
            out[k] = Path(value).expanduser()
        else:
            out[k] = value
    return out


def _pick_cert(directory: Path, role: str | None, tenant: str | None) -> tuple[Path, Path]:
    if not directory.is_dir():
        raise ClientConfigError(f"TLS directory {directory} does not exist")
    pairs = sorted(p for p in directory.glob("*.pem")
                   if p.name != "ca.pem" and p.with_suffix(".key").is_file())
    wanted: list[Path] = []
    if role == "tenant" and tenant:
        wanted = [p for p in pairs if p.name == f"tenant-{tenant}.pem"]
    elif role:
        wanted = [p for p in pairs if p.name.startswith(f"{role}-")]
    if not wanted:
        wanted = [p for p in pairs if p.name == "client.pem"] or pairs
    if len(wanted) != 1:
        need = f"{role}-{tenant if role == 'tenant' and tenant else '<id>'}.pem" if role \
            else "client.pem"
        found = ", ".join(p.name for p in pairs) or "none"
        raise ClientConfigError(
            f"TLS directory {directory}: cannot tell which client certificate to use (want "
            f"{need} with its .key; found: {found}); give --cert and --key")
    return wanted[0], wanted[0].with_suffix(".key")


def resolve(flags: Mapping[str, Any], *, role: str | None = None,
            environ: Mapping[str, str] | None = None) -> ClientConfig:
    """Resolve the client configuration from ``flags`` (keys as in :data:`ENV` plus
    ``profile`` and ``profile_file``; None or empty means not given), the environment and the
    profile file. ``role``: which client certificate a ``--tls`` directory should give
    (``tenant`` or ``operator``)."""
    env = os.environ if environ is None else environ
    explicit_file = flags.get("profile_file") or env.get(PROFILE_FILE_ENV)
    profile_name = flags.get("profile") or env.get(PROFILE_ENV) or "default"
    profile_path = Path(explicit_file).expanduser() if explicit_file \
        else default_profile_file(env)
    profile = _load_profile(profile_path, profile_name,
                            explicit=bool(explicit_file or flags.get("profile")
                                          or env.get(PROFILE_ENV)))
    layers: list[tuple[str, dict[str, Any]]] = [
        ("flag", {k: v for k, v in flags.items() if k in _KEYS and v not in (None, [], "")}),
        (f"environment ({', '.join(sorted(ENV.values()))})", _env_layer(env)),
        (f"profile {profile_name!r} in {profile_path}", profile),
    ]
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, layer in layers:
        for k in ("brokers", "server_name", "tenant", "tenant_key"):
            if k not in values and k in layer:
                values[k], sources[k] = layer[k], source
    from kms_broker.replicas import split_set

    brokers = tuple(values.get("brokers", ()))
    addresses = [a for spec in brokers for a in split_set(spec)]
    for address in addresses:
        if not (address.startswith("unix:") and len(address) > 5):  # a local socket path
            parse_address(address)
    if len(set(addresses)) != len(addresses):
        raise ClientConfigError(f"a broker address is given twice: {', '.join(addresses)}")
    tenant = values.get("tenant")
    for source, layer in layers:  # TLS files: a single file beats a directory one level down
        from_dir: dict[str, Path] = {}
        if "tls" in layer:
            directory = Path(layer["tls"])
            from_dir["ca"] = directory / "ca.pem"
            from_dir["cert"], from_dir["key"] = (None, None) if all(
                k in values or k in layer for k in ("cert", "key")) else \
                _pick_cert(directory, role, tenant)
        for k in ("ca", "cert", "key"):
            if k in values:
                continue
            if k in layer:
                values[k], sources[k] = Path(layer[k]), source
            elif from_dir.get(k) is not None:
                values[k], sources[k] = from_dir[k], f"{source} (TLS directory)"
    return ClientConfig(
        brokers=brokers, ca=values.get("ca"), cert=values.get("cert"), key=values.get("key"),
        server_name=values.get("server_name"), tenant=values.get("tenant"),
        tenant_key=values.get("tenant_key"), sources=sources)


def flags_from(args: Any) -> dict[str, Any]:
    """The client flags of an argparse namespace (absent ones as None); ``--broker`` is
    ``brokers``."""
    names = (*ENV, "profile", "profile_file")
    flags = {n: getattr(args, n, None) for n in names}
    flags["brokers"] = getattr(args, "broker", None)
    return flags
