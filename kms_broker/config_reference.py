"""What each ``broker.yaml`` key means: the source of docs/reference/broker-yaml.md.

``scripts/gen_config_docs.py`` writes the page from :func:`entries`: the key names and
defaults come from the definitions (:class:`kms_broker.config.BrokerConfig`,
:class:`~kms_broker.config.HsmConfig`, :class:`kms_broker.limits.Limits`, the TTL defaults of
:class:`kms_broker.domain.deps.Settings`), the descriptions from :data:`DESCRIPTIONS`.
tests/docs/test_reference.py fails when a definition gains a key this table does not
describe, when a described key is not accepted by :func:`kms_broker.config.load_config`, or
when the page on disk differs from what the definitions generate.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

__all__ = ["DESCRIPTIONS", "Entry", "entries"]


class Entry(NamedTuple):
    key: str          # dotted YAML key
    kind: str         # what the value is
    default: str      # "required" or the default, as YAML would spell it
    description: str


REQUIRED = "required"

# YAML key -> (kind, description). The order here is the page's order.
DESCRIPTIONS: dict[str, tuple[str, str]] = {
    "broker_id": ("string", "This broker's id. Bound into every sealing transcript, so a share "
                  "sealed by one broker cannot be passed off as another's; clients and the "
                  "audit log name it."),
    "listen": ("host:port", "Where the gRPC server listens (mTLS only). Port 0 picks a free "
               "port; the port is written to `STATE_DIR/broker.port` once it listens."),
    "state_dir": ("path", "Directory for `broker.db` (SQLite), `audit.log`, "
                  "`audit.anchor` and the empty lock files `audit.log.anchoring` and "
                  "`broker.db.writers`. Created with "
                  "the broker's umask; keep it owner-only."),
    "state": ("`sqlite` or URL", "Where the broker keeps its state. `sqlite` (the default): "
              "`STATE_DIR/broker.db` and the audit log as files in `state_dir`, one machine. "
              "A `postgresql://user@host:5432/db?passfile=/etc/pgpass` URL: broker state and "
              "the audit log in PostgreSQL, shared by several `kms-broker serve` replicas on "
              "one HSM token (`kms_broker/state/postgres.py`). The URL must not carry a "
              "password: give it in a libpq password file (`passfile=`)."),
    "tls.ca": ("path", "PEM of the CA that issued client certificates (nodes, tenants, "
               "operators). A client's role and id come from its certificate."),
    "tls.cert": ("path", "This broker's certificate (PEM, serverAuth); its DNS/IP names must "
                 "match the address clients dial."),
    "tls.key": ("path", "This broker's TLS private key (PEM)."),
    "hsm.backend": ("pkcs11 | fake", "`pkcs11`: keys on a PKCS#11 token (SoftHSM2 or a "
                    "hardware HSM). `fake`: an in-process stand-in with no custody boundary, "
                    "refused unless `kms-broker serve --dev-insecure-fake-hsm`."),
    "hsm.module": ("path", "The PKCS#11 module (shared library) to load."),
    "hsm.token_label": ("string", "Label of the token holding this broker's keys "
                        "(`kms-broker hsm init --label`)."),
    "hsm.pin_file": ("path", "File holding the token's user PIN: a regular file of mode 0600 "
                     "or 0400, read once at start. Required for `pkcs11`. The PIN is never "
                     "taken from argv or the environment."),
    "hsm.softhsm_conf": ("path", "SoftHSM2 configuration (`hsm init` writes one beside the "
                         "token); sets SOFTHSM2_CONF for this process only."),
    "verifiers": ("`default` or list", "`default`: every built-in evidence verifier (tpm2, "
                  "sev-snp, tdx, nvidia, composite). Otherwise a list of `module:factory` "
                  "plugin names."),
    "reference_values": ("mapping", "Per evidence kind, the reference values handed to its "
                         "verifier (for tpm2: `boot_pcrs`, PCR index to hex SHA-256 value)."),
    "ek_roots": ("list of paths", "TPM manufacturer root CAs (PEM) that EK certificates must "
                 "chain to for enrolment. Empty: every TPM enrolment is refused."),
    "ek_intermediates": ("list of paths", "Intermediate CAs (PEM) for those chains."),
    "trusted_tenant_keys": ("mapping", "Optional allow-list: tenant id to the hex Ed25519 "
                            "public key it must register with."),
    "metrics_port": ("port", "Serve Prometheus metrics on 127.0.0.1 at this port (none when "
                     "absent)."),
    "workers": ("integer 1-64", "Broker processes sharing the port and state "
                "(`kms_broker/workers.py`); needs `hsm.backend: pkcs11` above 1. "
                "`serve --workers` overrides it."),
    "ttl_ms.session": ("milliseconds", "How long a challenge (nonce) stays valid."),
    "ttl_ms.token": ("milliseconds", "How long the release token an Attest returns is valid."),
    "ttl_ms.lease": ("milliseconds", "How long a released share's lease lasts before the node "
                     "must renew it (re-attesting)."),
    "ttl_ms.upload": ("milliseconds", "How long a tenant's started upload may take to finish."),
    "ttl_ms.enrolment": ("milliseconds", "Time between BeginEnrolNode and CompleteEnrolNode."),
    "limits.rate_per_s": ("number", "Requests per second per certificate identity (token "
                          "bucket rate); over it: RESOURCE_EXHAUSTED."),
    "limits.burst": ("integer", "Token bucket size (a node's release is three calls)."),
    "limits.inflight_per_identity": ("integer", "Unary calls of one identity handled at once."),
    "limits.streams_per_node": ("integer", "Open WatchRevocations streams per node."),
    "limits.max_streams": ("integer", "All open streams of one broker process."),
    "limits.pending_sessions_per_node": ("integer", "Unused challenges per node."),
    "limits.pending_uploads_per_tenant": ("integer", "Open uploads per tenant."),
    "janitor_interval_ms": ("milliseconds", "How often expired sessions, uploads and leases "
                            "are purged (10 to 86400000)."),
    "audit_checkpoint_s": ("seconds", "A signed checkpoint and HSM anchor of the audit log at "
                           "least this often (0.05 to 3600)."),
}

# defaults that live in load_config rather than in a dataclass
_LOADER_DEFAULTS = {"broker_id": "broker", "listen": "127.0.0.1:7443", "hsm.backend": "pkcs11",
                    "hsm.module": "/usr/lib/softhsm/libsofthsm2.so", "hsm.token_label": "broker"}
# BrokerConfig fields that YAML spells differently
_YAML_NAME = {"ca": "tls.ca", "cert": "tls.cert", "key": "tls.key"}


def _yaml(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict | list | tuple):
        return "{}" if isinstance(value, dict) else "[]"
    return str(value)


def _field_default(f: dataclasses.Field[Any]) -> str:
    if f.default is not dataclasses.MISSING:
        return _yaml(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return _yaml(f.default_factory())
    return REQUIRED


def defined_keys() -> dict[str, str]:
    """Every YAML key the definitions hold, with its default."""
    from kms_broker.config import BrokerConfig, HsmConfig
    from kms_broker.domain.deps import Settings
    from kms_broker.limits import Limits

    keys: dict[str, str] = {}
    for f in dataclasses.fields(BrokerConfig):
        if f.name == "hsm":
            for h in dataclasses.fields(HsmConfig):
                keys[f"hsm.{h.name}"] = _field_default(h)
        elif f.name == "limits":
            for lim in dataclasses.fields(Limits):
                keys[f"limits.{lim.name}"] = _field_default(lim)
        elif f.name == "ttl_ms":
            for s in dataclasses.fields(Settings):
                if s.name.endswith("_ttl_ms"):
                    keys[f"ttl_ms.{s.name.removesuffix('_ttl_ms')}"] = _field_default(s)
        else:
            keys[_YAML_NAME.get(f.name, f.name)] = _field_default(f)
    for key, default in _LOADER_DEFAULTS.items():
        keys[key] = default
    if keys.get("hsm.pin_file") == "none":
        keys["hsm.pin_file"] = "required for pkcs11"
    return keys


def entries() -> list[Entry]:
    """The page's rows, in :data:`DESCRIPTIONS` order; a key the definitions hold but the
    table lacks raises ``KeyError`` naming it."""
    defined = defined_keys()
    undocumented = sorted(set(defined) - set(DESCRIPTIONS))
    if undocumented:
        raise KeyError(f"broker.yaml keys without a description: {', '.join(undocumented)}")
    return [Entry(key, kind, defined.get(key, REQUIRED), text)
            for key, (kind, text) in DESCRIPTIONS.items()]
